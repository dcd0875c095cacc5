"""Real kernel objects for tests: network namespaces and veth pairs, and a
FUSE file whose reads hang (a hung filesystem, served by the test itself).

Everything is made with iproute2 (an independent implementation, so tests do
not check our netlink code with itself) and removed on exit, even on failure.
Names carry a random suffix so parallel or leftover runs never collide.
"""

from __future__ import annotations

import atexit
import ctypes
import errno
import json
import os
import secrets
import select
import shutil
import stat
import struct
import subprocess
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import TypeVar

T = TypeVar("T")

_CAPS = {"CAP_NET_ADMIN": 12, "CAP_SYS_ADMIN": 21, "CAP_NET_RAW": 13}


def privilege_problem() -> str | None:
    """Why privileged tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "not running as root"
    status = Path("/proc/self/status").read_text()
    cap_eff = int(next(ln for ln in status.splitlines() if ln.startswith("CapEff:")).split()[1], 16)
    missing = [name for name, bit in _CAPS.items() if not cap_eff >> bit & 1]
    if missing:
        return f"missing capabilities {', '.join(missing)}"
    return None


def ip(*args: str, netns: str | None = None) -> str:
    cmd = ["ip", *(["-n", netns] if netns else []), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {done.stderr.strip()}")
    return done.stdout


_FOREIGN_OBJ: list[Path] = []


def foreign_xdp(dev: str) -> int:
    """Attach somebody else's XDP program (loaded by iproute2, not by us) to
    ``dev`` in generic mode; its program id."""
    if not _FOREIGN_OBJ:
        build = tempfile.mkdtemp(prefix="afxdp-test-")
        atexit.register(shutil.rmtree, build, ignore_errors=True)
        out = Path(build) / "xdp_pass.o"
        triplet = subprocess.run(["gcc", "-dumpmachine"], capture_output=True, text=True,
                                 check=True).stdout.strip()  # fmt: skip
        subprocess.run(["clang", "-O2", "-g", "-target", "bpf", f"-I/usr/include/{triplet}", "-c",
                        str(Path(__file__).parent / "bpf" / "xdp_pass.c"), "-o", str(out)],
                       check=True)  # fmt: skip
        _FOREIGN_OBJ.append(out)
    ip("link", "set", "dev", dev, "xdpgeneric", "obj", str(_FOREIGN_OBJ[0]), "sec", "xdp")
    link = json.loads(ip("-j", "-d", "link", "show", dev))[0]
    return int(link["xdp"]["prog"]["id"])


_CAPABILITY_VERSION_3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [(f, ctypes.c_uint32) for f in ("effective", "permitted", "inheritable")]


def without_capability(cap: str, fn: Callable[..., T], *args: object) -> T:
    """``fn(*args)`` in a fresh thread whose effective set lacks ``cap``.

    Linux capabilities are per thread, so the rest of the test process keeps
    them: a real EPERM from the kernel, not a faked one.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        header = _CapHeader(_CAPABILITY_VERSION_3, 0)
        data = (_CapData * 2)()
        if libc.capget(ctypes.byref(header), data) != 0:
            error.append(OSError(ctypes.get_errno(), "capget"))
            return
        data[0].effective &= ~(1 << _CAPS[cap])
        if libc.capset(ctypes.byref(header), data) != 0:
            error.append(OSError(ctypes.get_errno(), "capset"))
            return
        try:
            result.append(fn(*args))
        except BaseException as exc:  # re-raised in the caller's thread
            error.append(exc)

    thread = threading.Thread(target=target, name=f"without-{cap}")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


class Lab:
    """Creates namespaces and veth pairs; tears all of them down on exit."""

    def __init__(self) -> None:
        self.tag = secrets.token_hex(3)
        self.namespaces: list[str] = []
        self.host_links: list[str] = []

    def name(self, stem: str) -> str:
        """A unique name of at most 15 characters (IFNAMSIZ - 1)."""
        return f"{stem}{self.tag}"[:15]

    def netns(self, stem: str = "afxt") -> str:
        ns = self.name(stem)
        ip("netns", "add", ns)
        self.namespaces.append(ns)
        ip("link", "set", "lo", "up", netns=ns)
        return ns

    def veth(
        self, a: str, b: str, *, netns: str | None = None, queues: int = 1, mac: str | None = None
    ) -> tuple[str, str]:
        """A veth pair ``a``/``b`` in ``netns`` (the host when None)."""
        q = ["numtxqueues", str(queues), "numrxqueues", str(queues)]
        addr = ["address", mac] if mac else []
        ip("link", "add", a, *q, *addr, "type", "veth", "peer", "name", b, *q, netns=netns)
        if netns is None:
            self.host_links.append(a)
        return a, b

    def bridge(self, stem: str = "afbr") -> str:
        """A bridge in the host netns: a link kind without native XDP."""
        name = self.name(stem)
        ip("link", "add", name, "type", "bridge")
        self.host_links.append(name)
        return name

    def __enter__(self) -> Lab:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for link in self.host_links:
            subprocess.run(["ip", "link", "del", link], capture_output=True, check=False)
        for ns in self.namespaces:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


