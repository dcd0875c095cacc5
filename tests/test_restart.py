"""A restart loses nothing: afxdpd killed with SIGKILL after Allocate, during a
CNI ADD and during a DEL, then started again on the same directories. Kubelet
(the grpcio double) is the source of truth; the durable record says how each
allocation was set up. afxdpd runs as a real process; the CNI goes through the
built shim; IPAM is the real host-local behind a FAKE wrapper that can hold."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import grpc
import pytest

from afxdp import control
from afxdp.bpf import libbpf
from afxdp.cni import shim
from afxdp.cni.attachments import AttachmentStore
from afxdp.state import StateStore
from afxdp.uds.client import UdsClient
from tests.kernel import Lab, ip
from tests.kubelet import FakeKubelet, PluginClient
from tests.test_cni import cni
from tests.test_cni_handler import FakeIpam

pytestmark = [pytest.mark.privileged, pytest.mark.anyio]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
POD = "pod-r"
SUBNET = "10.79.0"


def handshake(uds_dir: Path, dev: str, hostname: str) -> int:
    """As the pod would, through the host side of its mounted directory: the XSKMAP's id."""
    with UdsClient(uds_dir / dev / "afxdp.sock") as c:
        c.connect(hostname)
        fd = c.xsk_map_fd(dev)
        c.fin()
    try:
        return int(libbpf.map_info(fd).id)
    finally:
        os.close(fd)


class Node:
    """afxdpd as a process on fixed directories, its kubelet double, its shim."""

    def __init__(self, tmp: Path, lab: Lab, devices: list[str]) -> None:
        self.tmp, self.lab, self.devices = tmp, lab, devices
        self.run_dir, self.uds_dir = tmp / "run", tmp / "uds"
        self.kubelet = FakeKubelet(tmp / "kubelet")
        self.kubelet.start_registration()
        self.kubelet.start_pod_resources()
        self.ipam = FakeIpam(tmp)
        self.shim = shim.install(tmp / "cni-bin", [self.run_dir])
        cfg = {
            "pools": [{"name": "p", "mode": "primary", "devices": [{"name": d} for d in devices]}]
        }
        (tmp / "config.json").write_text(json.dumps(cfg))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "afxdp.cli.afxdpd", "--config", str(self.tmp / "config.json"),
             "--node-name", "n1", "--kubelet-dir", str(self.kubelet.dir),
             "--uds-dir", str(self.uds_dir), "--pin-dir", str(self.tmp / "pins"),
             "--run-dir", str(self.run_dir), "--state-dir", str(self.tmp / "state"),
             "--log-dir", str(self.tmp / "log"), "--cdi-dir", str(self.tmp / "cdi"),
             "--metrics-address", ""],
            env=ENV, stderr=(self.tmp / "afxdpd.log").open("ab"),
        )  # fmt: skip
        until_ready(self.proc, self.run_dir, self.log)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            assert self.proc.wait(timeout=20) == 0, self.log()

    def log(self) -> str:
        return (self.tmp / "afxdpd.log").read_text(errors="replace")

    def states(self) -> dict[str, str]:
        pools = control.read_status(self.run_dir)["pools"]
        return {d["id"]: d["state"] for d in pools[0]["devices"]}

    def allocate(self, dev: str) -> Any:
        self.kubelet.hold(POD, "afxdp/p", dev)
        client = PluginClient(self.kubelet.plugin_dir / "afxdp-p.sock")
        try:
            return client.allocate([dev])
        finally:
            client.close()

    def handshake(self, dev: str) -> int:
        return handshake(self.uds_dir, dev, POD)

    def netconf(self, dev: str) -> dict[str, Any]:
        return {
            "cniVersion": "1.0.0", "name": "restart-net", "type": "afxdp", "mode": "primary",
            "deviceID": dev, "daemonSocket": str(self.run_dir / "cni.sock"),
            "ipam": {"type": "fakeipam", "dataDir": str(self.tmp / "ipam"),
                     "ranges": [[{"subnet": f"{SUBNET}.0/24"}]]},
        }  # fmt: skip

    async def cni(self, command: str, dev: str, netns: str) -> tuple[int, Any, str]:
        return await cni(command, self.netconf(dev), shim_path=self.shim,
                         netns=f"/run/netns/{netns}", container="ctr-r",
                         CNI_PATH=f"{self.ipam.bin}:/usr/lib/cni")  # fmt: skip

    def leases(self) -> set[str]:
        d = self.tmp / "ipam" / "restart-net"
        return {p.name for p in d.iterdir() if p.name.startswith(SUBNET)} if d.exists() else set()


