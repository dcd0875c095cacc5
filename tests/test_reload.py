"""Config reload under a running pod: a bad config is refused and changes
nothing; a good one adds, changes and removes pools without disturbing an
allocated device. In-process for the rules, and afxdpd as a process for
SIGHUP and the file watch (a ConfigMap update swaps a symlink)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from afxdp import control, service, workers
from afxdp.config import load_config
from afxdp.workers import Work
from tests.kernel import HungFile, Lab, ip
from tests.kubelet import FakeKubelet
from tests.node import NodeUnderTest, running

pytestmark = pytest.mark.privileged
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}


def _sample(svc: service.Service, name: str, **labels: str) -> float | None:
    """A sample as /metrics serves it, through the registry's public reading
    (``get_sample_value``: the exposition's names, ``_total`` and all)."""
    return svc.metrics.registry.get_sample_value(name, labels)


def _pool(name: str, devices: list[str], **extra: Any) -> dict[str, Any]:
    return {"name": name, "mode": "primary", "devices": [{"name": d} for d in devices], **extra}


@pytest.fixture
def devices(lab: Lab) -> list[str]:
    out = []
    for i in range(3):
        a, b = lab.veth(lab.name(f"rl{i}"), lab.name(f"rm{i}"))
        ip("link", "set", a, "up")
        ip("link", "set", b, "up")
        out.append(a)
    return out


@pytest.mark.anyio
async def test_a_bad_config_is_refused_and_a_good_one_applied_under_a_running_pod(
    tmp_path: Path, lab: Lab, devices: list[str]
) -> None:
    d0, d1, d2 = devices
    node = NodeUnderTest(tmp_path, lab, [d0], {"pools": [_pool("pool1", [d0])]})
    cfg = tmp_path / "config.json"
    async with running(node):
        svc = node.service
        assert svc is not None and svc.devices is not None
        svc.config_path = cfg
        await node.allocate(d0)
        node.kubelet.hold("pod-a", "afxdp/pool1", d0)
        sock = node.paths.uds_dir / d0 / "afxdp.sock"
        inode = sock.stat().st_ino

        cfg.write_text('{"pools": [{"name": "bad-name!", "mode": "primary"}]}')
        assert await svc.reload() is False
        assert list(svc.devices.pools) == ["pool1"]
        assert _sample(svc, "afxdp_config_invalid") == 1

        cfg.write_text(json.dumps({"pools": [_pool("pool1", [d0, d1], udsTimeout=60),
                                             _pool("pool2", [d2])]}))  # fmt: skip
        assert await svc.reload() is True
        regs = await node.call(node.kubelet.wait_registrations, 2, 10.0)
        assert "afxdp/pool2" in {r.resource_name for r in regs}
        states = await node.states()
        assert states == {d0: "allocated", d1: "free"}
        assert sock.stat().st_ino == inode  # the pod's socket was not touched
        assert svc.devices.pools["pool1"].config.uds_timeout == 60
        assert _sample(svc, "afxdp_config_invalid") == 0
        # The new pool works.
        resp = await node.call(node.plugin("pool2").allocate, [d2])
        assert dict(resp.container_responses[0].envs) == {"AFXDP_DEVICES_POOL2": d2}


@pytest.mark.anyio
async def test_without_pinned_maps_a_reload_adding_a_pinned_map_pool_is_refused(
    tmp_path: Path, lab: Lab, devices: list[str]
) -> None:
    d0, d1, _ = devices
    node = NodeUnderTest(tmp_path, lab, [d0], {"pools": [_pool("pool1", [d0])]})
    cfg = tmp_path / "config.json"
    async with running(node):
        svc = node.service
        assert svc is not None and svc.devices is not None
        svc.config_path = cfg
        svc.pinned_maps = False  # afxdpd --no-pinned-maps
        pinned = _pool("pinned", [d1], udsServerDisable=True, bpfMapPinningEnable=True)
        cfg.write_text(json.dumps({"pools": [_pool("pool1", [d0]), pinned]}))
        assert await svc.reload() is False
        assert list(svc.devices.pools) == ["pool1"]
        assert svc.metrics.config_invalid._value.get() == 1
        svc.pinned_maps = True  # the same file, where pinned maps can reach kubelet
        assert await svc.reload() is True
        assert list(svc.devices.pools) == ["pool1", "pinned"]


@pytest.mark.anyio
async def test_a_removed_pool_stops_advertising_and_drains_its_allocations(
    tmp_path: Path, lab: Lab, devices: list[str]
) -> None:
    d0, d1, _ = devices
    node = NodeUnderTest(tmp_path, lab, [d0, d1],
                         {"pools": [_pool("pool1", [d0]), _pool("pool2", [d1])]})  # fmt: skip
    cfg = tmp_path / "config.json"
    async with running(node):
        svc = node.service
        assert svc is not None and svc.devices is not None
        svc.config_path = cfg
        await node.allocate(d0)
        node.kubelet.hold("pod-a", "afxdp/pool1", d0)
        cfg.write_text(json.dumps({"pools": [_pool("pool2", [d1])]}))
        assert await svc.reload() is True
        assert not (node.kubelet.plugin_dir / "afxdp-pool1.sock").exists()  # unregistered
        assert "pool1" in svc.devices.draining
        assert (node.paths.uds_dir / d0 / "afxdp.sock").exists()  # the pod keeps its device
        node.kubelet.pods.clear()  # the pod is gone: the allocation ends, the pool with it
        assert await svc.devices.reconcile(grace=0.0) == [d0]
        assert list(svc.devices.pools) == ["pool2"]
        assert not (node.paths.uds_dir / d0).exists()


@pytest.mark.anyio
async def test_a_pool_removed_then_added_back_while_it_drains_is_served_again(
    tmp_path: Path, lab: Lab, devices: list[str]
) -> None:
    """Issue 19 review (attacks 2, 3, 13): a pool the config drops and brings
    back before its last allocation ended is served again (registered, its
    Allocate answered), and dropped once more it drains again; reloads that come
    at once (SIGHUP and the file watch) apply one after the other."""
    d0, d1, _ = devices
    node = NodeUnderTest(tmp_path, lab, [d0, d1], {"pools": [_pool("pool1", [d0, d1])]})
    cfg = tmp_path / "config.json"
    both = {"pools": [_pool("pool1", [d0, d1])]}
    none: dict[str, Any] = {"pools": []}
    async with running(node):
        svc = node.service
        assert svc is not None and svc.devices is not None
        svc.config_path = cfg
        await node.allocate(d0)
        node.kubelet.hold("pod-a", "afxdp/pool1", d0)
        plugin_sock = node.kubelet.plugin_dir / "afxdp-pool1.sock"
        for _ in range(2):
            cfg.write_text(json.dumps(none))
            assert await svc.reload() is True
            assert "pool1" in svc.devices.draining and not plugin_sock.exists()
            cfg.write_text(json.dumps(both))
            assert await svc.reload() is True
            assert "pool1" not in svc.devices.draining and plugin_sock.exists()
            assert svc.registrations["pool1"] is not None
            resp = await node.call(node.plugin("pool1").allocate, [d1])  # served again
            assert dict(resp.container_responses[0].envs) == {"AFXDP_DEVICES_POOL1": d1}
            node.kubelet.hold("pod-b", "afxdp/pool1", d1)
            assert await node.states() == {d0: "allocated", d1: "allocated"}
            node.kubelet.pods[:] = [p for p in node.kubelet.pods if p.name != "pod-b"]
            assert await svc.devices.reconcile(grace=0.0) == [d1]
        # Two at once, each flipping the pool: applied one after the other, afxdpd up.
        results = []

        async def reload() -> None:
            results.append(await svc.reload())

        for doc in (none, both, none, both):
            cfg.write_text(json.dumps(doc))
            async with anyio.create_task_group() as tg:
                tg.start_soon(reload)
                tg.start_soon(reload)
        assert results == [True] * 8
        assert plugin_sock.exists() and "pool1" not in svc.devices.draining
        assert await node.states() == {d0: "allocated", d1: "free"}


@pytest.mark.anyio
async def test_a_reload_keeps_in_its_pool_a_device_that_is_in_its_pods_netns(
    tmp_path: Path, lab: Lab, devices: list[str]
) -> None:
    """Issue 19 review (attack 9): a reload reads the links again, and a
    device in its pod's netns (not among them) is still the config's: when its
    pod ends it is free in its pool, not dropped from it."""
    d0, d1, _ = devices
    node = NodeUnderTest(tmp_path, lab, [d0, d1], {"pools": [_pool("pool1", [d0, d1])]})
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(node.config))
    pod = lab.netns("rlpod")
    async with running(node):
        svc = node.service
        assert svc is not None and svc.devices is not None
        svc.config_path = cfg
        await node.allocate(d0)
        node.kubelet.hold("pod-a", "afxdp/pool1", d0)
        ip("link", "set", d0, "netns", pod)  # as the CNI ADD moves it
        await svc.devices.resync()  # links read again (as after lost events, or a restart)
        assert await svc.reload() is True
        assert not svc.devices.leaving.get("pool1")
        ip("link", "set", d0, "netns", str(os.getpid()), netns=pod)  # its DEL brings it home
        ip("link", "set", d0, "up")
        node.kubelet.pods.clear()
        assert await svc.devices.reconcile(grace=0.0) == [d0]
        assert sorted(svc.devices.pools["pool1"].devices) == sorted([d0, d1])


