"""FAKE kubelet, DRA side: kubelet's plugin watcher and DRA client (kubelet
cannot run here), on grpcio, the C-core gRPC stack, so our grpclib servers
are checked against an independent implementation. Method paths are spelled
out by hand: they are the wire contract being tested.

As kubelet does: it watches ``plugins_registry`` for socket files; for each
new one it calls ``GetInfo``, checks the answer (type ``DRAPlugin``, a version
it speaks), and tells the plugin with ``NotifyRegistrationStatus``; then it
calls ``NodePrepareResources`` / ``NodeUnprepareResources`` on the endpoint
GetInfo named, in the newest version both speak (or the one a test asks for).
A kubelet restart deletes the plugin sockets (``restart``).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
import grpc

from afxdp.dra.pluginregistration import api_pb2 as reg
from afxdp.dra.v1 import api_pb2 as v1
from afxdp.dra.v1beta1 import api_pb2 as v1beta1

KUBELET_VERSIONS = ("v1.DRAPlugin", "v1beta1.DRAPlugin")  # kubelet 1.34's, preferred first
PB = {"v1": v1, "v1beta1": v1beta1}
POLL = 0.02


class FakeDraKubelet:
    """Registers the DRA plugins whose sockets appear under ``kubelet_dir``."""

    def __init__(self, kubelet_dir: Path) -> None:
        self.dir = kubelet_dir
        self.registry = kubelet_dir / "plugins_registry"
        self.registry.mkdir(parents=True, exist_ok=True)
        self.infos: list[reg.PluginInfo] = []  # one per registration, in order
        self.refuse = ""  # a reason to refuse the next registrations with
        self.changed = threading.Condition()
        self._seen: dict[Path, int] = {}  # socket -> inode registered
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _watch(self) -> None:
        while not self._stop.wait(POLL):
            for path in sorted(self.registry.glob("*.sock")):
                try:
                    inode = path.stat().st_ino
                except FileNotFoundError:
                    continue
                if self._seen.get(path) == inode:
                    continue
                try:
                    self._register(path)
                except grpc.RpcError:
                    continue  # not serving yet: the next look tries again
                self._seen[path] = inode

    def _register(self, path: Path) -> None:
        with grpc.insecure_channel(f"unix://{path}") as channel:
            info = channel.unary_unary(
                "/pluginregistration.Registration/GetInfo",
                request_serializer=reg.InfoRequest.SerializeToString,
                response_deserializer=reg.PluginInfo.FromString,
            )(reg.InfoRequest(), timeout=5)
            error = self.refuse
            if not error and info.type != "DRAPlugin":
                error = f"plugin type {info.type!r} is not DRAPlugin"
            if not error and not set(info.supported_versions) & set(KUBELET_VERSIONS):
                error = f"none of {list(info.supported_versions)} is supported"
            channel.unary_unary(
                "/pluginregistration.Registration/NotifyRegistrationStatus",
                request_serializer=reg.RegistrationStatus.SerializeToString,
                response_deserializer=reg.RegistrationStatusResponse.FromString,
            )(reg.RegistrationStatus(plugin_registered=not error, error=error), timeout=5)
        with self.changed:
            if not error:
                self.infos.append(info)
            self.changed.notify_all()

    def wait_registrations(self, count: int, timeout: float = 10.0) -> list[reg.PluginInfo]:
        with self.changed:
            self.changed.wait_for(lambda: len(self.infos) >= count, timeout)
            return list(self.infos)

    def restart(self) -> None:
        """As a restarted kubelet: the plugin sockets are deleted, and it
        registers what appears anew."""
        for path in [*self.registry.glob("*.sock"), *(self.dir / "plugins").glob("*/*.sock")]:
            path.unlink(missing_ok=True)
        self._seen.clear()

    # -- the DRA client ------------------------------------------------------------

    def _call(self, method: str, request: Any, version: str, timeout: float) -> Any:
        pb = PB[version]
        assert self.infos, "no plugin registered"
        info = self.infos[-1]
        assert f"{version}.DRAPlugin" in info.supported_versions
        resp_type = {
            "NodePrepareResources": pb.NodePrepareResourcesResponse,
            "NodeUnprepareResources": pb.NodeUnprepareResourcesResponse,
        }[method]
        with grpc.insecure_channel(f"unix://{info.endpoint}") as channel:
            return channel.unary_unary(
                f"/k8s.io.kubelet.pkg.apis.dra.{version}.DRAPlugin/{method}",
                request_serializer=type(request).SerializeToString,
                response_deserializer=resp_type.FromString,
            )(request, timeout=timeout)

    def prepare(
        self, *claims: tuple[str, str, str], version: str = "v1", timeout: float = 10.0
    ) -> Any:
        """NodePrepareResources for (namespace, name, uid) claims; the response."""
        pb = PB[version]
        req = pb.NodePrepareResourcesRequest(
            claims=[pb.Claim(namespace=ns, name=name, uid=uid) for ns, name, uid in claims]
        )
        return self._call("NodePrepareResources", req, version, timeout)

    def unprepare(
        self, *claims: tuple[str, str, str], version: str = "v1", timeout: float = 10.0
    ) -> Any:
        pb = PB[version]
        req = pb.NodeUnprepareResourcesRequest(
            claims=[pb.Claim(namespace=ns, name=name, uid=uid) for ns, name, uid in claims]
        )
        return self._call("NodeUnprepareResources", req, version, timeout)
