"""Secondary devices (cdq mode): the interface pools need, and its devlink side.

In cdq mode a pool hands out subfunctions created on a primary NIC port
(Intel "Container Dedicated Queues" on ``ice``). Pool assembly only needs the
pure part (which primaries can back secondaries, and their names); creating and
deleting them is I/O done at allocation and release time.
"""

from __future__ import annotations

import re
import subprocess
from typing import Protocol

from afxdp.errors import DeviceError
from afxdp.netdev import NetDev

# The original created a fixed number of subfunction slots per primary.
MAX_SECONDARIES = 64
CDQ_DRIVERS = frozenset({"ice"})


class SecondaryDeviceProvider(Protocol):
    """Makes secondary netdevs on top of a primary one."""

    def capacity(self, primary: NetDev) -> int:
        """How many secondaries ``primary`` can back; 0 when it cannot (pure)."""
        ...

    def name(self, primary: NetDev, index: int) -> str:
        """The netdev name of secondary ``index`` (1-based) of ``primary`` (pure)."""
        ...

    def create(self, primary: NetDev, index: int) -> str:
        """Create secondary ``index`` of ``primary`` (blocking); returns its netdev name."""
        ...

    def delete(self, name: str) -> None:
        """Delete the secondary netdev ``name`` (blocking); absent is not an error."""
        ...


class DevlinkSubfunctions:
    """Subfunctions through the ``devlink`` CLI, as the original did.

    It needs an ``ice`` NIC with CDQ firmware and a kernel with devlink; neither
    exists on the project's build machines, so tests use a named fake instead.
    """

    def __init__(self, devlink: str = "devlink") -> None:
        self.devlink = devlink

    def capacity(self, primary: NetDev) -> int:
        return MAX_SECONDARIES if primary.driver in CDQ_DRIVERS and primary.pci else 0

    def name(self, primary: NetDev, index: int) -> str:
        # The kernel names an ice subfunction netdev after its parent port.
        return f"{primary.name}sf{index}"

    def _run(self, *args: str) -> str:
        try:
            done = subprocess.run(
                [self.devlink, *args], capture_output=True, text=True, timeout=10, check=True
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise DeviceError(f"devlink {' '.join(args)}: {exc}") from exc
        return done.stdout

    def _port_of(self, netdev: str) -> tuple[str, str] | None:
        """(port index ``pci/<bdf>/<n>``, pfnum) of a netdev, from ``devlink port list``."""
        for line in self._run("port", "list").splitlines():
            if re.search(rf"\bnetdev {re.escape(netdev)}\b", line):
                pfnum = re.search(r"\bpfnum (\d+)", line)
                return line.split(": ", 1)[0], pfnum.group(1) if pfnum else "0"
        return None

    def create(self, primary: NetDev, index: int) -> str:
        port = self._port_of(primary.name)
        if port is None or primary.pci is None:
            raise DeviceError(f"{primary.name}: devlink knows no port for this netdev")
        out = self._run(
            "port", "add", f"pci/{primary.pci}", "flavour", "pcisf", "pfnum", port[1],
            "sfnum", str(index),
        )  # fmt: skip
        new_port = out.split(": ", 1)[0].strip()
        self._run("port", "function", "set", new_port, "state", "active")
        return self.name(primary, index)

    def delete(self, name: str) -> None:
        port = self._port_of(name)
        if port is None:
            return
        self._run("port", "function", "set", port[0], "state", "inactive")
        self._run("port", "del", port[0])