def until_ready(proc: subprocess.Popen[bytes], run_dir: Path, log: Callable[[], str]) -> None:
    """Return once the afxdpd of ``proc`` says it is ready; fail if it exits or takes 20 s."""
    deadline = time.monotonic() + 20
    while True:
        try:
            if control.read_status(run_dir)["ready"]:
                return
        except OSError:
            pass
        assert proc.poll() is None, log()
        assert time.monotonic() < deadline, "afxdpd never became ready\n" + log()
        time.sleep(0.05)


def prog_on(dev: str, netns: str | None = None) -> int:
    cmd = ["ip", *(["-n", netns] if netns else []), "-j", "link", "show", dev]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
        return -1  # no such link here
    xdp = json.loads(done.stdout)[0].get("xdp", {})
    return int(xdp.get("prog", {}).get("id", 0)) or int(
        next((a["prog"]["id"] for a in xdp.get("attached", []) if "prog" in a), 0)
    )


@pytest.fixture
def node(tmp_path: Path, lab: Lab) -> Iterator[Node]:
    devices = []
    for i in range(2):
        a, b = lab.veth(lab.name(f"rs{i}"), lab.name(f"rt{i}"))
        ip("link", "set", a, "up")
        ip("link", "set", b, "up")
        devices.append(a)
    n = Node(tmp_path, lab, devices)
    try:
        yield n
    finally:
        n.ipam.release_all()
        if n.proc is not None and n.proc.poll() is None:
            n.proc.kill()
            n.proc.wait()
        n.kubelet.stop()


async def test_kill9_after_allocate_keeps_the_allocation_and_the_pod_can_shake_hands(
    node: Node,
) -> None:
    d0, d1 = node.devices
    node.start()
    resp = node.allocate(d0)
    [mount] = resp.container_responses[0].mounts
    assert mount.host_path == str(node.uds_dir / d0)  # the directory, so a new socket shows
    map_before = node.handshake(d0)
    prog = prog_on(d0)
    node.kill9()

    node.start()
    assert node.states() == {d0: "allocated", d1: "free"}
    assert prog_on(d0) == prog  # the same program, never detached
    assert node.handshake(d0) == map_before  # a new socket, the same XSKMAP
    ns = node.lab.netns("rpod")
    code, _, err = await node.cni("ADD", d0, ns)
    assert code == 0, err
    assert prog_on(d0, ns) == prog
    code, _, err = await node.cni("DEL", d0, ns)
    assert code == 0, err
    assert node.leases() == set()
    # Kubelet lets the pod go: the allocation ends at the latest on the way out.
    node.kubelet.pods.clear()
    node.stop()
    assert prog_on(d0) == 0
    assert not (node.uds_dir / d0).exists()
    assert StateStore(node.tmp / "state").load().allocations == {}


async def test_kill9_after_allocate_with_the_pod_gone_meanwhile_cleans_up_at_start(
    node: Node,
) -> None:
    d0, _ = node.devices
    node.start()
    node.allocate(d0)
    old = prog_on(d0)
    node.kill9()
    node.kubelet.pods.clear()  # the pod went away while afxdpd was down
    node.start()
    assert node.states()[d0] == "free"
    assert prog_on(d0) != old  # the pod's map is gone (a fresh program may be prepared)
    assert not (node.uds_dir / d0 / "afxdp.sock").exists()
    assert "no pod holds it (kubelet); cleaned up" in node.log()
    node.stop()


async def test_kill9_during_add_then_the_runtimes_del_leaves_nothing(node: Node) -> None:
    d0, _ = node.devices
    node.start()
    node.allocate(d0)
    ns = node.lab.netns("rpod")
    node.ipam.set("hold-ctr-r")
    async with anyio.create_task_group() as tg:
        tg.start_soon(node.cni, "ADD", d0, ns)
        await node.ipam.wait_entered("ctr-r")
        node.kill9()  # the shim's ADD gets an error; the runtime will DEL
    # The orphaned IPAM plugin finishes on its own after afxdpd died: a lease.
    node.ipam.set("hold-ctr-r", on=False)
    with anyio.fail_after(10):
        while not node.leases():
            await anyio.sleep(0.02)
    node.start()
    assert node.states()[d0] == "allocated"
    code, _, err = await node.cni("DEL", d0, ns)
    assert code == 0, err
    assert node.leases() == set()  # the half-done ADD was undone from its record
    code, _out, err = await node.cni("ADD", d0, ns)  # the runtime tries again
    assert code == 0, err
    assert prog_on(d0, ns) > 0
    code, _, err = await node.cni("DEL", d0, ns)
    assert code == 0, err
    node.kubelet.pods.clear()
    node.stop()
    assert node.leases() == set() and prog_on(d0) == 0


