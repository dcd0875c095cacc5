"""The metrics and health endpoints: what they say, and hostile HTTP clients."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import pytest
from prometheus_client.parser import text_string_to_metric_families

from afxdp import metrics
from afxdp.metrics import Metrics, parse_address, route
from afxdp.unixserver import ServerStats

pytestmark = pytest.mark.anyio


def _get(port: int, path: str, method: str = "GET") -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def _samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text.decode())
        for s in family.samples
    }


class Node:
    def __init__(self) -> None:
        self.devices = [
            ("p1", "free", "Healthy"),
            ("p1", "allocated", "Healthy"),
            ("p1", "free", "Unhealthy"),
            ("p2", "free", "Healthy"),
        ]
        self.ready: tuple[bool, str] = (False, "pool p2 is not registered")


@asynccontextmanager
async def serving(
    node: Node, stats: ServerStats | None = None
) -> AsyncIterator[tuple[Metrics, int]]:
    m = Metrics.create(lambda: node.devices)
    async with anyio.create_task_group() as tg:
        _host, port = await tg.start(
            lambda task_status: metrics.serve(
                "127.0.0.1:0", m, lambda: node.ready, stats=stats, task_status=task_status
            )
        )
        yield m, port
        tg.cancel_scope.cancel()


async def test_metrics_count_what_happened_and_devices_as_they_are_now() -> None:
    node = Node()
    async with serving(node) as (m, port):
        for result in ("ok", "ok", "refused"):
            with m.timed(m.allocate, "p1") as r:
                r[0] = result
        with pytest.raises(RuntimeError), m.timed(m.cni, "ADD"):
            raise RuntimeError("a failed ADD")
        m.handshakes.labels("ok").inc(4)
        status, body = await anyio.to_thread.run_sync(_get, port, "/metrics")
        assert status == 200
        got = _samples(body)
        assert got["afxdp_allocate_seconds_count", (("pool", "p1"), ("result", "ok"))] == 2
        assert got["afxdp_allocate_seconds_count", (("pool", "p1"), ("result", "refused"))] == 1
        assert got["afxdp_cni_request_seconds_count", (("result", "error"), ("verb", "ADD"))] == 1
        assert got["afxdp_uds_connections_total", (("result", "ok"),)] == 4
        key = (("health", "Healthy"), ("pool", "p1"), ("state", "free"))
        assert got["afxdp_devices", key] == 1
        assert got["afxdp_allocations", ()] == 1
        node.devices.append(("p1", "allocated", "Healthy"))  # read at scrape time
        got = _samples((await anyio.to_thread.run_sync(_get, port, "/metrics"))[1])
        assert got["afxdp_allocations", ()] == 2
        assert got["afxdp_open_fds", ()] > 0


async def test_readyz_follows_readiness_and_healthz_is_always_ok() -> None:
    node = Node()
    async with serving(node) as (_m, port):
        status, body = await anyio.to_thread.run_sync(_get, port, "/readyz")
        assert (status, body) == (503, b"not ready: pool p2 is not registered\n")
        node.ready = (True, "")
        assert await anyio.to_thread.run_sync(_get, port, "/readyz") == (200, b"ready\n")
        assert (await anyio.to_thread.run_sync(_get, port, "/healthz"))[0] == 200
        assert await anyio.to_thread.run_sync(_get, port, "/healthz", "HEAD") == (200, b"")


def test_routes_refuse_what_they_do_not_serve() -> None:
    m, ready = Metrics.create(), lambda: (True, "")
    assert route(b"POST /metrics HTTP/1.1", m, ready).startswith(b"HTTP/1.1 405")
    assert route(b"GET /nothing HTTP/1.1", m, ready).startswith(b"HTTP/1.1 404")
    assert route(b"\x00\xff junk", m, ready).startswith(b"HTTP/1.1 400")
    assert route(b"GET /metrics?x=1 HTTP/1.0", m, ready).startswith(b"HTTP/1.1 200")


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("127.0.0.1:9109", ("127.0.0.1", 9109)),
        (":9109", ("0.0.0.0", 9109)),
        ("[::1]:80", ("::1", 80)),
    ],
)
def test_addresses(address: str, expected: tuple[str, int]) -> None:
    assert parse_address(address) == expected


@pytest.mark.parametrize("address", ["9109", "host:", "host:99999", "host:port"])
def test_bad_addresses_are_refused(address: str) -> None:
    with pytest.raises(ValueError, match="not HOST:PORT"):
        parse_address(address)


async def test_hostile_clients_cost_one_connection_never_the_server(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(metrics, "READ_TIMEOUT", 0.3)
    stats = ServerStats()
    async with serving(Node(), stats) as (_m, port):

        def attack() -> list[bytes]:
            replies = []
            # Silent past the deadline; a 100 KiB header; junk; a hang-up mid-request.
            for payload, read in [
                (b"", True),
                (b"GET / HTTP/1.1\r\nX: " + b"a" * 100_000, True),
                (b"\x00\xff" * 50 + b"\r\n\r\n", True),
                (b"GET /metr", False),
            ]:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                    try:
                        s.sendall(payload)
                        replies.append(s.recv(100) if read else b"")
                    except OSError:  # the server may close on us mid-send: fine
                        replies.append(b"closed")
            return replies

        replies = await anyio.to_thread.run_sync(attack)
        assert all(r.startswith((b"HTTP/1.1 400", b"closed")) for r in replies[:3]), replies
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(200)]
        try:
            with anyio.fail_after(5):
                while stats.refused < 200 - metrics.MAX_CLIENTS:
                    await anyio.sleep(0.02)
        finally:
            for s in held:
                s.close()
        with anyio.fail_after(5):
            while stats.active:
                await anyio.sleep(0.02)
        assert (await anyio.to_thread.run_sync(_get, port, "/healthz"))[0] == 200
        assert stats.failed == 0
