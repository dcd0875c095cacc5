"""Fakes, only where the real thing cannot exist on the test machines.

FakeSubfunctions stands in for devlink subfunctions on an ``ice`` NIC with CDQ
firmware: this kernel has no devlink and the machine has no such NIC. With
``links=True`` each "subfunction" it creates is a real veth pair, so that the
rest of an allocation (XDP, UDS server) runs on a real netdev.
"""

from __future__ import annotations

import subprocess

from afxdp.errors import DeviceError
from afxdp.inventory import NetDev


class FakeSubfunctions:
    """FAKE SecondaryDeviceProvider: records creations instead of calling devlink."""

    def __init__(
        self,
        capable_drivers: frozenset[str] = frozenset({"ice"}),
        capacity: int = 64,
        *,
        links: bool = False,
    ) -> None:
        self.capable_drivers = capable_drivers
        self.max = capacity
        self.links = links
        self.created: list[str] = []
        self.deleted: list[str] = []

    def capacity(self, primary: NetDev) -> int:
        return self.max if primary.driver in self.capable_drivers else 0

    def name(self, primary: NetDev, index: int) -> str:
        return f"{primary.name}sf{index}"

    def create(self, primary: NetDev, index: int) -> str:
        name = self.name(primary, index)
        if name in self.created:
            raise DeviceError(f"{name}: already exists")
        if self.links:
            _ip("link", "add", name, "type", "veth", "peer", "name", peer_of(name))
            for link in (name, peer_of(name)):
                _ip("link", "set", link, "up")
        self.created.append(name)
        return name

    def delete(self, name: str) -> None:
        if name in self.created:
            if self.links:
                _ip("link", "del", name)
            self.created.remove(name)
            self.deleted.append(name)


def peer_of(secondary: str) -> str:
    """The veth peer of a fake secondary (IFNAMSIZ allows the extra letter)."""
    return f"{secondary}p"


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise DeviceError(f"ip {' '.join(args)}: {done.stderr.strip()}")