async def test_kill9_during_del_then_the_retried_del_finishes(node: Node) -> None:
    d0, _ = node.devices
    node.start()
    node.allocate(d0)
    ns = node.lab.netns("rpod")
    code, _, err = await node.cni("ADD", d0, ns)
    assert code == 0, err
    assert len(node.leases()) == 1
    node.ipam.set("hold-DEL-ctr-r")
    async with anyio.create_task_group() as tg:
        tg.start_soon(node.cni, "DEL", d0, ns)
        with anyio.fail_after(10):
            while not (node.ipam.ctl / "entered-DEL-ctr-r").exists():
                await anyio.sleep(0.01)
        node.kill9()
    node.ipam.set("hold-DEL-ctr-r", on=False)
    node.start()
    code, _, err = await node.cni("DEL", d0, ns)  # runtimes retry a failed DEL
    assert code == 0, err
    assert node.leases() == set()
    assert prog_on(d0) > 0 and node.states()[d0] == "allocated"  # home, still allocated
    node.kubelet.pods.clear()
    node.stop()
    assert prog_on(d0) == 0
    assert AttachmentStore(node.run_dir / "cni-attachments.json").all() == []


async def test_sigterm_restart_keeps_the_pods_directory_and_serves_a_new_socket_in_it(
    node: Node,
) -> None:
    d0, _ = node.devices
    node.start()
    node.allocate(d0)
    directory = node.uds_dir / d0
    inode = directory.stat().st_ino  # what the pod has bind-mounted
    map_before = node.handshake(d0)
    prog = prog_on(d0)
    node.stop()  # SIGTERM: kubelet still lists the pod, so nothing is undone
    assert prog_on(d0) == prog
    assert directory.stat().st_ino == inode
    node.start()
    assert directory.stat().st_ino == inode
    assert node.handshake(d0) == map_before
    node.kubelet.pods.clear()
    node.stop()
    assert prog_on(d0) == 0 and not directory.exists()


async def test_sigterm_lets_a_cni_add_in_flight_finish_and_turns_new_ones_away(
    node: Node,
) -> None:
    d0, d1 = node.devices
    node.start()
    node.allocate(d0)
    ns = node.lab.netns("rpod")
    node.ipam.set("hold-ctr-r")
    results: list[tuple[int, Any, str]] = []

    async def add() -> None:
        results.append(await node.cni("ADD", d0, ns))

    async with anyio.create_task_group() as tg:
        tg.start_soon(add)
        await node.ipam.wait_entered("ctr-r")
        assert node.proc is not None
        node.proc.send_signal(signal.SIGTERM)
        # While it drains, a new request is told to come back later.
        with anyio.fail_after(10):
            while True:
                code, out, _ = await cni("ADD", node.netconf(d1), shim_path=node.shim,
                                         netns=f"/run/netns/{ns}", container="ctr-other",
                                         CNI_PATH=f"{node.ipam.bin}:/usr/lib/cni")  # fmt: skip
                if code and out and out["code"] == 11 and "stopping" in out["msg"]:
                    break
                await anyio.sleep(0.05)
        node.ipam.set("hold-ctr-r", on=False)
    [(code, _, err)] = results
    assert code == 0, err  # the ADD in flight was finished, not cut off
    assert node.proc is not None and node.proc.wait(timeout=20) == 0
    assert prog_on(d0, ns) > 0  # the pod has its device


async def test_a_forged_state_record_cannot_make_afxdpd_unlink_what_is_not_its(
    node: Node,
) -> None:
    _, d1 = node.devices
    victim = node.tmp / "victim" / "afxdp.sock"  # where uds-dir/../victim leads
    outside = node.tmp / "outside" / "xsks_map"
    for path in (victim, outside):
        path.parent.mkdir()
        path.write_text("not afxdpd's")
    forged = {
        "../victim": {"pool": "p", "device": "../victim", "prog_id": 1},
        d1: {"pool": "p", "device": d1, "pinned": str(outside)},
    }
    (node.tmp / "state").mkdir()
    (node.tmp / "state" / "state.json").write_text(
        json.dumps({"version": 1, "allocations": forged}) + "\n"
    )
    node.start()
    assert set(node.states().values()) == {"free"}
    node.stop()
    assert victim.read_text() == outside.read_text() == "not afxdpd's"
    assert (node.tmp / "state" / "state.json.unreadable").exists()
    assert "state.json cannot be trusted" in node.log()


