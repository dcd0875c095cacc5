"""Fakes, only where the real thing cannot exist on the test machines.

FakeSubfunctions stands in for devlink subfunctions on an ``ice`` NIC with CDQ
firmware: this kernel has no devlink and the machine has no such NIC.
"""

from __future__ import annotations

from afxdp.errors import DeviceError
from afxdp.inventory import NetDev


class FakeSubfunctions:
    """FAKE SecondaryDeviceProvider: records creations instead of calling devlink."""

    def __init__(self, capable_drivers: frozenset[str] = frozenset({"ice"}), capacity: int = 64):
        self.capable_drivers = capable_drivers
        self.max = capacity
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
        self.created.append(name)
        return name

    def delete(self, name: str) -> None:
        if name in self.created:
            self.created.remove(name)
            self.deleted.append(name)
