"""The map-in-map datapath (bpf/slot.py, datapath.KernelDatapath.carry/give) on
real kernel objects: one program per device, a pod's fresh XSKMAP in its slot,
counters that are exact, control frames to the kernel; and the layout choice."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from afxdp import frames, metrics
from afxdp.bpf import libbpf, pinning, slot
from afxdp.bpf.xdp import XdpAttachment
from afxdp.config import load_config
from afxdp.datapath import (
    LAYOUT_ENV,
    MAP_IN_MAP,
    PER_POD,
    KernelDatapath,
    Program,
    choose_layout,
)
from afxdp.errors import ConfigError, DeviceError
from afxdp.metrics import Metrics
from afxdp.netns import run_in
from afxdp.uds.handshake import HostCheck
from afxdp.uds.server import UdsServer, socket_path
from afxdp.xsk import XskSocket
from tests.kernel import Lab, foreign_xdp
from tests.test_metrics import _get, _samples
from tests.test_xdp_e2e import (
    COUNT,
    PEER_IP,
    POD_IP,
    PORT,
    PodApp,
    in_netns,
    plug,
    run_pod,
    send_udp,
    unplug,
    wired,
)

__all__ = ["wired"]  # the fixture, used here


def test_the_per_pod_layout_is_chosen_by_the_environment_without_probing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_probe() -> str | None:
        raise AssertionError("probed")

    monkeypatch.setattr(slot, "probe", no_probe)
    assert choose_layout({LAYOUT_ENV: PER_POD})[0] == PER_POD


def test_a_kernel_that_refuses_map_in_map_runs_per_pod_unless_it_is_asked_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(slot, "probe", lambda: "refused (FAKE probe)")
    layout, why = choose_layout({})
    assert layout == PER_POD and "refused (FAKE probe)" in why
    with pytest.raises(ConfigError, match="kernel refuses it"):
        choose_layout({LAYOUT_ENV: MAP_IN_MAP})
    with pytest.raises(ConfigError, match="must be map-in-map or per-pod"):
        choose_layout({LAYOUT_ENV: "slots"})


def test_control_frames_are_off_by_default_and_a_pool_turns_them_on() -> None:
    doc = '{"pools": [{"name": "p", "mode": "primary", "devices": [{"name": "e0"}]%s}]}'
    assert not load_config(doc % "").config.pools[0].control_frames_to_kernel
    on = load_config(doc % ', "controlFramesToKernel": true').config.pools[0]
    assert on.control_frames_to_kernel


@pytest.mark.privileged
def test_this_kernel_takes_the_map_in_map_layout() -> None:
    assert slot.probe() is None
    assert choose_layout({})[0] == MAP_IN_MAP


def installed(carrier: Program, control: bool = False) -> Program:
    """A pod's handout, its map in the slot (afxdpd installs it in the background)."""
    given = carrier.give(control)
    given.install()
    return given


def _quiet_peer(peer_ns: str) -> None:
    """No IPv6 in the peer's netns: no neighbour discovery or MLD of its own
    reaches the device, so the counters hold only what a test sends."""
    for key in ("all", "default"):
        subprocess.run(in_netns(peer_ns, "sysctl", "-qw", f"net.ipv6.conf.{key}.disable_ipv6=1"),
                       check=True)  # fmt: skip


@pytest.mark.privileged
@pytest.mark.anyio
@pytest.mark.parametrize("how", ["uds", "pinned"])
async def test_a_pods_map_in_the_slot_receives_and_every_frame_is_counted(
    wired: tuple[str, str, str, str], tmp_path: Path, how: str
) -> None:
    dev, peer, pod_ns, peer_ns = wired
    _quiet_peer(peer_ns)
    datapath = KernelDatapath(tmp_path / "pins", MAP_IN_MAP)
    carrier = await anyio.to_thread.run_sync(datapath.carry, dev)
    given = await anyio.to_thread.run_sync(installed, carrier)
    path = pinning.map_path(tmp_path / "pins", "pool1", dev)
    app = None
    try:
        assert given.prog_id == carrier.prog_id == libbpf.xdp_query_id(carrier.ifindex)
        addressing = await anyio.to_thread.run_sync(plug, dev, peer, pod_ns, peer_ns)
        async with anyio.create_task_group() as tg:
            if how == "uds":
                server = UdsServer(netdev=dev, map_fd=given.map_fd,
                                   path=socket_path(tmp_path / "uds", dev),
                                   check_host=_anyone)  # fmt: skip
                server.listen()
                tg.start_soon(server.serve)
                where, host = str(server.path), "pod-x"
            else:
                datapath.pin(given, path, 0)
                where, host = str(path), "-"
            app = PodApp(pod_ns, how, where, host, dev, str(PORT), str(COUNT), *addressing)
            done = await run_pod(app, peer_ns)
            tg.cancel_scope.cancel()
        assert done["xsk"] == COUNT and done["kernel"] == 0, done
        # The 5 frames sent before the pod's socket was in its map passed to
        # the kernel, counted so; the rest went to the socket, every one.
        assert carrier.counters() == {(0, "no_socket"): 5, (0, "redirected"): COUNT}
    finally:
        if app:
            app.close()
        await anyio.to_thread.run_sync(unplug, dev, pod_ns)
        datapath.unpin(path)
        given.detach()
        carrier.detach()
        subprocess.run(["umount", str(tmp_path / "pins")], check=False)
    assert libbpf.xdp_query_id(carrier.ifindex) == 0


