"""The service stays up whatever its peers do: control clients that hang up,
answers that fail, fd exhaustion, a second afxdpd; allocations end when kubelet
says so; bad bytes in a config get an error with their path."""

from __future__ import annotations

import json
import logging
import os
import resource
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import time
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import grpc
import pytest
from anyio.abc import SocketAttribute, SocketListener, SocketStream

from afxdp import control
from afxdp.cli.common import Exit
from afxdp.cni import shim
from afxdp.config import load_config
from afxdp.errors import ConfigError
from afxdp.handouts import Handouts
from afxdp.uds.client import UdsClient
from afxdp.unixserver import ServerStats, serve_listener, serve_unix
from tests.kernel import Lab, ip
from tests.kubelet import FakeKubelet, PluginClient
from tests.node import NodeUnderTest, running

pytestmark = pytest.mark.anyio
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}


def _hang_up(path: Path, *, reset: bool) -> None:
    """Connect and leave without reading; with ``reset`` the kernel sends an RST-like close."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(path))
        if reset:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


async def test_status_clients_that_hang_up_never_stop_the_control_server(tmp_path: Path) -> None:
    big = {"pad": "x" * 400_000}  # larger than a socket buffer: the send meets the hang-up
    stats = ServerStats()
    async with anyio.create_task_group() as tg:
        await tg.start(lambda task_status: control.serve(tmp_path, lambda: big, stats=stats,
                                                         task_status=task_status))  # fmt: skip
        for i in range(20):
            await anyio.to_thread.run_sync(
                partial(_hang_up, tmp_path / "control.sock", reset=bool(i % 2))
            )
        doc = await anyio.to_thread.run_sync(control.read_status, tmp_path)
        assert doc == big
        tg.cancel_scope.cancel()
    assert stats.failed == 0
    assert stats.served >= 1
    assert not (tmp_path / "control.sock").exists()


def _ask(path: Path) -> bytes:
    """Connect to the server at ``path`` and read what it answers."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(path))
        return s.recv(100)


async def test_a_failing_answer_ends_only_its_own_connection(tmp_path: Path) -> None:
    calls = 0

    async def answer(stream: SocketStream) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("a bug in one handler")
        await stream.send(b"fine")

    stats = ServerStats()
    path = tmp_path / "s.sock"

    async with anyio.create_task_group() as tg:
        await tg.start(lambda task_status: serve_unix(path, answer, stats=stats,
                                                      task_status=task_status))  # fmt: skip
        assert await anyio.to_thread.run_sync(_ask, path) == b""  # the failed one is closed
        assert await anyio.to_thread.run_sync(_ask, path) == b"fine"
        tg.cancel_scope.cancel()
    assert (stats.failed, stats.served) == (1, 1)


async def test_a_stray_cancellation_in_one_connection_ends_only_that_connection(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Every server bounds a connection with move_on_after/fail_after; under load
    # such a deadline once escaped its scope as a CancelledError (see
    # afxdp/confine.py). One raised by hand is that FAKE stray cancellation.
    calls = 0

    async def answer(stream: SocketStream) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise anyio.get_cancelled_exc_class()("a stray deadline")
        await stream.send(b"fine")

    stats = ServerStats()
    path = tmp_path / "s.sock"

    served = False
    with caplog.at_level(logging.ERROR, logger="afxdp.unixserver"):
        async with anyio.create_task_group() as tg:
            await tg.start(lambda task_status: serve_unix(path, answer, stats=stats,
                                                          task_status=task_status))  # fmt: skip
            assert await anyio.to_thread.run_sync(_ask, path) == b""
            served = await anyio.to_thread.run_sync(_ask, path) == b"fine"
            tg.cancel_scope.cancel()
    assert served and (stats.failed, stats.served) == (1, 1)
    (record,) = [r for r in caplog.records if r.name == "afxdp.unixserver"]
    assert record.getMessage() == (
        "s.sock: a connection was cancelled by no scope around it; the server goes on"
    )


async def test_connections_over_the_limit_are_refused_and_counted(tmp_path: Path) -> None:
    release = anyio.Event()

    async def answer(stream: SocketStream) -> None:
        await release.wait()
        await stream.send(b"ok")

    stats = ServerStats()
    path = tmp_path / "s.sock"
    clients = []
    async with anyio.create_task_group() as tg:
        await tg.start(lambda task_status: serve_unix(path, answer, limit=3, stats=stats,
                                                      task_status=task_status))  # fmt: skip
        for _ in range(5):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(path))
            clients.append(s)
        with anyio.fail_after(5):
            while stats.refused < 2:
                await anyio.sleep(0.01)
        assert stats.active == 3
        release.set()
        replies = [await anyio.to_thread.run_sync(c.recv, 10) for c in clients]
        tg.cancel_scope.cancel()
    for c in clients:
        c.close()
    assert sorted(replies) == [b"", b"", b"ok", b"ok", b"ok"]


