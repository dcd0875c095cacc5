"""Parts built alone, wired into the service: CDI devices in Allocate, and the
kind network built at start and removed at stop (afxdpd in a netns of its own)."""

from __future__ import annotations

import gc
import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import anyio
import pytest

from afxdp import cdi, control
from afxdp import service as service_module
from afxdp.config import Config, load_config
from afxdp.kindnet import BRIDGE
from afxdp.service import Paths, Service
from tests.fakes import FakeSubfunctions
from tests.kernel import Lab, ip
from tests.kubelet import FakeKubelet
from tests.node import NodeUnderTest, running

pytestmark = pytest.mark.privileged
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}


@pytest.mark.anyio
async def test_allocate_names_the_cdi_device_whose_spec_the_service_wrote(
    tmp_path: Path, lab: Lab
) -> None:
    dev, peer = lab.veth(lab.name("cw"), lab.name("cx"))
    ip("link", "set", dev, "up")
    ip("link", "set", peer, "up")
    node = NodeUnderTest(tmp_path, lab, [dev])
    node.paths = replace(node.paths, cdi_dir=tmp_path / "cdi")
    async with running(node):
        resp = await node.allocate(dev)
        [container] = resp.container_responses
        assert [d.name for d in container.cdi_devices] == [cdi.device_name("pool1", dev)]
        spec = json.loads(cdi.spec_path(tmp_path / "cdi", "pool1").read_text())
        assert [d["name"] for d in spec["devices"]] == [dev]


@pytest.mark.anyio
async def test_cdi_off_in_the_config_writes_no_spec_and_names_no_device(
    tmp_path: Path, lab: Lab
) -> None:
    dev, peer = lab.veth(lab.name("cy"), lab.name("cz"))
    ip("link", "set", dev, "up")
    ip("link", "set", peer, "up")
    node = NodeUnderTest(tmp_path, lab, [dev])
    node.config = {**node.config, "cdi": False}
    node.paths = replace(node.paths, cdi_dir=tmp_path / "cdi")
    async with running(node):
        resp = await node.allocate(dev)
        assert not resp.container_responses[0].cdi_devices
        assert not cdi.spec_path(tmp_path / "cdi", "pool1").exists()


def _links(netns: str) -> set[str]:
    out = subprocess.run(["ip", "-n", netns, "-j", "link", "show"], capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    return {link["ifname"] for link in json.loads(out)}


def test_kind_mode_builds_its_network_pools_exactly_it_and_removes_it(
    tmp_path: Path, lab: Lab
) -> None:
    ns = lab.netns("kindn")
    lab.veth("veth6", "veth7", netns=ns)  # kindnet-like pod veths: never pooled
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"kindCluster": True, "pools": [
        {"name": "kind", "mode": "primary", "drivers": [{"name": "veth"}]}]}))  # fmt: skip
    assert load_config(cfg.read_bytes()).config.kind_cluster
    kubelet = FakeKubelet(tmp_path / "kubelet")
    kubelet.start_registration()
    kubelet.start_pod_resources()
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, "-m", "afxdp.cli.afxdpd",
         "--config", str(cfg), "--node-name", "n1", "--kubelet-dir", str(kubelet.dir),
         "--uds-dir", str(tmp_path / "uds"), "--pin-dir", str(tmp_path / "pins"),
         "--run-dir", str(run_dir), "--state-dir", str(tmp_path / "state"),
         "--cdi-dir", str(tmp_path / "cdi"), "--metrics-address", ""],
        env=ENV, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while True:  # the socket file exists a moment before it listens
            try:
                status = control.read_status(run_dir)
                break
            except OSError:
                assert proc.poll() is None, proc.communicate()[1]
                assert time.monotonic() < deadline
                time.sleep(0.05)
        pooled = sorted(d["id"] for d in status["pools"][0]["devices"])
        assert pooled == ["afxk0", "afxk1", "afxk2", "afxk3"]
        assert {BRIDGE, "afxk0-br", "veth6"} <= _links(ns)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        left = _links(ns)
        assert BRIDGE not in left and not any(n.startswith("afxk") for n in left)
        assert {"veth6", "veth7"} <= left  # not ours: untouched
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        kubelet.stop()


@pytest.mark.anyio
async def test_the_collector_off_for_start_up_is_on_again_when_kubelet_never_registers_us(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    service = Service(Config(), "node1", Paths(), FakeSubfunctions(), freeze_heap=True)
    ready = False
    monkeypatch.setattr(Service, "readiness", lambda self: (ready, "not registered"))
    monkeypatch.setattr(service_module, "COLLECTOR_OFF_FOR", 0.05)
    caplog.set_level(logging.INFO, logger="afxdp.service")
    gc.disable()  # as run() does when it starts
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(service._say_when_ready, "pool1")
            with anyio.fail_after(5):
                while not gc.isenabled():
                    await anyio.sleep(0.01)
            assert gc.get_freeze_count() > 0
            assert "ready on node" not in caplog.text  # still not ready: not said
            ready = True
            with anyio.fail_after(5):
                while "ready on node node1: pool1" not in caplog.text:
                    await anyio.sleep(0.05)
    finally:
        gc.enable()
        gc.unfreeze()
