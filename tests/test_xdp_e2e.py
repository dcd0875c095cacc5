"""End to end on real kernel objects: our XDP program on a veth, the device
moved into a "pod" netns, the handshake from inside that netns, an AF_XDP
socket receiving frames sent by the peer, and nothing left behind."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from afxdp.bpf import libbpf, pinning
from afxdp.bpf.libbpf import BpfError
from afxdp.bpf.xdp import AttachMode, XdpAttachment, detach_stale
from afxdp.datapath import KernelDatapath
from afxdp.errors import DeviceError
from afxdp.podresources import PodResourcesChecker
from afxdp.uds.handshake import HostCheck
from afxdp.uds.server import UdsServer, socket_path
from tests.kernel import Lab, foreign_xdp, ip, without_capability
from tests.kubelet import FakeKubelet

pytestmark = [pytest.mark.privileged, pytest.mark.anyio]
POD_IP, PEER_IP, PORT, COUNT = "10.251.0.2", "10.251.0.1", 9999, 200
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}

PEER_RECEIVER = r"""
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
print("ready", flush=True)
s.settimeout(0.5)
got, deadline = 0, time.monotonic() + 20
while got < int(sys.argv[2]) and time.monotonic() < deadline:
    try:
        if s.recv(2048).startswith(b"afxdp-tx-"):
            got += 1
    except TimeoutError:
        pass
print(got, flush=True)
"""

SENDER = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(int(sys.argv[3])):
    s.sendto(b"afxdp-test-%05d" % i, (sys.argv[1], int(sys.argv[2])))
"""


def in_netns(ns: str, *argv: str) -> list[str]:
    # nsenter, not "ip netns exec": the latter remounts /sys and hides bpffs pins.
    return ["nsenter", f"--net=/run/netns/{ns}", *argv]


def send_udp(ns: str, count: int) -> None:
    subprocess.run(in_netns(ns, sys.executable, "-c", SENDER, POD_IP, str(PORT), str(count)),
                   check=True, timeout=30)  # fmt: skip


