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
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio
from pyroute2.netlink.rtnl.marshal import MarshalRtnl

log = logging.getLogger(__name__)

RTMGRP_LINK = 1
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
        """Deliver events until cancelled; ``resync`` when some were lost."""
        if self._sock is None:
            self.open()
        sock = self._sock
        assert sock is not None
        try:
            while True:
                await anyio.wait_readable(sock)
                try:
                    data = sock.recv(1 << 20)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    if exc.errno != errno.ENOBUFS:
                        raise
                    log.warning("netlink events were lost (socket overflow); re-reading links")
                    await resync()
                    continue
                try:
                    for msg in self._marshal.parse(data):
                        event = classify(msg)
                        if event is not None:
                            deliver(event)
                except Exception:  # one bad batch (a bug) must not end the service
                    log.exception("handling link events failed; re-reading links")
                    await resync()
        finally:
            sock.close()
            self._sock = None
