"""Link events from netlink, turned into what they mean for device health.

A plain ``AF_NETLINK`` socket read on the event loop. Not pyroute2's IPRoute:
its asyncio transport fails under uvloop, and its synchronous ``get()`` keeps
some messages of a read in an internal buffer where ``select()`` cannot see
them, so events arrive late or not at all (found while building this). Nor its
marshal: it decodes every attribute of every message (about 0.5 ms each, on
the loop, for every link of the node that changes: each pod's veths too);
``link_events`` reads the three attributes a health change needs, and the
link's ifindex. The socket
is bound before the node's inventory is read, so no event between that read
and the watch is lost; a socket overflow (ENOBUFS: events were lost) asks the
owner to re-read the truth.
"""

from __future__ import annotations

import enum
import errno
import logging
import math
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import anyio

log = logging.getLogger(__name__)

RTMGRP_LINK = 1
RESYNC_RETRY = 1.0  # seconds between attempts at a re-read of every link that failed


class Change(enum.Enum):
    UP = "up"
    DOWN = "down"
    REMOVED = "removed"
    # Moved to another netns (by our CNI into a pod, or by anyone else).
    MOVED_OUT = "moved_out"


@dataclass(frozen=True)
class LinkEvent:
    name: str
    change: Change
    # The link's ifindex (0: not known). A link deleted and re-created under
    # the same name is a new link with a new ifindex.
    index: int = 0


# rtnetlink, as linux/netlink.h, rtnetlink.h, if_link.h and if.h lay it out.
_NLMSG = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, seq, pid
_IFINFO = struct.Struct("=BxHiII")  # ifinfomsg: family, type, index, flags, change
_RTA = struct.Struct("=HH")  # rtattr: length, type
RTM_NEWLINK, RTM_DELLINK = 16, 17
IFLA_IFNAME, IFLA_OPERSTATE, IFLA_NEW_NETNSID = 3, 16, 45
_NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED and NLA_F_NET_BYTEORDER
_USABLE = frozenset({0, 6})  # IF_OPER_UNKNOWN, IF_OPER_UP
IFF_UP = 1


def link_events(data: bytes) -> list[LinkEvent]:
    """What one read of a link-group rtnetlink socket means for health: its
    messages in order, those not about a named link skipped; whatever does not
    parse ends the read's messages, it never raises (the kernel sends what we
    read, but a bug must not take the watch down)."""
    events = []
    off = 0
    while off + _NLMSG.size <= len(data):
        length, kind, _flags, _seq, _pid = _NLMSG.unpack_from(data, off)
        if length < _NLMSG.size or off + length > len(data):
            break
        if kind in (RTM_NEWLINK, RTM_DELLINK):
            event = _link_event(kind, data[off + _NLMSG.size : off + length])
            if event is not None:
                events.append(event)
        off += (length + 3) & ~3
    return events


def _link_event(kind: int, body: bytes) -> LinkEvent | None:
    if len(body) < _IFINFO.size:
        return None
    family, _type, index, flags, _change = _IFINFO.unpack_from(body)
    if family != socket.AF_UNSPEC:
        return None  # AF_BRIDGE: a port joining or leaving a bridge, not the link itself
    attrs = _attributes(body[_IFINFO.size :], {IFLA_IFNAME, IFLA_OPERSTATE, IFLA_NEW_NETNSID})
    name = attrs.get(IFLA_IFNAME, b"").split(b"\0", 1)[0].decode(errors="replace")
    if not name:
        return None
    if kind == RTM_DELLINK:
        # The kernel tags the goodbye of a link that changes netns with the new
        # netns id; a destroyed link has none.
        moved = IFLA_NEW_NETNSID in attrs
        return LinkEvent(name, Change.MOVED_OUT if moved else Change.REMOVED, index)
    oper = attrs.get(IFLA_OPERSTATE, b"")
    up = bool(flags & IFF_UP) and len(oper) == 1 and oper[0] in _USABLE
    return LinkEvent(name, Change.UP if up else Change.DOWN, index)


def _attributes(data: bytes, wanted: set[int]) -> dict[int, bytes]:
    """The payloads of the ``wanted`` top-level attributes (the first of each)."""
    found: dict[int, bytes] = {}
    off = 0
    while off + _RTA.size <= len(data) and len(found) < len(wanted):
        length, kind = _RTA.unpack_from(data, off)
        if length < _RTA.size or off + length > len(data):
            break
        kind &= _NLA_TYPE_MASK
        if kind in wanted and kind not in found:
            found[kind] = data[off + _RTA.size : off + length]
        off += (length + 3) & ~3
    return found


async def _resynced(resync: Callable[[], Awaitable[None]]) -> bool:
    try:
        await resync()
    except Exception:
        log.exception("re-reading links failed; trying again in %g s", RESYNC_RETRY)
        return False
    return True


class NetWatch:
    """Link events of the service's netns, delivered on the event loop."""

    # A burst of link events (a node with many VFs) must not overflow the
    # socket. A class attribute so tests can shrink it and overflow it for real.
    RCVBUF = 4 << 20

    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        self.foreign = 0  # messages ignored because a process, not the kernel, sent them

    def _ignore(self, sender: int) -> None:
        """A message not from the kernel: any process of this netns (a
        hostNetwork pod) can send to our socket, and must not make a device
        unhealthy or take its prepared program."""
        self.foreign += 1
        if self.foreign == 1 or self.foreign % 1000 == 0:  # a flood must not flood the log
            log.warning("ignored %d netlink message(s) not from the kernel (the last from port %d)",
                        self.foreign, sender)  # fmt: skip

    def open(self) -> None:
        """Subscribe now; events queue in the socket until ``run``."""
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 0)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.RCVBUF)
        sock.bind((0, RTMGRP_LINK))
        sock.setblocking(False)
        self._sock = sock

    async def run(
        self, deliver: Callable[[LinkEvent], None], resync: Callable[[], Awaitable[None]]
    ) -> None:
        """Deliver events until cancelled; ``resync`` when some were lost (or a
        batch could not be handled). A resync that fails is logged and tried
        again every RESYNC_RETRY seconds, events still delivered meanwhile: the
        watch never ends the service."""
        if self._sock is None:
            self.open()
        sock = self._sock
        assert sock is not None
        owed = False  # a re-read of every link, still to be done
        next_try = -math.inf  # no sooner than this (a failing re-read, links churning)
        try:
            while True:
                if owed and anyio.current_time() >= next_try:
                    owed = not await _resynced(resync)
                    next_try = anyio.current_time() + RESYNC_RETRY
                wait = next_try - anyio.current_time() if owed else math.inf
                with anyio.move_on_after(max(wait, 0.0)):
                    await anyio.wait_readable(sock)
                try:
                    data, (sender, _groups) = sock.recvfrom(1 << 20)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    if exc.errno != errno.ENOBUFS:
                        raise
                    log.warning("netlink events were lost (socket overflow); re-reading links")
                    owed = True
                    continue
                if sender != 0:
                    self._ignore(sender)
                    continue
                try:
                    for event in link_events(data):
                        deliver(event)
                except Exception:  # one bad batch (a bug) must not end the service
                    log.exception("handling link events failed; re-reading links")
                    owed = True
        finally:
            sock.close()
            self._sock = None
