"""Real kernel objects for tests: network namespaces and veth pairs.

Everything is made with iproute2 (an independent implementation, so tests do
not check our netlink code with itself) and removed on exit, even on failure.
Names carry a random suffix so parallel or leftover runs never collide.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType

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
        out = Path(tempfile.mkdtemp(prefix="afxdp-test-")) / "xdp_pass.o"
        triplet = subprocess.run(["gcc", "-dumpmachine"], capture_output=True, text=True,
                                 check=True).stdout.strip()  # fmt: skip
        subprocess.run(["clang", "-O2", "-g", "-target", "bpf", f"-I/usr/include/{triplet}", "-c",
                        str(Path(__file__).parent / "bpf" / "xdp_pass.c"), "-o", str(out)],
                       check=True)  # fmt: skip
        _FOREIGN_OBJ.append(out)
    ip("link", "set", "dev", dev, "xdpgeneric", "obj", str(_FOREIGN_OBJ[0]), "sec", "xdp")
    link = json.loads(ip("-j", "-d", "link", "show", dev))[0]
    return int(link["xdp"]["prog"]["id"])


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
