"""The unix socket the shim talks to, and the replay of DELs queued while we were down.

A peer never takes afxdpd down: a request that is too big, too slow, not a
frame, or whose sender hangs up at any byte is that connection's problem only.
Each connection is logged exactly once (a warning when it went wrong, a debug
line when it was answered). Queued DELs that cannot be replayed are moved aside
to ``del-queue/rejected/``, never replayed again, and never stop the others.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from typing import Protocol

import anyio
from anyio.abc import SocketStream, TaskStatus

from afxdp.cni.errors import DECODE_FAILURE, IO_FAILURE, CniError
from afxdp.cni.frame import MAX_FIELD, FrameError, Request, encode_reply
from afxdp.cni.netconf import LATEST
from afxdp.unixserver import serve_unix
from afxdp.workers import Work, run_sync

log = logging.getLogger(__name__)

SOCKET_NAME = "cni.sock"
QUEUE_DIR = "del-queue"
REJECTED_DIR = "rejected"
# A whole request (env block, stdin and framing); the shim sends its stdin in
# one field, so this is MAX_FIELD plus room for the environment.
MAX_REQUEST = MAX_FIELD + (64 << 10)
# The shim writes its request at once; a peer slower than this is not the shim.
READ_TIMEOUT = 30.0

# What a peer that hangs up does to our reads and writes.
_GONE = (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError)


class RequestHandler(Protocol):
    """What answers a decoded request (CniHandler)."""

    async def handle(self, request: Request) -> tuple[int, bytes, bytes]: ...


class _Malformed(Exception):
    """A request that did not arrive whole: answered with code 6."""


async def _read_request(stream: SocketStream) -> bytes:
    """Everything the shim sends (it shuts down its write side when done)."""
    chunks: list[bytes] = []
    size = 0
    try:
        with anyio.fail_after(READ_TIMEOUT):
            while True:
                try:
                    chunk = await stream.receive()
                except anyio.EndOfStream:
                    return b"".join(chunks)
                size += len(chunk)
                if size > MAX_REQUEST:
                    # Stop reading: the reply still reaches a peer that reads it.
                    raise _Malformed(f"request larger than {MAX_REQUEST} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise _Malformed(f"request not complete within {READ_TIMEOUT:g} s") from None


def _error_reply(err: CniError) -> bytes:
    return encode_reply(1, err.to_json(LATEST), f"afxdp: {err}\n".encode())


async def _answer(stream: SocketStream, handler: RequestHandler) -> None:
    """One connection: read, handle, reply, and exactly one log line."""
    bug: Exception | None = None
    try:
        request = Request.decode(await _read_request(stream))
    except (_Malformed, FrameError) as exc:
        what, problem = "request", f"malformed ({exc}); answered with code {DECODE_FAILURE}"
        err = CniError(DECODE_FAILURE, "malformed request from the afxdp shim", str(exc))
        reply = _error_reply(err)
    except _GONE as exc:
        log.warning("CNI request: the shim went away mid-request (%r)", exc)
        return
    else:
        what, problem = f"{request.env.get('CNI_COMMAND', '?')} request", ""
        try:
            code, out, err_text = await handler.handle(request)
        except Exception as exc:  # a bug: still answer the runtime in CNI's terms
            bug, problem = exc, "failed unexpectedly"
            reply = _error_reply(CniError(IO_FAILURE, "internal error in afxdpd", repr(exc)))
        else:
            reply = encode_reply(code, out, err_text)
    try:
        await stream.send(reply)
    except _GONE as exc:
        problem = f"{problem}; " if problem else ""
        log.warning("CNI %s: %sthe shim went away before its reply (%r)", what, problem, exc,
                    exc_info=bug)  # fmt: skip
        return
    if problem:
        log.warning("CNI %s: %s", what, problem, exc_info=bug)
    else:
        log.debug("CNI %s answered", what)


async def serve(
    run_dir: Path,
    handler: RequestHandler,
    *,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    async def answer(stream: SocketStream) -> None:
        async with stream:
            await _answer(stream, handler)

    await serve_unix(run_dir / SOCKET_NAME, answer, task_status=task_status)


def _read_queued(item: Path) -> bytes:
    """A queued request's bytes: a regular file (not followed), bounded in size."""
    fd = os.open(item, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise FrameError("not a regular file")
        data = f.read(MAX_REQUEST + 1)
    if len(data) > MAX_REQUEST:
        raise FrameError(f"larger than {MAX_REQUEST} bytes")
    return data


def _queued(queue: Path) -> list[Path]:
    return sorted(queue.glob("*.del"))


def _reject(item: Path) -> str:
    """Move ``item`` to ``rejected/``; returns where it went (for the log line)."""
    rejected = item.parent / REJECTED_DIR
    try:
        rejected.mkdir(mode=0o700, exist_ok=True)
        os.replace(item, rejected / item.name)
    except OSError as exc:
        # Never replayed again, even if it cannot be kept.
        item.unlink(missing_ok=True)
        return f"deleted (could not move it to {REJECTED_DIR}/: {exc})"
    return f"moved to {REJECTED_DIR}/"


async def replay_queue(run_dir: Path, handler: RequestHandler) -> int:
    """Run the DELs the shim queued while afxdpd was down; returns how many succeeded.

    A DEL that cannot be read or decoded, that fails, or whose handling raises,
    is moved to ``del-queue/rejected/`` with one log line: a DEL that fails now
    fails for good (bad config); retrying on every start would only repeat it,
    and one bad item must never keep afxdpd from starting.
    """
    queue = run_dir / QUEUE_DIR
    if not queue.is_dir():
        return 0
    done = 0
    for item in await run_sync(Work.DISK, _queued, queue):
        try:
            request = Request.decode(await run_sync(Work.DISK, _read_queued, item))
            if request.env.get("CNI_COMMAND") != "DEL":
                raise FrameError(f"CNI_COMMAND is {request.env.get('CNI_COMMAND')!r}, not DEL")
        except (FrameError, OSError) as exc:
            where = await run_sync(Work.DISK, _reject, item)
            log.error("queued DEL %s is unreadable (%s); %s", item.name, exc, where)
            continue
        try:
            code, out, _ = await handler.handle(request)
        except Exception as exc:
            where = await run_sync(Work.DISK, _reject, item)
            log.error("queued DEL %s raised %r; %s", item.name, exc, where)
            continue
        if code:
            where = await run_sync(Work.DISK, _reject, item)
            text = out.decode(errors="replace").strip()[:500]
            log.error("queued DEL %s failed: %s; %s", item.name, text, where)
            continue
        await run_sync(Work.DISK, item.unlink, True)
        log.info("replayed queued DEL %s", item.name)
        done += 1
    return done