# A server (``serve_listener``) in a child process whose fd limit is a few fds
# above what it holds once serving: accept() runs into EMFILE. Each line on its
# stdin asks for its counters. ``unix-errno-hidden``: its listener is a FAKE
# that reports accept errors without their errno, as anyio's UNIX listener
# nearly does (the OSError only as BrokenResourceError's __cause__): the server
# must tell EMFILE apart whatever its listener reports.
_EMFILE_SERVER = textwrap.dedent("""
    import json, os, resource, sys
    from functools import partial
    import anyio
    from anyio.abc import SocketAttribute
    from afxdp.unixserver import ServerStats, serve_listener

    async def main(kind, path):
        stats = ServerStats()
        async def answer(stream):  # holds its fd until the client speaks or leaves
            try:
                await stream.receive()
            except anyio.EndOfStream:
                return
            await stream.send(b"%d" % stats.accept_errors)
        if kind == "tcp":
            [listener] = (await anyio.create_tcp_listener(local_host="127.0.0.1")).listeners
            address = listener.extra(SocketAttribute.local_address)[1]
        else:
            listener = await anyio.create_unix_listener(path)
            address = path
        if kind == "unix-errno-hidden":
            real = listener.accept
            async def hidden():
                try:
                    return await real()
                except anyio.BrokenResourceError:
                    raise anyio.BrokenResourceError from None
            listener.accept = hidden
        async with listener, anyio.create_task_group() as tg:
            tg.start_soon(partial(serve_listener, listener, answer, name="t", limit=10_000,
                                  stats=stats))
            line = anyio.to_thread.run_sync(sys.stdin.readline)  # its worker thread made now
            print(json.dumps(address), flush=True)
            await line
            hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
            resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 6, hard))
            print("ready", flush=True)
            while await anyio.to_thread.run_sync(sys.stdin.readline):
                print(json.dumps({"accept_errors": stats.accept_errors, "active": stats.active}),
                      flush=True)
            tg.cancel_scope.cancel()

    anyio.run(main, *sys.argv[1:], backend_options={"use_uvloop": True})
""")


