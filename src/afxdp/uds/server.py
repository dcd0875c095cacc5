"""The UDS server: one listening socket per allocated device; moves bytes and fds.

All protocol decisions are in ``handshake.py``. This module creates the socket
(listening before Allocate returns, so the container can mount it), accepts
connection after connection until the device is released (DPDK connects once
per queue), checks the peer's uid, enforces the idle timeout on connections
(the socket itself stays, so a late pod can still connect), and performs the
handshake's actions.
"""

from __future__ import annotations

import array
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from contextlib import suppress
from pathlib import Path

import anyio

from afxdp.uds import handshake as hs

log = logging.getLogger(__name__)

SOCKET_NAME = "afxdp.sock"
SO_PREFER_BUSY_POLL = 69
SO_BUSY_POLL_BUDGET = 70
_MAX_FDS = 4  # a request carries at most one; room for a few more so extras get closed
_UCRED = struct.Struct("3i")

HostChecker = Callable[[str], Awaitable[hs.HostCheck]]


def socket_path(uds_dir: Path, netdev: str) -> Path:
    """Host path of a device's socket, mirroring the pod's /tmp/afxdp_dp/<netdev>/."""
    return uds_dir / netdev / SOCKET_NAME


def _private_dir(path: Path) -> None:
    """Create ``path`` (and parents) mode 0700, or insist an existing one is a real dir."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.is_symlink() or not path.is_dir():
        raise OSError(f"{path}: exists and is not a directory")
    # Nobody but us may reach the socket between bind() and chmod().
    os.chmod(path, 0o700)


def peer_uid(conn: socket.socket) -> int:
    _pid, uid, _gid = _UCRED.unpack(
        conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    )
    return int(uid)


def apply_busy_poll(fd: int, timeout: int, budget: int) -> bool:
    """Set the three busy-poll options on the pod's socket; all or none."""
    sock = socket.socket(fileno=os.dup(fd))
    options = [
        (SO_PREFER_BUSY_POLL, 1),
        (socket.SO_BUSY_POLL if hasattr(socket, "SO_BUSY_POLL") else 46, timeout),
        (SO_BUSY_POLL_BUDGET, budget),
    ]
    applied: list[tuple[int, int]] = []
    try:
        for opt, value in options:
            try:
                previous = sock.getsockopt(socket.SOL_SOCKET, opt)
            except OSError:
                previous = 0  # kernels before 6.x cannot read the budget back; 0 is its default
            sock.setsockopt(socket.SOL_SOCKET, opt, value)
            applied.append((opt, previous))
    except (OSError, OverflowError) as exc:
        log.warning("busy poll on fd %d failed: %s; restoring", fd, exc)
        for opt, previous in reversed(applied):
            with suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, opt, previous)
        return False
    finally:
        sock.close()
    return True


async def _recv(conn: socket.socket) -> tuple[bytes, list[int]]:
    """One packet and the fds that came with it.

    A request longer than MAX_REQUEST arrives cut to MAX_REQUEST + 1 bytes, which
    the handshake rejects as too long; surplus fds likewise make it malformed.
    """
    while True:
        try:
            data, ancdata, _flags, _ = conn.recvmsg(
                hs.MAX_REQUEST + 1, socket.CMSG_SPACE(_MAX_FDS * 4)
            )
        except BlockingIOError:
            await anyio.wait_readable(conn)
            continue
        fds = array.array("i")
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
        return data, list(fds)


async def _send(conn: socket.socket, text: str, fd: int | None) -> None:
    anc = [] if fd is None else [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
    while True:
        try:
            conn.sendmsg([text.encode()], anc)
            return
        except BlockingIOError:
            await anyio.wait_writable(conn)


class UdsServer:
    """The handshake server of one allocated device."""

    def __init__(
        self,
        *,
        netdev: str,
        map_fd: int,
        path: Path,
        check_host: HostChecker,
        uid: int = 0,
        idle_timeout: float | None = 30.0,
    ) -> None:
        self.netdev = netdev
        self.map_fd = map_fd
        self.path = path
        self.check_host = check_host
        self.uid = uid
        self.idle_timeout = idle_timeout
        self.connections = 0
        self._listener: socket.socket | None = None

    def listen(self) -> None:
        """Bind and listen now (blocking, fast): the socket exists when this returns."""
        _private_dir(self.path.parent)
        self.path.unlink(missing_ok=True)  # stale, from a previous run
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            sock.bind(str(self.path))
            os.chmod(self.path, 0o600)
            if self.uid:
                os.chown(self.path, self.uid, -1)
            sock.listen(16)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            self.path.unlink(missing_ok=True)
            raise
        self._listener = sock

    async def serve(self) -> None:
        """Accept connections until cancelled; then remove the socket."""
        if self._listener is None:
            self.listen()
        listener = self._listener
        assert listener is not None
        try:
            async with anyio.create_task_group() as tg:
                while True:
                    await anyio.wait_readable(listener)
                    try:
                        conn, _ = listener.accept()
                    except (BlockingIOError, InterruptedError):
                        continue
                    conn.setblocking(False)
                    tg.start_soon(self._connection, conn)
        finally:
            self.close()

    def close(self) -> None:
        """Stop listening and remove the socket file. Idempotent."""
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            self.path.unlink(missing_ok=True)
            with suppress(OSError):
                self.path.parent.rmdir()

    async def _connection(self, conn: socket.socket) -> None:
        # One connection's failure (a peer that vanished mid-reply) must never
        # take the listening socket, or other connections, down with it.
        with conn:
            try:
                await self._converse(conn)
            except OSError as exc:
                log.info("%s: connection ended: %s", self.netdev, exc)

    async def _converse(self, conn: socket.socket) -> None:
        uid = peer_uid(conn)
        if uid not in (0, self.uid):
            log.warning("%s: refused a peer with uid %d", self.netdev, uid)
            return
        self.connections += 1
        machine = hs.Handshake({self.netdev: self.map_fd})
        while machine.state is not hs.State.CLOSED:
            with anyio.move_on_after(self.idle_timeout) as idle:
                data, fds = await _recv(conn)
            if idle.cancelled_caught:
                log.info("%s: connection idle for %ss; closed", self.netdev, self.idle_timeout)
                return
            try:
                if not data and not fds:
                    return  # a zero-length read on SEQPACKET is the peer hanging up
                if not await self._perform(conn, machine, machine.receive(data, fds)):
                    return
            finally:
                for fd in fds:
                    os.close(fd)

    async def _perform(
        self, conn: socket.socket, machine: hs.Handshake, actions: list[hs.Action]
    ) -> bool:
        """Carry out actions (and those their results produce); False on Close."""
        pending = list(actions)
        while pending:
            action = pending.pop(0)
            if isinstance(action, hs.Send):
                await _send(conn, action.text, action.fd)
            elif isinstance(action, hs.CheckHost):
                pending += machine.host_checked(await self.check_host(action.hostname))
            elif isinstance(action, hs.ApplyBusyPoll):
                ok = apply_busy_poll(action.fd, action.timeout, action.budget)
                pending += machine.busy_poll_done(ok)
            else:
                return False
        return True
