"""Prometheus metrics and the health endpoints, on one small HTTP server.

``GET /metrics`` (Prometheus text format, from a registry the service owns),
``/healthz`` (200 while the process serves) and ``/readyz`` (200 when every pool
is served and registered and the CNI socket listens, else 503 with the reason).
The server speaks just enough HTTP/1.1 for scrapers and kubelet probes: one
request per connection, GET or HEAD, a head of at most MAX_HEAD bytes read
within READ_TIMEOUT (the whole head, however it trickles in). It runs on the
event loop (no thread) through the same confined accept loop as the unix
servers, so a hostile client costs one connection, never the server. Any pod
may reach the port (the DaemonSet binds the node's IP for kubelet's probes), so
when all MAX_CLIENTS slots are taken a newcomer evicts the oldest client that is
still sending its request or not reading its reply (``serve_listener``'s
``evict``): clients that trickle bytes cannot keep /healthz from kubelet.
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from functools import partial

import anyio
from anyio.abc import SocketAttribute, SocketListener, SocketStream, TaskStatus
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from afxdp.frames import DeviceFrames
from afxdp.unixserver import ServerStats, serve_listener

DEFAULT_ADDRESS = "127.0.0.1:9109"
MAX_HEAD = 8192
READ_TIMEOUT = 5.0
MAX_CLIENTS = 32
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# (pool, state, health) of every device, read at scrape time.
DeviceRows = Callable[[], Iterable[tuple[str, str, str]]]
# (ready, reason when not)
Readiness = Callable[[], tuple[bool, str]]


class _Live(Collector):
    """Values read from the service when scraped, not kept in step by hand."""

    def __init__(self, devices: DeviceRows) -> None:
        self._devices = devices

    def collect(self) -> Iterator[Metric]:
        devices = GaugeMetricFamily(
            "afxdp_devices", "Devices by pool, state and health", labels=["pool", "state", "health"]
        )
        counts: dict[tuple[str, str, str], int] = {}
        for row in self._devices():
            counts[row] = counts.get(row, 0) + 1
        for labels, n in sorted(counts.items()):
            devices.add_metric(list(labels), n)
        yield devices
        allocations = GaugeMetricFamily("afxdp_allocations", "Devices allocated to pods")
        allocations.add_metric([], sum(n for (_, state, _), n in counts.items() if state != "free"))
        yield allocations
        fds = GaugeMetricFamily("afxdp_open_fds", "File descriptors open in afxdpd")
        fds.add_metric([], len(os.listdir("/proc/self/fd")))
        yield fds


class _XdpFrames(Collector):
    """``afxdp_xdp_frames_total``: what our XDP programs counted, as read
    just before this scrape (``Metrics.refresh``)."""

    def __init__(self) -> None:
        self.read: list[DeviceFrames] = []

    def collect(self) -> Iterator[Metric]:
        frames = CounterMetricFamily(
            "afxdp_xdp_frames",
            "Frames our XDP program gave a verdict on, by queue and action: redirected "
            "(to the pod's AF_XDP socket), no_socket (none bound on that queue: to the "
            "kernel), control (ARP or IPv6 neighbour discovery: to the kernel)",
            labels=["pool", "device", "queue", "action"],
        )
        for d in self.read:
            for (queue, action), n in sorted(d.counts.items()):
                frames.add_metric([d.pool, d.device, str(queue), action], n)
        yield frames


@dataclass
class Metrics:
    """The service's instruments; ``registry`` is what /metrics serves."""

    registry: CollectorRegistry
    allocate: Histogram
    cni: Histogram
    handshakes: Counter
    reloads: Counter
    config_invalid: Gauge
    restarts_reconciled: Counter
    fd_limit: Gauge
    xdp_frames: _XdpFrames
    # Read what the registry shows from the kernel, before each scrape (off the
    # event loop); None: nothing to read.
    read_frames: Callable[[], Awaitable[list[DeviceFrames]]] | None = None

    async def refresh(self) -> None:
        """Before a scrape: read the datapath counters it shows."""
        if self.read_frames is not None:
            self.xdp_frames.read = await self.read_frames()

    @classmethod
    def create(cls, devices: DeviceRows = lambda: ()) -> Metrics:
        r = CollectorRegistry()
        r.register(_Live(devices))
        xdp_frames = _XdpFrames()
        r.register(xdp_frames)
        return cls(
            xdp_frames=xdp_frames,
            registry=r,
            allocate=Histogram(
                "afxdp_allocate_seconds",
                "Allocate calls by pool and result",
                ["pool", "result"],
                registry=r,
            ),
            cni=Histogram(
                "afxdp_cni_request_seconds",
                "CNI requests by verb and result",
                ["verb", "result"],
                registry=r,
            ),
            handshakes=Counter(
                "afxdp_uds_connections",
                "UDS handshake connections by outcome (accepted, refused, denied, failed)",
                ["result"],
                registry=r,
            ),
            reloads=Counter(
                "afxdp_config_reloads", "Config reloads by result", ["result"], registry=r
            ),
            config_invalid=Gauge(
                "afxdp_config_invalid", "1 while the last config read was refused", registry=r
            ),
            restarts_reconciled=Counter(
                "afxdp_restart_reconciled", "Allocations taken over from a previous run", registry=r
            ),
            fd_limit=Gauge("afxdp_fd_limit", "afxdpd's soft RLIMIT_NOFILE", registry=r),
        )

    @contextmanager
    def timed(self, histogram: Histogram, *labels: str) -> Iterator[list[str]]:
        """Observe the block's duration with ``labels`` + [result]; the block may set
        ``result[0]``; an exception counts as "error"."""
        result = ["ok"]
        start = time.perf_counter()
        try:
            yield result
        except BaseException:
            result[0] = "error"
            raise
        finally:
            histogram.labels(*labels, result[0]).observe(time.perf_counter() - start)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def parse_address(address: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[v6]:PORT`` or ``:PORT`` (every interface)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"not HOST:PORT: {address!r}")
    return host.strip("[]") or "0.0.0.0", int(port)  # noqa: S104 - ":PORT" asks for it