@pytest.mark.parametrize("kind", ["unix", "tcp", "unix-errno-hidden"])
def test_fd_exhaustion_backs_off_and_serves_again_when_fds_return(
    tmp_path: Path, kind: str
) -> None:
    proc = subprocess.Popen([sys.executable, "-c", _EMFILE_SERVER, kind, str(tmp_path / "s.sock")],
                            env=ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None
    address = json.loads(proc.stdout.readline())
    family = socket.AF_INET if kind == "tcp" else socket.AF_UNIX
    where = ("127.0.0.1", address) if kind == "tcp" else address

    def stats() -> dict[str, int]:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write("\n")
        proc.stdin.flush()
        line = proc.stdout.readline()
        assert line, "the server died"
        stats: dict[str, int] = json.loads(line)
        return stats

    held: list[socket.socket] = []
    try:
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "ready"
        # More connections than the server has fds: it holds each one it
        # accepts until the client leaves, so it runs out; the rest wait in
        # the kernel's backlog.
        for _ in range(20):
            s = socket.socket(family, socket.SOCK_STREAM)
            held.append(s)
            s.connect(where)
        deadline = time.monotonic() + 10
        while (now := stats())["accept_errors"] == 0:
            assert time.monotonic() < deadline, f"accept never ran out of fds: {now}"
            time.sleep(0.01)
        assert 0 < now["active"] < len(held)
        for s in held:
            s.close()
        held.clear()
        with socket.socket(family, socket.SOCK_STREAM) as s:  # served once fds are back
            s.settimeout(10)
            s.connect(where)
            s.send(b"?")
            assert int(s.recv(100)) > 0
        assert proc.poll() is None
    finally:
        for s in held:
            s.close()
        proc.kill()
        proc.wait()


async def test_a_tcp_peer_that_reset_before_it_was_served_is_closed_quietly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # anyio wraps connected sockets only; the server checks that itself, so a
    # peer gone from the backlog is no failed connection (and no log).
    served = 0

    async def answer(stream: SocketStream) -> None:
        nonlocal served
        served += 1

    stats = ServerStats()
    multi = await anyio.create_tcp_listener(local_host="127.0.0.1")
    [listener] = multi.listeners
    assert isinstance(listener, SocketListener)
    port = listener.extra(SocketAttribute.local_address)[1]
    reset = socket.create_connection(("127.0.0.1", port))
    reset.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    reset.close()  # RST while it waits in the backlog: accept() still hands it over
    honest = socket.create_connection(("127.0.0.1", port))
    with honest, caplog.at_level(logging.DEBUG, logger="afxdp.unixserver"):
        async with multi, anyio.create_task_group() as tg:
            tg.start_soon(partial(serve_listener, listener, answer, name="t", stats=stats))
            with anyio.fail_after(10):
                while stats.served < 2:
                    await anyio.wait_readable(honest)  # closed by the server once served
                    honest.recv(1)
            tg.cancel_scope.cancel()
    # Both accepted: the reset one ended at once, as a peer that left does.
    assert (served, stats.served, stats.failed) == (1, 2, 0)
    assert not caplog.records


def _afxdpd(
    tmp_path: Path,
    kubelet: FakeKubelet,
    cfg: Path,
    *extra: str,
    uds_dir: Path | None = None,
    netns: str | None = None,
    **popen: Any,
) -> subprocess.Popen[str]:
    """afxdpd with its dirs under ``tmp_path`` (but ``uds_dir``), in ``netns``."""
    args = ["--config", str(cfg), "--node-name", "node1", "--kubelet-dir", str(kubelet.dir),
            "--uds-dir", str(uds_dir or tmp_path / "uds"), "--pin-dir", str(tmp_path / "pins"),
            "--run-dir", str(tmp_path / "run"), "--state-dir", str(tmp_path / "state"), "--log-dir", str(tmp_path / "log"),
            "--cdi-dir", str(tmp_path / "cdi"), *extra]  # fmt: skip
    # nsenter execs (no fork): the pid is afxdpd's.
    ns = ["nsenter", f"--net=/run/netns/{netns}"] if netns else []
    return subprocess.Popen([*ns, sys.executable, "-m", "afxdp.cli.afxdpd", *args], env=ENV,
                            text=True, **popen)  # fmt: skip


def _wait_for(path: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


@pytest.mark.privileged
def test_afxdpd_survives_interrupted_status_and_refuses_a_second_instance(
    tmp_path: Path, lab: Lab
) -> None:
    dev, peer = lab.veth(lab.name("sh"), lab.name("si"))
    ip("link", "set", dev, "up")
    ip("link", "set", peer, "up")
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"pools": [{"name": "p", "mode": "primary",
                                          "devices": [{"name": dev}]}]}))  # fmt: skip
    kubelet = FakeKubelet(tmp_path / "kubelet")
    kubelet.start_registration()
    kubelet.start_pod_resources()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = min(512, hard)

    def low_fd_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))

    first = _afxdpd(tmp_path, kubelet, cfg, stderr=subprocess.DEVNULL, preexec_fn=low_fd_limit)
    run_dir = tmp_path / "run"
    try:
        _wait_for(run_dir / "cni.sock")
        for i in range(10):
            _hang_up(run_dir / "control.sock", reset=bool(i % 2))
        deadline = time.monotonic() + 20  # ready a moment after cni.sock appears
        while not (status := control.read_status(run_dir))["ready"]:
            assert time.monotonic() < deadline, status
            time.sleep(0.05)
        assert status["ready"] is True
        assert first.poll() is None
        assert status["fd_limit"] == {"soft": hard, "hard": hard}
        assert status["fd_limit"]["soft"] > low

        second = _afxdpd(tmp_path, kubelet, cfg, stderr=subprocess.PIPE)
        _out, err = second.communicate(timeout=30)
        assert second.returncode == 6
        assert f"another afxdpd (pid {first.pid}) already serves {run_dir}" in err
        # The second one touched nothing of the first's.
        assert (run_dir / "cni.sock").exists()
        assert control.read_status(run_dir)["ready"] is True
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=20) == 0
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
        kubelet.stop()


