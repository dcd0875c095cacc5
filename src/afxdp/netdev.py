"""A network device as the node sees it: plain data, no I/O (``inventory``
reads it; ``pools`` and the rest use it)."""

from __future__ import annotations

import re
from typing import Any

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


IFNAMSIZ = 16  # the kernel's bound on a netdev name, its NUL included
_NAME_BAD = re.compile(r"[/:\s\0]")


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a Linux netdev name; None when it can.

    The kernel's rule (``dev_valid_name``): 1 to IFNAMSIZ - 1 bytes, not "."
    or "..", no "/", ":" or whitespace (NUL ends a C string: none either). A
    name that passes is one plain path component, so joining it to one of
    afxdpd's directories (a device's socket dir, its pin dir) stays inside.
    """
    try:
        size = len(name.encode())
    except UnicodeEncodeError:
        return f"{name!r} is not UTF-8"
    if not 0 < size < IFNAMSIZ:
        return f"{name!r} is not 1 to {IFNAMSIZ - 1} bytes long"
    if name in (".", "..") or _NAME_BAD.search(name):
        return f"{name!r} is '.', '..' or has '/', ':', NUL or whitespace"
    return None


def description_problem(doc: dict[str, Any], name: str) -> str | None:
    """Why ``doc`` (a NetDev as builtins, kept in a durable record for device
    ``name``, to pool it while it is in a pod) cannot describe ``name``; None
    when it can, or is empty (nothing was known)."""
    if not doc:
        return None
    try:
        described = msgspec.convert(doc, NetDev)
    except msgspec.ValidationError as exc:
        return f"its netdev is not a description of one ({exc})"
    if described.name != name:
        return f"its netdev describes {described.name!r}"
    return None
