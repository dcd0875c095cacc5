"""The composition root: one asyncio process per node, all parts in one task group.

Wiring only: device state belongs to ``devices.Devices``, what is set up for a
handout to ``handouts.Handouts``. Start-up order matters: the netlink watch is
subscribed before the inventory is read (no link event is lost in between),
pools are built, every pool's server is serving (and then registers), link
events start flowing, and only then is the service ready. Shutdown takes back
every handout whose device is not in a pod.
"""

from __future__ import annotations

import ctypes
import gc
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import TypeVar

import anyio
import msgspec
from anyio.abc import SocketStream, TaskGroup, TaskStatus
from anyio.streams.stapled import MultiListener

from afxdp import cdi, control, frames, inventory, kindnet, metrics, pools, workers
from afxdp import status as st
from afxdp.cni import server as cni_server
from afxdp.cni.attachments import AttachmentStore
from afxdp.cni.errors import TRY_AGAIN_LATER, CniError
from afxdp.cni.frame import Request
from afxdp.cni.handler import CniHandler
from afxdp.cni.netconf import peek_version
from afxdp.config import Config, LoadedConfig, load_config_file, refuse_pinned_maps
from afxdp.datapath import KernelDatapath, choose_layout
from afxdp.deviceplugin.plugin import PoolPlugin
from afxdp.deviceplugin.registration import Registration
from afxdp.devices import Devices
from afxdp.dra.claims import Claims, ClaimSource, NoApiServer
from afxdp.dra.registration import DraRegistration
from afxdp.errors import ConfigError, ConfigIssue
from afxdp.handouts import Handouts
from afxdp.inventory import NetDev
from afxdp.logsetup import LEVELS, OWN_LOGGERS
from afxdp.metrics import Metrics
from afxdp.netwatch import NetWatch
from afxdp.podresources import PodResourcesChecker
from afxdp.secondary import SecondaryDeviceProvider
from afxdp.state import StateStore
from afxdp.uds.handshake import HostCheck
from afxdp.uds.server import ConnectionBudget
from afxdp.unixserver import ServerStats
from afxdp.workers import Work

# How often allocations are checked against kubelet's PodResources.
RECONCILE_INTERVAL = 10.0
COLLECTOR_OFF_FOR = 60.0  # s: the garbage collector is off while afxdpd starts
VERBS = frozenset({"ADD", "DEL", "CHECK", "GC", "STATUS", "VERSION"})
# How often the config file is looked at, and how long a change must settle.
CONFIG_POLL, CONFIG_SETTLE = 1.0, 0.3
# Seconds a reload waits for the config file to be read (a hung filesystem).
CONFIG_READ_TIMEOUT = 5.0

log = logging.getLogger(__name__)
T = TypeVar("T")


class _Hung(Exception):
    """A call on the config file did not return in time, or one before it has not."""


@dataclass(frozen=True)
class Paths:
    kubelet_dir: Path = Path("/var/lib/kubelet")
    uds_dir: Path = Path("/tmp/afxdp_dp")
    pin_dir: Path = Path("/var/run/afxdp_dp")
    run_dir: Path = Path("/run/afxdp")
    # The durable record; None keeps it in the run dir (tests). afxdpd's
    # --state-dir defaults to /var/lib/afxdp.
    state_dir: Path | None = None
    # Where CDI specs go (afxdpd: /var/run/cdi); None writes none (tests).
    cdi_dir: Path | None = None


class _Counted:
    """The CNI handler, with each request counted and timed by verb and result,
    and, while the service drains for a stop, new requests turned away."""

    def __init__(self, handler: CniHandler, m: Metrics) -> None:
        self.handler, self.metrics = handler, m
        self.in_flight = 0
        self.draining = False

    async def handle(self, request: Request) -> tuple[int, bytes, bytes]:
        verb = request.env.get("CNI_COMMAND", "")
        verb = verb if verb in VERBS else "other"  # a label per junk value would grow forever
        if self.draining and verb != "VERSION":
            err = CniError(TRY_AGAIN_LATER, "afxdpd is stopping; try again in a moment")
            return 1, err.to_json(peek_version(request.stdin)), f"afxdp: {err}\n".encode()
        self.in_flight += 1
        start = time.perf_counter()
        try:
            with self.metrics.timed(self.metrics.cni, verb) as result:
                code, out, err_text = await self.handler.handle(request)
                result[0] = "ok" if code == 0 else f"code {_cni_code(out)}"
        finally:
            self.in_flight -= 1
        # One line per request, with its outcome and how long it took.
        log.log(logging.INFO if code == 0 else logging.WARNING, "CNI %s %s: %s in %.1f ms",
                verb, request.env.get("CNI_CONTAINERID", "-")[:12], result[0],
                (time.perf_counter() - start) * 1000)  # fmt: skip
        return code, out, err_text


