"""STAND-IN kubelet: the gRPC side of kubelet that afxdpd talks to, for the demo.

Not kubelet, and no part of the node service: the demo (``afxdp.demo``) plays
kubelet with it where no Kubernetes runs. It serves what kubelet serves
(``Registration`` on ``<kubelet-dir>/device-plugins/kubelet.sock`` and
``PodResourcesLister`` on ``<kubelet-dir>/pod-resources/kubelet.sock``) and
calls a registered plugin as kubelet does (GetDevicePluginOptions,
ListAndWatch, GetPreferredAllocation, Allocate), on grpclib. It keeps kubelet's
own book of which pod holds which device: a pod that is forgotten (deleted) is
no longer listed by PodResources, which is how afxdpd learns an allocation ended.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import anyio
from grpclib.client import Channel
from grpclib.server import Server, Stream

from afxdp.deviceplugin.podresources import api_grpc as pr_grpc
from afxdp.deviceplugin.podresources import api_pb2 as pr
from afxdp.deviceplugin.v1beta1 import api_grpc as dp_grpc
from afxdp.deviceplugin.v1beta1 import api_pb2 as dp

CALL_TIMEOUT = 5.0  # kubelet's own deadline for a plugin call is of this order


@dataclass
class Pod:
    """A pod as kubelet's books hold it: one container with its devices."""

    name: str
    namespace: str
    resource: str
    devices: list[str]

    def resources(self) -> pr.PodResources:
        devs = pr.ContainerDevices(resource_name=self.resource, device_ids=self.devices)
        return pr.PodResources(
            name=self.name,
            namespace=self.namespace,
            containers=[pr.ContainerResources(name="app", devices=[devs])],
        )


class _Registration(dp_grpc.RegistrationBase):
    def __init__(self, node: StandInKubelet) -> None:
        self.node = node

    async def Register(self, stream: Stream[dp.RegisterRequest, dp.Empty]) -> None:
        req = await stream.recv_message()
        assert req is not None
        self.node.registrations[req.resource_name] = req
        self.node.registered.set()
        await stream.send_message(dp.Empty())


class _PodResources(pr_grpc.PodResourcesListerBase):
    def __init__(self, node: StandInKubelet) -> None:
        self.node = node

    async def List(
        self, stream: Stream[pr.ListPodResourcesRequest, pr.ListPodResourcesResponse]
    ) -> None:
        await stream.recv_message()
        pods = [p.resources() for p in self.node.pods.values()]
        await stream.send_message(pr.ListPodResourcesResponse(pod_resources=pods))

    async def Get(
        self, stream: Stream[pr.GetPodResourcesRequest, pr.GetPodResourcesResponse]
    ) -> None:
        req = await stream.recv_message()
        assert req is not None
        pod = self.node.pods.get((req.pod_namespace, req.pod_name))
        answer = pod.resources() if pod else pr.PodResources()
        await stream.send_message(pr.GetPodResourcesResponse(pod_resources=answer))


@dataclass
class StandInKubelet:
    """Kubelet's two servers under ``kubelet_dir`` and its book of pods."""

    kubelet_dir: Path
    registrations: dict[str, dp.RegisterRequest] = field(default_factory=dict)
    pods: dict[tuple[str, str], Pod] = field(default_factory=dict)
    registered: anyio.Event = field(default_factory=anyio.Event)

    @property
    def plugin_dir(self) -> Path:
        return self.kubelet_dir / "device-plugins"

    @asynccontextmanager
    async def serving(self) -> AsyncIterator[StandInKubelet]:
        """Both servers listening for the block's duration; their sockets removed after."""
        sockets: list[tuple[Path, _Registration | _PodResources]] = [
            (self.plugin_dir / "kubelet.sock", _Registration(self)),
            (self.kubelet_dir / "pod-resources" / "kubelet.sock", _PodResources(self)),
        ]
        servers: list[tuple[Path, Server]] = []
        try:
            for path, handler in sockets:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.unlink(missing_ok=True)
                server = Server([handler])
                await server.start(path=str(path))
                servers.append((path, server))
            yield self
        finally:
            with anyio.CancelScope(shield=True):
                for path, server in servers:
                    server.close()
                    await server.wait_closed()
                    path.unlink(missing_ok=True)  # grpclib leaves the file

    async def wait_registered(self, resource: str, timeout: float) -> dp.RegisterRequest:
        """The registration of ``resource`` (raises TimeoutError past ``timeout``)."""
        with anyio.fail_after(timeout):
            while resource not in self.registrations:
                await self.registered.wait()
                self.registered = anyio.Event()
        return self.registrations[resource]

    def plugin(self, resource: str) -> PluginClient:
        """Kubelet's client of the plugin registered for ``resource``."""
        return PluginClient(self.plugin_dir / self.registrations[resource].endpoint)

    def in_use(self, resource: str) -> set[str]:
        """Devices of ``resource`` that kubelet's pods hold."""
        return {d for p in self.pods.values() if p.resource == resource for d in p.devices}

    def admit(self, pod: Pod) -> None:
        """The pod now holds its devices (PodResources lists it)."""
        self.pods[(pod.namespace, pod.name)] = pod

    def forget(self, pod: Pod) -> None:
        """The pod is deleted: PodResources stops listing it."""
        self.pods.pop((pod.namespace, pod.name), None)


