"""DRA end to end on real veths, sockets and processes: a claim prepared
through the FAKE kubelet (grpcio, tests/kubelet_dra.py), read from the FAKE API
server (tests/apiserver.py), handed out by afxdpd (in-process, then as a real
process killed with SIGKILL), the pod's handshake on the device's socket, and
nothing left after NodeUnprepareResources."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import pytest

from afxdp import control
from afxdp import status as st
from afxdp.cni import shim
from afxdp.datapath import MAP_IN_MAP
from afxdp.dra.apiserver import ApiServerClaims
from afxdp.dra.claims import journal as claims_journal
from afxdp.state import StateStore
from afxdp.uds.client import HandshakeError
from tests.apiserver import FakeApiServer, resource_claim, result
from tests.kernel import Lab, ip
from tests.kubelet import FakeKubelet
from tests.kubelet_dra import FakeDraKubelet
from tests.node import NodeUnderTest, pool_config, running
from tests.test_cni import cni
from tests.test_restart import handshake, prog_on, until_ready

pytestmark = [pytest.mark.privileged, pytest.mark.anyio]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
UID = "3d1f2c8e-5b7a-4c0e-9f61-0a2b3c4d5e6f"
CLAIM = ("ns", "nic-claim", UID)


def prog_exists(prog_id: int) -> bool:
    done = subprocess.run(["bpftool", "prog", "show", "id", str(prog_id)], capture_output=True,
                          check=False)  # fmt: skip
    return done.returncode == 0


def until_fresh_program(read_status: Callable[[], Any], dev: str, pods: int) -> int:
    """The program a released device carries for the next pod (in the
    background, after Unprepare answered), once status says it is on: a fresh
    one in place of its pod's (per-pod layout), or the same one with its slot
    emptied (map-in-map: the pod's map is what goes)."""
    deadline = time.monotonic() + 10
    while True:
        status = read_status()
        [d] = [d for p in status["pools"] for d in p["devices"] if d["id"] == dev]
        kept = status["datapath"] == MAP_IN_MAP
        if d["prepared"] and d["xdp_prog_id"] is not None and (d["xdp_prog_id"] == pods) == kept:
            return int(d["xdp_prog_id"])
        assert time.monotonic() < deadline, f"{dev} never got a fresh program: {d}"
        time.sleep(0.02)


@pytest.fixture
def api() -> Iterator[FakeApiServer]:
    server = FakeApiServer()
    yield server
    server.stop()


def _devices(lab: Lab, n: int) -> list[str]:
    devices = []
    for i in range(n):
        a, b = lab.veth(lab.name(f"dr{i}"), lab.name(f"dq{i}"))
        ip("link", "set", a, "up")
        ip("link", "set", b, "up")
        devices.append(a)
    return devices


async def test_a_claim_prepared_serves_its_pods_handshake_and_unprepare_leaves_nothing(
    tmp_path: Path, lab: Lab, api: FakeApiServer
) -> None:
    d0, d1 = _devices(lab, 2)
    node = NodeUnderTest(tmp_path, lab, [d0, d1], pool_config([d0, d1], api="dra"))
    node.paths = replace(node.paths, cdi_dir=tmp_path / "cdi", state_dir=tmp_path / "state")
    api.put(resource_claim(*CLAIM, [result(d0, "node1/pool1")], pods=("pod-a",)))
    kubelet = FakeDraKubelet(tmp_path / "kubelet")
    kubelet.start()
    try:
        async with running(node, claim_source=ApiServerClaims(api.url)):
            await anyio.to_thread.run_sync(kubelet.wait_registrations, 1)
            # One API per pool: no device plugin for a DRA pool.
            assert not (node.kubelet.plugin_dir / "afxdp-pool1.sock").exists()
            resp = await anyio.to_thread.run_sync(partial(kubelet.prepare, CLAIM))
            answer = resp.claims[UID]
            assert answer.error == ""
            [cdi_id] = answer.devices[0].cdi_device_ids
            assert cdi_id == f"afxdp.dev/claim={UID}-{d0}"
            spec_file = tmp_path / "cdi" / f"afxdp.dev_claim-{UID}.json"
            [dev] = json.loads(spec_file.read_text())["devices"]
            assert dev["containerEdits"]["mounts"][0]["hostPath"] == str(node.paths.uds_dir / d0)

            map_id = await anyio.to_thread.run_sync(handshake, node.paths.uds_dir, d0, "pod-a")
            assert map_id > 0
            with pytest.raises(HandshakeError):  # not a pod the claim is reserved for
                await anyio.to_thread.run_sync(handshake, node.paths.uds_dir, d0, "pod-b")
            status = await node.call(control.read_status, node.paths.run_dir)
            [pool] = status["pools"]
            assert (pool["api"], pool["registered"]) == ("dra", True)
            assert {d["id"]: (d["state"], d["pod"]) for d in pool["devices"]} == {
                d0: ("allocated", {"name": "pod-a", "namespace": "ns"}), d1: ("free", None)}  # fmt: skip
            [claim] = status["claims"]
            assert (claim["namespace"], claim["name"], claim["uid"], claim["devices"],
                    claim["pods"]) == ("ns", "nic-claim", UID, [f"pool1/{d0}"], ["ns/pod-a"])  # fmt: skip
            assert status["dra"]["registered"] is True
            pods_prog = prog_on(d0)

            resp = await anyio.to_thread.run_sync(partial(kubelet.unprepare, CLAIM))
            assert resp.claims[UID].error == ""
            status = await node.call(control.read_status, node.paths.run_dir)
            assert status["claims"] == [] and status["allocations"] == []
            assert not spec_file.exists()
            assert not (node.paths.uds_dir / d0).exists()
            read = partial(control.read_status, node.paths.run_dir)
            fresh = await anyio.to_thread.run_sync(until_fresh_program, read, d0, pods_prog)
            assert prog_on(d0) == fresh and prog_exists(pods_prog) == (fresh == pods_prog)
            assert claims_journal(tmp_path / "state").load() == {}
            assert StateStore(tmp_path / "state").load().allocations == {}
    finally:
        kubelet.stop()


class Afxdpd:
    """afxdpd as a process on fixed directories (as tests/test_restart.py's Node)."""

    def __init__(self, tmp: Path, devices: list[str], api: FakeApiServer) -> None:
        self.tmp, self.api = tmp, api
        self.run_dir, self.uds_dir = tmp / "run", tmp / "uds"
        cfg = {"pools": [{"name": "p", "mode": "primary", "api": "dra",
                          "devices": [{"name": d} for d in devices]}]}  # fmt: skip
        (tmp / "config.json").write_text(json.dumps(cfg))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "afxdp.cli.afxdpd", "--config", str(self.tmp / "config.json"),
             "--node-name", "n1", "--kubelet-dir", str(self.tmp / "kubelet"),
             "--uds-dir", str(self.uds_dir), "--pin-dir", str(self.tmp / "pins"),
             "--run-dir", str(self.run_dir), "--state-dir", str(self.tmp / "state"),
             "--cdi-dir", str(self.tmp / "cdi"), "--kube-api", self.api.url,
             "--log-dir", str(self.tmp / "log"), "--metrics-address", ""],
            env=ENV, stderr=(self.tmp / "afxdpd.log").open("ab"),
        )  # fmt: skip
        until_ready(self.proc, self.run_dir, self.log)

    def status(self) -> Any:
        return control.read_status(self.run_dir)

    def log(self) -> str:
        return (self.tmp / "afxdpd.log").read_text(errors="replace")


