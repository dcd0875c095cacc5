"""The kind node's secondary network (``kindCluster: true``).

A kind "node" is a container with no NIC to spare, so afxdpd makes the NICs
itself, as the original does: a bridge ``afxdp-kind-br`` holding the node's
address on that network, and veth pairs whose bridge-side ends are the bridge's
ports and whose other ends are the pool's devices (moved into pods by the CNI).

Each bridge-side end carries a pass-through XDP program in native mode. Frames
that a pod's XDP program sends out of its pooled end (``XDP_TX``, a redirect)
are delivered straight into the peer's XDP receive ring, and veth has that ring
only while the peer has a native XDP program: without one they are dropped.
The program is our redirect program with its map left empty, which passes
every frame (DESIGN.md 3.4), so no second program is shipped.

What is ours is told apart by name (``BRIDGE``, ``afxk<i>``, ``afxk<i>-br``)
AND by the marker ``MARKER`` in the link alias: a link that merely has one of
our names is never touched, and building fails instead. The alias survives
netns moves, so a pooled end in a pod still says whose it is.

``build`` reconciles rather than recreates: after a crash it mends what is
there (a missing program, a port out of the bridge, a link down) and adds what
is missing, so a pair whose pooled end is in a pod (afxdpd restarted under a
running pod) keeps working. The decisions (``plan_build``, ``plan_remove``) are
pure functions of the links seen; the I/O runs them with pyroute2's sync
``IPRoute`` in a worker thread (its asyncio side does not run under uvloop).
"""

from __future__ import annotations

import enum
import ipaddress
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute

from afxdp.bpf.xdp import AttachMode, XdpAttachment
from afxdp.errors import DeviceError
from afxdp.netns import run_in
from afxdp.workers import Work, run_sync

log = logging.getLogger(__name__)

BRIDGE = "afxdp-kind-br"
ADDRESS = "192.168.1.1/24"  # the original's; its example NADs route via .1
MARKER = "afxdp-kind"
PAIRS = 4  # the original's number of pairs per node
_MEMBER = re.compile(r"afxk(\d+)(-br)?")


def pooled_name(i: int) -> str:
    """The pooled end of pair ``i`` (a pool device, moved into pods)."""
    return f"afxk{i}"


def port_name(i: int) -> str:
    """The bridge-side end of pair ``i``."""
    return f"afxk{i}-br"


class KindNetError(DeviceError):
    """The kind network cannot be built or removed as asked."""


@dataclass(frozen=True)
class Link:
    """What the planner needs to know about one link of the netns."""

    name: str
    ifindex: int
    kind: str | None = None
    alias: str | None = None
    up: bool = False
    master: str | None = None  # the bridge it is a port of
    peer: int | None = None  # a veth's peer ifindex, when the peer is in this netns
    peer_away: bool = False  # a veth whose peer is in another netns (a pod)
    xdp_native: bool = False  # an XDP program attached in driver mode
    addresses: tuple[str, ...] = ()  # IPv4, CIDR notation

    @property
    def ours(self) -> bool:
        """Made by us: one of our names AND our marker."""
        named = self.name == BRIDGE or _MEMBER.fullmatch(self.name) is not None
        return named and self.alias == MARKER


class Op(enum.Enum):
    DELETE = "delete"
    ADD_BRIDGE = "add bridge"
    ADD_PAIR = "add pair"  # link = pooled end, arg = bridge-side end
    MARK = "mark"
    ENSLAVE = "enslave"  # arg = bridge
    ADD_ADDRESS = "add address"  # arg = CIDR
    UP = "up"
    ATTACH_XDP = "attach xdp"


@dataclass(frozen=True)
class Step:
    op: Op
    link: str
    arg: str = ""