def test_sighup_and_a_swapped_configmap_symlink_reload_afxdpd(
    tmp_path: Path, devices: list[str]
) -> None:
    d0, d1, _ = devices
    # A ConfigMap volume: config.json -> ..data/config.json, ..data -> a timestamped dir.
    first, second = tmp_path / "..2026_1", tmp_path / "..2026_2"
    first.mkdir()
    second.mkdir()
    (first / "config.json").write_text(json.dumps({"pools": [_pool("pool1", [d0])]}))
    (tmp_path / "..data").symlink_to(first.name)
    cfg = tmp_path / "config.json"
    cfg.symlink_to("..data/config.json")
    kubelet = FakeKubelet(tmp_path / "kubelet")
    kubelet.start_registration()
    kubelet.start_pod_resources()
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "afxdp.cli.afxdpd", "--config", str(cfg), "--node-name", "n1",
         "--kubelet-dir", str(kubelet.dir), "--uds-dir", str(tmp_path / "uds"),
         "--pin-dir", str(tmp_path / "pins"), "--run-dir", str(run_dir),
         "--state-dir", str(tmp_path / "state"), "--cdi-dir", str(tmp_path / "cdi"),
         "--metrics-address", ""],
        env=ENV, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip

    def pools() -> list[str]:
        return [p["resource"] for p in control.read_status(run_dir)["pools"]]

    def wait(cond: Any, what: str) -> None:
        deadline = time.monotonic() + 20
        while True:
            try:
                if cond():
                    return
            except OSError:
                pass
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, what
            time.sleep(0.05)

    try:
        wait(lambda: pools() == ["afxdp/pool1"], "afxdpd never served pool1")
        # The kubelet way: the new file goes in a new dir, then ..data is swapped.
        (second / "config.json").write_text(
            json.dumps({"pools": [_pool("pool1", [d0]), _pool("pool2", [d1])]})
        )
        tmp_link = tmp_path / "..data_tmp"
        tmp_link.symlink_to(second.name)
        tmp_link.replace(tmp_path / "..data")
        wait(lambda: pools() == ["afxdp/pool1", "afxdp/pool2"], "the file change was not seen")
        # SIGHUP with an invalid file: refused, running config kept, process alive.
        (second / "config.json").write_text("{not json")
        proc.send_signal(signal.SIGHUP)
        time.sleep(0.3)  # nothing to wait for: the point is that nothing changes
        (second / "config.json").write_text(json.dumps({"pools": [_pool("pool2", [d1])]}))
        proc.send_signal(signal.SIGHUP)
        wait(lambda: pools() == ["afxdp/pool2"], "SIGHUP did not reload")
        assert load_config((second / "config.json").read_bytes()).config.pools[0].name == "pool2"
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=20)
        assert proc.returncode == 0
        assert "reload refused, the running config stays: <document>: not valid JSON" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        kubelet.stop()


