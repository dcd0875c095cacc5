"""Netlink work on the device, in the host or in a pod's netns (blocking calls;
the handler runs them in worker threads, pod-side ones via ``netns.run_in``).

Devices keep their name when they move into a pod: pods find them by the name
in ``AFXDP_DEVICES_<POOL>`` and in their socket path, as with the original.
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import os
import socket
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute, NetlinkError

from afxdp.inventory import index_of

# The service's own netns, reachable from a thread that entered a pod's.
HOST_NETNS = Path(f"/proc/{os.getpid()}/ns/net")
IFF_UP = 1
_IFNAMSIZ = 16
_SIOCGIFFLAGS, _SIOCGIFHWADDR = 0x8913, 0x8927  # linux/sockios.h
_ARPHRD_ETHER = 1


@dataclass(frozen=True)
class LinkState:
    index: int
    mac: str
    up: bool
    addresses: frozenset[str]  # "10.0.0.2/24"
    routes: frozenset[tuple[str, str | None]]  # (dst, gateway)


def _index(name: str) -> int:
    idx = index_of(name)
    if idx is None:
        raise LookupError(f"no link {name}")
    return idx


def state(name: str) -> LinkState | None:
    """The link ``name`` in the calling thread's netns, or None."""
    idx = index_of(name)
    if idx is None:
        return None
    with IPRoute() as ipr:
        return _state(ipr, idx)


def _state(ipr: IPRoute, idx: int) -> LinkState:
    link = ipr.get_links(idx)[0]
    addrs = frozenset(f"{a.get('address')}/{a['prefixlen']}" for a in ipr.get_addr(index=idx))
    routes = set()
    for r in ipr.get_routes(oif=idx, table=254):
        dst = r.get("dst")
        routes.add((f"{dst}/{r['dst_len']}" if dst else "0.0.0.0/0", r.get("gateway")))
    return LinkState(idx, str(link.get("address")), bool(link["flags"] & IFF_UP), addrs,
                     frozenset(routes))  # fmt: skip


def _ifreq(name: str, request: int) -> bytes | None:
    """``struct ifreq`` for ``name`` after the interface ioctl ``request``, in
    the calling thread's netns; None when there is no such link. An ioctl, not
    netlink: no netlink socket to open and no message to parse, on the paths
    the CNI runtime waits on (a pyroute2 request costs about a millisecond)."""
    raw = name.encode()
    if not raw or len(raw) >= _IFNAMSIZ or b"\0" in raw:
        return None  # the kernel would read a cut name: another link's, maybe
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            return fcntl.ioctl(sock, request, struct.pack(f"{_IFNAMSIZ}s24x", raw))
        except OSError as exc:
            if exc.errno == errno.ENODEV:
                return None
            raise


def admin_up(name: str) -> bool | None:
    """Whether ``name`` is administratively up here; None when there is no such link."""
    got = _ifreq(name, _SIOCGIFFLAGS)
    return None if got is None else bool(struct.unpack_from("H", got, _IFNAMSIZ)[0] & IFF_UP)


def mac(name: str) -> str:
    """The MAC address of the Ethernet link ``name`` here ("aa:bb:cc:dd:ee:ff")."""
    got = _ifreq(name, _SIOCGIFHWADDR)
    if got is None:
        raise LookupError(f"no link {name}")
    family = struct.unpack_from("H", got, _IFNAMSIZ)[0]
    if family != _ARPHRD_ETHER:  # not 6 bytes; netlink has the whole address
        found = state(name)
        if found is None:
            raise LookupError(f"no link {name}")
        return found.mac
    return got[_IFNAMSIZ + 2 : _IFNAMSIZ + 8].hex(":")


def setup(name: str, ips: list[dict[str, Any]], routes: list[dict[str, Any]]) -> str:
    """In the pod: addresses and routes (the move brought the link up); its
    MAC. One netns entry, one netlink socket, and no read-back dumps: each
    costs the pod's ADD a little."""
    idx = _index(name)
    if ips:
        with IPRoute() as ipr:
            _configure(ipr, idx, ips, routes)
    return mac(name)


def leave(name: str, netns: Path, up: bool = False) -> bool:
    """Move ``name`` from the calling thread's netns to ``netns``; False if it is not here."""
    try:
        move(name, netns, up)
    except LookupError:
        return False
    return True


def move(name: str, netns: Path, up: bool = False) -> None:
    """Move ``name`` (in the calling thread's netns) into ``netns``, keeping its
    name; with ``up``, link up there too. One message: the kernel moves the link
    (which takes it down) and then applies the flags, in the new netns."""
    idx = _index(name)
    fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
    try:
        with IPRoute() as ipr:
            ipr.link("set", index=idx, net_ns_fd=fd, **({"state": "up"} if up else {}))
    finally:
        os.close(fd)


def set_up(name: str, up: bool = True) -> None:
    idx = _index(name)
    with IPRoute() as ipr:
        ipr.link("set", index=idx, state="up" if up else "down")


def _configure(
    ipr: IPRoute, idx: int, ips: list[dict[str, Any]], routes: list[dict[str, Any]]
) -> None:
    """Addresses and routes of an IPAM result, as ipam.ConfigureIface does."""
    gateways: dict[int, str] = {}
    for ip in ips:
        iface = ipaddress.ip_interface(ip["address"])
        ipr.addr("add", index=idx, address=str(iface.ip), prefixlen=iface.network.prefixlen)
        if ip.get("gateway"):
            gateways.setdefault(iface.version, ip["gateway"])
    for route in routes:
        dst = ipaddress.ip_network(route["dst"], strict=False)
        gw = route.get("gw") or gateways.get(dst.version)
        spec: dict[str, Any] = {"dst": str(dst), "oif": idx}
        if gw:
            spec["gateway"] = gw
        try:
            ipr.route("add", **spec)
        except NetlinkError as exc:
            if exc.code != 17:  # EEXIST: the kernel made it already (connected route)
                raise


def exists(netns: str) -> bool:
    return bool(netns) and Path(netns).exists()