def _wait_ready(proc: subprocess.Popen[str], run_dir: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, f"afxdpd exited {proc.returncode}"
        try:
            if control.read_status(run_dir)["ready"]:
                return
        except OSError:
            pass  # not listening yet
        assert time.monotonic() < deadline, "afxdpd never became ready"
        time.sleep(0.05)


def _inodes(*paths: Path) -> dict[Path, tuple[int, int]]:
    return {p: (p.lstat().st_dev, p.lstat().st_ino) for p in paths}


@pytest.mark.privileged
def test_a_second_afxdpd_is_refused_even_when_the_lock_file_was_deleted(
    tmp_path: Path, lab: Lab
) -> None:
    dev, peer = lab.veth(lab.name("lk"), lab.name("ll"))
    ip("link", "set", dev, "up")
    ip("link", "set", peer, "up")
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"pools": [{"name": "p", "mode": "primary",
                                          "devices": [{"name": dev}]}]}))  # fmt: skip
    kubelet = FakeKubelet(tmp_path / "kubelet")
    kubelet.start_registration()
    kubelet.start_pod_resources()
    run_dir = tmp_path / "run"
    first = _afxdpd(tmp_path, kubelet, cfg, "--metrics-address", "", stderr=subprocess.DEVNULL)
    second: subprocess.Popen[str] | None = None
    try:
        _wait_ready(first, run_dir)
        sockets = _inodes(run_dir / "control.sock", run_dir / "cni.sock",
                          kubelet.plugin_dir / "afxdp-p.sock")  # fmt: skip
        (run_dir / "afxdpd.lock").unlink()  # a tidy-up script, an operator's rm

        second = _afxdpd(tmp_path, kubelet, cfg, "--metrics-address", "", stderr=subprocess.PIPE)
        _out, err = second.communicate(timeout=30)
        assert second.returncode == Exit.RUNNING, err
        assert f"another afxdpd (pid {first.pid}) already serves {run_dir}" in err
        assert _inodes(*sockets) == sockets, "the first one's sockets are all still its own"
        assert control.read_status(run_dir)["ready"] is True
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=20) == 0
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        kubelet.stop()


@pytest.mark.privileged
def test_a_second_afxdpd_sharing_the_uds_dir_leaves_the_first_ones_device_socket(
    tmp_path: Path, lab: Lab
) -> None:
    # Two afxdpd, each with its own run, state and kubelet dirs and its own
    # network namespace, but one UDS dir: each has a device of the same name,
    # so both want <uds-dir>/<dev>/afxdp.sock.
    dev, peer = lab.name("ud"), lab.name("ue")
    ns = lab.netns()
    for netns in (None, ns):
        lab.veth(dev, peer, netns=netns)
        ip("link", "set", dev, "up", netns=netns)
        ip("link", "set", peer, "up", netns=netns)
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"pools": [{"name": "p", "mode": "primary",
                                          "devices": [{"name": dev}]}]}))  # fmt: skip
    uds = tmp_path / "uds"
    procs: list[subprocess.Popen[str]] = []
    kubelets: list[FakeKubelet] = []
    try:
        for name, netns in (("a", None), ("b", ns)):
            kubelets.append(FakeKubelet(tmp_path / name / "kubelet"))
            kubelets[-1].start_registration()
            kubelets[-1].start_pod_resources()
            procs.append(_afxdpd(tmp_path / name, kubelets[-1], cfg, "--metrics-address", "",
                                 uds_dir=uds, netns=netns, stderr=subprocess.DEVNULL))  # fmt: skip
        first, second = procs
        for proc, name in zip(procs, "ab", strict=True):
            _wait_ready(proc, tmp_path / name / "run")
        plugins = [PluginClient(k.plugin_dir / "afxdp-p.sock") for k in kubelets]
        plugins[0].allocate([dev])
        sock = uds / dev / "afxdp.sock"
        theirs = (sock.lstat().st_dev, sock.lstat().st_ino)

        # The second is asked for its device of that name: the socket path is
        # taken by a server that answers, so its Allocate fails, saying why.
        with pytest.raises(grpc.RpcError) as refused:
            plugins[1].allocate([dev])
        assert "another server answers on this socket" in str(refused.value.details())
        assert str(sock) in str(refused.value.details())
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=20) == 0
        assert (sock.lstat().st_dev, sock.lstat().st_ino) == theirs
        kubelets[0].hold("pod-a", "afxdp/p", dev)
        client = UdsClient(sock)
        try:  # the first one still answers its pod
            client.connect("pod-a")
            assert client.version() == "0.1"
        finally:
            client.close()
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=20) == 0
        for plugin in plugins:
            plugin.close()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for kubelet in kubelets:
            kubelet.stop()


