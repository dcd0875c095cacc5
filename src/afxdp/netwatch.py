"""Link events from netlink, turned into what they mean for device health.

A plain ``AF_NETLINK`` socket read on the event loop, decoded with pyroute2's
marshal (pure parsing). Not pyroute2's IPRoute: its asyncio transport fails
under uvloop, and its synchronous ``get()`` keeps some messages of a read in
an internal buffer where ``select()`` cannot see them, so events arrive late or
not at all (found while building this). The socket is bound before the node's
inventory is read, so no event between that read and the watch is lost; a
socket overflow (ENOBUFS: events were lost) asks the owner to re-read the truth.
"""

from __future__ import annotations

import enum
import errno
import logging
import math
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio
from pyroute2.netlink.rtnl.marshal import MarshalRtnl

log = logging.getLogger(__name__)

RTMGRP_LINK = 1
RESYNC_RETRY = 1.0  # seconds between attempts at a re-read of every link that failed
_USABLE = frozenset({"UP", "UNKNOWN"})


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


def classify(msg: Any) -> LinkEvent | None:
    """What a netlink link message means, or None when it means nothing to us."""
    name = msg.get("ifname")
    if not name:
        return None
    if msg["event"] == "RTM_DELLINK":
        # The kernel tags the goodbye of a link that changes netns with the new
        # netns id; a destroyed link has none.
        moved = msg.get_attr("IFLA_NEW_NETNSID") is not None
        return LinkEvent(name, Change.MOVED_OUT if moved else Change.REMOVED)
    if msg["event"] == "RTM_NEWLINK":
        up = bool(msg["flags"] & 1) and str(msg.get("operstate")) in _USABLE
        return LinkEvent(name, Change.UP if up else Change.DOWN)
    return None


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
        self._marshal = MarshalRtnl()

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
        try:
            while True:
                if owed:
                    owed = not await _resynced(resync)
                with anyio.move_on_after(RESYNC_RETRY if owed else math.inf):
                    await anyio.wait_readable(sock)
                try:
                    data = sock.recv(1 << 20)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    if exc.errno != errno.ENOBUFS:
                        raise
                    log.warning("netlink events were lost (socket overflow); re-reading links")
                    owed = True
                    continue
                try:
                    for msg in self._marshal.parse(data):
                        event = classify(msg)
                        if event is not None:
                            deliver(event)
                except Exception:  # one bad batch (a bug) must not end the service
                    log.exception("handling link events failed; re-reading links")
                    owed = True
        finally:
            sock.close()
            self._sock = None
