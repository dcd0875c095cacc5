"""The kubelet DevicePlugin service of one pool (DESIGN.md 3.1 and 3.5).

A thin translation between gRPC and ``devices.Devices``, which owns the
pool's state (as the SR-IOV network device plugin's server only asks its
resource pool); errors are mapped to gRPC statuses here, at the edge.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

from grpclib import GRPCError, Status
from grpclib.server import Stream

from afxdp.deviceplugin.v1beta1 import api_grpc
from afxdp.deviceplugin.v1beta1 import api_pb2 as pb
from afxdp.devices import AllocateFailed, Devices
from afxdp.errors import DeviceError
from afxdp.logsetup import about
from afxdp.metrics import Metrics
from afxdp.pools import Pool, preferred

log = logging.getLogger(__name__)

HEALTHY, UNHEALTHY = "Healthy", "Unhealthy"

# (pool, device IDs) -> the CDI device names whose spec is on disk.
CdiNames = Callable[[str, Sequence[str]], list[str]]


class PoolPlugin(api_grpc.DevicePluginBase):
    """DevicePlugin for resource ``afxdp/<pool>``."""

    def __init__(
        self,
        devices: Devices,
        pool_name: str,
        metrics: Metrics | None = None,
        cdi_names: CdiNames | None = None,
    ) -> None:
        self.devices = devices
        self.pool_name = pool_name
        self.metrics = metrics or Metrics.create()
        self.cdi_names = cdi_names

    @property
    def pool(self) -> Pool:
        """The pool as it is now; a call on a server whose pool a reload just
        removed (its server is stopping) is refused, saying so."""
        pool = self.devices.pools.get(self.pool_name)
        if pool is None:
            raise GRPCError(Status.FAILED_PRECONDITION,
                            f"pool {self.pool_name} was removed from the config")  # fmt: skip
        return pool

    def device_list(self) -> pb.ListAndWatchResponse:
        devices = []
        for dev in self.pool.devices.values():
            topology = None
            if dev.numa_node is not None:
                topology = pb.TopologyInfo(nodes=[pb.NUMANode(ID=dev.numa_node)])
            devices.append(
                pb.Device(ID=dev.id, health=HEALTHY if dev.usable else UNHEALTHY, topology=topology)
            )
        return pb.ListAndWatchResponse(devices=devices)

    async def GetDevicePluginOptions(
        self, stream: Stream[pb.Empty, pb.DevicePluginOptions]
    ) -> None:
        await stream.recv_message()
        await stream.send_message(pb.DevicePluginOptions(get_preferred_allocation_available=True))

    def advertised(self) -> tuple[tuple[str, bool, int | None], ...]:
        """What a device list tells kubelet (an allocation changes none of it)."""
        return tuple((d.id, d.usable, d.numa_node) for d in self.pool.devices.values())

    async def ListAndWatch(self, stream: Stream[pb.Empty, pb.ListAndWatchResponse]) -> None:
        await stream.recv_message()
        changes = self.devices.changes[self.pool_name]
        sent = None
        while True:
            version = changes.version
            # Most changes are allocations: kubelet's view is the same, and sending
            # it anyway (1,000 devices) held up the Allocate answer beside it.
            if (now := self.advertised()) != sent:
                await stream.send_message(self.device_list())
                sent = now
            await changes.wait_after(version)

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
        start = time.perf_counter()

        def took() -> str:
            return f"{(time.perf_counter() - start) * 1000:.1f} ms"

        concerns = about(pool=self.pool_name, device=",".join(all_ids))
        try:
            handouts = await self.devices.allocate(self.pool_name, all_ids)
        except DeviceError as exc:
            log.warning("%s: Allocate %s refused in %s: %s", self.pool_name, all_ids, took(), exc,
                        extra=concerns)  # fmt: skip
            raise GRPCError(Status.FAILED_PRECONDITION, f"{self.pool_name}: {exc}") from None
        except AllocateFailed as exc:
            log.error("%s: Allocate %s failed in %s, rolled back: %s",
                      self.pool_name, all_ids, took(), exc, extra=concerns)  # fmt: skip
            raise GRPCError(Status.INTERNAL, f"{self.pool_name}: {exc}") from None
        mounts = {h.device: h.mounts for h in handouts}
        responses = []
        for ids in containers:
            resp = pb.ContainerAllocateResponse(envs={self.pool.config.env_var: " ".join(ids)})
            if self.cdi_names is not None:  # the same devices again, for CDI runtimes
                resp.cdi_devices.extend(
                    pb.CDIDevice(name=n) for n in self.cdi_names(self.pool_name, ids)
                )
            for dev_id in ids:
                for host, container in mounts[dev_id]:
                    resp.mounts.append(pb.Mount(container_path=container, host_path=host))
            responses.append(resp)
        log.info("%s: allocated %s in %s", self.pool_name, all_ids, took(), extra=concerns)
        await stream.send_message(pb.AllocateResponse(container_responses=responses))
