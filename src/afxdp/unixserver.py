"""A root-only stream unix socket under the run dir, served until cancelled."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
from anyio.abc import SocketStream, TaskStatus


async def serve_unix(
    path: Path,
    answer: Callable[[SocketStream], Awaitable[None]],
    *,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``answer`` per connection on ``path`` (mode 0600, stale file replaced);
    started once listening; the file is removed when serving ends."""
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    listener = await anyio.create_unix_listener(path, mode=0o600)
    try:
        task_status.started()
        await listener.serve(answer)
    finally:
        path.unlink(missing_ok=True)