class PodApp:
    def __init__(self, ns: str, *args: str) -> None:
        self.proc = subprocess.Popen(
            in_netns(ns, sys.executable, "-m", "tests.pod_app", *args),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=ENV,
            cwd=Path(__file__).parent.parent,
        )  # fmt: skip

    def event(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, f"pod app ended early, exit {self.proc.wait()}"
        event: dict[str, Any] = json.loads(line)
        return event

    def go(self, control_frames: int) -> None:
        """Tell the app the control frames are sent, and how many to wait for."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"go {control_frames}\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.fixture
def wired(lab: Lab) -> Iterator[tuple[str, str, str, str]]:
    """(device, peer, pod netns, peer netns): a veth pair made in the host netns."""
    pod_ns, peer_ns = lab.netns("afpod"), lab.netns("afpeer")
    dev, peer = lab.veth(lab.name("xd"), lab.name("xp"))
    yield dev, peer, pod_ns, peer_ns


def plug(dev: str, peer: str, pod_ns: str, peer_ns: str, *, moved: bool = False) -> list[str]:
    """What the CNI does with the device (``moved``: the CNI did it already),
    and a peer host to send from; the pod app's addressing arguments (POD_MAC
    POD_IP PEER_MAC PEER_IP)."""
    if not moved:
        ip("link", "set", dev, "netns", pod_ns)
    ip("link", "set", peer, "netns", peer_ns)
    ip("addr", "add", f"{POD_IP}/24", "dev", dev, netns=pod_ns)
    ip("link", "set", dev, "up", netns=pod_ns)
    ip("addr", "add", f"{PEER_IP}/24", "dev", peer, netns=peer_ns)
    ip("link", "set", peer, "up", netns=peer_ns)
    mac = json.loads(ip("-j", "link", "show", dev, netns=pod_ns))[0]["address"]
    peer_mac = json.loads(ip("-j", "link", "show", peer, netns=peer_ns))[0]["address"]
    # Static: once the XSK takes queue 0, ARP replies would go to it too.
    ip("neigh", "replace", POD_IP, "lladdr", mac, "dev", peer, netns=peer_ns)
    return [mac, POD_IP, peer_mac, PEER_IP]


def unplug(dev: str, pod_ns: str) -> None:
    ip("link", "set", dev, "netns", str(os.getpid()), netns=pod_ns)


async def run_pod(app: PodApp, peer_ns: str) -> dict[str, Any]:
    """Frames from the peer into the pod's RX ring; then the pod's TX to the peer."""
    receiver = subprocess.Popen(in_netns(peer_ns, sys.executable, "-c", PEER_RECEIVER, str(PORT - 1), str(COUNT)),
                                stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert receiver.stdout is not None
    assert receiver.stdout.readline().strip() == "ready"
    try:
        done = await _rx(app, peer_ns)
        done["peer_received"] = int(await anyio.to_thread.run_sync(receiver.stdout.readline))
    finally:
        receiver.kill()
        receiver.wait()
    return done


async def _rx(app: PodApp, peer_ns: str) -> dict[str, Any]:
    ready = await anyio.to_thread.run_sync(app.event)
    assert (ready["map_type"], ready["map_name"]) == (libbpf.BPF_MAP_TYPE_XSKMAP, "xsks_map")
    # Control: before the XSK is in the map, frames go to the kernel stack.
    await anyio.to_thread.run_sync(send_udp, peer_ns, 5)
    app.go(5)
    xsk = await anyio.to_thread.run_sync(app.event)
    assert xsk["control_to_kernel"] == 5
    await anyio.to_thread.run_sync(send_udp, peer_ns, COUNT)
    return await anyio.to_thread.run_sync(app.event)


async def test_frames_reach_the_pods_xsk_through_the_handshake(
    wired: tuple[str, str, str, str], tmp_path: Path
) -> None:
    dev, peer, pod_ns, peer_ns = wired
    kubelet = FakeKubelet(tmp_path / "kubelet")
    kubelet.start_pod_resources()
    kubelet.hold("pod-x", "afxdp/pool1", dev)
    checker = PodResourcesChecker(kubelet.dir / "pod-resources" / "kubelet.sock")

    async def check(host: str) -> HostCheck:
        return await checker.check(host, resource="afxdp/pool1", device=dev)

    att = await anyio.to_thread.run_sync(XdpAttachment.attach, dev)
    app = None
    try:
        assert att.mode is AttachMode.NATIVE  # veth has native XDP
        server = UdsServer(netdev=dev, map_fd=att.map_fd, path=socket_path(tmp_path / "uds", dev),
                           check_host=check)  # fmt: skip
        server.listen()
        addressing = await anyio.to_thread.run_sync(plug, dev, peer, pod_ns, peer_ns)
        # The program stayed attached across the move into the pod.
        assert (
            json.loads(ip("-j", "link", "show", dev, netns=pod_ns))[0]["xdp"]["prog"]["id"]
            == att.prog_id
        )
        async with anyio.create_task_group() as tg:
            tg.start_soon(server.serve)
            app = PodApp(
                pod_ns, "uds", str(server.path), "pod-x", dev, str(PORT), str(COUNT), *addressing
            )
            done = await run_pod(app, peer_ns)
            tg.cancel_scope.cancel()
        assert done["xsk"] == COUNT, done
        assert done["kernel"] == 0, done
        assert done["sent"] == COUNT and done["peer_received"] == COUNT, done  # TX ring works too
        assert server.connections == 1
        assert not server.path.exists()  # removed when the allocation ended
    finally:
        if app:
            app.close()
        kubelet.stop()
        await anyio.to_thread.run_sync(unplug, dev, pod_ns)
        att.detach()
    assert libbpf.xdp_query_id(att.ifindex) == 0  # nothing left on the link


async def test_frames_reach_the_pods_xsk_through_a_pinned_map(
    wired: tuple[str, str, str, str], tmp_path: Path
) -> None:
    dev, peer, pod_ns, peer_ns = wired
    pin_dir = tmp_path / "pins"
    pinning.ensure_bpffs(pin_dir)
    app = None
    att = await anyio.to_thread.run_sync(XdpAttachment.attach, dev, AttachMode.GENERIC)
    try:
        assert pinning.fs_type(pin_dir) == "bpf"
        path = pinning.map_path(pin_dir, "pool1", dev)
        pinning.prepare(path, uid=1500)
        att.pin_map(path)
        pinning.grant(path, uid=1500)
        assert path.stat().st_uid == 1500
        addressing = await anyio.to_thread.run_sync(plug, dev, peer, pod_ns, peer_ns)
        app = PodApp(pod_ns, "pinned", str(path), "-", dev, str(PORT), str(COUNT), *addressing)
        done = await run_pod(app, peer_ns)
        assert done["xsk"] == COUNT, done
        assert done["kernel"] == 0, done
    finally:
        if app:
            app.close()
        await anyio.to_thread.run_sync(unplug, dev, pod_ns)
        att.detach()
        pinning.remove(pinning.map_path(pin_dir, "pool1", dev))
        subprocess.run(["umount", str(pin_dir)], check=False)
    assert not path.exists() and not path.parent.exists()
    assert libbpf.xdp_query_id(att.ifindex) == 0


def test_detach_leaves_foreign_programs_alone(lab: Lab) -> None:
    dev, _ = lab.veth(lab.name("xf"), lab.name("xg"))
    ours = XdpAttachment.attach(dev)
    ours.detach()
    theirs = XdpAttachment.attach(dev, AttachMode.GENERIC)
    try:
        ours.detach()  # idempotent, and must not touch the program attached since
        assert libbpf.xdp_query_id(theirs.ifindex) == theirs.prog_id
    finally:
        theirs.detach()
    assert libbpf.xdp_query_id(theirs.ifindex) == 0


def test_replace_ours_swaps_a_left_over_program_in_one_change_in_its_mode(lab: Lab) -> None:
    bridge = lab.bridge()  # generic only: the replacement must keep that mode
    old = XdpAttachment.attach(bridge)
    old_map = libbpf.map_info(old.map_fd).id
    old.abandon()  # left attached, as for the next pod's swap
    new = XdpAttachment.attach(bridge, replace_ours=True)
    try:
        assert new.replaced == old.prog_id and new.prog_id != old.prog_id
        assert new.mode is AttachMode.GENERIC
        assert libbpf.xdp_query_id(new.ifindex) == new.prog_id
        assert libbpf.map_info(new.map_fd).id != old_map  # a fresh XSKMAP too
        with pytest.raises(BpfError):  # the old program is gone (nothing held it)
            libbpf.prog_name(old.prog_id)
    finally:
        new.detach()
    assert libbpf.xdp_query_id(new.ifindex) == 0


def test_replace_ours_attaches_where_nothing_is_and_never_replaces_another(lab: Lab) -> None:
    dev, _ = lab.veth(lab.name("xr"), lab.name("xs"))
    ours = XdpAttachment.attach(dev, replace_ours=True)
    assert ours.replaced is None and ours.mode is AttachMode.NATIVE
    ours.detach()
    theirs = foreign_xdp(dev)
    with pytest.raises(DeviceError, match=f"another XDP program \\(id {theirs}\\)"):
        XdpAttachment.attach(dev, replace_ours=True)
    assert libbpf.xdp_query_id(ours.ifindex) == theirs


def test_ours_names_our_program_left_on_a_device_and_nothing_else(lab: Lab) -> None:
    dev, peer = lab.veth(lab.name("xq"), lab.name("xt"))
    datapath = KernelDatapath(Path("/nonexistent-pin-dir"))
    assert datapath.ours(dev) is None
    left = XdpAttachment.attach(dev)
    left.abandon()  # attached, nothing owning it: as a killed afxdpd leaves a pod's
    try:
        assert datapath.ours(dev) == left.prog_id
    finally:
        detach_stale(dev)
    assert datapath.ours(dev) is None
    foreign_xdp(peer)
    assert datapath.ours(peer) is None  # someone else's
    assert datapath.ours(lab.name("xz")) is None  # not in our netns (in a pod's)


def test_attach_falls_back_to_generic_when_the_driver_has_no_native_xdp(lab: Lab) -> None:
    bridge = lab.bridge()  # the bridge driver has no native XDP: EOPNOTSUPP
    with pytest.raises(BpfError) as err:
        XdpAttachment.attach(bridge, AttachMode.NATIVE)
    assert err.value.errno == errno.EOPNOTSUPP
    att = XdpAttachment.attach(bridge)
    try:
        assert att.mode is AttachMode.GENERIC
        link = json.loads(ip("-j", "-d", "link", "show", bridge))[0]
        assert link["xdp"]["mode"] == 2  # XDP_ATTACHED_SKB
        assert link["xdp"]["prog"]["id"] == att.prog_id != 0
    finally:
        att.detach()
    assert libbpf.xdp_query_id(att.ifindex) == 0


def test_a_failed_detach_is_reported_and_can_be_retried(lab: Lab) -> None:
    dev, _ = lab.veth(lab.name("xe"), lab.name("xh"))
    att = XdpAttachment.attach(dev)
    try:
        # Without CAP_NET_ADMIN the kernel refuses the netlink request.
        with pytest.raises(BpfError) as err:
            without_capability("CAP_NET_ADMIN", att.detach)
        assert (err.value.op, err.value.errno) == ("bpf_xdp_detach", errno.EPERM)
        assert "bpf_xdp_detach" in str(err.value) and "[errno 1]" in str(err.value)
        # Nothing was detached, and nothing was forgotten: a retry finishes the job.
        assert libbpf.xdp_query_id(att.ifindex) == att.prog_id
    finally:
        att.detach()
    assert libbpf.xdp_query_id(att.ifindex) == 0


def xdp_prog_id(dev: str, netns: str) -> int | None:
    link = json.loads(ip("-j", "link", "show", dev, netns=netns))[0]
    prog_id: int | None = link.get("xdp", {}).get("prog", {}).get("id")
    return prog_id


def test_attach_and_detach_on_a_link_in_another_netns(lab: Lab) -> None:
    ns = lab.netns("afx")
    lab.veth("in0", "in1", netns=ns)
    where = Path("/run/netns") / ns
    att = XdpAttachment.attach("in0", netns=where)
    try:
        assert att.mode is AttachMode.NATIVE
        assert xdp_prog_id("in0", ns) == att.prog_id
        # The service's own netns has no such link, and was not touched.
        with pytest.raises(Exception, match="no such netdev"):
            XdpAttachment.attach("in0")
    finally:
        att.detach()
    assert xdp_prog_id("in0", ns) is None


def test_replace_ours_on_a_kernel_without_xdp_flags_replace_detaches_then_attaches(
    lab: Lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = libbpf.xdp_attach

    def before_5_7(
        ifindex: int, prog_fd: int, flags: libbpf.XdpFlags, replacing_fd: int | None = None
    ) -> None:
        if replacing_fd is not None:  # FAKE of a 5.4-5.6 kernel: the flag is unknown
            raise BpfError("bpf_xdp_attach", errno.EINVAL)
        real(ifindex, prog_fd, flags)

    monkeypatch.setattr("afxdp.bpf.xdp.xdp_attach", before_5_7)
    dev, _ = lab.veth(lab.name("xo"), lab.name("xp"))
    old = XdpAttachment.attach(dev)
    old.abandon()
    new = XdpAttachment.attach(dev, replace_ours=True)
    try:
        assert new.replaced == old.prog_id and new.mode is AttachMode.NATIVE
        assert libbpf.xdp_query_id(new.ifindex) == new.prog_id != old.prog_id
    finally:
        new.detach()