def _response(status: str, body: bytes, content_type: str, head_only: bool) -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    return head if head_only else head + body


def _path(request_line: bytes) -> bytes:
    """The path a request line asks for (without its query); empty if none."""
    parts = request_line.split()
    return parts[1].split(b"?", 1)[0] if len(parts) == 3 else b""


def route(request_line: bytes, metrics: Metrics, ready: Readiness) -> bytes:
    """The whole response to one request line (no I/O: tested on its own)."""
    parts = request_line.split()
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
        return _response("400 Bad Request", b"bad request line\n", "text/plain", False)
    method, target = parts[0], _path(request_line)
    if method not in (b"GET", b"HEAD"):
        return _response("405 Method Not Allowed", b"GET or HEAD\n", "text/plain", False)
    head_only = method == b"HEAD"
    if target == b"/metrics":
        return _response("200 OK", metrics.exposition(), CONTENT_TYPE, head_only)
    if target == b"/healthz":
        return _response("200 OK", b"ok\n", "text/plain", head_only)
    if target == b"/readyz":
        ok, reason = ready()
        if ok:
            return _response("200 OK", b"ready\n", "text/plain", head_only)
        body = f"not ready: {reason}\n".encode()
        return _response("503 Service Unavailable", body, "text/plain", head_only)
    return _response("404 Not Found", b"/metrics, /healthz or /readyz\n", "text/plain", head_only)


async def _read_head(stream: SocketStream) -> bytes | None:
    """The request's head up to its blank line; None if too long, cut or too slow."""
    data = b""
    with anyio.move_on_after(READ_TIMEOUT):
        while b"\r\n\r\n" not in data and b"\n\n" not in data:
            try:
                data += await stream.receive(4096)
            except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                return None
            if len(data) > MAX_HEAD:
                return None
        return data
    return None


async def serve(
    address: str,
    metrics: Metrics,
    ready: Readiness,
    *,
    stats: ServerStats | None = None,
    task_status: TaskStatus[tuple[str, int]] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled; started with the (host, port) actually bound."""
    host, port = parse_address(address)

    async def answer(stream: SocketStream) -> None:
        head = await _read_head(stream)
        if head is None:
            reply = _response("400 Bad Request", b"bad or slow request\n", "text/plain", False)
        else:
            line = head.split(b"\n", 1)[0].rstrip(b"\r")
            if _path(line) == b"/metrics":
                await metrics.refresh()  # what the datapath counted, read off the loop
            reply = route(line, metrics, ready)
        # A client that left has nothing to be told.
        gone = (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError)
        with anyio.move_on_after(READ_TIMEOUT), suppress(*gone):
            await stream.send(reply)

    multi = await anyio.create_tcp_listener(local_host=host, local_port=port)
    async with multi, anyio.create_task_group() as tg:
        bound = multi.listeners[0].extra(SocketAttribute.local_address)  # noqa: S610
        for listener in multi.listeners:  # one per address family the host resolves to
            assert isinstance(listener, SocketListener)  # what create_tcp_listener makes
            tg.start_soon(
                partial(
                    serve_listener,
                    listener,
                    answer,
                    name=f"metrics {address}",
                    limit=MAX_CLIENTS,
                    stats=stats,
                    evict=True,  # no client may keep a probe out (issue 19)
                )
            )
        task_status.started((str(bound[0]), int(bound[1])))
