"""The UDS server against hostile and clumsy peers, over real SEQPACKET sockets.

No peer event may end the server, every fd a peer sends is closed on every
path, and connections are bounded. The host check here is a fake (``FakeHolders``)
so that the process's fd count holds nothing but the server's and the test's
own fds (the kubelet double's gRPC threads open and close fds on their own
schedule); the real PodResources path is tested in test_uds_server.py.
"""

from __future__ import annotations

import array
import json
import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import anyio
import pytest

from afxdp.uds.client import AsyncUdsClient, UdsClient
from afxdp.uds.handshake import HostCheck
from afxdp.uds.server import ConnectionBudget, UdsServer, socket_path

pytestmark = pytest.mark.anyio


class FakeHolders:
    """Stands in for kubelet's PodResources: ``pod-a`` holds every device."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, hostname: str) -> HostCheck:
        self.calls += 1
        return HostCheck.OK if hostname == "pod-a" else HostCheck.REFUSED


def fd_targets() -> list[str]:
    """What each open fd of this process refers to (``pipe:[n]``, a path, ...)."""
    targets = []
    for name in os.listdir("/proc/self/fd"):
        with suppress(OSError):  # the listing's own fd, gone by now
            targets.append(os.readlink(f"/proc/self/fd/{name}"))
    return targets


def refs(fd: int) -> int:
    """How many fds of this process refer to the object ``fd`` refers to."""
    target = os.readlink(f"/proc/self/fd/{fd}")
    return fd_targets().count(target)


async def settles(what: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait until ``what()`` holds; fail after ``timeout``."""
    with anyio.fail_after(timeout):
        while not what():
            await anyio.sleep(0.01)


@pytest.fixture
def map_fd() -> Iterator[int]:
    """Stands in for the XSKMAP fd: the server passes any fd on unchanged."""
    r, w = os.pipe()
    yield r
    os.close(r)
    os.close(w)


@asynccontextmanager
async def serving(tmp_path: Path, map_fd: int, netdev: str = "devA",
                  **kw: Any) -> AsyncIterator[UdsServer]:  # fmt: skip
    kw.setdefault("check_host", FakeHolders())
    server = UdsServer(netdev=netdev, map_fd=map_fd, path=socket_path(tmp_path / "uds", netdev),
                       **kw)  # fmt: skip
    server.listen()
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve)
        yield server
        tg.cancel_scope.cancel()