_libc = ctypes.CDLL(None, use_errno=True)
_FUSE_IN = struct.Struct("=IIQQIIII")  # len, opcode, unique, nodeid, uid, gid, pid, padding
_FUSE_OUT = struct.Struct("=IiQ")  # len, -errno, unique
# ino, size, blocks, a/m/ctime, their nsecs, mode, nlink, uid, gid, rdev, blksize, flags
_FUSE_ATTR = struct.Struct("=QQQQQQIIIIIIIIII")
_LOOKUP, _GETATTR, _OPEN, _READ, _RELEASE, _FLUSH, _INIT = 1, 3, 14, 15, 18, 25, 26
_FOPEN_DIRECT_IO = 1  # every read reaches the server: no page cache answers it
_MNT_DETACH = 2


class HungFile:
    """A regular file (``path``) on a FUSE filesystem this object serves on
    /dev/fuse itself: lookups, stats and opens are answered, reads never are,
    as on a hung network filesystem (stats too with ``stat_hangs``). ``reading`` is set once a read waits. On
    exit the filesystem goes and the waiting reads fail (ECONNABORTED)."""

    NAME = "config.json"

    def __init__(self, mountpoint: Path) -> None:
        self.mountpoint = mountpoint
        self.path = mountpoint / self.NAME
        self.reading = threading.Event()
        # Whether a stat of the file (its lookup) hangs too; ``stating`` is set
        # once one waits.
        self.stat_hangs = False
        self.stating = threading.Event()
        self._fd = -1
        self._stop_r, self._stop_w = os.pipe()

    def __enter__(self) -> HungFile:
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        self._fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        opts = f"fd={self._fd},rootmode=40000,user_id=0,group_id=0".encode()
        if _libc.mount(b"afxdp-hung", str(self.mountpoint).encode(), b"fuse", 0, opts) != 0:
            err = ctypes.get_errno()
            self._close()
            raise OSError(err, f"mount fuse on {self.mountpoint}: {os.strerror(err)}")
        self._thread = threading.Thread(target=self._serve, name="hung-fuse", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Unmount; the waiting reads fail. Once is enough: again does nothing."""
        if self._fd < 0:
            return
        os.write(self._stop_w, b"x")
        self._thread.join()
        _libc.umount2(str(self.mountpoint).encode(), _MNT_DETACH)
        self._close()  # the connection ends with its fd: waiting reads fail

    def _close(self) -> None:
        for fd in (self._fd, self._stop_r, self._stop_w):
            os.close(fd)
        self._fd = -1

    def _attr(self, node: int) -> bytes:
        mode, size = (stat.S_IFDIR | 0o755, 0) if node == 1 else (stat.S_IFREG | 0o644, 4096)
        return _FUSE_ATTR.pack(node, size, 8, 0, 0, 0, 0, 0, 0, mode, 1, 0, 0, 0, 4096, 0)

    def _reply(self, unique: int, body: bytes = b"", error: int = 0) -> None:
        os.write(self._fd, _FUSE_OUT.pack(_FUSE_OUT.size + len(body), -error, unique) + body)

    def _serve(self) -> None:
        while self._stop_r not in select.select([self._fd, self._stop_r], [], [])[0]:
            try:
                msg = os.read(self._fd, 1 << 20)
            except InterruptedError:
                continue
            _len, op, unique, node, *_ = _FUSE_IN.unpack_from(msg)
            body = msg[_FUSE_IN.size :]
            if op == _INIT:  # protocol 7.31; the kernel's readahead; 64 KiB writes
                readahead = struct.unpack_from("=III", body)[2]
                self._reply(unique, struct.pack("=IIIIHHIIHHI7I", 7, 31, readahead, 0, 0, 0,
                                                1 << 16, 1, 0, 0, 0, *[0] * 7))  # fmt: skip
            elif op == _LOOKUP and node == 1 and body.rstrip(b"\0") == self.NAME.encode():
                if self.stat_hangs:
                    self.stating.set()  # and never answered
                    continue
                self._reply(unique, struct.pack("=QQQQII", 2, 0, 0, 0, 0, 0) + self._attr(2))
            elif op == _GETATTR:
                self._reply(unique, struct.pack("=QII", 0, 0, 0) + self._attr(node))
            elif op == _OPEN:
                self._reply(unique, struct.pack("=QII", 0, _FOPEN_DIRECT_IO, 0))
            elif op == _READ:
                self.reading.set()  # and never answered
            elif op in (_RELEASE, _FLUSH):
                self._reply(unique)
            else:
                self._reply(unique, error=errno.ENOENT if op == _LOOKUP else errno.ENOSYS)
