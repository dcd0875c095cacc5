"""A network device as the node sees it: plain data, no I/O (``inventory``
reads it; ``pools`` and the rest use it)."""

from __future__ import annotations

import msgspec

# Operational states in which a link can carry traffic. Virtual links that do
# not report carrier stay "unknown" while up (the kernel's own convention).
_USABLE_OPER_STATES = frozenset({"up", "unknown"})


class NetDev(msgspec.Struct, frozen=True, kw_only=True):
    """One network device of the node, as seen in one netns."""

    name: str
    ifindex: int
    # Kernel driver behind the device (sysfs ``device/driver``); for a virtual
    # device, its link kind ("veth", "bridge"...), which is what users write.
    driver: str
    kind: str | None = None
    pci: str | None = None
    mac: str | None = None
    ipv4: tuple[str, ...] = ()
    oper_state: str = "unknown"
    admin_up: bool = False
    rx_queues: int = 1
    tx_queues: int = 1
    numa_node: int | None = None
    # True when no hardware device stands behind the netdev.
    virtual: bool = True

    @property
    def link_up(self) -> bool:
        """Administratively up and operationally usable."""
        return self.admin_up and self.oper_state in _USABLE_OPER_STATES
