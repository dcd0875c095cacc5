"""Serving the DRA driver's sockets and staying registered with kubelet.

Kubelet's plugin watcher looks for sockets in ``<kubelet-dir>/plugins_registry``:
for each new one it calls ``GetInfo`` (type ``DRAPlugin``, our driver name,
the DRA endpoint, the versions we speak) and then ``NotifyRegistrationStatus``
with its verdict. So registering is serving: the DRA service first, on
``<kubelet-dir>/plugins/<driver>/dra.sock`` (kubelet dials it as soon as it has
the endpoint), then the registration socket ``<driver>-reg.sock``. When either
file goes (a restarted kubelet, or someone, deleted it), both are served
again on fresh sockets, and the new registration socket registers us again,
as the device plugin does (deviceplugin/registration.py, whose socket rules
this shares: sockfile.py). Prepared claims are ``Claims``', so they survive.
"""

from __future__ import annotations

import logging
from pathlib import Path

import anyio
from anyio.abc import TaskStatus
from grpclib.server import Server, Stream

from afxdp.deviceplugin.registration import POLL, serve_socket
from afxdp.dra import claims as cl
from afxdp.dra.plugin import DraV1, DraV1beta1
from afxdp.dra.pluginregistration import api_grpc as reg_grpc
from afxdp.dra.pluginregistration import api_pb2 as reg
from afxdp.sockfile import FileId, file_id, remove_own

log = logging.getLogger(__name__)

PLUGIN_TYPE = "DRAPlugin"  # kubelet's pluginregistration/v1 constant
VERSIONS = ("v1.DRAPlugin", "v1beta1.DRAPlugin")  # what kubelet picks from, newest first


class DraRegistration(reg_grpc.RegistrationBase):
    """The driver's two sockets and what kubelet said of the registration."""

    def __init__(self, claims: cl.Claims, kubelet_dir: Path, driver: str = cl.DRIVER) -> None:
        self.claims = claims
        self.driver = driver
        self.socket = kubelet_dir / "plugins_registry" / f"{driver}-reg.sock"
        self.endpoint = kubelet_dir / "plugins" / driver / "dra.sock"
        self.registered = False  # kubelet's last NotifyRegistrationStatus said so
        self.registrations = 0  # times it did (kubelet restarts make it more than one)
        self.error = ""  # kubelet's reason when it refused us
        self.served = 0  # times the sockets were served (1 + re-serves)

    async def GetInfo(self, stream: Stream[reg.InfoRequest, reg.PluginInfo]) -> None:
        await stream.recv_message()
        await stream.send_message(
            reg.PluginInfo(
                type=PLUGIN_TYPE,
                name=self.driver,
                endpoint=str(self.endpoint),
                supported_versions=list(VERSIONS),
            )
        )

    async def NotifyRegistrationStatus(
        self, stream: Stream[reg.RegistrationStatus, reg.RegistrationStatusResponse]
    ) -> None:
        status = await stream.recv_message()
        assert status is not None
        self.registered, self.error = status.plugin_registered, status.error
        if status.plugin_registered:
            self.registrations += 1
            log.info("DRA driver %s registered with kubelet", self.driver)
        else:
            log.error("kubelet refused DRA driver %s: %s", self.driver, status.error)
        await stream.send_message(reg.RegistrationStatusResponse())

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Serve both sockets until cancelled; started once first serving."""
        started = False
        while True:
            servers: list[tuple[Server, Path, FileId | None]] = []
            try:
                # The endpoint first: kubelet dials it once the registration says where.
                for path, handlers in (
                    (self.endpoint, [DraV1(self.claims), DraV1beta1(self.claims)]),
                    (self.socket, [self]),
                ):
                    server = await serve_socket(path, handlers, wait=started, concerns={})
                    servers.append((server, path, file_id(path)))
                self.served += 1
                if not started:
                    task_status.started()
                    started = True
                await self._watch([(path, ours) for _, path, ours in servers])
                log.info("%s: a DRA socket vanished (kubelet restarted?); serving again",
                         self.driver)  # fmt: skip
            finally:
                self.registered = False
                with anyio.CancelScope(shield=True):
                    for server, path, ours in reversed(servers):
                        server.close()
                        await server.wait_closed()
                        remove_own(path, ours)  # unless it is already another's

    async def _watch(self, ours: list[tuple[Path, FileId | None]]) -> None:
        """Return when one of our socket files is gone or replaced."""
        while all(inode is not None and file_id(path) == inode for path, inode in ours):
            await anyio.sleep(POLL)
