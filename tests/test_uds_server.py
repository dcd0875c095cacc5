"""The UDS server over real SEQPACKET sockets, with the fake kubelet's PodResources."""

from __future__ import annotations

import errno
import os
import socket
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from afxdp.podresources import PodResourcesChecker
from afxdp.uds.client import AsyncUdsClient, HandshakeError, UdsClient
from afxdp.uds.handshake import HostCheck
from afxdp.uds.server import UdsServer, socket_path
from tests.kubelet import FakeKubelet

pytestmark = pytest.mark.anyio
RESOURCE = "afxdp/pool1"


@pytest.fixture
def kubelet(tmp_path: Path) -> Any:
    k = FakeKubelet(tmp_path / "kubelet")
    k.start_pod_resources()
    k.hold("pod-a", RESOURCE, "devA")
    yield k
    k.stop()


@pytest.fixture
def map_fd() -> Any:
    """Stands in for the XSKMAP fd: the server passes any fd on unchanged."""
    r, w = os.pipe()
    yield r
    os.close(r)
    os.close(w)


@asynccontextmanager
async def serving(
    tmp_path: Path, kubelet: FakeKubelet, map_fd: int, **kw: Any
) -> AsyncIterator[UdsServer]:
    checker = PodResourcesChecker(kubelet.dir / "pod-resources" / "kubelet.sock")

    async def check(host: str) -> HostCheck:
        return await checker.check(host, resource=RESOURCE, device="devA")

    server = UdsServer(netdev="devA", map_fd=map_fd, path=socket_path(tmp_path / "uds", "devA"),
                       check_host=check, **kw)  # fmt: skip
    server.listen()
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve)
        yield server
        tg.cancel_scope.cancel()


async def test_a_server_closed_before_its_task_ran_never_listens_again(
    tmp_path: Path, map_fd: int
) -> None:
    # Its path may belong to the device's next pod's server by then.
    server = UdsServer(netdev="devA", map_fd=map_fd, path=socket_path(tmp_path / "uds", "devA"),
                       check_host=lambda h: anyio.sleep(0))  # type: ignore[arg-type,return-value]  # fmt: skip
    server.listen()
    server.close(keep_dir=True)
    server.path.touch()  # stands in for the next server's socket
    with anyio.fail_after(5):
        await server.serve()  # returns at once
    assert server.path.exists() and not stat.S_ISSOCK(server.path.stat().st_mode)


@pytest.mark.privileged  # chown to the pool's uid
async def test_socket_exists_with_private_modes_before_serving(
    tmp_path: Path, kubelet: FakeKubelet, map_fd: int
) -> None:
    server = UdsServer(netdev="devA", map_fd=map_fd, path=socket_path(tmp_path / "uds", "devA"),
                       check_host=lambda h: anyio.sleep(0), uid=1500)  # type: ignore[arg-type,return-value]  # fmt: skip
    server.listen()
    st_sock = os.stat(server.path)
    assert stat.S_ISSOCK(st_sock.st_mode) and stat.S_IMODE(st_sock.st_mode) == 0o600
    assert st_sock.st_uid == 1500
    st_dir = os.stat(server.path.parent)
    # The pool's user must reach its socket: it owns the (private) directory too.
    assert stat.S_IMODE(st_dir.st_mode) == 0o700 and st_dir.st_uid == 1500
    assert server.path == tmp_path / "uds" / "devA" / "afxdp.sock"
    server.close()
    assert not server.path.exists() and not server.path.parent.exists()


async def test_full_handshake_passes_the_map_fd(
    tmp_path: Path, kubelet: FakeKubelet, map_fd: int
) -> None:
    async with (
        serving(tmp_path, kubelet, map_fd) as server,
        await AsyncUdsClient.open(server.path) as c,
    ):
        await c.connect("pod-a")
        fd = await c.xsk_map_fd("devA")
        try:
            assert os.fstat(fd).st_ino == os.fstat(map_fd).st_ino
        finally:
            os.close(fd)
        with pytest.raises(HandshakeError, match="/fd_nak"):
            await c.xsk_map_fd("devB")
        await c.fin()


async def test_sync_client_and_many_connections_on_one_socket(
    tmp_path: Path, kubelet: FakeKubelet, map_fd: int
) -> None:
    """DPDK connects once per queue: the socket must keep serving."""

    def session(path: Path) -> str:
        with UdsClient(path) as c:
            c.connect("pod-a")
            os.close(c.xsk_map_fd("devA"))
            version = c.version()
            c.fin()
            return version

    async with serving(tmp_path, kubelet, map_fd) as server:
        for _ in range(5):
            assert await anyio.to_thread.run_sync(session, server.path) == "0.1"
        async with anyio.create_task_group() as tg:
            for _ in range(4):
                tg.start_soon(anyio.to_thread.run_sync, session, server.path)
        assert server.connections == 9


