"""The unix socket the shim talks to, and the replay of DELs queued while we were down."""

from __future__ import annotations

import logging
from pathlib import Path

import anyio
from anyio.abc import SocketStream, TaskStatus

from afxdp.cni.errors import DECODE_FAILURE, CniError
from afxdp.cni.frame import FrameError, Request, encode_reply
from afxdp.cni.handler import CniHandler
from afxdp.cni.netconf import LATEST
from afxdp.unixserver import serve_unix

log = logging.getLogger(__name__)

SOCKET_NAME = "cni.sock"
QUEUE_DIR = "del-queue"
MAX_REQUEST = 32 << 20
READ_TIMEOUT = 30.0


async def _read_request(stream: SocketStream) -> bytes:
    """Everything the shim sends (it shuts down its write side when done)."""
    chunks: list[bytes] = []
    size = 0
    with anyio.fail_after(READ_TIMEOUT):
        while True:
            try:
                chunk = await stream.receive()
            except anyio.EndOfStream:
                return b"".join(chunks)
            size += len(chunk)
            if size > MAX_REQUEST:
                raise FrameError(f"request larger than {MAX_REQUEST} bytes")
            chunks.append(chunk)


async def serve(
    run_dir: Path, handler: CniHandler, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
) -> None:
    async def answer(stream: SocketStream) -> None:
        async with stream:
            try:
                request = Request.decode(await _read_request(stream))
            except (FrameError, TimeoutError) as exc:
                err = CniError(DECODE_FAILURE, "malformed request from the afxdp shim", str(exc))
                await stream.send(encode_reply(1, err.to_json(LATEST)))
                return
            code, out, err_text = await handler.handle(request)
            try:
                await stream.send(encode_reply(code, out, err_text))
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                log.warning(
                    "the shim went away before its %s reply", request.env.get("CNI_COMMAND")
                )

    await serve_unix(run_dir / SOCKET_NAME, answer, task_status=task_status)


async def replay_queue(run_dir: Path, handler: CniHandler) -> int:
    """Run the DELs the shim queued while afxdpd was down; returns how many ran."""
    queue = run_dir / QUEUE_DIR
    if not queue.is_dir():
        return 0
    count = 0
    for item in sorted(queue.glob("*.del")):
        try:
            request = Request.decode(item.read_bytes())
        except (FrameError, OSError) as exc:
            log.error("queued DEL %s is unreadable (%s); dropped", item.name, exc)
        else:
            code, out, _ = await handler.handle(request)
            count += 1
            if code:
                # Dropped all the same: a DEL that fails now fails for good
                # (bad config); retrying on every start would only repeat it.
                log.error("queued DEL %s failed: %s", item.name, out.decode(errors="replace"))
            else:
                log.info("replayed queued DEL %s", item.name)
        item.unlink(missing_ok=True)
    return count
