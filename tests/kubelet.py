"""FAKE kubelet: a test double of kubelet's gRPC side (kubelet cannot run here).

Built on grpcio, the C-core gRPC stack, so our grpclib code is checked against
an independent implementation. Method paths are spelled out by hand (no
generated grpcio stubs): they are the wire contract being tested.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from typing import Any

# The tests fork (subprocesses) while grpcio threads run; its fork handlers only
# print warnings about that.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
import grpc

from afxdp.deviceplugin.podresources import api_pb2 as pr
from afxdp.deviceplugin.v1beta1 import api_pb2 as dp


def _unary(fn: Callable[[Any, Any], Any], req: Any, resp: Any) -> grpc.RpcMethodHandler:
    return grpc.unary_unary_rpc_method_handler(
        fn, request_deserializer=req.FromString, response_serializer=resp.SerializeToString
    )


class FakeKubelet:
    """Serves Registration (device-plugins/kubelet.sock) and PodResourcesLister
    (pod-resources/kubelet.sock) under ``kubelet_dir``."""

    def __init__(self, kubelet_dir: Path) -> None:
        self.dir = kubelet_dir
        self.plugin_dir = kubelet_dir / "device-plugins"
        self.plugin_dir.mkdir(parents=True, exist_ok=True)
        (kubelet_dir / "pod-resources").mkdir(parents=True, exist_ok=True)
        self.registrations: list[dp.RegisterRequest] = []
        self.registered = threading.Condition()
        self.pods: list[pr.PodResources] = []
        self.list_calls = 0
        self.fail_list = False
        # Cleared, a List takes its answer and holds it (in the double's thread)
        # until this is set again; ``listing`` is set once one holds: a test puts
        # events of its own between a List's start and its answer.
        self.answer = threading.Event()
        self.answer.set()
        self.listing = threading.Event()
        self._servers: list[grpc.Server] = []

    def hold(self, pod: str, resource: str, *device_ids: str, namespace: str = "default") -> None:
        """Make pod ``pod`` hold ``device_ids`` of ``resource`` in one container."""
        self.pods.append(
            pr.PodResources(
                name=pod,
                namespace=namespace,
                containers=[
                    pr.ContainerResources(
                        name="app",
                        devices=[
                            pr.ContainerDevices(resource_name=resource, device_ids=device_ids)
                        ],
                    )
                ],
            )
        )

    def _register(self, req: dp.RegisterRequest, ctx: grpc.ServicerContext) -> dp.Empty:
        with self.registered:
            self.registrations.append(req)
            self.registered.notify_all()
        return dp.Empty()

    def _list(self, req: pr.ListPodResourcesRequest, ctx: grpc.ServicerContext) -> Any:
        self.list_calls += 1
        if self.fail_list:
            ctx.abort(grpc.StatusCode.UNAVAILABLE, "fake kubelet told to fail")
        answer = pr.ListPodResourcesResponse(pod_resources=self.pods)  # as things are now
        if not self.answer.is_set():
            self.listing.set()
            self.answer.wait(10)
        return answer

    def _serve(self, socket: Path, service: str, methods: dict[str, grpc.RpcMethodHandler]) -> None:
        socket.unlink(missing_ok=True)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, methods),))
        server.add_insecure_port(f"unix://{socket}")
        server.start()
        self._servers.append(server)

    def start_pod_resources(self) -> None:
        self._serve(
            self.dir / "pod-resources" / "kubelet.sock",
            "v1.PodResourcesLister",
            {"List": _unary(self._list, pr.ListPodResourcesRequest, pr.ListPodResourcesResponse)},
        )

    def start_registration(self) -> None:
        self._serve(
            self.plugin_dir / "kubelet.sock",
            "v1beta1.Registration",
            {"Register": _unary(self._register, dp.RegisterRequest, dp.Empty)},
        )

    def wait_registrations(self, count: int, timeout: float = 5.0) -> list[dp.RegisterRequest]:
        with self.registered:
            self.registered.wait_for(lambda: len(self.registrations) >= count, timeout)
            return list(self.registrations)

    def stop(self) -> None:
        for server in self._servers:
            server.stop(grace=None)
        self._servers.clear()


_PLUGIN_METHODS: dict[str, tuple[Any, Any]] = {
    "GetDevicePluginOptions": (dp.Empty, dp.DevicePluginOptions),
    "GetPreferredAllocation": (dp.PreferredAllocationRequest, dp.PreferredAllocationResponse),
    "Allocate": (dp.AllocateRequest, dp.AllocateResponse),
    "PreStartContainer": (dp.PreStartContainerRequest, dp.PreStartContainerResponse),
}


class PluginClient:
    """Kubelet's side of one plugin socket (grpcio, blocking: call from a thread)."""

    def __init__(self, socket: Path) -> None:
        self.channel = grpc.insecure_channel(f"unix://{socket}")

    def call(self, method: str, request: Any, timeout: float = 5.0) -> Any:
        req_type, resp_type = _PLUGIN_METHODS[method]
        assert isinstance(request, req_type)
        fn = self.channel.unary_unary(
            f"/v1beta1.DevicePlugin/{method}",
            request_serializer=req_type.SerializeToString,
            response_deserializer=resp_type.FromString,
        )
        return fn(request, timeout=timeout)

    def allocate(self, *containers: list[str]) -> dp.AllocateResponse:
        req = dp.AllocateRequest(
            container_requests=[dp.ContainerAllocateRequest(devices_ids=c) for c in containers]
        )
        resp: dp.AllocateResponse = self.call("Allocate", req)
        return resp

    def list_and_watch(
        self, read_timeout: float = 5.0, deadline: float | None = None
    ) -> WatchStream:
        """The ListAndWatch stream: ``next()`` it for device lists; ``.cancel()`` it when done.
        ``deadline`` (seconds; STREAM_DEADLINE unless given) ends it all the same."""
        fn = self.channel.unary_stream(
            "/v1beta1.DevicePlugin/ListAndWatch",
            request_serializer=dp.Empty.SerializeToString,
            response_deserializer=dp.ListAndWatchResponse.FromString,
        )
        # The call's own deadline ends the stream even if a test forgets to cancel it.
        return WatchStream(fn(dp.Empty(), timeout=deadline or STREAM_DEADLINE), read_timeout)

    def close(self) -> None:
        self.channel.close()


