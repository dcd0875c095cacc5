"""The UDS server: one listening socket per allocated device; moves bytes and fds.

All protocol decisions are in ``handshake.py``. This module creates the socket
(listening before Allocate returns, so the container can mount it), accepts
connection after connection until the device is released (DPDK connects once
per queue), checks the peer's uid, enforces the idle timeout on connections
(the socket itself stays, so a late pod can still connect), and performs the
handshake's actions.

A peer never takes the server down: any failure in a connection is logged once
and ends that connection only; accept errors back off and retry. Connections
are bounded per device (``max_connections``) and per process (a shared
``ConnectionBudget``): the excess is accepted and closed at once, so the
kernel's backlog never fills up, and counted. Every fd a peer sends is closed
on every path, whatever the request was.
"""

from __future__ import annotations

import array
import logging
import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable
from contextlib import suppress
from pathlib import Path

import anyio
from anyio.abc import TaskGroup

from afxdp import contracts
from afxdp.confine import confined
from afxdp.logsetup import about
from afxdp.sockfile import FileId, clear_stale, file_id, remove_own
from afxdp.uds import handshake as hs
from afxdp.unixserver import BACKOFF_MIN, TRANSIENT_ACCEPT_ERRORS, Backoff, accept

log = logging.getLogger(__name__)

SOCKET_NAME = contracts.SOCKET_NAME
SO_PREFER_BUSY_POLL = 69
SO_BUSY_POLL_BUDGET = 70
_MAX_FDS = 4  # a request carries at most one; room for a few more so extras get closed
_UCRED = struct.Struct("3i")
# DPDK opens one connection per queue; 64 queues is more than any NIC it drives here.
MAX_CONNECTIONS = 64
GLOBAL_CONNECTIONS = 1024
# A peer that does not read its replies must not hold a connection forever,
# even in a pool whose idle timeout is disabled.
SEND_TIMEOUT = 5.0

HostChecker = Callable[[str], Awaitable[hs.HostCheck]]


