"""The control socket: ``afxdpctl status`` reads the service's state from it.

Protocol (trivial on purpose): connect to ``<run-dir>/control.sock``; the
service writes one JSON document and closes. Only root may connect (mode 0600).
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import SocketStream, TaskStatus

from afxdp.unixserver import serve_unix

SOCKET_NAME = "control.sock"


async def serve(
    run_dir: Path,
    status: Callable[[], dict[str, Any]],
    *,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    async def answer(stream: SocketStream) -> None:
        async with stream:
            await stream.send(json.dumps(status()).encode())

    await serve_unix(run_dir / SOCKET_NAME, answer, task_status=task_status)


def read_status(run_dir: Path, timeout: float = 5.0) -> dict[str, Any]:
    """Blocking client: the service's status document."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(run_dir / SOCKET_NAME))
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    doc: dict[str, Any] = json.loads(b"".join(chunks))
    return doc