# Longer than any test may run (pytest-timeout's 60 s).
STREAM_DEADLINE = 90.0


class _End:
    def __init__(self, error: grpc.RpcError | None) -> None:
        self.error = error


class WatchStream:
    """A ListAndWatch call whose every read gives up on its own deadline.

    grpcio's ``next(call)`` blocks its thread until a message comes; called
    from a worker thread, that outlives the test's ``fail_after`` and hangs the
    run when the plugin never sends. Here one thread per stream pumps messages
    into a queue, and ``next()`` waits for the queue at most ``read_timeout``
    seconds, then raises TimeoutError.
    """

    def __init__(self, call: Any, read_timeout: float) -> None:
        self._call = call
        self.read_timeout = read_timeout
        self._queue: queue.Queue[dp.ListAndWatchResponse | _End] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True, name="list-and-watch").start()

    def _pump(self) -> None:
        try:
            for resp in self._call:
                self._queue.put(resp)
        except grpc.RpcError as exc:
            self._queue.put(_End(exc))
        else:
            self._queue.put(_End(None))

    def __iter__(self) -> WatchStream:
        return self

    def __next__(self) -> dp.ListAndWatchResponse:
        try:
            item = self._queue.get(timeout=self.read_timeout)
        except queue.Empty:
            raise TimeoutError(f"no ListAndWatch update within {self.read_timeout} s") from None
        if isinstance(item, _End):
            self._queue.put(item)  # every later read ends the same way
            if item.error is not None:
                raise item.error
            raise StopIteration
        return item

    def cancel(self) -> None:
        self._call.cancel()
