"""Real kernel objects for tests: network namespaces and veth pairs.

Everything is made with iproute2 (an independent implementation, so tests do
not check our netlink code with itself) and removed on exit, even on failure.
Names carry a random suffix so parallel or leftover runs never collide.
"""

from __future__ import annotations

import atexit
import ctypes
import json
import os
import secrets
import shutil
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