class ConnectionBudget:
    """The connections all UDS servers of the process may hold at once.

    One object shared by every UdsServer: a pod that opens many connections to
    its own socket cannot use up the fds the rest of the node service needs.
    ``refused`` counts the connections refused because the budget was spent.
    """

    def __init__(self, limit: int = GLOBAL_CONNECTIONS) -> None:
        self.limit = limit
        self.active = 0
        self.refused = 0

    @classmethod
    def for_fd_limit(cls, soft_limit: int) -> ConnectionBudget:
        """A budget of half the process's fd limit: the other half stays for the
        rest of the service (gRPC, CNI, netlink, XSKMAP fds)."""
        return cls(max(16, soft_limit // 2))

    def take(self) -> bool:
        if self.active >= self.limit:
            self.refused += 1
            return False
        self.active += 1
        return True

    def give_back(self) -> None:
        self.active -= 1


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


def _own(path: Path, uid: int) -> None:
    # Only when it changes anything: an unprivileged afxdpd (tests) serving
    # uid 0 pools cannot chown, and need not.
    if path.lstat().st_uid != uid:
        os.chown(path, uid, -1, follow_symlinks=False)


def peer_uid(conn: socket.socket) -> int:
    _pid, uid, _gid = _UCRED.unpack(
        conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    )
    return int(uid)


def apply_busy_poll(fd: int, timeout: int, budget: int) -> bool:
    """Set the three busy-poll options on the pod's socket; all or none.

    ``fd`` is the peer's and stays open (the caller closes it); anything but a
    socket is refused without touching it.
    """
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            log.info("busy poll: fd %d is not a socket", fd)
            return False
        dup = os.dup(fd)
    except OSError as exc:
        log.info("busy poll: fd %d: %s", fd, exc)
        return False
    try:
        sock = socket.socket(fileno=dup)
    except OSError as exc:
        os.close(dup)
        log.info("busy poll: fd %d: %s", fd, exc)
        return False
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
    try:
        conn.sendmsg([text.encode()], anc)
        return
    except BlockingIOError:
        pass  # the peer does not read: wait for room, up to the deadline
    # (A deadline only here: a cancel scope costs each reply ~15 us, a fifth of
    # the server's own time per message, and a reply almost always fits.)
    with anyio.fail_after(SEND_TIMEOUT):
        while True:
            await anyio.wait_writable(conn)
            try:
                conn.sendmsg([text.encode()], anc)
                return
            except BlockingIOError:
                continue


class UdsServer:
    """The handshake server of one allocated device.

    Counters (for status): ``connections`` handshakes begun by an allowed peer,
    ``active`` connections open now, ``refused`` connections closed at once over
    the per-device limit or the shared budget, ``denied`` peers of a foreign
    uid, ``failed`` connections ended by an error, ``accept_errors`` accept()
    failures retried.
    """

    def __init__(
        self,
        *,
        netdev: str,
        map_fd: int,
        path: Path,
        check_host: HostChecker,
        uid: int = 0,
        idle_timeout: float | None = 30.0,
        max_connections: int = MAX_CONNECTIONS,
        budget: ConnectionBudget | None = None,
        count: Callable[[str], None] | None = None,
    ) -> None:
        self.netdev = netdev
        self.concerns = about(device=netdev)  # what its log lines are about
        self.map_fd = map_fd
        self.path = path
        self.check_host = check_host
        self.uid = uid
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self.budget = budget if budget is not None else ConnectionBudget()
        # Told each connection's outcome (accepted, refused, denied, failed): metrics.
        self.count: Callable[[str], None] = count or (lambda _outcome: None)
        self.connections = 0
        self.active = 0
        self.refused = 0
        self.denied = 0
        self.failed = 0
        self.accept_errors = 0
        self._listener: socket.socket | None = None
        self._ours: FileId | None = None  # the socket file this server made
        self._closed = False  # closed for good: serve() must not listen again

    def listen(self) -> None:
        """Bind and listen now (blocking, fast): the socket exists when this returns.
        OSError(EADDRINUSE) when another server answers at the path (``sockfile``)."""
        _private_dir(self.path.parent)
        # A socket someone answers on is another afxdpd's (sharing the UDS dir):
        # an error. One nobody answers on is stale, from a previous run.
        clear_stale(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours = None
        try:
            sock.bind(str(self.path))
            ours = file_id(self.path)
            os.chmod(self.path, 0o600)
            # The pool's user owns the socket and its directory, so a pod running
            # as that user can reach it (as pinning does for a pinned map); a
            # directory left by an earlier pool's user goes back to this one.
            _own(self.path, self.uid)
            _own(self.path.parent, self.uid)
            sock.listen(16)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            remove_own(self.path, ours)  # a bind() that failed made no file of ours
            raise
        self._listener = sock
        self._ours = ours

    async def serve(self) -> None:
        """Accept connections until cancelled; then remove the socket. Never
        raises for anything a peer or the system does (a UDS server ending
        would end the service's task group). Once closed, it never listens again:
        a later listener at the same path belongs to the device's next pod."""
        if self._closed:
            return
        if self._listener is None:
            self.listen()
        listener = self._listener
        assert listener is not None
        backoff = Backoff()
        try:
            async with anyio.create_task_group() as tg:
                while True:
                    try:
                        conn = await accept(listener)
                    except OSError as exc:
                        await self._accept_failed(exc, backoff)
                        continue
                    backoff.reset()
                    self._admit(tg, conn)
        finally:
            # The directory stays: whoever ends the allocation removes it
            # (a pod may have it mounted across an afxdpd restart).
            self.close(keep_dir=True)

    async def _accept_failed(self, exc: OSError, backoff: Backoff) -> None:
        # Out of fds or memory, or a peer gone while queued: the connection
        # stays in the backlog, so the listener stays readable; wait instead
        # of spinning. Anything else is unexpected but no reason to stop.
        self.accept_errors += 1
        delay = backoff.next()
        if delay == BACKOFF_MIN:  # once per streak, not once per retry
            expected = exc.errno in TRANSIENT_ACCEPT_ERRORS
            log.log(logging.WARNING if expected else logging.ERROR,
                    "%s: accept failed (%s); backing off", self.netdev, exc,
                    extra=self.concerns)  # fmt: skip
        await anyio.sleep(delay)

    def _admit(self, tg: TaskGroup, conn: socket.socket) -> None:
        """Serve ``conn`` in its own task, or refuse it (close at once) over a limit."""
        if self.active >= self.max_connections:
            reason = f"{self.max_connections} connections open"
        elif not self.budget.take():
            reason = f"the process holds {self.budget.limit} UDS connections"
        else:
            self.active += 1
            conn.setblocking(False)
            tg.start_soon(self._connection, conn)
            return
        conn.close()
        self.refused += 1
        self.count("refused")
        if self.refused == 1 or self.refused % 100 == 0:  # a flood must not flood the log
            log.warning("%s: refused a connection (%s; %d so far)", self.netdev, reason,
                        self.refused, extra=self.concerns)  # fmt: skip

    def close(self, *, keep_dir: bool = False) -> None:
        """Stop listening and remove the socket file if it is still the one this
        server made (and the device's directory, unless ``keep_dir``: a pod has
        that directory bind-mounted, and a restarted afxdpd's new socket must
        appear in the very same directory). Idempotent."""
        self._closed = True
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            # Only the file this server made: another afxdpd sharing the UDS dir,
            # or anyone, may have put its own socket at the path meanwhile.
            remove_own(self.path, self._ours)
        if not keep_dir:  # also after the serving task closed it, keeping the dir
            with suppress(OSError):
                self.path.parent.rmdir()

    async def _connection(self, conn: socket.socket) -> None:
        # One connection's failure (a peer that vanished mid-reply, a bug, a
        # stray cancellation of its idle deadline) must never take the listening
        # socket, or other connections, down with it.
        try:
            if not await confined(log, lambda: f"{self.netdev}: a connection", "the server",
                                  self._talk, conn):  # fmt: skip
                self._failed()
        finally:
            self.active -= 1
            self.budget.give_back()

    async def _talk(self, conn: socket.socket) -> None:
        with conn:
            try:
                await self._converse(conn)
            except (OSError, TimeoutError) as exc:  # the peer's doing, not a bug
                self._failed()
                log.info("%s: connection ended: %s", self.netdev, exc, extra=self.concerns)

    def _failed(self) -> None:
        self.failed += 1
        self.count("failed")

    async def _converse(self, conn: socket.socket) -> None:
        uid = peer_uid(conn)
        if uid not in (0, self.uid):
            self.denied += 1
            self.count("denied")
            log.warning("%s: refused a peer with uid %d", self.netdev, uid, extra=self.concerns)
            return
        self.connections += 1
        self.count("accepted")
        machine = hs.Handshake({self.netdev: self.map_fd})
        while machine.state is not hs.State.CLOSED:
            with anyio.move_on_after(self.idle_timeout) as idle:
                data, fds = await _recv(conn)
            if idle.cancelled_caught:
                log.info("%s: connection idle for %ss; closed", self.netdev, self.idle_timeout,
                         extra=self.concerns)  # fmt: skip
                return
            # Received fds are ours from here on (_recv has no await after its
            # recvmsg): closed whatever happens next (a failed reply, a bug,
            # cancellation while kubelet is asked).
            try:
                if not data and not fds:
                    return  # a zero-length read on SEQPACKET is the peer hanging up
                if not await self._perform(conn, machine, machine.receive(data, fds)):
                    return
            finally:
                for fd in fds:
                    with suppress(OSError):
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