async def _anyone(host: str) -> HostCheck:
    return HostCheck.OK


@pytest.mark.privileged
def test_taking_back_empties_the_slot_and_the_next_pod_gets_a_fresh_map(lab: Lab) -> None:
    dev, _ = lab.veth(lab.name("sa"), lab.name("sb"))
    carrier = KernelDatapath(Path("/nonexistent"), MAP_IN_MAP).carry(dev)
    try:
        prog = libbpf.xdp_query_id(carrier.ifindex)
        first = installed(carrier)
        first_id = libbpf.map_info(first.map_fd).id
        assert libbpf.map_lookup_u32(carrier.map_fd, 0) == first_id
        first.detach()
        assert libbpf.map_lookup_u32(carrier.map_fd, 0) is None  # frames go to the kernel
        second = carrier.give(False)  # fast: no map of maps changes yet
        assert libbpf.map_lookup_u32(carrier.map_fd, 0) is None
        second.install()  # the slow part (a grace period): afxdpd's background
        second_id = libbpf.map_info(second.map_fd).id
        assert second_id != first_id
        assert libbpf.map_lookup_u32(carrier.map_fd, 0) == second_id
        # A take-back that comes late, after the next pod's map went in (its
        # pod's map still open), never empties the next pod's slot.
        third = installed(carrier)
        third_id = libbpf.map_info(third.map_fd).id
        second.detach()
        assert libbpf.map_lookup_u32(carrier.map_fd, 0) == third_id
        # No program change for any pod.
        assert libbpf.xdp_query_id(carrier.ifindex) == prog == carrier.prog_id
        third.detach()
        assert libbpf.map_lookup_u32(carrier.map_fd, 0) is None
    finally:
        carrier.detach()
    assert libbpf.xdp_query_id(carrier.ifindex) == 0


@pytest.mark.privileged
def test_a_restart_finds_the_pods_map_and_a_free_device_keeps_its_program(lab: Lab) -> None:
    dev, _ = lab.veth(lab.name("sr"), lab.name("ss"))
    datapath = KernelDatapath(Path("/nonexistent"), MAP_IN_MAP)
    carrier = datapath.carry(dev)
    given = installed(carrier)
    pods_map = libbpf.map_info(given.map_fd).id
    given.abandon()  # afxdpd stops (or is killed): the pod's map stays in the slot
    adopted = datapath.adopt(dev, carrier.prog_id)
    try:
        assert adopted.carrier is not None
        assert libbpf.map_info(adopted.map_fd).id == pods_map  # what the handshake sends
        adopted.abandon()
        # The allocation ended while afxdpd was down: the device's program is
        # taken as it is (no program change) and the old pod's map leaves the slot.
        again = datapath.carry(dev)
        assert again.prog_id == carrier.prog_id and again.replaced is None
        assert libbpf.map_lookup_u32(again.map_fd, 0) is None
    finally:
        assert datapath.detach_stale(dev) == carrier.prog_id
    assert libbpf.xdp_query_id(carrier.ifindex) == 0


@pytest.mark.privileged
def test_carry_refuses_a_foreign_program(lab: Lab) -> None:
    dev, _ = lab.veth(lab.name("sf"), lab.name("sg"))
    theirs = foreign_xdp(dev)
    with pytest.raises(DeviceError, match="another XDP program"):
        KernelDatapath(Path("/nonexistent"), MAP_IN_MAP).carry(dev)
    assert libbpf.xdp_query_id(socket.if_nametoindex(dev)) == theirs


ARP_PROBE = r"""
import socket, struct, sys, time
dev, src_ip, dst_ip = sys.argv[1:4]
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806))
s.bind((dev, 0))
mac = s.getsockname()[4]
ip = lambda a: socket.inet_aton(a)
frame = (b"\xff" * 6 + mac + b"\x08\x06" + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1)
         + mac + ip(src_ip) + b"\x00" * 6 + ip(dst_ip))
s.send(frame)
s.settimeout(0.2)
deadline = time.monotonic() + 3
while time.monotonic() < deadline:
    try:
        got = s.recv(2048)
    except TimeoutError:
        continue
    if got[20:22] == b"\x00\x02" and got[28:32] == ip(dst_ip):
        print("reply", flush=True)
        break
else:
    print("none", flush=True)
"""


