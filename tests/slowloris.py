"""The metrics port's reported attacker (issue 19) and kubelet's probe of it.

``Slowloris`` is a pod on the node: many connections, each a request line and
then a byte per ``trickle``, never the blank line that ends the head; when the
server ends one (a 400, a close) it comes back. ``probe`` is what kubelet's
httpGet does: connect, one request, the whole reply within a deadline (a
probe's ``timeoutSeconds``, 1 s unless set). test_metrics.py runs them scaled
down; the soak (tests/soak.py) at the reported pace while pods come and go.
"""

from __future__ import annotations

import re
import time
from contextlib import suppress
from dataclasses import dataclass, field

import anyio

PROBE_DEADLINE = 1.0  # kubelet's default timeoutSeconds


@dataclass
class Slowloris:
    """``run(clients)`` until cancelled; ``connections`` counts every connect."""

    host: str
    port: int
    trickle: float = 1.0  # a byte per this many seconds
    comeback: float = 0.01  # the pause before a connection cut off is made again
    connections: int = 0

    async def run(self, clients: int) -> None:
        async with anyio.create_task_group() as tg:
            for _ in range(clients):
                tg.start_soon(self._client)

    async def _client(self) -> None:
        while True:
            with suppress(OSError, anyio.EndOfStream, anyio.BrokenResourceError):
                async with await anyio.connect_tcp(self.host, self.port) as s:
                    self.connections += 1
                    await s.send(b"GET /healthz HTTP/1.1\r\n")
                    while True:
                        with anyio.move_on_after(self.trickle):
                            await s.receive()  # the server answered or closed: start again
                            break
                        await s.send(b"X")
            await anyio.sleep(self.comeback)  # back at once, but without spinning


async def get(
    host: str, port: int, path: str, deadline: float = PROBE_DEADLINE
) -> tuple[str, bytes]:
    """One GET of ``path`` on a connection of its own, the whole reply within
    ``deadline``: its status ("200") and body, or what went wrong instead (no
    reply in time, a refusal, a reply cut short) and no body."""
    try:
        with anyio.fail_after(deadline):
            async with await anyio.connect_tcp(host, port) as s:
                await s.send(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n"
                             "User-Agent: kube-probe\r\nConnection: close\r\n\r\n".encode())  # fmt: skip
                reply = b""
                with suppress(anyio.EndOfStream):
                    while True:
                        reply += await s.receive()
    except TimeoutError:
        return f"no reply within {deadline:g} s", b""
    except (OSError, anyio.BrokenResourceError) as exc:
        return f"{type(exc).__name__}: {exc}", b""
    if not reply:
        return "closed without a reply", b""
    head, _, body = reply.partition(b"\r\n\r\n")
    status = re.match(rb"HTTP/1\.[01] (\d{3}) ", head)
    length = re.search(rb"\r\ncontent-length: *(\d+)\r", head + b"\r", re.I)
    if status is None or length is None:
        return f"not HTTP: {reply[:200]!r}", b""
    if int(length[1]) != len(body):
        return f"a reply cut short: {reply[:200]!r}", b""
    return status[1].decode(), body


async def probe(host: str, port: int, path: str, deadline: float = PROBE_DEADLINE) -> str:
    """One httpGet probe of ``path``: its status ("200"), or what went wrong
    instead (``get``)."""
    return (await get(host, port, path, deadline))[0]


@dataclass
class Prober:
    """Probes as kubelet does, alternating ``paths`` every ``interval`` until
    cancelled; each must be a 200 within ``deadline``. No probe is made while
    someone else holds ``lock``."""

    host: str
    port: int
    paths: tuple[str, ...] = ("/healthz", "/readyz")
    interval: float = 0.5
    deadline: float = PROBE_DEADLINE
    probes: int = 0
    slowest: float = 0.0  # seconds, of the probes answered
    failures: int = 0
    first_failures: list[str] = field(default_factory=list)  # which probe, and what it got
    lock: anyio.Lock = field(default_factory=anyio.Lock)

    async def run(self) -> None:
        while True:
            path = self.paths[self.probes % len(self.paths)]
            async with self.lock:
                started = time.monotonic()
                got = await probe(self.host, self.port, path, self.deadline)
            self.probes += 1
            if got == "200":
                self.slowest = max(self.slowest, time.monotonic() - started)
            else:
                self.failures += 1
                if len(self.first_failures) < 10:
                    self.first_failures.append(f"probe {self.probes} of {path}: {got}")
            await anyio.sleep(self.interval)