def plan_build(pairs: int, links: Iterable[Link], address: str = ADDRESS) -> list[Step]:
    """The steps that turn ``links`` into the kind network of ``pairs`` pairs.

    Raises KindNetError when a name we need is held by a link that is not ours.
    """
    if pairs < 1:
        raise KindNetError(f"a kind network needs at least one veth pair, got {pairs}")
    by_name = {link.name: link for link in links}
    wanted = [BRIDGE] + [n for i in range(pairs) for n in (pooled_name(i), port_name(i))]
    foreign = [n for n in wanted if n in by_name and not by_name[n].ours]
    if foreign:
        raise KindNetError(
            f"{', '.join(foreign)}: exist(s) but not made by afxdpd (no alias {MARKER!r}); "
            "not touched: delete or rename them to use kind mode"
        )
    steps: list[Step] = []
    # Our links left by a run with more pairs; a pair a pod holds stays until
    # the pod gives it back (deleting a veth end deletes the pod's end too).
    for link in sorted(by_name.values(), key=lambda lk: lk.name):
        if link.ours and link.name not in wanted and not link.peer_away:
            steps.append(Step(Op.DELETE, link.name))
    bridge = by_name.get(BRIDGE)
    if bridge is None or bridge.kind != "bridge":
        if bridge is not None:
            steps.append(Step(Op.DELETE, BRIDGE))
        steps += [Step(Op.ADD_BRIDGE, BRIDGE), Step(Op.MARK, BRIDGE)]
        bridge = None
    if bridge is None or not _has_address(bridge, address):
        steps.append(Step(Op.ADD_ADDRESS, BRIDGE, address))
    if bridge is None or not bridge.up:
        steps.append(Step(Op.UP, BRIDGE))
    for i in range(pairs):
        steps += _plan_pair(by_name.get(pooled_name(i)), by_name.get(port_name(i)), i)
    return steps


def _has_address(link: Link, address: str) -> bool:
    want = ipaddress.ip_interface(address)
    return any(ipaddress.ip_interface(a) == want for a in link.addresses)


def _plan_pair(pooled: Link | None, port: Link | None, i: int) -> list[Step]:
    intact = (
        port is not None
        and port.kind == "veth"
        and (
            port.peer_away
            or (
                pooled is not None
                and pooled.kind == "veth"
                and pooled.peer == port.ifindex
                and port.peer == pooled.ifindex
            )
        )
    )
    if not intact:
        # Half a pair, or ends that are not each other's peers: start afresh.
        return [
            *(Step(Op.DELETE, link.name) for link in (pooled, port) if link is not None),
            Step(Op.ADD_PAIR, pooled_name(i), port_name(i)),
            Step(Op.MARK, pooled_name(i)),
            Step(Op.MARK, port_name(i)),
            Step(Op.ENSLAVE, port_name(i), BRIDGE),
            Step(Op.UP, port_name(i)),
            Step(Op.ATTACH_XDP, port_name(i)),
            Step(Op.UP, pooled_name(i)),
        ]
    assert port is not None
    steps = []
    if port.master != BRIDGE:
        steps.append(Step(Op.ENSLAVE, port.name, BRIDGE))
    if not port.up:
        steps.append(Step(Op.UP, port.name))
    if not port.xdp_native:
        steps.append(Step(Op.ATTACH_XDP, port.name))
    # A pooled end in a pod is the pod's to set up or down.
    if pooled is not None and not port.peer_away and not pooled.up:
        steps.append(Step(Op.UP, pooled.name))
    return steps


def plan_remove(links: Iterable[Link], keep_in_use: bool = False) -> list[Step]:
    """The steps that remove our links (found by name and marker, so also after a
    crash). With ``keep_in_use``, pairs whose pooled end is in a pod stay, and so
    does the bridge while any of them does."""
    ours = sorted((link for link in links if link.ours), key=lambda lk: lk.name)
    kept = [lk for lk in ours if keep_in_use and lk.peer_away]
    steps = [Step(Op.DELETE, lk.name) for lk in ours if lk.name != BRIDGE and lk not in kept]
    if not kept and any(lk.name == BRIDGE for lk in ours):
        steps.append(Step(Op.DELETE, BRIDGE))
    return steps


@dataclass(frozen=True)
class KindNet:
    """The kind network as built: its bridge, address and pool devices."""

    bridge: str
    address: str
    devices: tuple[str, ...]  # the pooled ends, the one pool's devices
    netns: Path | None = None


async def build(
    pairs: int = PAIRS, *, address: str = ADDRESS, queues: int = 1, netns: Path | None = None
) -> KindNet:
    """Build (or mend) the kind network in ``netns`` (this process's when None).

    ``queues`` is the number of queues of each veth end (both ends alike: veth
    refuses native XDP on an end with fewer RX queues than its peer has TX).
    """
    steps = await run_sync(Work.NETLINK, run_in, netns, _build_here, pairs, address, queues)
    for step in steps:
        log.debug("kind network: %s %s %s", step.op.value, step.link, step.arg)
    devices = tuple(pooled_name(i) for i in range(pairs))
    log.info("kind network %s %s: devices %s", BRIDGE, address, " ".join(devices))
    return KindNet(BRIDGE, address, devices, netns)


