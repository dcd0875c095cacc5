"""Pod side of the UDS handshake, for Python AF_XDP apps: sync and async clients.

Inside a pod the socket of device ``<netdev>`` is ``/tmp/afxdp_dp/<netdev>/afxdp.sock``
and the device list is in ``AFXDP_DEVICES_<POOL>``. A session::

    with UdsClient.for_device("ens801f0") as c:
        c.connect()                 # sends the pod's hostname
        map_fd = c.xsk_map_fd("ens801f0")
        ...                         # insert your XSK fd at its queue in map_fd
        c.fin()

The request wording and reply checks are shared (``Request``); the two clients
only move packets.
"""

from __future__ import annotations

import array
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

import anyio

from afxdp import contracts
from afxdp.errors import AfxdpError

POD_DIR = contracts.POD_DIR
REPLY_SIZE = 128  # what DPDK reads replies into


class HandshakeError(AfxdpError):
    """The server said no, or said something unexpected."""


def pod_socket_path(netdev: str, base: Path = POD_DIR) -> Path:
    return base / netdev / contracts.SOCKET_NAME


@dataclass(frozen=True)
class Request:
    """One request, the reply that means success, and whether an fd comes back."""

    text: str
    ok: str
    fd: int | None = None
    wants_fd: bool = False

    def result(self, reply: str, fds: list[int]) -> int | None:
        """The received fd (when one is wanted), or raise HandshakeError."""
        if reply != self.ok or (self.wants_fd and len(fds) != 1):
            for fd in fds:
                os.close(fd)
            raise HandshakeError(f"{self.text!r}: server replied {reply!r}")
        if not self.wants_fd:
            for fd in fds:
                os.close(fd)
            return None
        return fds[0]

    @staticmethod
    def connect(hostname: str | None = None) -> Request:
        return Request(f"/connect,{hostname or socket.gethostname()}", "/host_ok")

    @staticmethod
    def version() -> Request:
        return Request("/version", "0.1")

    @staticmethod
    def xsk_map_fd(netdev: str) -> Request:
        return Request(f"/xsk_map_fd,{netdev}", "/fd_ack", wants_fd=True)

    @staticmethod
    def busy_poll(xsk_fd: int, timeout: int, budget: int) -> Request:
        return Request(f"/config_busy_poll,{timeout},{budget}", "/config_busy_poll_ack", xsk_fd)

    @staticmethod
    def fin() -> Request:
        return Request("/fin", "/fin_ack")


def _ancillary(fd: int | None) -> list[tuple[int, int, bytes]]:
    if fd is None:
        return []
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]).tobytes())]


def _unpack(msg: tuple[bytes, list[tuple[int, int, bytes]], int, object]) -> tuple[str, list[int]]:
    data, ancdata, _flags, _addr = msg
    fds = array.array("i")
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    if not data and not fds:
        raise HandshakeError("server closed the connection")
    return data.decode("ascii", "replace"), list(fds)


_CMSG_ROOM = socket.CMSG_SPACE(4 * 4)


class UdsClient:
    """Blocking client."""

    def __init__(self, path: Path | str, timeout: float = 5.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(str(path))
        except BaseException:
            self.sock.close()
            raise

    @classmethod
    def for_device(cls, netdev: str, timeout: float = 5.0) -> UdsClient:
        return cls(pod_socket_path(netdev), timeout)

    def call(self, req: Request) -> int | None:
        self.sock.sendmsg([req.text.encode()], _ancillary(req.fd))
        return req.result(*_unpack(self.sock.recvmsg(REPLY_SIZE, _CMSG_ROOM)))

    def connect(self, hostname: str | None = None) -> None:
        self.call(Request.connect(hostname))

    def version(self) -> str:
        """The protocol version, checked to be the one this client speaks."""
        self.call(Request.version())
        return "0.1"

    def xsk_map_fd(self, netdev: str) -> int:
        fd = self.call(Request.xsk_map_fd(netdev))
        assert fd is not None
        return fd

    def config_busy_poll(self, xsk_fd: int, timeout: int, budget: int) -> None:
        self.call(Request.busy_poll(xsk_fd, timeout, budget))

    def fin(self) -> None:
        self.call(Request.fin())

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class AsyncUdsClient:
    """anyio client (asyncio or trio, uvloop included)."""

    def __init__(self, sock: socket.socket, timeout: float) -> None:
        self.sock = sock
        self.timeout = timeout

    @classmethod
    async def open(cls, path: Path | str, timeout: float = 5.0) -> AsyncUdsClient:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.setblocking(False)
        try:
            with anyio.fail_after(timeout):
                try:
                    sock.connect(str(path))
                except BlockingIOError:
                    await anyio.wait_writable(sock)
                    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        raise OSError(err, os.strerror(err)) from None
        except BaseException:
            sock.close()
            raise
        return cls(sock, timeout)

    async def call(self, req: Request) -> int | None:
        with anyio.fail_after(self.timeout):
            self.sock.sendmsg([req.text.encode()], _ancillary(req.fd))
            while True:
                try:
                    msg = self.sock.recvmsg(REPLY_SIZE, _CMSG_ROOM)
                    break
                except BlockingIOError:
                    await anyio.wait_readable(self.sock)
        return req.result(*_unpack(msg))

    async def connect(self, hostname: str | None = None) -> None:
        await self.call(Request.connect(hostname))

    async def xsk_map_fd(self, netdev: str) -> int:
        fd = await self.call(Request.xsk_map_fd(netdev))
        assert fd is not None
        return fd

    async def config_busy_poll(self, xsk_fd: int, timeout: int, budget: int) -> None:
        await self.call(Request.busy_poll(xsk_fd, timeout, budget))

    async def fin(self) -> None:
        await self.call(Request.fin())

    async def aclose(self) -> None:
        self.sock.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