async def test_kill9_between_prepare_and_unprepare_keeps_the_claim_and_unprepare_releases(
    tmp_path: Path, lab: Lab, api: FakeApiServer
) -> None:
    d0, d1 = _devices(lab, 2)
    node = Afxdpd(tmp_path, [d0, d1], api)
    kubelet = FakeDraKubelet(tmp_path / "kubelet")
    kubelet.start()
    # Kubelet's PodResources answers, listing no device-plugin pod: a restart
    # must keep the claim's device all the same (the claim holds it).
    pod_resources = FakeKubelet(tmp_path / "kubelet")
    pod_resources.start_pod_resources()
    # The claim of another node and one of another driver: refused, each saying why.
    api.put(resource_claim("ns", "elsewhere", "a1", [result(d1, "n2/p")]))
    api.put(resource_claim("ns", "gpu", "a2", [result("gpu0", "n1/p", driver="gpu.example.com")]))
    api.put(resource_claim(*CLAIM, [result(d0, "n1/p")], pods=("pod-k",)))
    try:
        node.start()
        await anyio.to_thread.run_sync(kubelet.wait_registrations, 1)
        resp = await anyio.to_thread.run_sync(
            partial(kubelet.prepare, CLAIM, ("ns", "elsewhere", "a1"), ("ns", "gpu", "a2"))
        )
        assert resp.claims[UID].error == ""
        assert "pool n2/p is not of this node (n1)" in resp.claims["a1"].error
        assert "no device of driver afxdp.dev" in resp.claims["a2"].error
        map_before = await anyio.to_thread.run_sync(handshake, node.uds_dir, d0, "pod-k")
        prog = prog_on(d0)
        assert node.proc is not None
        node.proc.send_signal(signal.SIGKILL)
        node.proc.wait()

        api.down = True  # a restart does not need the API server to keep its claims
        node.start()
        await anyio.to_thread.run_sync(kubelet.wait_registrations, 2)
        status = node.status()
        assert {d["id"]: d["state"] for d in status["pools"][0]["devices"]} == {
            d0: "allocated", d1: "free"}  # fmt: skip
        assert [c["uid"] for c in status["claims"]] == [UID]
        assert prog_on(d0) == prog  # the same program, never detached
        assert await anyio.to_thread.run_sync(handshake, node.uds_dir, d0, "pod-k") == map_before
        # The CNI ADD takes a claim's device as a kubelet-allocated one, after a restart too.
        ns = lab.netns("drapod")
        netconf = {"cniVersion": "1.0.0", "name": "dra-net", "type": "afxdp", "mode": "primary",
                   "deviceID": d0, "daemonSocket": str(node.run_dir / "cni.sock"),
                   "ipam": {"type": "host-local", "dataDir": str(tmp_path / "ipam"),
                            "ranges": [[{"subnet": "10.78.0.0/24"}]]}}  # fmt: skip
        shim_path = shim.install(tmp_path / "cni-bin", [node.run_dir])
        for command in ("ADD", "DEL"):
            code, _, err = await cni(command, netconf, shim_path=shim_path,
                                     netns=f"/run/netns/{ns}", container="ctr-dra")  # fmt: skip
            assert code == 0, err
            if command == "ADD":
                assert prog_on(d0, ns) == prog  # in the pod's netns, with its program
        assert prog_on(d0) == prog  # home again, still the claim's
        # Kubelet retries Prepare after the restart: the same answer, from the record.
        again = await anyio.to_thread.run_sync(partial(kubelet.prepare, CLAIM))
        assert again.claims[UID] == resp.claims[UID]

        resp = await anyio.to_thread.run_sync(partial(kubelet.unprepare, CLAIM))
        assert resp.claims[UID].error == ""
        status = node.status()
        assert status["claims"] == [] and status["allocations"] == []
        assert not (tmp_path / "cdi" / f"afxdp.dev_claim-{UID}.json").exists()
        assert not (node.uds_dir / d0).exists()
        fresh = await anyio.to_thread.run_sync(until_fresh_program, node.status, d0, prog)
        assert prog_on(d0) == fresh and prog_exists(prog) == (fresh == prog)
        node.proc.send_signal(signal.SIGTERM)
        assert node.proc.wait(timeout=20) == 0, node.log()
        assert StateStore(tmp_path / "state").load().allocations == {}
        assert claims_journal(tmp_path / "state").load() == {}
    finally:
        kubelet.stop()
        pod_resources.stop()
        if node.proc is not None and node.proc.poll() is None:
            node.proc.kill()
            node.proc.wait()


async def test_the_node_is_ready_only_once_kubelet_has_registered_the_dra_driver(
    tmp_path: Path, lab: Lab
) -> None:
    [d0] = _devices(lab, 1)
    node = NodeUnderTest(tmp_path, lab, [d0], pool_config([d0], api="dra"))
    kubelet = FakeDraKubelet(tmp_path / "kubelet")
    try:
        async with running(node):
            assert node.service is not None
            assert node.service.readiness() == (
                False, "not registered with kubelet: DRA driver afxdp.dev")  # fmt: skip
            doc = st.decode(json.dumps(await node.call(control.read_status,
                                                       node.paths.run_dir)).encode())  # fmt: skip
            assert doc.unready_reasons() == ["not registered with kubelet: afxdp/pool1"]
            kubelet.start()
            await anyio.to_thread.run_sync(kubelet.wait_registrations, 1)
            assert node.service.readiness() == (True, "")
            assert doc.pools[0].api == "dra"
    finally:
        kubelet.stop()