async def remove(*, keep_in_use: bool = False, netns: Path | None = None) -> list[str]:
    """Remove what ``build`` made (in any run) from ``netns``; the links deleted."""
    steps = await run_sync(Work.NETLINK, run_in, netns, _remove_here, keep_in_use)
    return [s.link for s in steps]


def _build_here(pairs: int, address: str, queues: int) -> list[Step]:
    with IPRoute() as ipr:
        steps = plan_build(pairs, scan(ipr), address)
        _apply(ipr, steps, queues)
    return steps


def _remove_here(keep_in_use: bool) -> list[Step]:
    with IPRoute() as ipr:
        steps = plan_remove(scan(ipr), keep_in_use)
        _apply(ipr, steps, 1)
    return steps


def scan(ipr: IPRoute) -> list[Link]:
    """The links of the calling thread's netns, as the planner sees them."""
    msgs = list(ipr.get_links())
    names = {m["index"]: m.get("ifname") for m in msgs}
    addresses: dict[int, list[str]] = {}
    for a in ipr.get_addr(family=2):  # AF_INET
        addresses.setdefault(a["index"], []).append(f"{a.get('address')}/{a['prefixlen']}")
    out = []
    for m in msgs:
        info = m.get("linkinfo")
        kind = info.get("kind") if info is not None else None
        away = m.get("link_netnsid") is not None
        out.append(
            Link(
                name=m.get("ifname"),
                ifindex=m["index"],
                kind=kind,
                alias=m.get("ifalias"),
                up=bool(m["flags"] & 1),  # IFF_UP
                master=names.get(m.get("master")),
                peer=m.get("link") if kind == "veth" and not away else None,
                peer_away=kind == "veth" and away,
                xdp_native=_xdp_native(m.get("xdp")),
                addresses=tuple(addresses.get(m["index"], ())),
            )
        )
    return out


def _xdp_native(xdp: Any) -> bool:
    return xdp is not None and bool(xdp.get_attr("IFLA_XDP_DRV_PROG_ID"))


def _apply(ipr: IPRoute, steps: Sequence[Step], queues: int) -> None:
    def index(name: str) -> int:
        found = ipr.link_lookup(ifname=name)
        if not found:
            raise KindNetError(f"{name}: vanished while building the kind network")
        return int(found[0])

    for step in steps:
        try:
            _apply_one(ipr, step, queues, index)
        except KindNetError:
            raise
        except Exception as exc:  # netlink or libbpf: say which step failed
            raise KindNetError(f"kind network: {step.op.value} {step.link}: {exc}") from exc


def _apply_one(ipr: IPRoute, step: Step, queues: int, index: Any) -> None:
    name = step.link
    if step.op is Op.DELETE:
        found = ipr.link_lookup(ifname=name)
        if found:  # gone already when its veth peer was deleted first
            ipr.link("del", index=found[0])
    elif step.op is Op.ADD_BRIDGE:
        ipr.link("add", ifname=name, kind="bridge")
    elif step.op is Op.ADD_PAIR:
        q = {"num_tx_queues": queues, "num_rx_queues": queues}
        ipr.link("add", ifname=name, kind="veth", peer={"ifname": step.arg, **q}, **q)
    elif step.op is Op.MARK:
        # The kernel ignores an alias given at creation; it is set right after.
        ipr.link("set", index=index(name), ifalias=MARKER)
    elif step.op is Op.ENSLAVE:
        ipr.link("set", index=index(name), master=index(step.arg))
    elif step.op is Op.ADD_ADDRESS:
        iface = ipaddress.ip_interface(step.arg)
        ipr.addr("add", index=index(name), address=str(iface.ip), prefixlen=iface.network.prefixlen)
    elif step.op is Op.UP:
        ipr.link("set", index=index(name), state="up")
    elif step.op is Op.ATTACH_XDP:
        # Attached by netlink, the program stays after our handles are closed;
        # deleting the link frees it.
        XdpAttachment.attach(name, AttachMode.NATIVE).abandon()