class PluginClient:
    """Kubelet's side of one DevicePlugin socket: a fresh channel per call, as
    these calls are few and afxdpd may restart between them."""

    def __init__(self, socket: Path) -> None:
        self.socket = socket

    @asynccontextmanager
    async def _stub(self) -> AsyncIterator[dp_grpc.DevicePluginStub]:
        channel = Channel(path=str(self.socket))
        try:
            yield dp_grpc.DevicePluginStub(channel)
        finally:
            channel.close()

    async def options(self) -> dp.DevicePluginOptions:
        async with self._stub() as stub:
            return await stub.GetDevicePluginOptions(dp.Empty(), timeout=CALL_TIMEOUT)

    async def devices(self) -> list[dp.Device]:
        """The first list of the ListAndWatch stream (kubelet keeps the stream open;
        one answer is what a single admission needs)."""
        async with self._stub() as stub:
            with anyio.fail_after(CALL_TIMEOUT):
                async with stub.ListAndWatch.open() as stream:
                    await stream.send_message(dp.Empty(), end=True)
                    first = await stream.recv_message()
                    await stream.cancel()
        return list(first.devices) if first is not None else []

    async def preferred(self, available: list[str], size: int) -> list[str]:
        req = dp.PreferredAllocationRequest(
            container_requests=[
                dp.ContainerPreferredAllocationRequest(
                    available_deviceIDs=available, allocation_size=size
                )
            ]
        )
        async with self._stub() as stub:
            resp = await stub.GetPreferredAllocation(req, timeout=CALL_TIMEOUT)
        return list(resp.container_responses[0].deviceIDs)

    async def allocate(self, devices: list[str]) -> dp.ContainerAllocateResponse:
        req = dp.AllocateRequest(
            container_requests=[dp.ContainerAllocateRequest(devices_ids=devices)]
        )
        async with self._stub() as stub:
            resp = await stub.Allocate(req, timeout=CALL_TIMEOUT)
        return resp.container_responses[0]


async def admit_pod(
    kubelet: StandInKubelet, name: str, resource: str, count: int = 1, namespace: str = "default"
) -> tuple[Pod, dp.ContainerAllocateResponse]:
    """Pod admission as kubelet does it for a container asking ``count`` devices:
    healthy devices not held by other pods, the plugin's preference when it
    offers one, then Allocate; the pod holds the devices once Allocate succeeded."""
    plugin = kubelet.plugin(resource)
    options = await plugin.options()
    held = kubelet.in_use(resource)
    available = [d.ID for d in await plugin.devices() if d.health == "Healthy" and d.ID not in held]
    if len(available) < count:
        raise LookupError(f"{resource}: {count} device(s) wanted, {len(available)} available")
    chosen = available[:count]
    if options.get_preferred_allocation_available:
        chosen = await plugin.preferred(available, count)
    answer = await plugin.allocate(chosen)
    pod = Pod(name, namespace, resource, chosen)
    kubelet.admit(pod)
    return pod, answer