async def test_state_and_attachment_files_nested_past_the_bound_are_moved_aside_at_start(
    node: Node,
) -> None:
    # Deep enough for a decoder to meet the recursion limit: such a file is
    # unreadable like any other, never a reason for afxdpd not to start.
    deep = b"[" * 100_000 + b"]" * 100_000
    (node.tmp / "state").mkdir()
    (node.tmp / "state" / "state.json").write_bytes(
        b'{"version": 1, "allocations": {}, "x": ' + deep + b"}\n"
    )
    node.run_dir.mkdir()
    (node.run_dir / "cni-attachments.json").write_bytes(b'[]\n{"remove": ' + deep + b"}\n")
    node.start()
    assert set(node.states().values()) == {"free"}
    node.stop()
    log = node.log()
    why = "is unreadable (a line nests deeper than 64 levels (at"
    assert f"state.json {why} x" in log
    assert f"cni-attachments.json {why} remove" in log
    assert (node.tmp / "state" / "state.json.unreadable").exists()
    assert (node.run_dir / "cni-attachments.json.unreadable").exists()


def allocate_refused(node: Node, dev: str) -> str:
    """Kubelet's Allocate of ``dev``, which afxdpd must refuse: its message."""
    with pytest.raises(grpc.RpcError) as err:
        node.allocate(dev)
    node.kubelet.pods.pop()  # allocate() listed a pod holding it: there is none
    return str(err.value.details())


async def test_kill9_and_a_garbage_state_file_keep_what_kubelet_lists_and_refuse_the_rest(
    node: Node,
) -> None:
    d0, d1 = node.devices
    node.start()
    node.allocate(d0)
    map_before = node.handshake(d0)
    prog = prog_on(d0)
    node.kill9()
    (node.tmp / "state" / "state.json").write_bytes(b"\x00garbage, not a record\n")

    node.start()  # kubelet lists the pod: d0 stays its
    assert node.states() == {d0: "allocated", d1: "free"}
    assert prog_on(d0) == prog  # the pod's program, never replaced
    assert node.handshake(d0) == map_before  # adopted: its socket is served again
    assert "allocated" in allocate_refused(node, d0)  # never handed out twice
    status = control.read_status(node.run_dir)
    [alloc] = status["allocations"]
    assert alloc["device"] == d0 and alloc["xdp_prog_id"] == prog
    assert not alloc["setup_unknown"]
    assert "state.json is unreadable" in node.log()
    assert (node.tmp / "state" / "state.json.unreadable").exists()
    node.kubelet.pods.clear()
    node.stop()
    assert prog_on(d0) == 0


async def test_a_truncated_state_file_and_kubelet_down_leave_every_device_unknown_till_it_answers(
    node: Node,
) -> None:
    d0, d1 = node.devices
    node.start()
    node.allocate(d0)
    prog, prepared = prog_on(d0), prog_on(d1)  # d1's: attached ahead of Allocate
    node.kill9()
    path = node.tmp / "state" / "state.json"
    path.write_bytes(path.read_bytes()[:-20])  # the snapshot line cut short
    node.kubelet.fail_list = True  # PodResources cannot be asked

    node.start()
    assert node.states() == {d0: "unknown", d1: "unknown"}
    for dev in (d0, d1):
        assert "waiting for kubelet's PodResources" in allocate_refused(node, dev)
    assert (prog_on(d0), prog_on(d1)) == (prog, prepared)  # no program touched
    node.kubelet.fail_list = False  # kubelet answers: d0 is its pod's
    deadline = time.monotonic() + 10
    while node.states() != {d0: "allocated", d1: "free"}:
        assert time.monotonic() < deadline, node.states()
        await anyio.sleep(0.05)
    assert prog_on(d0) == prog
    assert node.handshake(d0) > 0
    node.kubelet.pods.clear()
    node.stop()
    assert prog_on(d0) == 0


async def test_a_garbage_state_file_keeps_a_device_in_its_pod_allocated_its_setup_unknown(
    node: Node,
) -> None:
    d0, d1 = node.devices
    node.start()
    node.allocate(d0)
    ns = node.lab.netns("rpod")
    code, _, err = await node.cni("ADD", d0, ns)
    assert code == 0, err
    prog = prog_on(d0, ns)
    node.kill9()
    (node.tmp / "state" / "state.json").write_bytes(b"{not json\n")

    node.start()  # d0 is pooled as its CNI attachment describes it, and kubelet lists it
    assert node.states() == {d0: "allocated", d1: "free"}
    [alloc] = control.read_status(node.run_dir)["allocations"]
    assert (alloc["device"], alloc["setup_unknown"]) == (d0, True)
    assert "no program of ours on it here (in its pod's netns?): setup unknown" in node.log()
    assert "allocated" in allocate_refused(node, d0)
    assert prog_on(d0, ns) == prog  # the pod's datapath, untouched
    code, _, err = await node.cni("DEL", d0, ns)  # home again, still allocated
    assert code == 0, err
    assert node.states()[d0] == "allocated"
    node.kubelet.pods.clear()
    node.stop()  # the allocation ends: what it came home with goes
    assert prog_on(d0) == 0