async def test_wrong_pod_and_lookup_failure(
    tmp_path: Path, kubelet: FakeKubelet, map_fd: int
) -> None:
    async with serving(tmp_path, kubelet, map_fd) as server:
        async with await AsyncUdsClient.open(server.path) as c:
            with pytest.raises(HandshakeError, match="/host_nak"):
                await c.connect("pod-b")
        kubelet.hold("pod-b", RESOURCE, "devZ")
        async with await AsyncUdsClient.open(server.path) as c:
            with pytest.raises(HandshakeError, match="/host_nak"):
                await c.connect("pod-b")  # holds a device, not this one
        kubelet.fail_list = True
        async with await AsyncUdsClient.open(server.path) as c:
            with pytest.raises(HandshakeError, match="'/error'"):
                await c.connect("pod-c")  # unknown, and kubelet cannot be asked
        # The holder kubelet named before still gets in: an outage of kubelet
        # does not take the device from its pod.
        async with await AsyncUdsClient.open(server.path) as c:
            await c.connect("pod-a")


@pytest.mark.privileged  # SO_BUSY_POLL and SO_PREFER_BUSY_POLL need CAP_NET_ADMIN
async def test_busy_poll_options_are_applied_to_the_sent_socket(
    tmp_path: Path, kubelet: FakeKubelet, map_fd: int
) -> None:
    async with (
        serving(tmp_path, kubelet, map_fd) as server,
        await AsyncUdsClient.open(server.path) as c,
    ):
        await c.connect("pod-a")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            await c.config_busy_poll(s.fileno(), 20, 64)
            assert s.getsockopt(socket.SOL_SOCKET, 46) == 20  # SO_BUSY_POLL
            assert s.getsockopt(socket.SOL_SOCKET, 69) == 1  # SO_PREFER_BUSY_POLL
            try:
                assert s.getsockopt(socket.SOL_SOCKET, 70) == 64  # SO_BUSY_POLL_BUDGET
            except OSError as exc:  # this kernel cannot read the budget back
                assert exc.errno == errno.ENOPROTOOPT
            # Budget above U16_MAX fails: nak, and nothing stays half-applied.
            with pytest.raises(HandshakeError, match="_nak"):
                await c.config_busy_poll(s.fileno(), 99, 70000)
            assert s.getsockopt(socket.SOL_SOCKET, 46) == 20


# Runs as root, enters the socket's directory, then becomes ``uid``: a relative
# connect() then needs no access to the test's private parent directories.
POKE = r"""
import os, socket, sys
os.chdir(os.path.dirname(sys.argv[1]))
os.setgid(int(sys.argv[2])); os.setuid(int(sys.argv[2]))
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.settimeout(5)
s.connect(os.path.basename(sys.argv[1]))
try:
    s.send(b"/connect,pod-a")
    print(repr(s.recv(128)))
except OSError as exc:
    print("closed", exc.errno)
"""


@pytest.mark.privileged  # chown, and a child that setuid()s
async def test_peer_uid_must_be_root_or_the_pool_uid(
    tmp_path: Path, kubelet: FakeKubelet, map_fd: int
) -> None:
    async with serving(tmp_path, kubelet, map_fd, uid=1500) as server:
        # Let any user reach the socket, so that the uid check itself is what refuses.
        os.chmod(server.path.parent, 0o711)
        os.chmod(server.path, 0o666)

        def poke(uid: int) -> str:
            done = subprocess.run([sys.executable, "-c", POKE, str(server.path), str(uid)],
                                  capture_output=True, text=True, timeout=10, check=True)  # fmt: skip
            return done.stdout.strip()

        assert await anyio.to_thread.run_sync(poke, 1500) == "b'/host_ok'"
        refused = await anyio.to_thread.run_sync(poke, 1501)
        assert refused == "b''" or refused.startswith("closed"), refused  # no reply
        assert (server.denied, server.connections) == (1, 1)


async def test_malformed_traffic_never_stops_the_server(
    tmp_path: Path, kubelet: FakeKubelet, map_fd: int
) -> None:
    async with serving(tmp_path, kubelet, map_fd) as server:

        @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
        @given(st.lists(st.binary(min_size=1, max_size=400), min_size=1, max_size=4),
               st.booleans())  # fmt: skip
        def junk(msgs: list[bytes], connect_first: bool) -> None:
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
                s.settimeout(5)
                s.connect(str(server.path))
                if connect_first:
                    s.send(b"/connect,pod-a")
                    assert s.recv(128) == b"/host_ok"
                for m in msgs:
                    s.send(m)
                    reply = s.recv(128)
                    assert reply, f"no reply to {m!r}"
                    if reply in (b"/host_nak", b"/fin_ack"):
                        break

        await anyio.to_thread.run_sync(junk)
        async with await AsyncUdsClient.open(server.path) as c:
            await c.connect("pod-a")
            await c.fin()