def _cni_code(out: bytes) -> str:
    try:
        return str(int(json.loads(out)["code"]))
    except (ValueError, KeyError, TypeError):
        return "?"


def _trim_native_heap() -> None:
    """Give freed native memory back to the OS. Worker threads each get a glibc
    arena, and a node agent that runs for months fragments them: RSS crept up
    7 % over 1,000 pod lifecycles while the Python heap stayed flat."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _same_apis(new: Config, old: Config) -> Config:
    """``new``, each pool it keeps offered through the API it was: which allocator
    ends an allocation (kubelet's PodResources, or a claim's Unprepare) must
    not change under the pods that hold its devices. A change of ``api`` takes
    effect at the next start (said so)."""
    was = {p.name: p.api for p in old.pools}
    pools = []
    for pool in new.pools:
        kept = pool
        if pool.name in was and pool.api != was[pool.name]:
            log.warning("reload: pool %s stays offered through %s; api %s takes effect at "
                        "the next start", pool.name, was[pool.name], pool.api)  # fmt: skip
            kept = msgspec.structs.replace(pool, api=was[pool.name])
        pools.append(kept)
    return msgspec.structs.replace(new, pools=tuple(pools))


try:
    _LIBC: ctypes.CDLL | None = ctypes.CDLL("libc.so.6")
except OSError:  # not glibc: nothing to trim this way
    _LIBC = None


@dataclass
class Service:
    config: Config
    node_name: str
    paths: Paths
    secondary: SecondaryDeviceProvider
    metrics_address: str = ""  # HOST:PORT of /metrics, /healthz, /readyz; empty: none
    fd_limit: tuple[int, int] = (0, 0)
    devices: Devices | None = None
    registrations: dict[str, Registration] = field(default_factory=dict)
    # Where NodePrepareResources reads ResourceClaims (afxdpd --kube-api).
    claim_source: ClaimSource = field(default_factory=NoApiServer)
    claims: Claims | None = None
    dra: DraRegistration | None = None  # served once a pool is offered through DRA
    servers: dict[str, ServerStats] = field(default_factory=dict)
    metrics: Metrics = field(init=False)
    config_path: Path | None = None  # re-read on SIGHUP and when it changes
    # False (afxdpd --no-pinned-maps): a config with a pinned-map pool is
    # refused, at a reload as at the start (config.refuse_pinned_maps).
    pinned_maps: bool = True
    # Freeze the start-up heap once ready (afxdpd does; a test that runs services
    # in its own process must not: its garbage would stay).
    freeze_heap: bool = False
    layout: str | None = None  # the datapath layout (datapath.choose_layout), once probed
    layout_reason: str | None = None
    _tg: TaskGroup | None = field(default=None, init=False)
    _specs: cdi.CdiSpecs | None = field(default=None, init=False)
    _attachments: AttachmentStore | None = field(default=None, init=False)
    _pool_scopes: dict[str, anyio.CancelScope] = field(default_factory=dict, init=False)
    _pool_stopped: dict[str, anyio.Event] = field(default_factory=dict, init=False)
    _cni: _Counted | None = field(default=None, init=False)
    _config_reading: anyio.Lock = field(default_factory=anyio.Lock, init=False)
    # One reload applied at a time (SIGHUP and the file watch may come at once):
    # a pool one stops must not be one another just served again.
    _reloading: anyio.Lock = field(default_factory=anyio.Lock, init=False)
    # Set when the config read a reload left behind (past its deadline) returns.
    _config_left: threading.Event | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.metrics = Metrics.create(
            lambda: self.devices.rows() if self.devices else [], self.pool_registrations
        )
        self.metrics.read_frames = self.read_frames

    async def read_frames(self) -> list[frames.DeviceFrames]:
        """What every device's XDP program counted (off the event loop)."""
        return await frames.read(self.devices.counting() if self.devices else [])

    @property
    def ready(self) -> bool:
        return self.devices is not None and self.devices.ready

    def readiness(self) -> tuple[bool, str]:
        """Ready: serving, every pool registered with kubelet, the CNI socket listening."""
        if not self.ready:
            return False, "starting"
        waiting = [r.plugin.pool.config.resource_name
                   for r in self.registrations.values() if not r.registered]  # fmt: skip
        if self.dra is not None and not self.dra.registered:
            waiting.append(f"DRA driver {self.dra.driver}")
        if waiting:
            return False, "not registered with kubelet: " + ", ".join(waiting)
        return True, ""

    def pool_registrations(self) -> list[tuple[str, bool]]:
        """(pool, registered with kubelet now) of every pool served (a removed pool
        that drains: False), as ``afxdpctl status`` says too."""
        if self.devices is None:
            return []
        return [(name, self._registered(name)) for name in self.devices.pools]

    def _registered(self, name: str) -> bool:
        pool = self.devices.pools.get(name) if self.devices else None
        if pool is not None and pool.config.dra and name not in self.registrations:
            return self.dra is not None and self.dra.registered
        reg = self.registrations.get(name)  # none while a removed pool drains
        return reg is not None and reg.registered

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled. The metrics address is bound first: when it
        cannot be had (``metrics.MetricsBindError``) nothing else has started,
        and afxdpd exits saying so instead of serving while kubelet's liveness
        probe, which needs that port, fails forever."""
        if not self.metrics_address:
            await self._run(None, task_status=task_status)
            return
        async with await metrics.listen(self.metrics_address) as listener:
            await self._run(listener, task_status=task_status)

    async def _run(
        self,
        metrics_listener: MultiListener[SocketStream] | None,
        *,
        task_status: TaskStatus[None],
    ) -> None:
        if self.freeze_heap:
            # Start-up builds every device's state (1,000: hundreds of thousands
            # of objects, nearly all kept), and the collector walked that growing
            # heap again and again: 4 full collections, 1.25 s of a 3.4 s start on
            # a busy node. Off until ready (_say_when_ready: one collection, then
            # a freeze), or COLLECTOR_OFF_FOR at most.
            gc.disable()
        watch = NetWatch()
        watch.open()
        kind = await kindnet.build() if self.config.kind_cluster else None
        netdevs = {nd.name: nd for nd in await inventory.scan()}
        store = AttachmentStore(self.paths.run_dir / "cni-attachments.json")
        self._attachments = store
        state = StateStore(self.paths.state_dir or self.paths.run_dir, self.paths.pin_dir)
        record = state.load()
        # Devices in pods since before this start are not in our netns: their
        # pools count them as the record describes them (without one, as their
        # CNI attachments do: kubelet may say a pod holds them).
        described = store.all() if state.unreadable else record.allocations.values()
        in_pods = {
            a.device: msgspec.convert(a.netdev, NetDev)
            for a in described
            if a.netdev and a.device not in netdevs
        }
        assembly = pools.assemble(
            self.config,
            [*netdevs.values(), *in_pods.values()],
            self.node_name,
            unprivileged_bpf_disabled=inventory.unprivileged_bpf_disabled(),
            secondary=self.secondary,
            kind_devices=kind.devices if kind else (),
        )
        for warning in assembly.warnings:
            log.warning("%s", warning)
        pod_resources = PodResourcesChecker(
            self.paths.kubelet_dir / "pod-resources" / "kubelet.sock"
        )
        # Probed once: loads the map-in-map program and puts an XSKMAP in its slot.
        layout, why = await workers.run_sync(Work.DEVICES, choose_layout)
        log.info("datapath: %s layout (%s)", layout, why)
        self.layout, self.layout_reason = layout, why
        async with anyio.create_task_group() as tg:
            if metrics_listener is not None:
                await self._serve_metrics(tg, metrics_listener)
            handouts = Handouts(
                task_group=tg,
                datapath=KernelDatapath(self.paths.pin_dir, layout),
                uds_dir=self.paths.uds_dir,
                pin_dir=self.paths.pin_dir,
                check_host=partial(self._check_host, pod_resources),
                secondary=self.secondary,
                # As seen now (a reload or resync reads the links again), else at start.
                netdev_of=lambda name: (
                    (self.devices.netdevs.get(name) if self.devices else None)
                    or netdevs.get(name)
                    or in_pods.get(name)
                ),
                uds_budget=ConnectionBudget.for_fd_limit(self.fd_limit[0] or 1024),
                store=state,
            )
            handouts.count_uds = lambda outcome: self.metrics.handshakes.labels(outcome).inc()
            self.devices = devs = Devices(
                assembly.pools,
                handouts,
                find_stale=pod_resources.stale,
                read_link=partial(workers.run_sync, Work.NETLINK, inventory.read_one),
                scan=inventory.scan,
                netdevs=netdevs,
                holders=pod_resources,
            )
            # A DRA pool's devices reach containers through CDI only: claim specs
            # are written whenever there is a CDI dir, whatever the config's cdi.
            self.claims = claims = Claims(devs, self.claim_source, self.node_name,
                                          state_dir=self.paths.state_dir or self.paths.run_dir,
                                          cdi_dir=self.paths.cdi_dir)  # fmt: skip
            claims.load()
            specs = None
            if self.config.cdi and self.paths.cdi_dir is not None:
                specs = cdi.CdiSpecs(self.paths.cdi_dir, uds_dir=self.paths.uds_dir,
                                     pin_dir=self.paths.pin_dir)  # fmt: skip
                await specs.start([p for p in self.config.pools if not p.dra])
            await claims.clean_specs()
            try:
                # The prepared claims hold their devices, whatever PodResources says.
                kept = await devs.start(record, unreadable=state.unreadable, torn=state.torn,
                                        ask=claims.held_too(pod_resources.held))  # fmt: skip
                self.metrics.restarts_reconciled.inc(len(kept))
                devs.prepare_all()  # fresh programs on free devices: Allocate need not wait
                self._tg, self._specs = tg, specs
                for pool in assembly.pools:
                    await self._serve_pool(pool.name)
                if self.config_path is not None:
                    tg.start_soon(self._watch_config, self.config_path)
                tg.start_soon(watch.run, devs.on_link, devs.resync)
                self.servers["control"] = ServerStats()
                await tg.start(
                    partial(control.serve, stats=self.servers["control"]),
                    self.paths.run_dir,
                    self.status_read,
                )
                cni = CniHandler(devs, store, after=tg)
                self._cni = _Counted(cni, self.metrics)
                await tg.start(cni_server.serve, self.paths.run_dir, self._cni)
                devs.ready = True
                replayed = await cni_server.replay_queue(self.paths.run_dir, cni)
                if replayed:
                    log.info("replayed %d DEL(s) queued while afxdpd was down", replayed)
                summary = ", ".join(
                    f"{p.config.resource_name}={len(p.devices)}" for p in assembly.pools
                )
                log.info("serving on node %s: %s", self.node_name, summary or "no pools")
                tg.start_soon(self._say_when_ready, summary or "no pools")
                task_status.started()
                await self.reconcile_forever()
            finally:
                devs.ready = False
                with anyio.CancelScope(shield=True):
                    await devs.shutdown()
                    if kind is not None:  # pods' pairs stay; the next start mends the rest
                        await kindnet.remove(keep_in_use=True)
                tg.cancel_scope.cancel()

    async def _serve_metrics(self, tg: TaskGroup, listener: MultiListener[SocketStream]) -> None:
        """Serve /metrics, /healthz and /readyz on the listener ``run`` bound."""
        self.servers["metrics"] = ServerStats()
        bound = await tg.start(
            partial(metrics.serve, stats=self.servers["metrics"]),
            listener,
            self.metrics,
            self.readiness,
        )
        log.info("metrics and health on http://%s:%d/", *bound)

    async def _say_when_ready(self, summary: str) -> None:
        """ "ready" in the log only once kubelet has every pool registered."""
        with anyio.move_on_after(COLLECTOR_OFF_FOR):
            await self._until_ready()
        if self.freeze_heap:
            # What start-up built (imports, pools, 1,000 devices) lives as long as
            # afxdpd: out of the collector's sight, a full collection no longer
            # walks it. It took 32 ms, paid by whichever Allocate, handshake or
            # health event it landed on. The collector was off since start-up
            # began (run); it is on again from here, ready or not.
            gc.collect()
            gc.freeze()
            gc.enable()
        await self._until_ready()
        log.info("ready on node %s: %s", self.node_name, summary)

    async def _until_ready(self) -> None:
        while not self.readiness()[0]:
            await anyio.sleep(0.1)

    async def _serve_pool(self, name: str) -> None:
        """Serve pool ``name`` (its CDI spec first, then its gRPC server, which
        registers with kubelet), in a scope of its own so a reload can stop it."""
        assert self.devices is not None and self._tg is not None
        if self.devices.pools[name].config.dra:  # no device plugin: claims hand it out
            await self._serve_dra()
            return
        specs = self._specs
        if specs is not None:  # before kubelet can Allocate
            pool = self.devices.pools[name]
            await specs.update(pool.config, pool.devices.keys())
        plugin = PoolPlugin(self.devices, name, self.metrics, specs.names if specs else None)
        reg = Registration(plugin, self.paths.kubelet_dir)
        self.registrations[name] = reg
        self._pool_scopes[name] = await self._tg.start(self._pool_tasks, reg, specs)

    async def _serve_dra(self) -> None:
        """Serve the DRA driver (once: every DRA pool is one driver's)."""
        assert self._tg is not None and self.claims is not None
        if self.dra is None:
            self.dra = DraRegistration(self.claims, self.paths.kubelet_dir)
            await self._tg.start(self.dra.run)

    async def _check_host(
        self, pod_resources: PodResourcesChecker, hostname: str, *, resource: str, device: str
    ) -> HostCheck:
        """Whether ``hostname`` is the pod holding ``device``: the pods its
        prepared claim is reserved for, else kubelet's PodResources."""
        if self.claims is not None:
            verdict = await self.claims.host_check(hostname, device)
            if verdict is not None:
                return verdict
        return await pod_resources.check(hostname, resource=resource, device=device)

    async def _pool_tasks(
        self,
        reg: Registration,
        specs: cdi.CdiSpecs | None,
        *,
        task_status: TaskStatus[anyio.CancelScope],
    ) -> None:
        stopped = self._pool_stopped[reg.plugin.pool_name] = anyio.Event()
        try:
            with anyio.CancelScope() as scope:
                async with anyio.create_task_group() as tg:
                    await tg.start(reg.run)
                    if specs is not None:
                        tg.start_soon(self._keep_cdi_spec, specs, reg.plugin.pool_name)
                    task_status.started(scope)
        finally:
            stopped.set()

    async def _keep_cdi_spec(self, specs: cdi.CdiSpecs, name: str) -> None:
        """Rewrite the pool's CDI spec whenever its devices change."""
        assert self.devices is not None
        changes = self.devices.changes[name]
        described = None  # what the spec on disk was made from
        while True:
            version = changes.version
            await changes.wait_after(version)
            pool = self.devices.pools.get(name)
            if pool is None:
                continue
            # Most changes are allocations and health, which the spec does not
            # describe: only a new device set or pool config rewrites it (and
            # Allocate's answer must not wait behind the rebuild).
            now = (pool.config, frozenset(pool.devices))
            if now != described:
                await specs.update(pool.config, pool.devices.keys())
                described = now

    async def _read_config(self, path: Path) -> LoadedConfig:
        """The config at ``path``, read within CONFIG_READ_TIMEOUT (``_on_config_fs``)."""

        def read() -> LoadedConfig:
            loaded = load_config_file(path)
            if not self.pinned_maps:
                refuse_pinned_maps(loaded.config)
            return loaded

        try:
            return await self._on_config_fs("config-read", read)
        except _Hung as exc:
            raise ConfigError([ConfigIssue(str(path), str(exc))]) from None

    async def _on_config_fs(self, name: str, fn: Callable[[], T]) -> T:
        """``fn`` (a read or stat of the config file) in a thread of its own,
        within CONFIG_READ_TIMEOUT; one at a time (SIGHUP and the file watch may
        come at once), and none while one left behind has not returned, so a
        hung filesystem costs one thread, not one per reload or poll. _Hung
        says which of the two it was."""
        async with self._config_reading:
            if self._config_left is not None and not self._config_left.is_set():
                raise _Hung("the read an earlier reload left behind has not returned "
                            "(a hung filesystem?)")  # fmt: skip
            done = threading.Event()

            def call() -> T:
                try:
                    return fn()
                finally:
                    done.set()

            try:
                return await workers.run_detached(name, call, timeout=CONFIG_READ_TIMEOUT)
            except TimeoutError:
                self._config_left = done
                raise _Hung(
                    f"not read within {CONFIG_READ_TIMEOUT:g} s (a hung filesystem?)"
                ) from None

    async def reload(self) -> bool:
        """Read the config file again and apply it; False (and the old config
        kept, every error logged) when the new one is invalid or unreadable.

        The read takes no lock or thread that Allocate needs (``_read_config``;
        load_config_file refuses a FIFO or a device without waiting on it);
        only applying the new config, after the read, touches the pools.
        """
        async with self._reloading:
            return await self._reload()

    async def _reload(self) -> bool:
        assert self.devices is not None and self.config_path is not None
        try:
            loaded = await self._read_config(self.config_path)
        except ConfigError as exc:
            for issue in exc.issues:
                log.error("reload refused, the running config stays: %s", issue)
            self.metrics.reloads.labels("invalid").inc()
            self.metrics.config_invalid.set(1)
            return False
        new = _same_apis(loaded.config, self.config)
        if new.kind_cluster != self.config.kind_cluster:
            log.warning("reload: kindCluster changes take effect at the next start")
        assembly = pools.assemble(
            new,
            await self.devices.inventory(),
            self.node_name,
            unprivileged_bpf_disabled=inventory.unprivileged_bpf_disabled(),
            secondary=self.secondary,
            kind_devices=[d for p in self.devices.pools.values() for d in p.devices]
            if self.config.kind_cluster
            else (),
        )
        for warning in assembly.warnings:
            log.warning("reload: %s", warning)
        self.config = new
        added, removed = await self.devices.replace_pools(assembly.pools)
        for name in removed:  # unregistered by stopping its server; allocations drain
            scope = self._pool_scopes.pop(name, None)
            if scope is None:
                continue  # a DRA pool: no server of its own
            scope.cancel()
            await self._pool_stopped.pop(name).wait()
            self.registrations.pop(name, None)
            if self._specs is not None:
                await self._specs.remove(name)
        for name in added:
            await self._serve_pool(name)
        for name in OWN_LOGGERS:
            logging.getLogger(name).setLevel(LEVELS.get(new.log_level, logging.INFO))
        self.metrics.reloads.labels("ok").inc()
        self.metrics.config_invalid.set(0)
        log.info("config reloaded: pools %s (added %s, removed %s)",
                 sorted(self.devices.pools), added or "none", removed or "none")  # fmt: skip
        return True

    async def _watch_config(self, path: Path) -> None:
        """Reload when the file changes (a ConfigMap update swaps a symlink in its
        directory): compared by what the path resolves to, debounced."""

        def seen() -> tuple[int, int, int] | None:
            try:
                st = path.stat()
            except OSError:
                return None
            return st.st_ino, st.st_mtime_ns, st.st_size

        async def look() -> tuple[int, int, int] | None:
            try:  # a stat on a hung filesystem must not take a DISK thread for good
                return await self._on_config_fs("config-stat", seen)
            except _Hung as exc:
                log.warning("%s: %s; not watched until it answers", path, exc)
                return None

        last = await look()
        while True:
            await anyio.sleep(CONFIG_POLL)
            now = await look()
            if now is None or now == last:
                continue
            await anyio.sleep(CONFIG_SETTLE)  # let a writer finish
            last = await look()
            if last is not None:
                log.info("%s changed; reloading", path)
                await self.reload()

    async def drain(self) -> None:
        """Before a stop: turn new CNI requests away (code 11, the runtime retries)
        and return once those in flight are done. The caller bounds the wait."""
        if self.devices is not None:
            self.devices.ready = False  # CNI STATUS says not ready
        if self._cni is None:
            return
        self._cni.draining = True
        if self._cni.in_flight:
            log.info("waiting for %d CNI request(s) in flight", self._cni.in_flight)
        while self._cni.in_flight:
            await anyio.sleep(0.02)

    async def reconcile_forever(self) -> None:
        """End allocations that kubelet no longer lists, every RECONCILE_INTERVAL."""
        assert self.devices is not None
        while True:
            await anyio.sleep(RECONCILE_INTERVAL)
            try:
                await self.devices.reconcile()
            except Exception:  # a bug here must not end the service
                log.exception("reconciling allocations with kubelet failed")
            await workers.run_sync(Work.DISK, _trim_native_heap)

    def _pool_status(self, name: str, pool: pools.Pool, pods: dict[str, st.PodRef],
                     counted: dict[tuple[str, str], list[st.QueueFrames]]
                     ) -> st.PoolStatus:  # fmt: skip
        reg = self.registrations.get(name)  # none while a removed pool drains
        prepared = self.devices.handouts.prepared if self.devices else {}
        return st.PoolStatus(
            resource=pool.config.resource_name,
            mode=pool.config.mode,
            registered=self._registered(name),
            registrations=reg.registrations if reg else 0,
            devices=[
                st.DeviceStatus(
                    id=d.id,
                    state=d.state.value,
                    numa=d.numa_node,
                    parent=d.parent,
                    fault=d.problem or (pools.UNKNOWN_HOLDER if d.unknown else None),
                    health=st.HEALTHY if d.usable else st.UNHEALTHY,
                    pod=(pods.get(d.id) or self._claim_pod(d.id)) if d.allocated else None,
                    prepared=program is not None,
                    xdp_mode=program.mode_name if program else None,
                    xdp_prog_id=program.prog_id if program else None,
                    xdp_frames=counted.get((name, d.id)),
                )
                for d in pool.devices.values()
                for program in [prepared.get(d.id)]
            ],
            name=name,
            draining=self.devices is not None and name in self.devices.draining,
            api=pool.config.api,
        )

    def _claim_pod(self, device: str) -> st.PodRef | None:
        """The (first) pod the claim holding ``device`` is reserved for."""
        pods = self.claims.pods_of(device) if self.claims else None
        if not pods:
            return None
        namespace, _, name = pods[0].partition("/")
        return st.PodRef(name=name, namespace=namespace)

    async def status_read(self) -> st.Status:
        """The status with what the datapath counted (read off the event loop)."""
        return self.status(await self.read_frames())

    def status(self, counted: list[frames.DeviceFrames] | None = None) -> st.Status:
        devs = self.devices
        by_device = {(f.pool, f.device): st.QueueFrames.of(f.counts) for f in counted or []}
        budget = devs.handouts.uds_budget if devs else None
        attachments = self._attachments.all() if self._attachments else []
        pods = st.pods_by_device((a.device, a.env) for a in attachments)
        # A handful of names in a small dir: cheap enough for the event loop.
        queue = self.paths.run_dir / cni_server.QUEUE_DIR
        return st.Status(
            node=self.node_name,
            ready=self.ready,
            fd_limit=st.FdLimit(soft=self.fd_limit[0], hard=self.fd_limit[1]),
            gc_frozen=gc.get_freeze_count(),
            gc_enabled=gc.isenabled(),
            workers={
                kind: st.WorkerUsage(limit=int(u["limit"]), busy=int(u["busy"]))
                for kind, u in workers.usage().items()
            },
            servers={
                name: st.ServerCounts(**asdict(stats)) for name, stats in self.servers.items()
            },
            uds_budget=st.UdsBudget(
                limit=budget.limit, active=budget.active, refused=budget.refused
            )
            if budget
            else None,
            pools=[
                self._pool_status(n, p, pods, by_device)
                for n, p in (devs.pools.items() if devs else [])
            ],
            datapath=self.layout,
            datapath_reason=self.layout_reason,
            allocations=[h.status() for h in devs.handouts.handouts.values()] if devs else [],
            queued_dels=len(list(queue.glob("*.del"))),
            dra=st.DraStatus(
                driver=self.dra.driver,
                registered=self.dra.registered,
                registrations=self.dra.registrations,
                error=self.dra.error,
                socket=str(self.dra.socket),
                endpoint=str(self.dra.endpoint),
            )
            if self.dra
            else None,
            claims=[
                st.ClaimStatus(
                    uid=c.uid,
                    namespace=c.namespace,
                    name=c.name,
                    devices=[f"{d.pool}/{d.device}" for d in c.devices],
                    pods=list(c.pods),
                )
                for c in (self.claims.prepared.values() if self.claims else [])
            ],
        )
