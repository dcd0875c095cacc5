"""A server removes only a socket file it created, and never binds over a live
one: the UDS server and the control/CNI server over real unix sockets, with
another process's socket (another afxdpd sharing the directory) at their path."""

from __future__ import annotations

import errno
import socket
import stat
from pathlib import Path

import anyio
import pytest
from anyio.abc import SocketStream

from afxdp.sockfile import file_id
from afxdp.uds.handshake import HostCheck
from afxdp.uds.server import UdsServer, socket_path
from afxdp.unixserver import serve_unix

pytestmark = pytest.mark.anyio


def other_server(path: Path, kind: int) -> socket.socket:
    """Another process's live socket at ``path`` (a listening socket is all it
    takes: connect() is answered by the kernel's backlog)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, kind)
    sock.bind(str(path))
    sock.listen(4)
    return sock


def answers(path: Path, kind: int) -> bool:
    with socket.socket(socket.AF_UNIX, kind) as probe:
        probe.settimeout(5)
        return probe.connect_ex(str(path)) == 0


async def no_host(_hostname: str) -> HostCheck:
    raise AssertionError("no handshake in these tests")


def uds_server(tmp_path: Path, map_fd: int = -1) -> UdsServer:
    return UdsServer(netdev="devA", map_fd=map_fd, path=socket_path(tmp_path / "uds", "devA"),
                     check_host=no_host)  # fmt: skip


async def test_a_uds_server_leaves_a_socket_put_in_its_place_when_it_closes(
    tmp_path: Path,
) -> None:
    server = uds_server(tmp_path)
    server.listen()
    # Another afxdpd sharing the UDS dir binds the same device's path (its own
    # stale-file removal took ours): the file there is no longer ours.
    server.path.unlink()
    with other_server(server.path, socket.SOCK_SEQPACKET):
        theirs = file_id(server.path)
        server.close()  # not keep_dir: the directory goes only if empty
        assert file_id(server.path) == theirs
        assert answers(server.path, socket.SOCK_SEQPACKET)


async def test_a_uds_server_whose_task_ends_leaves_a_socket_put_in_its_place(
    tmp_path: Path,
) -> None:
    server = uds_server(tmp_path)
    server.listen()
    server.path.unlink()
    with other_server(server.path, socket.SOCK_SEQPACKET):
        theirs = file_id(server.path)
        async with anyio.create_task_group() as tg:
            tg.start_soon(server.serve)
            await anyio.wait_all_tasks_blocked()
            tg.cancel_scope.cancel()  # the stop path of a service that stops
        assert file_id(server.path) == theirs


async def test_a_uds_server_refuses_to_bind_over_a_socket_someone_answers_on(
    tmp_path: Path,
) -> None:
    server = uds_server(tmp_path)
    with other_server(server.path, socket.SOCK_SEQPACKET):
        theirs = file_id(server.path)
        with pytest.raises(OSError) as raised:
            server.listen()
        assert raised.value.errno == errno.EADDRINUSE
        assert str(server.path) in str(raised.value)
        assert file_id(server.path) == theirs
        assert answers(server.path, socket.SOCK_SEQPACKET)
        server.close()
        assert file_id(server.path) == theirs


@pytest.mark.parametrize("leftover", ["closed socket", "regular file", "dangling symlink"])
async def test_a_uds_server_replaces_a_file_nobody_answers_on(
    tmp_path: Path, leftover: str
) -> None:
    server = uds_server(tmp_path)
    server.path.parent.mkdir(parents=True)
    if leftover == "closed socket":  # the last run's
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as old:
            old.bind(str(server.path))
    elif leftover == "regular file":
        server.path.write_text("")
    else:
        server.path.symlink_to(tmp_path / "gone")
    server.listen()
    try:
        assert stat.S_ISSOCK(server.path.lstat().st_mode)
        assert answers(server.path, socket.SOCK_SEQPACKET)
    finally:
        server.close()
    assert not server.path.exists()


async def test_a_symlink_a_pod_planted_to_a_live_socket_does_not_block_its_device(
    tmp_path: Path,
) -> None:
    """The device directory is mounted read-write into the pod: a symlink the
    pod puts in place of afxdp.sock, to a socket a host server answers on, is
    nobody's server. It is replaced (the next pod gets the device), and the
    socket it pointed to is left alone (issue 19 review)."""
    server = uds_server(tmp_path)
    live = tmp_path / "host.sock"
    with other_server(live, socket.SOCK_SEQPACKET):
        server.path.parent.mkdir(parents=True)
        server.path.symlink_to(live)
        theirs = file_id(live)
        server.listen()
        try:
            assert stat.S_ISSOCK(server.path.lstat().st_mode)
            assert file_id(server.path) != theirs
        finally:
            server.close()
        assert file_id(live) == theirs and answers(live, socket.SOCK_SEQPACKET)


async def _nothing(stream: SocketStream) -> None:
    pass


async def test_the_control_and_cni_server_refuses_to_bind_over_a_socket_someone_answers_on(
    tmp_path: Path,
) -> None:
    path = tmp_path / "run" / "control.sock"
    with other_server(path, socket.SOCK_STREAM):
        theirs = file_id(path)
        with pytest.raises(OSError) as raised, anyio.fail_after(5):  # not serve on
            await serve_unix(path, _nothing)
        assert raised.value.errno == errno.EADDRINUSE
        assert file_id(path) == theirs
        assert answers(path, socket.SOCK_STREAM)


async def test_the_control_and_cni_server_leaves_a_socket_put_in_its_place_when_it_stops(
    tmp_path: Path,
) -> None:
    path = tmp_path / "run" / "control.sock"
    async with anyio.create_task_group() as tg:
        await tg.start(serve_unix, path, _nothing)
        path.unlink()
        other = other_server(path, socket.SOCK_STREAM)
        theirs = file_id(path)
        tg.cancel_scope.cancel()
    with other:
        assert file_id(path) == theirs
        assert answers(path, socket.SOCK_STREAM)