@pytest.mark.privileged
def test_a_second_afxdpd_sharing_the_kubelet_dir_leaves_the_first_ones_plugin_socket(
    tmp_path: Path, lab: Lab
) -> None:
    # Another run dir (so no lock stops it), the same kubelet dir and pool name:
    # both want <kubelet-dir>/device-plugins/afxdp-p.sock.
    dev, peer = lab.veth(lab.name("kd"), lab.name("ke"))
    ip("link", "set", dev, "up")
    ip("link", "set", peer, "up")
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"pools": [{"name": "p", "mode": "primary",
                                          "devices": [{"name": dev}]}]}))  # fmt: skip
    kubelet = FakeKubelet(tmp_path / "kubelet")
    kubelet.start_registration()
    kubelet.start_pod_resources()
    first = _afxdpd(tmp_path / "a", kubelet, cfg, "--metrics-address", "",
                    stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        _wait_ready(first, tmp_path / "a" / "run")
        plugin = kubelet.plugin_dir / "afxdp-p.sock"
        theirs = (plugin.lstat().st_dev, plugin.lstat().st_ino)
        second = _afxdpd(tmp_path / "b", kubelet, cfg, "--metrics-address", "",
                         stderr=subprocess.PIPE)  # fmt: skip
        try:
            _out, err = second.communicate(timeout=30)
        finally:
            if second.poll() is None:
                second.kill()
                second.wait()
        assert second.returncode == Exit.POOL, err
        assert f"another server answers on this socket: '{plugin}'" in err
        assert (plugin.lstat().st_dev, plugin.lstat().st_ino) == theirs
        assert len(kubelet.registrations) == 1, "only the first one registered"
        client = PluginClient(plugin)
        try:
            assert client.allocate([dev]).container_responses  # the first one still serves
        finally:
            client.close()
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=20) == 0
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
        kubelet.stop()


@pytest.fixture
def node(tmp_path: Path, lab: Lab) -> NodeUnderTest:
    dev, peer = lab.veth(lab.name("rc"), lab.name("rd"))
    ip("link", "set", dev, "up")
    ip("link", "set", peer, "up")
    return NodeUnderTest(tmp_path, lab, [dev])


@pytest.mark.privileged
async def test_an_allocation_ends_when_kubelet_no_longer_lists_its_pod(
    node: NodeUnderTest, monkeypatch: pytest.MonkeyPatch
) -> None:
    dev = node.devices[0]
    async with running(node):
        assert node.service is not None and node.service.devices is not None
        await node.allocate(dev)
        sock = node.paths.uds_dir / dev / "afxdp.sock"
        assert sock.exists()
        node.kubelet.hold("pod-a", "afxdp/pool1", dev)
        assert await node.service.devices.reconcile(grace=0.0) == []
        assert (await node.states())[dev] == "allocated"
        node.kubelet.pods.clear()
        assert await node.service.devices.reconcile(grace=0.0) == [dev]
        assert (await node.states())[dev] == "free"
        assert not sock.exists()


