"""Serving a pool's DevicePlugin socket and keeping kubelet registered with it.

Serve first, then register (kubelet dials back at once). A restarted kubelet
deletes every socket in its device-plugins dir and recreates its own
``kubelet.sock``: either change restarts our server on a fresh socket and
registers again. Allocations are ours, not the server's, so they survive.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import TaskStatus
from grpclib.client import Channel
from grpclib.server import Server

from afxdp.deviceplugin.plugin import PoolPlugin
from afxdp.deviceplugin.v1beta1 import api_grpc
from afxdp.deviceplugin.v1beta1 import api_pb2 as pb
from afxdp.logsetup import about
from afxdp.sockfile import FileId, clear_stale, file_id, remove_own

log = logging.getLogger(__name__)

API_VERSION = "v1beta1"
POLL = 0.1  # seconds between looks at the sockets; re-registration well within 2 s
RETRY = 0.5


class Registration:
    """One pool's server and its registration with kubelet."""

    def __init__(self, plugin: PoolPlugin, kubelet_dir: Path) -> None:
        self.plugin = plugin
        self.dir = kubelet_dir / "device-plugins"
        self.socket = self.dir / f"afxdp-{plugin.pool.name}.sock"
        self.kubelet_socket = self.dir / "kubelet.sock"
        self.registered = False
        self.registrations = 0
        self.concerns = about(pool=plugin.pool_name)  # what its log lines are about

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Serve and stay registered until cancelled; started once first serving."""
        started = False
        while True:
            server = await self._serve(wait=started)
            ours = file_id(self.socket)
            try:
                if not started:
                    task_status.started()
                    started = True
                kubelet_inode = await self._register()
                await self._watch(ours, kubelet_inode)
                log.info("%s: kubelet restarted or our socket vanished; serving again",
                         self.socket, extra=self.concerns)  # fmt: skip
            finally:
                self.registered = False
                server.close()
                with anyio.CancelScope(shield=True):
                    await server.wait_closed()
                # grpclib leaves the file; remove it unless it is already another's
                # (kubelet's next server, another afxdpd sharing the kubelet dir).
                remove_own(self.socket, ours)

    async def _serve(self, *, wait: bool) -> Server:
        return await serve_socket(self.socket, [self.plugin], wait=wait, concerns=self.concerns)

    async def _register(self) -> FileId | None:
        """Register (waiting for kubelet as long as it takes); kubelet.sock's identity."""
        resource = self.plugin.pool.config.resource_name
        said = ""  # the last problem logged: one line per change, not one per retry
        while True:
            if file_id(self.socket) is None:
                return None  # our socket is gone already: start over
            kubelet_inode = file_id(self.kubelet_socket, follow_symlinks=True)
            problem = f"waiting for kubelet at {self.kubelet_socket}"
            if kubelet_inode is not None:
                try:
                    await self._register_once(resource)
                except Exception as exc:  # whatever kubelet (or grpclib) does: retry
                    problem = f"registering {resource} with kubelet failed: {exc!r}; retrying"
                else:
                    self.registered = True
                    self.registrations += 1
                    log.info("registered %s at %s", resource, self.socket.name,
                             extra=self.concerns)  # fmt: skip
                    return kubelet_inode
            if problem != said:
                log.warning("%s", problem, extra=self.concerns)
                said = problem
            await anyio.sleep(RETRY)

    async def _register_once(self, resource: str) -> None:
        channel = Channel(path=str(self.kubelet_socket))
        try:
            await api_grpc.RegistrationStub(channel).Register(
                pb.RegisterRequest(
                    version=API_VERSION,
                    endpoint=self.socket.name,
                    resource_name=resource,
                    options=pb.DevicePluginOptions(get_preferred_allocation_available=True),
                ),
                timeout=5,
            )
        finally:
            channel.close()

    async def _watch(self, our_inode: FileId | None, kubelet_inode: FileId | None) -> None:
        """Return when our socket or kubelet's changes."""
        while (
            our_inode is not None
            and file_id(self.socket) == our_inode
            and file_id(self.kubelet_socket, follow_symlinks=True) == kubelet_inode
        ):
            await anyio.sleep(POLL)


async def serve_socket(
    path: Path, handlers: Sequence[Any], *, wait: bool, concerns: dict[str, Any]
) -> Server:
    """Serve ``handlers`` on ``path``, in place of a stale file. A socket someone
    answers on there is another afxdpd's (a pool of this name, the same DRA
    driver), not ours to take: at start an error (afxdpd exits saying so);
    later (our socket vanished and theirs took its place), with ``wait``, we
    wait for it to go, unregistered, while the rest of the service (every
    pod's socket) goes on."""
    path.parent.mkdir(parents=True, exist_ok=True)
    said = False
    while True:
        try:
            clear_stale(path)
            break
        except OSError as exc:
            if not wait or exc.errno != errno.EADDRINUSE:
                raise
            if not said:
                log.warning("%s; serving again once it is gone", exc, extra=concerns)
                said = True
            await anyio.sleep(RETRY)
    # (The event loop too removes a socket file it finds at the path, in the
    # same loop turn as clear_stale: no wider a window than sockfile's own.)
    server = Server(handlers)
    await server.start(path=str(path))
    return server
