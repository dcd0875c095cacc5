"""The composition root: one asyncio process per node, all parts in one task group.

Start-up order matters: the netlink watch is subscribed before the inventory is
read (no link event is lost in between), pools are built, every pool's server
is serving (and then registers), link events start flowing, and only then is
the service ready. Shutdown takes every handed-out device back.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import msgspec
from anyio.abc import TaskGroup, TaskStatus

from afxdp import control, inventory, metrics, pools, workers
from afxdp.allocations import Allocations
from afxdp.cni import server as cni_server
from afxdp.cni.attachments import AttachmentStore
from afxdp.cni.handler import CniHandler
from afxdp.config import Config
from afxdp.deviceplugin.plugin import PoolPlugin
from afxdp.deviceplugin.registration import Registration
from afxdp.inventory import NetDev
from afxdp.metrics import Metrics
from afxdp.netwatch import Change, LinkEvent, NetWatch
from afxdp.podresources import PodResourcesChecker
from afxdp.secondary import SecondaryDeviceProvider
from afxdp.uds.server import ConnectionBudget
from afxdp.unixserver import ServerStats
from afxdp.workers import Work

# How often allocations are checked against kubelet's PodResources, and how old
# an allocation must be before it may be found stale (kubelet lists a pod's
# devices right after Allocate; the margin covers a slow kubelet).
RECONCILE_INTERVAL = 10.0
RECONCILE_GRACE = 30.0

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Paths:
    kubelet_dir: Path = Path("/var/lib/kubelet")
    uds_dir: Path = Path("/tmp/afxdp_dp")
    pin_dir: Path = Path("/var/run/afxdp_dp")
    run_dir: Path = Path("/run/afxdp")


@dataclass
class Service:
    config: Config
    node_name: str
    paths: Paths
    secondary: SecondaryDeviceProvider
    plugins: dict[str, PoolPlugin] = field(default_factory=dict)
    registrations: dict[str, Registration] = field(default_factory=dict)
    netdevs: dict[str, NetDev] = field(default_factory=dict)
    allocations: Allocations | None = None
    ready: bool = False
    fd_limit: tuple[int, int] = (0, 0)
    servers: dict[str, ServerStats] = field(default_factory=dict)
    pod_resources: PodResourcesChecker | None = None
    metrics_address: str = ""  # HOST:PORT of /metrics, /healthz, /readyz; empty: none
    metrics: Metrics = field(init=False)

    def __post_init__(self) -> None:
        self.metrics = Metrics.create(self._device_rows)

    def _device_rows(self) -> list[tuple[str, str, str]]:
        return [
            (name, d.state.value, "Healthy" if d.healthy else "Unhealthy")
            for name, p in self.plugins.items()
            for d in p.pool.devices.values()
        ]

    def readiness(self) -> tuple[bool, str]:
        """Ready: serving, every pool registered with kubelet, the CNI socket listening."""
        if not self.ready:
            return False, "starting"
        waiting = [r.plugin.pool.config.resource_name
                   for r in self.registrations.values() if not r.registered]  # fmt: skip
        if waiting:
            return False, "not registered with kubelet: " + ", ".join(waiting)
        return True, ""

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        watch = NetWatch()
        watch.open()
        self.netdevs = {nd.name: nd for nd in await inventory.scan()}
        store = AttachmentStore(self.paths.run_dir / "cni-attachments.json")
        # Devices in pods since before this start are not in our netns: count
        # them as their attachments describe them, as allocated.
        in_pods = {
            a.device: msgspec.convert(a.netdev, NetDev)
            for a in store.all()
            if a.netdev and a.device not in self.netdevs
        }
        assembly = pools.assemble(
            self.config,
            [*self.netdevs.values(), *in_pods.values()],
            self.node_name,
            unprivileged_bpf_disabled=inventory.unprivileged_bpf_disabled(),
            secondary=self.secondary,
        )
        for warning in assembly.warnings:
            log.warning("%s", warning)
        pod_resources = self.pod_resources = PodResourcesChecker(
            self.paths.kubelet_dir / "pod-resources" / "kubelet.sock"
        )
        async with anyio.create_task_group() as tg:
            if self.metrics_address:
                await self._serve_metrics(tg)
            self.allocations = Allocations(
                task_group=tg,
                uds_dir=self.paths.uds_dir,
                pin_dir=self.paths.pin_dir,
                check_host=pod_resources.check,
                secondary=self.secondary,
                netdev_of=self.netdevs.get,
                uds_budget=ConnectionBudget.for_fd_limit(self.fd_limit[0] or 1024),
            )
            for pool in assembly.pools:
                for dev_id in in_pods.keys() & pool.devices.keys():
                    pool.devices[dev_id].allocated = True
                    pool.devices[dev_id].healthy = True
                    self.allocations.orphans[dev_id] = pool.name
                    log.info("%s: in its pod since before this start; allocated", dev_id)
            try:
                for pool in assembly.pools:
                    plugin = PoolPlugin(pool, self.allocations, pod_resources.stale, self.metrics)
                    reg = Registration(plugin, self.paths.kubelet_dir)
                    self.plugins[pool.name], self.registrations[pool.name] = plugin, reg
                    await tg.start(reg.run)
                tg.start_soon(watch.run, self.on_link, self.resync)
                self.servers["control"] = ServerStats()
                await tg.start(
                    partial(control.serve, stats=self.servers["control"]),
                    self.paths.run_dir,
                    self.status,
                )
                cni = CniHandler(self, store)
                await tg.start(cni_server.serve, self.paths.run_dir, cni)
                self.ready = True
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
                self.ready = False
                with anyio.CancelScope(shield=True):
                    await self.allocations.shutdown()
                tg.cancel_scope.cancel()

    async def _serve_metrics(self, tg: TaskGroup) -> None:
        """Start the HTTP endpoints; a port that cannot be had is an error in the log,
        not a reason for the node's devices to go unserved."""
        self.metrics.fd_limit.set(self.fd_limit[0])
        self.servers["metrics"] = ServerStats()
        try:
            bound = await tg.start(
                partial(metrics.serve, stats=self.servers["metrics"]),
                self.metrics_address,
                self.metrics,
                self.readiness,
            )
        except OSError as exc:
            log.error("metrics: cannot listen on %s (%s); serving without them",
                      self.metrics_address, exc)  # fmt: skip
        else:
            log.info("metrics and health on http://%s:%d/", *bound)

    async def _say_when_ready(self, summary: str) -> None:
        """ "ready" in the log only once kubelet has every pool registered."""
        while not self.readiness()[0]:
            await anyio.sleep(0.1)
        log.info("ready on node %s: %s", self.node_name, summary)

    def on_link(self, event: LinkEvent) -> None:
        """Apply a link event to every pool's health; push lists that changed.

        An allocated device's link belongs to its pod: the CNI takes it down
        and moves it into the pod's netns, which must not make it Unhealthy.
        Only its destruction counts; its real state is read again on release.
        """
        for plugin in self.plugins.values():
            dev = plugin.pool.devices.get(event.name)
            if dev is not None and dev.allocated and event.change is not Change.REMOVED:
                continue
            if plugin.pool.set_link(event.name, event.change is Change.UP):
                log.info("%s: %s -> %s", plugin.pool.name, event.name, event.change.value)
                plugin.changes.bump()

    async def resync(self) -> None:
        """Re-read every link and apply what is true now (after lost events)."""
        self.netdevs = {nd.name: nd for nd in await inventory.scan()}
        for plugin in self.plugins.values():
            for dev in plugin.pool.devices.values():
                if not dev.allocated:  # an allocated one's link is in its pod's netns
                    name = dev.parent or dev.id
                    self._apply_link(plugin, name, self.netdevs.get(name))

    @staticmethod
    def _apply_link(plugin: PoolPlugin, name: str, link: NetDev | None) -> None:
        """Set the health of the devices on link ``name`` from what it is now."""
        if plugin.pool.set_link(name, link is not None and link.link_up):
            plugin.changes.bump()

    def describe(self, device: str) -> dict[str, Any]:
        nd = self.netdevs.get(device)
        return msgspec.to_builtins(nd) if nd is not None else {}

    def device_allocated(self, device: str) -> bool | None:
        """Whether ``device`` is allocated; None when no pool has it."""
        for plugin in self.plugins.values():
            dev = plugin.pool.devices.get(device)
            if dev is not None:
                return dev.allocated
        return None

    async def release(self, device: str, keep_xdp: bool = False) -> bool:
        """The allocation of ``device`` ended (kubelet no longer lists its pod):
        give it back to its pool, as it is now.

        ``keep_xdp`` (the NAD's skipUnloadBpf) leaves the program attached.
        """
        for plugin in self.plugins.values():
            dev = plugin.pool.devices.get(device)
            if dev is not None and await plugin.release(device, keep_xdp):
                await self._read_health(plugin, dev.parent or dev.id)
                return True
        return False

    async def came_home(self, device: str, keep_xdp: bool) -> None:
        """A CNI DEL brought ``device`` back to the host netns; it stays allocated
        (kubelet's to end), but its health is read again now that it is ours to
        see, and skipUnloadBpf is remembered for when the allocation ends."""
        assert self.allocations is not None
        if keep_xdp:
            self.allocations.keep_xdp.add(device)
        for plugin in self.plugins.values():
            dev = plugin.pool.devices.get(device)
            if dev is not None:
                await self._read_health(plugin, dev.parent or dev.id)

    async def _read_health(self, plugin: PoolPlugin, name: str) -> None:
        self._apply_link(
            plugin, name, await workers.run_sync(Work.NETLINK, inventory.read_one, name)
        )

    async def reconcile_forever(self) -> None:
        """End allocations that kubelet no longer lists, every RECONCILE_INTERVAL."""
        while True:
            await anyio.sleep(RECONCILE_INTERVAL)
            try:
                await self.reconcile()
            except Exception:  # a bug here must not end the service
                log.exception("reconciling allocations with kubelet failed")

    async def reconcile(self) -> list[str]:
        """Release allocated devices that no pod holds (kubelet's word); returns them.

        Nothing happens when kubelet cannot be asked. Allocations younger than
        RECONCILE_GRACE are left alone.
        """
        assert self.allocations is not None and self.pod_resources is not None
        now = anyio.current_time()
        released = []
        for plugin in self.plugins.values():
            allocated = []
            for dev in plugin.pool.devices.values():
                handout = self.allocations.handouts.get(dev.id)
                if dev.allocated and (handout is None or now - handout.since > RECONCILE_GRACE):
                    allocated.append(dev.id)
            if not allocated:
                continue
            resource = plugin.pool.config.resource_name
            for dev_id in await self.pod_resources.stale(resource, allocated):
                log.info("%s: no pod holds %s any more (kubelet); released", resource, dev_id)
                await self.release(dev_id)
                released.append(dev_id)
        return released

    def status(self) -> dict[str, Any]:
        handouts = self.allocations.handouts if self.allocations else {}
        return {
            "node": self.node_name,
            "ready": self.ready,
            "fd_limit": {"soft": self.fd_limit[0], "hard": self.fd_limit[1]},
            "workers": workers.usage(),
            "servers": {name: asdict(st) for name, st in self.servers.items()},
            "uds_budget": {"limit": b.limit, "active": b.active, "refused": b.refused}
            if (b := self.allocations and self.allocations.uds_budget)
            else None,
            "pools": [
                {
                    "resource": p.pool.config.resource_name,
                    "mode": p.pool.config.mode,
                    "registered": self.registrations[name].registered,
                    "registrations": self.registrations[name].registrations,
                    "devices": [d.summary() for d in p.pool.devices.values()],
                }
                for name, p in self.plugins.items()
            ],
            "allocations": [h.status() for h in handouts.values()],
        }