@pytest.mark.privileged
async def test_a_young_allocation_is_not_ended_before_kubelet_lists_it(node: NodeUnderTest) -> None:
    dev = node.devices[0]
    async with running(node):
        assert node.service is not None and node.service.devices is not None
        await node.allocate(dev)
        assert await node.service.devices.reconcile() == []  # kubelet lists nothing yet
        assert (await node.states())[dev] == "allocated"


@pytest.mark.privileged
async def test_no_reconcile_when_kubelet_cannot_be_asked(
    node: NodeUnderTest, monkeypatch: pytest.MonkeyPatch
) -> None:
    dev = node.devices[0]
    async with running(node):
        assert node.service is not None and node.service.devices is not None
        await node.allocate(dev)
        (node.kubelet.dir / "pod-resources" / "kubelet.sock").unlink()
        assert await node.service.devices.reconcile(grace=0.0) == []
        assert (await node.states())[dev] == "allocated"


@pytest.mark.privileged
async def test_an_allocate_that_fails_unexpectedly_leaves_nothing_allocated(
    node: NodeUnderTest, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(self: Handouts, pool: Any, ids: Any) -> Any:
        raise RuntimeError("a bug")

    dev = node.devices[0]
    async with running(node):
        monkeypatch.setattr(Handouts, "start", broken)
        with pytest.raises(grpc.RpcError) as err:
            await node.allocate(dev)
        assert err.value.code() == grpc.StatusCode.INTERNAL
        assert (await node.states())[dev] == "free"
        monkeypatch.undo()
        await node.allocate(dev)
        assert (await node.states())[dev] == "allocated"


def test_invalid_utf8_in_a_config_names_the_json_path() -> None:
    doc = b'{"pools": [{"name": "caf\xe9", "mode": "primary", "drivers": [{"name": "x\xff"}]}]}'
    with pytest.raises(ConfigError) as err:
        load_config(doc)
    paths = {i.path: i.message for i in err.value.issues}
    assert paths.keys() == {"pools[0].name", "pools[0].drivers[0].name"}
    assert "not valid UTF-8 (byte 0xe9" in paths["pools[0].name"]
    assert "not valid UTF-8 (byte 0xff" in paths["pools[0].drivers[0].name"]


def test_afxdpctl_config_validate_reports_invalid_utf8_without_a_traceback(tmp_path: Path) -> None:
    cfg = tmp_path / "c.json"
    cfg.write_bytes(b'{"pools": [{"name": "caf\xe9", "mode": "primary"}]}')
    done = subprocess.run([sys.executable, "-m", "afxdp.cli.afxdpctl", "config", "validate",
                           str(cfg)], capture_output=True, text=True, env=ENV, check=False)  # fmt: skip
    assert done.returncode == 1
    assert "pools[0].name: is not valid UTF-8" in done.stderr + done.stdout
    assert "Traceback" not in done.stderr


def _with_node(hostname: str) -> bytes:
    return json.dumps({"pools": [{"name": "p", "mode": "primary", "nodes": [
        {"hostname": hostname, "drivers": [{"name": "ice"}]}]}]}).encode()  # fmt: skip


@pytest.mark.parametrize("hostname", ["ip-10-0-0-1.eu-west-1.compute.internal", "node-1", "a.b"])
def test_node_hostnames_accept_dns_subdomains(hostname: str) -> None:
    cfg = load_config(_with_node(hostname)).config
    assert cfg.pools[0].nodes[0].hostname == hostname


@pytest.mark.parametrize(
    ("hostname", "rule"),
    [
        ("a" * 64 + ".example", "labels of at most 63 characters"),
        ("node..one", "labels of at most 63 characters"),
        ("node_1", "letters, digits, hyphens and dots"),
        (".".join(["abcdefgh"] * 30), "must be between 1 and 253 characters"),
    ],
)
def test_node_hostnames_that_are_not_dns_subdomains_are_refused(hostname: str, rule: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(_with_node(hostname))
    [issue] = err.value.issues
    assert issue.path == "pools[0].nodes[0].hostname"
    assert rule in issue.message


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _http_get(port: int, path: str) -> tuple[int, str]:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()


@pytest.mark.privileged
def test_afxdpd_serves_metrics_and_readiness(tmp_path: Path, lab: Lab) -> None:
    dev, peer = lab.veth(lab.name("mh"), lab.name("mi"))
    ip("link", "set", dev, "up")
    ip("link", "set", peer, "up")
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"pools": [{"name": "p", "mode": "primary",
                                          "devices": [{"name": dev}]}]}))  # fmt: skip
    kubelet = FakeKubelet(tmp_path / "kubelet")
    kubelet.start_pod_resources()  # registration comes later: not ready until then
    port = _free_port()
    proc: subprocess.Popen[str] | None = None
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "afxdp.cli.afxdpd", "--config", str(cfg), "--node-name", "n1",
             "--kubelet-dir", str(kubelet.dir), "--uds-dir", str(tmp_path / "uds"),
             "--pin-dir", str(tmp_path / "pins"), "--run-dir", str(tmp_path / "run"),
             "--state-dir", str(tmp_path / "state"), "--cdi-dir", str(tmp_path / "cdi"),
             "--metrics-address", f"127.0.0.1:{port}"],
            env=ENV, text=True, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while True:  # "starting" first, then "not registered" until kubelet is there
            try:
                status, body = _http_get(port, "/readyz")
                if "starting" not in body:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "metrics never said why it is not ready"
            time.sleep(0.05)
        assert status == 503 and "not registered with kubelet: afxdp/p" in body
        assert 'afxdp_pool_registered{pool="p"} 0.0' in _http_get(port, "/metrics")[1]
        kubelet.start_registration()
        while _http_get(port, "/readyz")[0] != 200:
            assert time.monotonic() < deadline, "never ready after registration"
            time.sleep(0.05)
        status, body = _http_get(port, "/metrics")
        assert status == 200
        assert 'afxdp_devices{health="Healthy",pool="p",state="free"} 1.0' in body
        assert 'afxdp_pool_registered{pool="p"} 1.0' in body
        # Allocate, a handshake connection and a CNI request are counted.
        client = PluginClient(kubelet.plugin_dir / "afxdp-p.sock")
        client.allocate([dev])
        client.close()
        with UdsClient(tmp_path / "uds" / dev / "afxdp.sock") as uds:
            uds.fin()
        bin_dir = tmp_path / "bin"
        done = subprocess.run(
            [str(shim.install(bin_dir, [tmp_path / "run"]))],
            input=json.dumps({"cniVersion": "1.0.0", "name": "n", "type": "afxdp",
                              "daemonSocket": str(tmp_path / "run" / "cni.sock")}).encode(),
            env={"CNI_COMMAND": "STATUS", "CNI_PATH": "/usr/lib/cni"}, capture_output=True,
            check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout
        body = _http_get(port, "/metrics")[1]
        assert 'afxdp_allocate_seconds_count{pool="p",result="ok"} 1.0' in body
        assert 'afxdp_uds_connections_total{result="accepted"} 1.0' in body
        assert 'afxdp_cni_request_seconds_count{result="ok",verb="STATUS"} 1.0' in body
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0

    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        kubelet.stop()


_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# An empty SETTINGS frame, then a HEADERS frame cut short: the start of a gRPC call.
_H2_START = _H2_PREFACE + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0]) + bytes([0, 0, 40, 1, 4, 0, 0, 0, 1])


@pytest.mark.privileged
async def test_a_grpc_peer_hanging_up_at_every_byte_never_harms_the_plugin_server(
    node: NodeUnderTest,
) -> None:
    dev = node.devices[0]
    async with running(node):
        sock = node.kubelet.plugin_dir / "afxdp-pool1.sock"

        def hang_ups() -> None:
            for cut in range(len(_H2_START) + 1):
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.connect(str(sock))
                    s.sendall(_H2_START[:cut])
                    if cut % 2:
                        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            # Junk instead of HTTP/2, then hang up.
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(str(sock))
                s.sendall(b"\x00\xff" * 100)

        await anyio.to_thread.run_sync(hang_ups)
        resp = await node.allocate(dev)  # kubelet's next call is served as ever
        assert dict(resp.container_responses[0].envs) == {"AFXDP_DEVICES_POOL1": dev}
        assert (await node.states())[dev] == "allocated"
