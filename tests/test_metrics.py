"""The metrics and health endpoints: what they say, and hostile HTTP clients."""

from __future__ import annotations

import platform
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial

import anyio
import pytest
from anyio.abc import SocketAttribute, SocketListener, SocketStream
from prometheus_client.parser import text_string_to_metric_families

from afxdp import __version__, metrics
from afxdp.bpf import libbpf
from afxdp.metrics import Metrics, parse_address, route
from afxdp.unixserver import ServerStats, serve_listener
from tests.slowloris import Slowloris, probe

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
        assert got["process_open_fds", ()] > 0


async def test_build_info_registered_pools_standard_process_metrics_once_no_created_series(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(metrics.REVISION_ENV, "0123abcd")
    registered = {"p1": True, "p2": False}
    m = Metrics.create(lambda: Node().devices, lambda: registered.items())
    # Every kind of instrument with a sample: counters and histograms are
    # where prometheus_client adds _created series.
    with m.timed(m.allocate, "p1"):
        pass
    with m.timed(m.cni, "ADD"):
        pass
    m.handshakes.labels("accepted").inc()
    m.reloads.labels("ok").inc()
    m.restarts_reconciled.inc()
    families = list(text_string_to_metric_families(m.exposition().decode()))
    names = [f.name for f in families]
    assert len(names) == len(set(names)), "a metric family appears twice"
    samples = _samples(m.exposition())
    assert not [name for name, _ in samples if name.endswith("_created")]
    build = {dict(labels)["version"]: (dict(labels), v) for (name, labels), v in samples.items()
             if name == "afxdp_build_info"}  # fmt: skip
    assert build == {__version__: ({"version": __version__, "python": platform.python_version(),
                                    "libbpf": libbpf.version(), "revision": "0123abcd"}, 1.0)}  # fmt: skip
    assert samples["afxdp_pool_registered", (("pool", "p1"),)] == 1
    assert samples["afxdp_pool_registered", (("pool", "p2"),)] == 0
    registered["p2"] = True  # read at scrape time
    assert _samples(m.exposition())["afxdp_pool_registered", (("pool", "p2"),)] == 1
    # The standard process metrics, and nothing of ours that says the same.
    ours = {n.removeprefix("afxdp_") for n in names if n.startswith("afxdp_")}
    standard = {n.removeprefix("process_") for n in names if n.startswith("process_")}
    assert {"open_fds", "max_fds", "resident_memory_bytes", "cpu_seconds"} <= standard
    assert not ours & standard
    # Only our registry is served: none of the default registry's python_gc_*.
    assert set(names) == {n for n in names if n.startswith(("afxdp_", "process_"))}


def test_a_result_set_before_an_exception_is_the_one_counted() -> None:
    m = Metrics.create()
    with pytest.raises(RuntimeError), m.timed(m.allocate, "p1") as result:
        result[0] = "failed_precondition"  # what the plugin does before re-raising
        raise RuntimeError("refused")
    labels = {"pool": "p1", "result": "failed_precondition"}
    assert m.registry.get_sample_value("afxdp_allocate_seconds_count", labels) == 1


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
            # Silent, all of them: each past the limit evicts the oldest, or is refused.
            with anyio.fail_after(5):
                while stats.refused + stats.evicted < 200 - metrics.MAX_CLIENTS:
                    await anyio.sleep(0.02)
        finally:
            for s in held:
                s.close()
        with anyio.fail_after(5):
            while stats.active:
                await anyio.sleep(0.02)
        assert (await anyio.to_thread.run_sync(_get, port, "/healthz"))[0] == 200
        assert stats.failed == 0


# The reported attack (issue 19), scaled down 5 times: afxdpd gives a request
# head 5 s and the attacker sent a byte a second; here 1 s and a byte every 0.2 s.
SCALED_READ_TIMEOUT = 1.0
TRICKLE = 0.2
PROBES = 40


async def test_healthz_answers_every_probe_while_slowloris_clients_take_every_slot(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 19: any pod reaches the port kubelet probes, so MAX_CLIENTS + 8 slow
    clients must not make one probe fail (a 200 within kubelet's 1 s)."""
    monkeypatch.setattr(metrics, "READ_TIMEOUT", SCALED_READ_TIMEOUT)
    stats = ServerStats()
    async with serving(Node(), stats) as (_m, port), anyio.create_task_group() as tg:
        attack = Slowloris("127.0.0.1", port, trickle=TRICKLE)
        tg.start_soon(attack.run, metrics.MAX_CLIENTS + 8)
        with anyio.fail_after(5):
            while stats.active < metrics.MAX_CLIENTS:  # every slot taken
                await anyio.sleep(0.02)
        answers = []
        for _ in range(PROBES):  # some 3 scaled read timeouts of attack
            answers.append(await probe("127.0.0.1", port, "/healthz"))
            await anyio.sleep(SCALED_READ_TIMEOUT * 3 / PROBES)
        tg.cancel_scope.cancel()
    failed = [(i, a) for i, a in enumerate(answers) if a != "200"]
    assert failed == [], f"{len(failed)} of {PROBES} probes failed: {failed}"
    assert attack.connections > metrics.MAX_CLIENTS + 8  # the attackers were cut off, came back
    assert stats.failed == 0


async def test_a_full_server_evicts_the_oldest_peer_that_owes_a_move_never_one_at_work() -> None:
    """``serve_listener(evict=True)``, the metrics server's policy, on its own: 3
    slots; "w" asks for work the server does (not waiting on the peer), "s" for
    more bytes than the kernel buffers to a peer that never reads."""
    release, arrived, working, sending = anyio.Event(), [0], [0], [0]
    ended: list[int] = []  # connections by order of arrival, as they end

    async def answer(stream: SocketStream) -> None:
        arrived[0] += 1
        me = arrived[0]
        try:
            request = await stream.receive(1)
            if request == b"w":
                working[0] += 1
                await release.wait()
                await stream.send(b"done")
            else:
                sending[0] += 1
                await stream.send(b"x" * (16 << 20))
        finally:
            ended.append(me)

    async def until(what: Callable[[], bool]) -> None:
        with anyio.fail_after(5):
            while not what():
                await anyio.sleep(0.01)

    async def connect(request: bytes) -> SocketStream:
        stream = await anyio.connect_tcp("127.0.0.1", port)
        await stream.send(request)
        return stream

    async def closed_on_us(stream: SocketStream) -> bool:
        with anyio.fail_after(5):
            try:
                while await stream.receive():
                    pass
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return True
        return False

    stats = ServerStats()
    multi = await anyio.create_tcp_listener(local_host="127.0.0.1")
    (listener,) = multi.listeners
    assert isinstance(listener, SocketListener)
    async with multi, anyio.create_task_group() as tg:
        port = listener.extra(SocketAttribute.local_port)
        tg.start_soon(
            partial(serve_listener, listener, answer, name="t", limit=3, stats=stats, evict=True)
        )
        at_work = await connect(b"w")
        await until(lambda: working[0] == 1)
        not_reading = await connect(b"s")  # a peer that never reads
        await until(lambda: sending[0] == 1)
        quiet = await connect(b"")  # a peer that never sends
        await until(lambda: arrived[0] == 3)
        # Full. The first newcomer takes the slot of the oldest that owes a move.
        first = await connect(b"w")
        await until(lambda: working[0] == 2)
        await until(lambda: ended == [2])  # the one not reading, not the one at work
        second = await connect(b"w")
        await until(lambda: working[0] == 3)
        await until(lambda: ended == [2, 3])
        assert await closed_on_us(quiet)
        assert (stats.evicted, stats.refused) == (2, 0)
        # Everyone left is at work: a newcomer is refused, no one is cut off.
        refused = await connect(b"w")
        assert await closed_on_us(refused)
        assert (stats.evicted, stats.refused, arrived[0]) == (2, 1, 5)
        release.set()
        for stream in (at_work, first, second):
            assert await stream.receive() == b"done"
        await until(lambda: stats.active == 0)
        assert (stats.served, stats.failed, sorted(ended)) == (3, 0, [1, 2, 3, 4, 5])
        for stream in (at_work, not_reading, quiet, first, second, refused):
            await stream.aclose()
        tg.cancel_scope.cancel()


async def test_a_slow_honest_scraper_gets_all_of_metrics_when_nothing_presses() -> None:
    """Eviction is for a full server only: a scraper on a slow link that sends its
    request in pieces and reads a large reply slowly gets every byte of it."""
    node = Node()
    node.devices = [(f"pool{i}", "free", "Healthy") for i in range(2000)]  # some 130 KB

    def scrape(port: int) -> tuple[bytes, bytes]:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window
            s.settimeout(5)
            s.connect(("127.0.0.1", port))
            for piece in (b"GET /met", b"rics HTTP/1.1\r\nHost: x\r\n", b"\r\n"):
                s.sendall(piece)
                time.sleep(0.2)
            data = b""
            while chunk := s.recv(4096):
                data += chunk
                time.sleep(0.005)
        head, _, body = data.partition(b"\r\n\r\n")
        return head, body

    stats = ServerStats()
    async with serving(node, stats) as (_m, port):
        head, body = await anyio.to_thread.run_sync(scrape, port)
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert f"Content-Length: {len(body)}\r\n".encode() in head
    got = _samples(body)
    assert sum(v for (name, _), v in got.items() if name == "afxdp_devices") == 2000
    assert (stats.served, stats.evicted, stats.refused) == (1, 0, 0)
