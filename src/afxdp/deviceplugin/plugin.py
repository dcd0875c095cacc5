"""The kubelet DevicePlugin service of one pool (DESIGN.md 3.1 and 3.5).

Bookkeeping lives in ``pools.Pool`` and the per-device work in
``allocations.Allocations``; this module maps them to the gRPC API and maps
errors to gRPC statuses at the edge.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence

import anyio
from grpclib import GRPCError, Status
from grpclib.server import Stream

from afxdp.allocations import Allocations
from afxdp.deviceplugin.v1beta1 import api_grpc
from afxdp.deviceplugin.v1beta1 import api_pb2 as pb
from afxdp.errors import DeviceError
from afxdp.metrics import Metrics
from afxdp.pools import DeviceState, Pool, preferred

log = logging.getLogger(__name__)

HEALTHY, UNHEALTHY = "Healthy", "Unhealthy"

# Given device IDs of the pool that are marked allocated, returns those that no
# pod holds any more (their release was missed), so Allocate can reclaim them.
StaleFinder = Callable[[str, Sequence[str]], Awaitable[list[str]]]


class Changes:
    """A version number and a way to wait for the next one (ListAndWatch)."""

    def __init__(self) -> None:
        self.version = 0
        self._event = anyio.Event()

    def bump(self) -> None:
        self.version += 1
        self._event.set()
        self._event = anyio.Event()

    async def wait_after(self, version: int) -> None:
        while self.version == version:
            await self._event.wait()


class PoolPlugin(api_grpc.DevicePluginBase):
    """DevicePlugin for resource ``afxdp/<pool>``."""

    def __init__(
        self,
        pool: Pool,
        allocations: Allocations,
        find_stale: StaleFinder,
        metrics: Metrics | None = None,
    ) -> None:
        self.pool = pool
        self.allocations = allocations
        self.find_stale = find_stale
        self.metrics = metrics or Metrics.create()
        self.changes = Changes()
        self._allocating = anyio.Lock()

    def device_list(self) -> pb.ListAndWatchResponse:
        devices = []
        for dev in self.pool.devices.values():
            topology = None
            if dev.numa_node is not None:
                topology = pb.TopologyInfo(nodes=[pb.NUMANode(ID=dev.numa_node)])
            devices.append(
                pb.Device(
                    ID=dev.id, health=HEALTHY if dev.healthy else UNHEALTHY, topology=topology
                )
            )
        return pb.ListAndWatchResponse(devices=devices)

    async def GetDevicePluginOptions(
        self, stream: Stream[pb.Empty, pb.DevicePluginOptions]
    ) -> None:
        await stream.recv_message()
        await stream.send_message(pb.DevicePluginOptions(get_preferred_allocation_available=True))

    async def ListAndWatch(self, stream: Stream[pb.Empty, pb.ListAndWatchResponse]) -> None:
        await stream.recv_message()
        while True:
            version = self.changes.version
            await stream.send_message(self.device_list())
            await self.changes.wait_after(version)

    async def GetPreferredAllocation(
        self, stream: Stream[pb.PreferredAllocationRequest, pb.PreferredAllocationResponse]
    ) -> None:
        req = await stream.recv_message()
        assert req is not None
        responses = [
            pb.ContainerPreferredAllocationResponse(
                deviceIDs=preferred(
                    self.pool,
                    list(c.available_deviceIDs),
                    list(c.must_include_deviceIDs),
                    c.allocation_size,
                )
            )
            for c in req.container_requests
        ]
        await stream.send_message(pb.PreferredAllocationResponse(container_responses=responses))

    async def PreStartContainer(
        self, stream: Stream[pb.PreStartContainerRequest, pb.PreStartContainerResponse]
    ) -> None:
        await stream.recv_message()
        await stream.send_message(pb.PreStartContainerResponse())

    async def Allocate(self, stream: Stream[pb.AllocateRequest, pb.AllocateResponse]) -> None:
        req = await stream.recv_message()
        assert req is not None
        with self.metrics.timed(self.metrics.allocate, self.pool.name) as result:
            try:
                await self._allocate(stream, req)
            except GRPCError as exc:
                result[0] = exc.status.name.lower()
                raise

    async def _allocate(
        self, stream: Stream[pb.AllocateRequest, pb.AllocateResponse], req: pb.AllocateRequest
    ) -> None:
        containers = [list(c.devices_ids) for c in req.container_requests]
        all_ids = [d for ids in containers for d in ids]
        # Kubelet admits pods one by one, but nothing stops two pools' or two
        # kubelets' calls from interleaving; one Allocate per pool at a time.
        async with self._allocating:
            try:
                await self._reclaim_stale(all_ids)
                self.pool.allocate(all_ids)
            except DeviceError as exc:
                log.warning("%s: Allocate %s refused: %s", self.pool.name, all_ids, exc)
                raise GRPCError(Status.FAILED_PRECONDITION, f"{self.pool.name}: {exc}") from None
            try:
                handouts = await self.allocations.start(self.pool, all_ids)
            except Exception as exc:  # a bug too: the devices must not stay marked
                self.pool.release(all_ids)
                if not isinstance(exc, DeviceError):
                    log.exception("%s: Allocate %s failed unexpectedly", self.pool.name, all_ids)
                log.error("%s: Allocate %s failed, rolled back: %s", self.pool.name, all_ids, exc)
                raise GRPCError(Status.INTERNAL, f"{self.pool.name}: {exc}") from None
        mounts = {h.device: h.mounts for h in handouts}
        responses = []
        for ids in containers:
            resp = pb.ContainerAllocateResponse(envs={self.pool.config.env_var: " ".join(ids)})
            for dev_id in ids:
                for host, container in mounts[dev_id]:
                    resp.mounts.append(pb.Mount(container_path=container, host_path=host))
            responses.append(resp)
        log.info("%s: allocated %s", self.pool.name, all_ids)
        await stream.send_message(pb.AllocateResponse(container_responses=responses))

    async def _reclaim_stale(self, ids: Sequence[str]) -> None:
        """Release devices we still count as allocated although no pod holds them."""
        busy = [
            d
            for d in ids
            if d in self.pool.devices and self.pool.devices[d].state is DeviceState.ALLOCATED
        ]
        if not busy:
            return
        for dev_id in await self.find_stale(self.pool.config.resource_name, busy):
            log.warning("%s: %s was never released; reclaiming it", self.pool.name, dev_id)
            await self.allocations.release(dev_id)
            self.pool.release([dev_id])

    async def release(self, device: str, keep_xdp: bool = False) -> bool:
        """The device's pod is gone (CNI DEL): take the device back."""
        if device not in self.pool.devices:
            return False
        await self.allocations.release(device, keep_xdp)
        self.pool.release([device])
        return True
