"""A root-only stream unix socket under the run dir, served until cancelled.

A peer never takes the server down: each connection runs in its own task and
any failure in it (a peer that hung up mid-reply, a bug in ``answer``) is
logged once and ends that connection only. Accept errors that mean "out of a
resource" (EMFILE, ENFILE, ENOBUFS, ENOMEM) or a peer that left while queued
are retried with a backoff instead of ending the server. At most ``limit``
connections are served at once; the excess is accepted and closed at once (so
the kernel's backlog cannot fill up) and counted.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import anyio
from anyio.abc import SocketListener, SocketStream, TaskStatus

from afxdp.confine import confined
from afxdp.sockfile import clear_stale, file_id, remove_own

log = logging.getLogger(__name__)

# Accept errors that say nothing is wrong with the listening socket itself.
TRANSIENT_ACCEPT_ERRORS = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.ECONNABORTED, errno.EPROTO}
)
BACKOFF_MIN, BACKOFF_MAX = 0.01, 1.0


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
    """What a server did (for status): connections served, refused, failed."""

    served: int = 0
    refused: int = 0
    failed: int = 0
    accept_errors: int = 0
    active: int = 0


async def serve_listener(
    listener: SocketListener,
    answer: Callable[[SocketStream], Awaitable[None]],
    *,
    name: str,
    limit: int = 64,
    stats: ServerStats | None = None,
) -> None:
    """Accept on ``listener`` until cancelled, each connection confined to its task."""
    stats = stats if stats is not None else ServerStats()
    backoff = Backoff()

    async def one(stream: SocketStream) -> None:
        async with stream:
            await answer(stream)

    async def connection(stream: SocketStream) -> None:
        try:
            if await confined(log, lambda: f"{name}: a connection", "the server", one, stream):
                stats.served += 1
            else:
                stats.failed += 1
        finally:
            stats.active -= 1

    async with anyio.create_task_group() as tg:
        while True:
            try:
                stream = await listener.accept()
            except (OSError, anyio.BrokenResourceError) as exc:
                # anyio wraps the accept's OSError in BrokenResourceError.
                cause = exc if isinstance(exc, OSError) else exc.__cause__
                if not isinstance(cause, OSError) or cause.errno not in TRANSIENT_ACCEPT_ERRORS:
                    raise
                stats.accept_errors += 1
                delay = backoff.next()
                if delay == BACKOFF_MIN:  # once per streak, not once per retry
                    log.warning("%s: accept failed (%s); backing off", name, cause)
                await anyio.sleep(delay)
                continue
            backoff.reset()
            if stats.active >= limit:
                stats.refused += 1
                await stream.aclose()
                continue
            stats.active += 1
            tg.start_soon(connection, stream)


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
