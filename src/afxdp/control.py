"""The control socket: ``afxdpctl status`` reads the service's state from it.

Protocol (trivial on purpose): connect to ``<run-dir>/control.sock``; the
service writes one JSON document (a ``status.Status``) and closes. Only root
may connect (mode 0600). A client that hangs up before reading (an
interrupted ``afxdpctl status``) is normal, not an error.
"""

from __future__ import annotations

import inspect
import json
import logging
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import msgspec
from anyio.abc import SocketStream, TaskStatus

from afxdp import status as status_doc
from afxdp.unixserver import ServerStats, serve_unix

log = logging.getLogger(__name__)

SOCKET_NAME = "control.sock"
MAX_CLIENTS = 16
SEND_TIMEOUT = 10.0


async def serve(
    run_dir: Path,
    status: Callable[[], Awaitable[status_doc.Status] | status_doc.Status | dict[str, Any]],
    *,
    stats: ServerStats | None = None,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    async def answer(stream: SocketStream) -> None:
        made = status()
        # The service's reads the datapath's counters in a worker thread first.
        doc = msgspec.json.encode(await made if inspect.isawaitable(made) else made)
        # A client that neither reads nor hangs up must not hold a task forever.
        with anyio.move_on_after(SEND_TIMEOUT):
            try:
                await stream.send(doc)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
                log.debug("a status client left before its answer: %s", exc)

    await serve_unix(
        run_dir / SOCKET_NAME, answer, limit=MAX_CLIENTS, stats=stats, task_status=task_status
    )


def _read(run_dir: Path, timeout: float) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(run_dir / SOCKET_NAME))
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def read_status(run_dir: Path, timeout: float = 5.0) -> dict[str, Any]:
    """Blocking client: the service's status document, as plain data."""
    doc: dict[str, Any] = json.loads(_read(run_dir, timeout))
    return doc


def fetch_status(run_dir: Path, timeout: float = 5.0) -> status_doc.Status:
    """Blocking client: the service's status document, typed.

    OSError: nothing answers (no socket, refused, timed out).
    status.NotStatus: something answered, but not with a status document.
    """
    return status_doc.decode(_read(run_dir, timeout))