@pytest.mark.privileged
@pytest.mark.parametrize("control", [True, False])
def test_arp_reaches_the_kernel_past_a_bound_socket_when_control_frames_are_on(
    wired: tuple[str, str, str, str], control: bool
) -> None:
    dev, peer, pod_ns, peer_ns = wired
    _quiet_peer(peer_ns)
    carrier = KernelDatapath(Path("/nonexistent"), MAP_IN_MAP).carry(dev)
    given = installed(carrier, control)
    xsk = None
    try:
        plug(dev, peer, pod_ns, peer_ns)
        # The pod's socket on queue 0, where the frames arrive (a veth of one queue).
        xsk = run_in(Path(f"/run/netns/{pod_ns}"), XskSocket, dev, 0)
        libbpf.map_update_u32(given.map_fd, 0, xsk.fileno())
        probe = subprocess.run(
            in_netns(peer_ns, sys.executable, "-c", ARP_PROBE, peer, PEER_IP, POD_IP),
            capture_output=True, text=True, check=True, timeout=30,
        )  # fmt: skip
        if control:  # the pod's kernel answered, the frame counted as control
            assert (probe.stdout.strip(), carrier.counters()) == ("reply", {(0, "control"): 1})
        else:  # the socket took it: nobody answered
            assert (probe.stdout.strip(), carrier.counters()) == ("none", {(0, "redirected"): 1})
    finally:
        if xsk is not None:
            xsk.close()
        unplug(dev, pod_ns)
        given.detach()
        carrier.detach()


KERNEL_RECEIVER = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
print("ready", flush=True)
s.settimeout(5)
got = 0
try:
    while got < int(sys.argv[2]):
        s.recv(2048)
        got += 1
except TimeoutError:
    pass
print(got, flush=True)
"""


@pytest.mark.privileged
@pytest.mark.anyio
async def test_frames_with_no_socket_on_their_queue_reach_the_kernel_and_metrics_count_them(
    wired: tuple[str, str, str, str],
) -> None:
    dev, peer, pod_ns, peer_ns = wired
    _quiet_peer(peer_ns)
    carrier = await anyio.to_thread.run_sync(KernelDatapath(Path("/x"), MAP_IN_MAP).carry, dev)
    given = await anyio.to_thread.run_sync(installed, carrier)
    m = Metrics.create()

    async def read() -> list[frames.DeviceFrames]:
        return await frames.read([("pool1", dev, given)])

    m.read_frames = read
    receiver = None
    try:
        await anyio.to_thread.run_sync(plug, dev, peer, pod_ns, peer_ns)
        receiver = subprocess.Popen(
            in_netns(pod_ns, sys.executable, "-c", KERNEL_RECEIVER, str(PORT), "40"),
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert receiver.stdout is not None
        assert receiver.stdout.readline().strip() == "ready"
        await anyio.to_thread.run_sync(send_udp, peer_ns, 40)
        assert int(await anyio.to_thread.run_sync(receiver.stdout.readline)) == 40
        async with anyio.create_task_group() as tg:
            _host, port = await tg.start(
                lambda task_status: metrics.serve("127.0.0.1:0", m, lambda: (True, ""),
                                                  task_status=task_status)
            )  # fmt: skip
            status, body = await anyio.to_thread.run_sync(_get, port, "/metrics")
            tg.cancel_scope.cancel()
        assert status == 200
        counted = {labels: n for (name, labels), n in _samples(body).items()
                   if name == "afxdp_xdp_frames_total"}  # fmt: skip
        key = (("action", "no_socket"), ("device", dev), ("pool", "pool1"), ("queue", "0"))
        assert counted == {key: 40}
    finally:
        if receiver is not None:
            receiver.kill()
            receiver.wait()
        await anyio.to_thread.run_sync(unplug, dev, pod_ns)
        given.detach()
        carrier.detach()


@pytest.mark.privileged
def test_either_layout_replaces_the_other_layouts_program_left_on_a_free_device(lab: Lab) -> None:
    dev, _ = lab.veth(lab.name("sl"), lab.name("sm"))
    index = socket.if_nametoindex(dev)
    left = XdpAttachment.attach(dev)  # a per-pod run's program, left behind
    left.abandon()
    carrier = KernelDatapath(Path("/x"), MAP_IN_MAP).carry(dev)
    assert carrier.replaced == left.prog_id  # in one change
    assert libbpf.xdp_query_id(index) == carrier.prog_id
    carrier.abandon()  # and back: a per-pod run replaces the slot program
    program = KernelDatapath(Path("/x"), PER_POD).attach(dev)
    try:
        assert program.replaced == carrier.prog_id
    finally:
        program.detach()
    assert libbpf.xdp_query_id(index) == 0
