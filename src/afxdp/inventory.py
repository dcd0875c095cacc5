"""What netdevs this node has: read from netlink (pyroute2) and sysfs.

pyroute2's asyncio transport does not work under uvloop (pyroute2 #1335), and
the main loop is uvloop, so netlink is read with the synchronous ``IPRoute`` in
a worker thread (``scan``). The reading itself is a plain function so the CLI
and tests can call it directly.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute, NetlinkError

from afxdp.netdev import NetDev
from afxdp.workers import Work, run_sync

__all__ = ["NetDev", "read_inventory", "read_one", "scan", "unprivileged_bpf_disabled"]

SYSFS = Path("/sys")
PROCFS = Path("/proc")


def _pci_address(device_dir: Path) -> str | None:
    """The PCI function behind a netdev's ``device`` link, walking up through
    intermediate buses such as virtio (``0000:00:03.0/virtio2``)."""
    try:
        path = device_dir.resolve(strict=True)
    except OSError:
        return None
    for node in (path, *path.parents):
        subsystem = node / "subsystem"
        if subsystem.is_symlink() and subsystem.resolve().name == "pci":
            return node.name
    return None


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _sysfs_facts(name: str, sysfs: Path) -> tuple[str | None, str | None, int | None]:
    """(driver, pci, numa_node) from sysfs; all None for virtual devices."""
    device = sysfs / "class" / "net" / name / "device"
    if not device.exists():
        return None, None, None
    driver_link = device / "driver"
    driver = driver_link.resolve().name if driver_link.exists() else None
    numa = _read_int(device / "numa_node")
    return driver, _pci_address(device), (numa if numa is not None and numa >= 0 else None)


def build_netdevs(
    links: Iterable[Any], addrs: Iterable[Any], sysfs: Path | None = None
) -> tuple[NetDev, ...]:
    """Turn netlink link and IPv4 address messages into NetDevs, sorted by name.

    ``sysfs`` defaults to ``SYSFS``, looked up at call time so that tests can
    point the whole service at a fake sysfs tree (NUMA nodes of veths).
    """
    sysfs = SYSFS if sysfs is None else sysfs
    ipv4: dict[int, list[str]] = {}
    for a in addrs:
        ipv4.setdefault(a["index"], []).append(f"{a.get('address')}/{a['prefixlen']}")
    out = []
    for m in links:
        name = m.get("ifname")
        if not name:
            continue
        info = m.get("linkinfo")
        kind = info.get("kind") if info is not None else None
        driver, pci, numa = _sysfs_facts(name, sysfs)
        mac = m.get("address")
        out.append(
            NetDev(
                name=name,
                ifindex=m["index"],
                driver=driver or kind or "",
                kind=kind,
                pci=pci,
                mac=mac.lower() if mac else None,
                ipv4=tuple(ipv4.get(m["index"], ())),
                oper_state=str(m.get("operstate") or "unknown").lower(),
                admin_up=bool(m["flags"] & 1),  # IFF_UP
                rx_queues=m.get("num_rx_queues") or 1,
                tx_queues=m.get("num_tx_queues") or 1,
                numa_node=numa,
                virtual=driver is None,
            )
        )
    out.sort(key=lambda d: d.name)
    return tuple(out)


def read_inventory(sysfs: Path | None = None) -> tuple[NetDev, ...]:
    """Read the netdevs of the calling thread's netns (blocking)."""
    with IPRoute() as ipr:
        links = ipr.get_links()
        addrs = ipr.get_addr(family=socket.AF_INET)
    return build_netdevs(links, addrs, sysfs)


def index_of(name: str) -> int | None:
    """The ifindex of ``name`` in the calling thread's netns, or None. An ioctl
    (6 us): netlink's lookup by name walks every link (1 ms at 1,000 links)."""
    try:
        return socket.if_nametoindex(name)
    except OSError:
        return None


def read_one(name: str, sysfs: Path | None = None) -> NetDev | None:
    """One netdev of the calling thread's netns, or None (blocking)."""
    index = index_of(name)
    if index is None:
        return None
    with IPRoute() as ipr:
        try:
            links = ipr.get_links(index)
        except NetlinkError as exc:  # gone since: ENODEV
            if exc.code == errno.ENODEV:
                return None
            raise
        addrs = ipr.get_addr(family=socket.AF_INET, index=index)
    devs = build_netdevs(links, addrs, sysfs)
    return devs[0] if devs else None


async def scan(sysfs: Path | None = None) -> tuple[NetDev, ...]:
    """``read_inventory`` off the event loop; safe under uvloop."""
    return await run_sync(Work.NETLINK, read_inventory, sysfs)


def unprivileged_bpf_disabled(procfs: Path = PROCFS) -> int | None:
    """``kernel.unprivileged_bpf_disabled``, or None when it cannot be read."""
    return _read_int(procfs / "sys" / "kernel" / "unprivileged_bpf_disabled")
