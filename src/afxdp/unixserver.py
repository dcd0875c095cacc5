"""A root-only stream unix socket under the run dir, served until cancelled.

A peer never takes the server down: each connection runs in its own task and
any failure in it (a peer that hung up mid-reply, a bug in ``answer``) is
logged once and ends that connection only. Accept errors that mean "out of a
resource" (EMFILE, ENFILE, ENOBUFS, ENOMEM) or a peer that left while queued
are retried with a backoff instead of ending the server. At most ``limit``
connections are served at once; the excess is accepted and closed at once (so
the kernel's backlog cannot fill up) and counted.

The server accepts on the listener's raw socket itself (``accept``) and wraps
each connection in an anyio stream afterwards: the accept error it classifies
is then the kernel's OSError as ``socket.accept`` raises it, not what a
listener makes of it (anyio's UNIX listener raises BrokenResourceError with the
OSError only as its ``__cause__``; its TCP listener the OSError itself).

With ``evict`` a full server makes room instead of refusing: the newcomer takes
the slot of the oldest connection whose peer owes the next move (the server
waits for its bytes, or for room in its window). A client that trickles a
request (slowloris) or never reads is such a peer all the time; kubelet's probe
is one only between its connect and its request, which it sends at once. So a
pod that opens every slot of the metrics port cannot fail afxdpd's liveness
probe (issue 19), whatever address the probe comes from, and a connection that
keeps up is never cut off for a newcomer.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import (
    SocketAttribute,
    SocketListener,
    SocketStream,
    TaskStatus,
    UNIXSocketStream,
)

from afxdp.confine import confined
from afxdp.sockfile import clear_stale, file_id, remove_own

log = logging.getLogger(__name__)

# Accept errors that say nothing is wrong with the listening socket itself.
TRANSIENT_ACCEPT_ERRORS = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.ECONNABORTED, errno.EPROTO}
)
BACKOFF_MIN, BACKOFF_MAX = 0.01, 1.0


async def accept(listening: socket.socket) -> socket.socket:
    """One connection from the non-blocking ``listening`` socket, waiting for
    it; an accept error is raised as the OSError ``socket.accept`` gives."""
    while True:
        await anyio.wait_readable(listening)
        try:
            conn, _ = listening.accept()
        except (BlockingIOError, InterruptedError):
            continue  # another accept took it, or it left the backlog: wait again
        return conn


async def _stream(conn: socket.socket) -> SocketStream | None:
    """``conn`` as an anyio stream that owns it; None (``conn`` closed) when its
    TCP peer reset it before it was served (anyio wraps connected sockets only)."""
    try:
        conn.setblocking(False)  # accept() gave it blocking: never on the event loop
        if conn.family == socket.AF_UNIX:
            return await UNIXSocketStream.from_socket(conn)
        try:
            conn.getpeername()
        except OSError:  # ENOTCONN: reset while it waited in the backlog
            conn.close()
            return None
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as anyio's listener does
        return await SocketStream.from_socket(conn)
    except BaseException:
        conn.close()  # not wrapped: no stream owns it
        raise


class Backoff:
    """Delays that double from BACKOFF_MIN to BACKOFF_MAX; reset on success."""

    def __init__(self) -> None:
        self.delay = 0.0

    def next(self) -> float:
        self.delay = min(BACKOFF_MAX, max(BACKOFF_MIN, self.delay * 2))
        return self.delay

    def reset(self) -> None:
        self.delay = 0.0


@dataclass
class ServerStats:
    """What a server did (for status): connections served, refused, failed, and
    ended to make room for a newcomer (``evicted``)."""

    served: int = 0
    refused: int = 0
    failed: int = 0
    accept_errors: int = 0
    active: int = 0
    evicted: int = 0


@dataclass(eq=False)
class _Slot:
    """One connection's place among the ``limit``; ``waiting`` while its peer owes
    the next move."""

    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    waiting: int = 0  # a receive and a send may wait at once
    evicted: bool = False

    @contextmanager
    def waits(self) -> Iterator[None]:
        self.waiting += 1
        try:
            yield
        finally:
            self.waiting -= 1


class _Watched(SocketStream):
    """``stream``, its slot told whenever a receive or send waits on the peer (the
    connection's answer needs to know nothing of eviction)."""

    def __init__(self, stream: SocketStream, slot: _Slot) -> None:
        self._stream = stream
        self._slot = slot

    async def receive(self, max_bytes: int = 65536) -> bytes:
        with self._slot.waits():
            return await self._stream.receive(max_bytes)

    async def send(self, item: bytes) -> None:
        with self._slot.waits():
            await self._stream.send(item)

    async def send_eof(self) -> None:
        await self._stream.send_eof()

    async def aclose(self) -> None:
        await self._stream.aclose()

    @property
    def _raw_socket(self) -> socket.socket:
        return self._stream.extra(SocketAttribute.raw_socket)  # noqa: S610 - not Django

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        return self._stream.extra_attributes


async def serve_listener(
    listener: SocketListener,
    answer: Callable[[SocketStream], Awaitable[None]],
    *,
    name: str,
    limit: int = 64,
    stats: ServerStats | None = None,
    evict: bool = False,
) -> None:
    """Accept on ``listener`` until cancelled, each connection confined to its task;
    with ``evict``, a newcomer to a full server ends the oldest connection whose
    peer owes the next move rather than being refused (the module's docstring)."""
    stats = stats if stats is not None else ServerStats()
    backoff = Backoff()
    slots: dict[_Slot, None] = {}  # in order of arrival: the oldest first

    async def one(conn: socket.socket, slot: _Slot) -> None:
        stream = await _stream(conn)
        if stream is None:
            return
        async with stream:
            await answer(_Watched(stream, slot) if evict else stream)

    async def connection(conn: socket.socket, slot: _Slot) -> None:
        try:
            with slot.scope:
                ok = await confined(
                    log, lambda: f"{name}: a connection", "the server", one, conn, slot
                )
                if ok:
                    stats.served += 1
                else:
                    stats.failed += 1
        finally:
            stats.active -= 1
            del slots[slot]

    def make_room() -> bool:
        """End the oldest connection that waits on its peer; False if none does."""
        for slot in slots:
            if slot.waiting and not slot.evicted:
                slot.evicted = True
                slot.scope.cancel()
                stats.evicted += 1
                if stats.evicted == 1 or stats.evicted % 1000 == 0:  # a flood, not a log flood
                    log.warning("%s: all %d connections open; ended the oldest waiting on its "
                                "peer (%d so far)", name, limit, stats.evicted)  # fmt: skip
                return True
        return False

    listening: socket.socket = listener.extra(SocketAttribute.raw_socket)  # noqa: S610
    async with anyio.create_task_group() as tg:
        while True:
            try:
                conn = await accept(listening)
            except OSError as exc:
                if exc.errno not in TRANSIENT_ACCEPT_ERRORS:
                    raise
                stats.accept_errors += 1
                delay = backoff.next()
                if delay == BACKOFF_MIN:  # once per streak, not once per retry
                    log.warning("%s: accept failed (%s); backing off", name, exc)
                await anyio.sleep(delay)
                continue
            backoff.reset()
            # ``stats`` may be shared by the listeners of one server (one per
            # address family): the limit is theirs together. An evicted
            # connection is counted until its task has closed it (its next
            # turn): count only those that stay.
            staying = stats.active - sum(slot.evicted for slot in slots)
            if staying >= limit and not (evict and make_room()):
                stats.refused += 1
                conn.close()
                continue
            stats.active += 1
            slot = _Slot()
            slots[slot] = None
            tg.start_soon(connection, conn, slot)


async def serve_unix(
    path: Path,
    answer: Callable[[SocketStream], Awaitable[None]],
    *,
    limit: int = 64,
    stats: ServerStats | None = None,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``answer`` per connection on ``path`` (mode 0600, a stale file
    replaced, OSError(EADDRINUSE) when another server answers there); started
    once listening; the file is removed when serving ends, if it is still the
    one this server created (a process never removes another's socket:
    ``sockfile``)."""
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    clear_stale(path)
    # (anyio too removes a socket file it finds at the path, in the same loop
    # turn as clear_stale: no wider a window than sockfile's own.)
    listener = await anyio.create_unix_listener(path, mode=0o600)
    ours = file_id(path)
    try:
        async with listener:
            task_status.started()
            await serve_listener(listener, answer, name=path.name, limit=limit, stats=stats)
    finally:
        remove_own(path, ours)