def _release_fifo_readers(fifo: Path) -> None:
    """Readers blocked opening ``fifo`` (afxdpd before it refused FIFOs) get EOF:
    a test that fails must not leave threads stuck."""
    try:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:  # ENXIO: no reader waits
        return
    os.close(fd)


@pytest.mark.anyio
async def test_a_fifo_in_place_of_the_config_fails_its_reloads_at_once_and_never_holds_allocate(
    tmp_path: Path, lab: Lab, devices: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    d0, d1, _ = devices
    node = NodeUnderTest(tmp_path, lab, [d0, d1], {"pools": [_pool("pool1", [d0, d1])]})
    fifo = tmp_path / "config.json"
    os.mkfifo(fifo)  # nobody will ever write it
    async with running(node):
        svc = node.service
        assert svc is not None and svc.devices is not None
        svc.config_path = fifo
        results: list[bool] = []

        async def reload() -> None:
            results.append(await svc.reload())

        async with anyio.create_task_group() as tg:
            for _ in range(2):  # SIGHUP's and the file watch's, at once
                tg.start_soon(reload)
            try:  # kubelet's Allocate (its deadline is 5 s) is answered all the same
                resp = await node.allocate(d0)
            finally:
                _release_fifo_readers(fifo)
        assert dict(resp.container_responses[0].envs) == {"AFXDP_DEVICES_POOL1": d0}
        assert results == [False, False]
        refused = f"reload refused, the running config stays: {fifo}: is a FIFO, not a regular file"
        assert [r.getMessage() for r in caplog.records].count(refused + "; refused") == 2
        assert list(svc.devices.pools) == ["pool1"]  # the running config stays
        assert _sample(svc, "afxdp_config_invalid") == 1
        assert _sample(svc, "afxdp_config_reloads_total", result="invalid") == 2


@pytest.mark.anyio
async def test_a_config_stat_that_hangs_costs_the_watch_one_thread_and_no_disk_worker(
    tmp_path: Path,
    lab: Lab,
    devices: list[str],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The file watch's stat on a hung filesystem: abandoned at the deadline (a
    thread of its own, not one of the durable records' two), not repeated while
    it hangs, and Allocate goes on."""
    d0, d1, _ = devices
    node = NodeUnderTest(tmp_path, lab, [d0, d1], {"pools": [_pool("pool1", [d0, d1])]})
    monkeypatch.setattr(service, "CONFIG_READ_TIMEOUT", 0.5)
    monkeypatch.setattr(service, "CONFIG_POLL", 0.1)
    async with running(node):
        svc = node.service
        assert svc is not None
        # The filesystem goes first whatever happens (the stat waiting on it then
        # fails), so a watch stuck in it cannot hold the task group's exit.
        async with anyio.create_task_group() as tg:
            with HungFile(tmp_path / "mnt") as hung:
                hung.stat_hangs = True
                tg.start_soon(svc._watch_config, hung.path)
                with anyio.fail_after(10):
                    while "not watched until it answers" not in caplog.text:
                        await anyio.sleep(0.05)
                assert hung.stating.is_set()  # the stat really did hang
                assert workers.limiter(Work.DISK).borrowed_tokens == 0
                await anyio.sleep(1.0)  # polls meanwhile: none starts a second hung stat
                stuck = [t for t in threading.enumerate() if t.name == "config-stat"]
                assert len(stuck) == 1, stuck
                resp = await node.allocate(d0)
                assert dict(resp.container_responses[0].envs) == {"AFXDP_DEVICES_POOL1": d0}
                tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_a_config_read_that_hangs_fails_its_reload_at_the_deadline_and_never_holds_allocate(
    tmp_path: Path,
    lab: Lab,
    devices: list[str],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    d0, d1, _ = devices
    node = NodeUnderTest(tmp_path, lab, [d0, d1], {"pools": [_pool("pool1", [d0, d1])]})
    monkeypatch.setattr(service, "CONFIG_READ_TIMEOUT", 1.0)
    async with running(node):
        svc = node.service
        assert svc is not None and svc.devices is not None
        results: list[bool] = []

        async def reload() -> None:
            results.append(await svc.reload())

        # A regular file on a filesystem that never answers a read (a hung NFS).
        with HungFile(tmp_path / "mnt") as hung:
            svc.config_path = hung.path
            async with anyio.create_task_group() as tg:
                for _ in range(2):  # SIGHUP's and the file watch's, at once
                    tg.start_soon(reload)
                try:
                    resp = await node.allocate(d0)  # kubelet's deadline is 5 s
                except BaseException:
                    hung.close()  # reloads that wait on the reads (no deadline) end too
                    raise
            assert hung.reading.is_set()  # the read really did hang
            # Left behind, that read holds off the next: one hung thread, not one a reload.
            assert await svc.reload() is False
        assert dict(resp.container_responses[0].envs) == {"AFXDP_DEVICES_POOL1": d0}
        assert results == [False, False]
        assert list(svc.devices.pools) == ["pool1"]  # the running config stays
        assert _sample(svc, "afxdp_config_invalid") == 1
        refused = [r.getMessage() for r in caplog.records if "reload refused" in r.getMessage()]
        stays = f"reload refused, the running config stays: {hung.path}: "
        assert sorted(refused) == [
            stays + "not read within 1 s (a hung filesystem?)",
            *[stays + "the read an earlier reload left behind has not returned "
                      "(a hung filesystem?)"] * 2,
        ]  # fmt: skip
