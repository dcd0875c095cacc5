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

What /metrics carries: ``afxdp_*`` (below), ``afxdp_build_info`` (1, with the
version, Python, libbpf and git revision as labels) and the standard
``process_*`` metrics (prometheus_client's ProcessCollector: open fds, fd
limit, memory, CPU), each once: nothing of ours repeats them. No ``_created``
series: a counter's creation time is clutter to a scraper of a long-lived
daemon, and it doubled the lines of every labelled counter and histogram.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from functools import partial
from importlib import metadata

import anyio
from anyio.abc import SocketAttribute, SocketListener, SocketStream, TaskStatus
from anyio.streams.stapled import MultiListener
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from afxdp import __version__
from afxdp.bpf import libbpf
from afxdp.errors import AfxdpError
from afxdp.frames import DeviceFrames
from afxdp.unixserver import ServerStats, serve_listener

# Process-wide in prometheus_client (a flag read when a metric is made and
# when it is collected): set here, before any metric of ours exists, rather
# than left to PROMETHEUS_DISABLE_CREATED_SERIES in the environment.
disable_created_metrics()  # type: ignore[no-untyped-call]

# 10740: outside 9100-9999, the range the Prometheus wiki's "default port
# allocations" hands to exporters, all of it taken (9109, the default before,
# is graphite_exporter's Graphite input); below Kubernetes' NodePort range
# (30000-32767) and the ephemeral ports (32768-60999), clear of the ports of
# kubelet and its neighbours (10248-10260), and neither registered with IANA
# nor seen open in nmap's port survey.
DEFAULT_PORT = 10740
DEFAULT_ADDRESS = f"127.0.0.1:{DEFAULT_PORT}"
MAX_HEAD = 8192
READ_TIMEOUT = 5.0
MAX_CLIENTS = 32
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# (pool, state, health) of every device, read at scrape time.
DeviceRows = Callable[[], Iterable[tuple[str, str, str]]]
# (pool, registered with kubelet now) of every pool, read at scrape time.
PoolRows = Callable[[], Iterable[tuple[str, bool]]]
# (ready, reason when not)
Readiness = Callable[[], tuple[bool, str]]

REVISION_ENV = "AFXDP_REVISION"  # the git commit an image was built from, when it says
UNKNOWN = "unknown"


def revision() -> str:
    """The git commit this afxdp was built from: ``$AFXDP_REVISION`` (an image
    build sets it), else the commit pip recorded when it installed afxdp from a
    git URL (PEP 610), else "unknown"."""
    if found := os.environ.get(REVISION_ENV, "").strip():
        return found
    try:
        direct = metadata.distribution("afxdp").read_text("direct_url.json")
        commit = json.loads(direct or "{}").get("vcs_info", {}).get("commit_id")
    except (metadata.PackageNotFoundError, ValueError, AttributeError):
        commit = None
    return commit if isinstance(commit, str) and commit else UNKNOWN


def build_labels() -> dict[str, str]:
    """``afxdp_build_info``'s labels."""
    try:
        libbpf_version = libbpf.version()
    except libbpf.BpfError:
        libbpf_version = UNKNOWN  # afxdpd without libbpf serves no device, but still says so
    return {
        "version": __version__,
        "python": platform.python_version(),
        "libbpf": libbpf_version,
        "revision": revision(),
    }


class _Live(Collector):
    """Values read from the service when scraped, not kept in step by hand."""

    def __init__(self, devices: DeviceRows, pools: PoolRows) -> None:
        self._devices, self._pools = devices, pools

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
        registered = GaugeMetricFamily(
            "afxdp_pool_registered",
            "1 while the pool's device plugin is registered with kubelet, else 0",
            labels=["pool"],
        )
        for pool, now in sorted(self._pools()):
            registered.add_metric([pool], 1 if now else 0)
        yield registered


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
    build_info: Gauge
    xdp_frames: _XdpFrames
    # Read what the registry shows from the kernel, before each scrape (off the
    # event loop); None: nothing to read.
    read_frames: Callable[[], Awaitable[list[DeviceFrames]]] | None = None

    async def refresh(self) -> None:
        """Before a scrape: read the datapath counters it shows."""
        if self.read_frames is not None:
            self.xdp_frames.read = await self.read_frames()

    @classmethod
    def create(cls, devices: DeviceRows = lambda: (), pools: PoolRows = lambda: ()) -> Metrics:
        r = CollectorRegistry()
        r.register(_Live(devices, pools))
        # The standard process_* metrics (open and max fds, memory, CPU, start
        # time), in our registry only: prometheus_client's default registry,
        # which also holds them, is never served.
        ProcessCollector(registry=r)
        labels = build_labels()
        build_info = Gauge(
            "afxdp_build_info", "1, labelled with what this afxdpd is built of", list(labels),
            registry=r,
        )  # fmt: skip
        build_info.labels(**labels).set(1)
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
            build_info=build_info,
        )

    @contextmanager
    def timed(self, histogram: Histogram, *labels: str) -> Iterator[list[str]]:
        """Observe the block's duration with ``labels`` + [result]; the block may set
        ``result[0]`` (also before it raises: a refusal's gRPC status); an exception
        it did not name counts as "error"."""
        result = ["ok"]
        start = time.perf_counter()
        try:
            yield result
        except BaseException:
            if result[0] == "ok":
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


class MetricsBindError(AfxdpError):
    """The metrics address cannot be had. afxdpd exits on it (``Exit.METRICS``):
    serving on would leave kubelet's liveness probe failing forever, the
    container restarted again and again with no word why."""


async def listen(address: str) -> MultiListener[SocketStream]:
    """Listeners on ``address``, one per address family it resolves to."""
    host, port = parse_address(address)
    try:
        return await anyio.create_tcp_listener(local_host=host, local_port=port)
    except OSError as exc:  # taken, not ours to bind, or a name that does not resolve
        raise MetricsBindError(f"cannot listen on {address} for /metrics, /healthz and "
                               f"/readyz: {exc.strerror or exc}") from exc  # fmt: skip


async def serve(
    address: str | MultiListener[SocketStream],
    metrics: Metrics,
    ready: Readiness,
    *,
    stats: ServerStats | None = None,
    task_status: TaskStatus[tuple[str, int]] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve on ``address`` (or listeners ``listen`` made, which this closes)
    until cancelled; started with the (host, port) actually bound. Raises
    MetricsBindError when the address cannot be had."""
    multi = await listen(address) if isinstance(address, str) else address

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

    async with multi, anyio.create_task_group() as tg:
        bound = multi.listeners[0].extra(SocketAttribute.local_address)  # noqa: S610
        name = f"metrics {bound[0]}:{bound[1]}"
        for listener in multi.listeners:  # one per address family the host resolves to
            assert isinstance(listener, SocketListener)  # what create_tcp_listener makes
            tg.start_soon(
                partial(
                    serve_listener,
                    listener,
                    answer,
                    name=name,
                    limit=MAX_CLIENTS,
                    stats=stats,
                    evict=True,  # no client may keep a probe out (issue 19)
                )
            )
        task_status.started((str(bound[0]), int(bound[1])))