def raw(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.settimeout(5)
    s.connect(str(path))
    return s


def send(s: socket.socket, text: bytes, *fds: int) -> None:
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    s.sendmsg([text], anc)


async def ask(s: socket.socket, text: bytes, *fds: int) -> bytes:
    """Send a request and read its reply (fds that come back are closed)."""
    send(s, text, *fds)
    msg, anc, _, _ = await anyio.to_thread.run_sync(s.recvmsg, 128, socket.CMSG_SPACE(16))
    for _level, _kind, data in anc:
        for fd in array.array("i", data[: len(data) - len(data) % 4]):
            os.close(fd)
    return msg


async def full_handshake(path: Path) -> None:
    async with await AsyncUdsClient.open(path) as c:
        await c.connect("pod-a")
        os.close(await c.xsk_map_fd("devA"))
        await c.fin()


async def test_a_non_socket_fd_in_busy_poll_gets_a_nak_and_never_leaks(
    tmp_path: Path, map_fd: int
) -> None:
    sent = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        async with serving(tmp_path, map_fd) as server:
            await full_handshake(server.path)  # every lazily made fd exists now
            before = len(fd_targets())
            with raw(server.path) as s:
                assert await ask(s, b"/connect,pod-a") == b"/host_ok"
                for _ in range(50):
                    assert (
                        await ask(s, b"/config_busy_poll,20,64", sent) == b"/config_busy_poll_nak"
                    )
                assert await ask(s, b"/fin") == b"/fin_ack"
            await settles(lambda: server.active == 0)
            assert refs(sent) == 1  # ours alone
            await settles(lambda: len(fd_targets()) <= before)
    finally:
        os.close(sent)


@pytest.mark.parametrize(
    "case",
    [
        ("await_host", b"/connect,pod-a", 1, b"/host_ok"),
        ("await_host", b"junk", 1, b"/nak"),
        ("connected", b"/xsk_map_fd,devA", 1, b"/fd_ack"),
        ("connected", b"/version", 1, b"0.1"),
        ("connected", b"\xff" * 300, 1, b"/nak"),
        ("connected", b"/config_busy_poll,1,2", 3, b"/nak"),  # extra fds: malformed
        ("connected", b"/fin", 1, b"/fin_ack"),
    ],
)  # fmt: skip
async def test_every_received_fd_is_closed_whatever_the_request(
    tmp_path: Path, map_fd: int, case: tuple[str, bytes, int, bytes]
) -> None:
    state, request_, nfds, reply = case
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as xsk:
        async with serving(tmp_path, map_fd) as server:
            with raw(server.path) as s:
                if state == "connected":
                    assert await ask(s, b"/connect,pod-a") == b"/host_ok"
                assert await ask(s, request_, *[xsk.fileno()] * nfds) == reply
                # Closed before the reply went out: no waiting needed.
                assert refs(xsk.fileno()) == 1


async def test_the_fd_is_closed_when_the_reply_cannot_be_sent(tmp_path: Path, map_fd: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as xsk:
        async with serving(tmp_path, map_fd) as server:
            with raw(server.path) as s:
                assert await ask(s, b"/connect,pod-a") == b"/host_ok"
                # Hang up before the server reads the request: its reply fails (EPIPE).
                send(s, b"/config_busy_poll,1,2", xsk.fileno())
            await settles(lambda: server.active == 0)
            assert server.failed == 1
            assert refs(xsk.fileno()) == 1
            await full_handshake(server.path)


async def test_a_peer_that_never_reads_its_replies_is_let_go_after_the_send_timeout(
    tmp_path: Path, map_fd: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("afxdp.uds.server.SEND_TIMEOUT", 0.3)
    async with serving(tmp_path, map_fd) as server:
        with raw(server.path) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)  # room for a few replies
            s.setblocking(False)
            sent = 0
            with anyio.fail_after(10):
                while server.failed == 0:  # requests until the server's reply blocks
                    with suppress(BlockingIOError):
                        send(s, b"/version")
                        sent += 1
                    await anyio.sleep(0.001)
            assert sent > 1
            # The stuck connection was closed, and its server goes on serving.
            await settles(lambda: server.active == 0)
        await full_handshake(server.path)
        assert server.connections == 2


async def test_the_fd_is_closed_when_the_server_is_cancelled_mid_request(
    tmp_path: Path, map_fd: int
) -> None:
    asked = anyio.Event()

    async def kubelet_never_answers(hostname: str) -> HostCheck:
        asked.set()
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as xsk, anyio.fail_after(5):
        async with serving(tmp_path, map_fd, check_host=kubelet_never_answers) as server:
            s = raw(server.path)
            send(s, b"/connect,pod-a", xsk.fileno())
            await asked.wait()
            assert refs(xsk.fileno()) == 2  # the server holds it while kubelet is asked
        # Released: the server is cancelled with the request still open.
        with s:
            assert refs(xsk.fileno()) == 1
            assert s.recv(128) == b""  # closed, with no reply
        assert not server.path.exists()


@pytest.mark.parametrize(
    "failure",
    [
        lambda: RuntimeError("a bug in the host check"),
        # The idle deadline of each request is a move_on_after; one escaping its
        # scope as a CancelledError (seen with another deadline under load, see
        # afxdp/confine.py) ended the server, and the pod's socket with it.
        # Raised by hand here: a FAKE stray cancellation.
        lambda: anyio.get_cancelled_exc_class()("a stray deadline"),
    ],
    ids=["bug", "stray_cancellation"],
)
async def test_an_unexpected_exception_ends_only_its_connection(
    tmp_path: Path, map_fd: int, failure: Callable[[], BaseException]
) -> None:
    holders = FakeHolders()

    async def failing_once(hostname: str) -> HostCheck:
        if not holders.calls:
            holders.calls += 1
            raise failure()
        return await holders(hostname)

    async with serving(tmp_path, map_fd, check_host=failing_once) as server:
        with raw(server.path) as s:
            assert await ask(s, b"/connect,pod-a") == b""  # closed, no traceback on the wire
        await settles(lambda: server.active == 0)
        assert server.failed == 1
        await full_handshake(server.path)  # the device's socket still serves
        assert server.connections == 2


# Where a peer may hang up: the requests it sends (and whether it reads the
# reply of the last one) before closing.
HANGUPS = {
    "before_connect": ([], False),
    "after_connect_before_reading": ([b"/connect,pod-a"], False),
    "after_host_ok": ([b"/connect,pod-a"], True),
    "after_xsk_map_fd_before_reading_the_fd": ([b"/connect,pod-a", b"/xsk_map_fd,devA"], False),
    "after_config_busy_poll": ([b"/connect,pod-a", b"/config_busy_poll,1,2"], False),
    "after_fin_before_reading": ([b"/connect,pod-a", b"/fin"], False),
}


async def test_a_peer_hanging_up_at_every_point_never_harms_the_server(
    tmp_path: Path, map_fd: int
) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as xsk:
        async with serving(tmp_path, map_fd) as server:
            await full_handshake(server.path)
            before = len(fd_targets())
            for point, (requests, read_last) in HANGUPS.items():
                with raw(server.path) as s:
                    for i, req in enumerate(requests):
                        fds = [xsk.fileno()] if req.startswith(b"/config_busy_poll") else []
                        if i < len(requests) - 1 or read_last:
                            assert await ask(s, req, *fds), point
                        else:
                            send(s, req, *fds)
                await settles(lambda: server.active == 0)
                assert refs(xsk.fileno()) == 1, point
            await full_handshake(server.path)
            # Every peer that got past accept counts, the hasty ones included.
            assert server.connections == 1 + len(HANGUPS) + 1
            await settles(lambda: server.active == 0)
            assert server.budget.active == 0
            await settles(lambda: len(fd_targets()) <= before)


async def test_connections_over_the_device_limit_are_refused_and_counted(
    tmp_path: Path, map_fd: int
) -> None:
    async with serving(tmp_path, map_fd, max_connections=3) as server:
        held = [raw(server.path) for _ in range(3)]
        try:
            for s in held:
                assert await ask(s, b"/connect,pod-a") == b"/host_ok"
            with raw(server.path) as extra:
                # Accepted and closed at once: the peer sees the end, not a hang.
                assert await anyio.to_thread.run_sync(extra.recv, 128) == b""
            assert (server.refused, server.active) == (1, 3)
            held.pop().close()
            await settles(lambda: server.active == 2)
            await full_handshake(server.path)
        finally:
            for s in held:
                s.close()
        assert server.refused == 1


async def test_the_global_budget_is_shared_by_every_server(tmp_path: Path, map_fd: int) -> None:
    budget = ConnectionBudget(2)
    async with (
        serving(tmp_path, map_fd, "devA", budget=budget) as a,
        serving(tmp_path, map_fd, "devB", budget=budget) as b,
    ):
        on_a, on_b = raw(a.path), raw(b.path)
        try:
            assert await ask(on_a, b"/connect,pod-a") == b"/host_ok"
            assert await ask(on_b, b"/connect,pod-a") == b"/host_ok"
            with raw(b.path) as extra:
                assert await anyio.to_thread.run_sync(extra.recv, 128) == b""
            assert (budget.refused, b.refused, a.refused) == (1, 1, 0)
            on_a.close()
            await settles(lambda: budget.active == 1)
            async with await AsyncUdsClient.open(b.path) as c:
                await c.connect("pod-a")
        finally:
            on_a.close()
            on_b.close()


def test_budget_from_the_fd_limit_leaves_half_for_the_rest() -> None:
    assert ConnectionBudget.for_fd_limit(1024).limit == 512
    assert ConnectionBudget.for_fd_limit(20).limit == 16


async def test_an_idle_connection_is_closed_but_the_socket_stays(
    tmp_path: Path, map_fd: int
) -> None:
    async with serving(tmp_path, map_fd, idle_timeout=0.3) as server:
        with raw(server.path) as s:
            assert await ask(s, b"/connect,pod-a") == b"/host_ok"
            started = anyio.current_time()
            # The server ends the idle connection on its own: the peer reads the end.
            assert await anyio.to_thread.run_sync(s.recv, 128) == b""
            assert anyio.current_time() - started >= 0.29
        assert server.path.is_socket()
        await full_handshake(server.path)  # a late pod still gets in


# A UDS server in a child process whose fd limit is a few fds above what it
# holds at start: accept() runs into EMFILE. Lines on stdin ask for its counters.
EMFILE_SERVER = r"""
import json, os, resource, sys
from pathlib import Path
import anyio
from afxdp.uds.handshake import HostCheck
from afxdp.uds.server import ConnectionBudget, UdsServer

async def fake_holders(hostname):  # no kubelet in the child: every pod holds the device
    return HostCheck.OK

async def main():
    r, _w = os.pipe()
    server = UdsServer(netdev="devA", map_fd=r, path=Path(sys.argv[1]), check_host=fake_holders,
                       idle_timeout=None, max_connections=10_000, budget=ConnectionBudget(10_000))
    server.listen()
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve)
        await anyio.sleep(0.1)  # the loop's own fds are all made
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 6, hard))
        print("ready", flush=True)
        while await anyio.to_thread.run_sync(sys.stdin.readline):
            print(json.dumps({"accept_errors": server.accept_errors, "active": server.active,
                              "connections": server.connections}), flush=True)
        tg.cancel_scope.cancel()

anyio.run(main, backend_options={"use_uvloop": True})
"""


def _line(proc: subprocess.Popen[str], timeout: float = 10.0) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "the child server did not answer"
    return proc.stdout.readline().strip()


def _stats(proc: subprocess.Popen[str]) -> dict[str, int]:
    assert proc.stdin is not None
    proc.stdin.write("\n")
    proc.stdin.flush()
    stats: dict[str, int] = json.loads(_line(proc))
    return stats


def test_accept_out_of_fds_backs_off_and_serves_again_once_fds_are_free(tmp_path: Path) -> None:
    path = socket_path(tmp_path / "uds", "devA")
    proc = subprocess.Popen([sys.executable, "-c", EMFILE_SERVER, str(path)], text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)  # fmt: skip
    peers: list[socket.socket] = []
    try:
        assert _line(proc) == "ready"
        # More connections than the child has fds; the rest wait in its backlog
        # until that is full too (then connect() says EAGAIN).
        for _ in range(64):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            peers.append(s)
            s.setblocking(False)
            try:
                s.connect(str(path))
            except BlockingIOError:
                break
        deadline = time.monotonic() + 10
        while (stats := _stats(proc))["accept_errors"] == 0:
            assert time.monotonic() < deadline, f"accept never ran out of fds: {stats}"
            time.sleep(0.01)
        assert proc.poll() is None, "the server died"
        assert 0 < stats["active"] < len(peers)
        for s in peers:
            s.close()
        peers.clear()
        deadline = time.monotonic() + 10
        while True:  # the closed peers leave the backlog as the server drains it
            try:
                client = UdsClient(path, timeout=10)
                break
            except BlockingIOError:
                assert time.monotonic() < deadline, "the backlog never drained"
                time.sleep(0.05)
        with client as c:
            c.connect("pod-a")
            os.close(c.xsk_map_fd("devA"))
            c.fin()
        assert proc.poll() is None
    finally:
        for s in peers:
            s.close()
        proc.kill()
        proc.wait(timeout=10)
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.close()
        proc.stdout.close()
