"""Device health as kubelet sees it on ListAndWatch, and NUMA topology: the real
service against the grpcio kubelet double, on real veth pairs."""

from __future__ import annotations

import json
import logging
import socket
import struct
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import grpc
import pytest

from afxdp import control, inventory, logsetup
from afxdp.bpf import libbpf
from afxdp.datapath import LAYOUT_ENV, MAP_IN_MAP, PER_POD
from afxdp.deviceplugin.v1beta1 import api_pb2 as dp
from afxdp.netwatch import Change, LinkEvent, NetWatch
from tests.kernel import Lab, ip
from tests.node import NodeUnderTest as Node
from tests.node import running
from tests.test_deviceplugin import health, socket_index, until

pytestmark = [pytest.mark.privileged, pytest.mark.anyio]


@pytest.fixture
def devices(lab: Lab) -> Iterator[list[str]]:
    names = []
    for i in range(3):
        a, b = lab.veth(lab.name(f"hl{i}"), lab.name(f"hm{i}"))
        ip("link", "set", a, "up")
        ip("link", "set", b, "up")
        names.append(a)
    yield names


@pytest.fixture
def node(tmp_path: Path, lab: Lab, devices: list[str]) -> Node:
    return Node(tmp_path, lab, devices)


async def test_removed_allocated_device_is_marked_unhealthy_and_the_json_log_names_it(
    node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="afxdp")
    d0, d1, _ = node.devices
    async with running(node):
        stream = node.plugin().list_and_watch()
        try:
            assert health(await node.call(next, stream)) == dict.fromkeys(node.devices, "Healthy")
            await node.allocate(d0, d1)
            ip("link", "set", d1, "down")  # the CNI's doing: an allocated link is the pod's
            ip("link", "del", d0)  # destroyed: no pod can use it any more
            got = await until(node, stream, {d0: "Unhealthy"})
            assert got[d1] == "Healthy"
            states = await node.states()
            assert states[d0] == "unhealthy" and states[d1] == "allocated"
        finally:
            stream.cancel()
    # The lines about the Allocate and the link's removal, as JSON lines: the
    # pool and the device are fields of their own, not only words in the message.
    lines = [json.loads(logsetup.JsonFormatter().format(r)) for r in caplog.records]
    (allocated,) = [j for j in lines if "allocated" in j["message"]]
    assert (allocated["pool"], allocated["device"]) == ("pool1", f"{d0},{d1}")
    removed = [j for j in lines if j.get("device") == d0 and "removed" in j["message"]]
    assert removed and all(j["pool"] == "pool1" for j in removed)


async def test_lost_netlink_events_are_recovered_by_rereading_link_health(
    node: Node, lab: Lab, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    d0, d1, d2 = node.devices
    noise, _ = lab.veth(lab.name("hn"), lab.name("ho"))
    # The kernel's smallest receive buffer: a few link messages fill it.
    monkeypatch.setattr(NetWatch, "RCVBUF", 1)
    caplog.set_level(logging.WARNING, logger="afxdp.netwatch")
    async with running(node):
        stream = node.plugin().list_and_watch()
        try:
            assert health(await node.call(next, stream)) == dict.fromkeys(node.devices, "Healthy")
            # Run on the event loop itself, so the watcher cannot read while the
            # burst overflows its socket: d0 going down comes last, when the queue
            # is full, so its event is lost for sure and only a re-read finds it.
            batch = "".join(f"link set {noise} {('up', 'down')[i % 2]}\n" for i in range(40))
            subprocess.run(["ip", "-batch", "-"], input=batch + f"link set {d0} down\n",
                           text=True, check=True, timeout=10)  # fmt: skip
            got = await until(node, stream, {d0: "Unhealthy"})
            assert got[d1] == got[d2] == "Healthy"
            assert "netlink events were lost" in caplog.text
            # And the watch goes on after the resync.
            ip("link", "set", d0, "up")
            await until(node, stream, {d0: "Healthy"})
        finally:
            stream.cancel()


@asynccontextmanager
async def watching(
    deliver: Callable[[LinkEvent], None],
    resync: Callable[[], Awaitable[None]],
    watch: NetWatch | None = None,
) -> AsyncIterator[None]:
    """A NetWatch (``watch``, or a new one) delivering to ``deliver`` while the block runs."""
    if watch is None:
        watch = NetWatch()
        watch.open()
    async with anyio.create_task_group() as tg:
        tg.start_soon(watch.run, deliver, resync)
        yield
        tg.cancel_scope.cancel()


async def test_a_link_event_whose_handling_fails_is_logged_and_the_watch_goes_on(
    lab: Lab, caplog: pytest.LogCaptureFixture
) -> None:
    dev, _ = lab.veth(lab.name("hw"), lab.name("hx"))
    seen: list[LinkEvent] = []
    resyncs = []

    def deliver(event: LinkEvent) -> None:
        if event.name != dev:
            return
        seen.append(event)
        if len(seen) == 1:
            raise KeyError("a bug in the health bookkeeping")

    async def resync() -> None:
        resyncs.append(len(seen))

    caplog.set_level(logging.ERROR, logger="afxdp.netwatch")
    async with watching(deliver, resync):
        with anyio.fail_after(10):
            ip("link", "set", dev, "up")
            while not resyncs:
                await anyio.sleep(0.01)
            ip("link", "set", dev, "down")  # delivered: the watch went on
            while not any(e.change is Change.DOWN for e in seen):
                await anyio.sleep(0.01)
    assert resyncs == [1]
    assert "handling link events failed; re-reading links" in caplog.text
    assert "a bug in the health bookkeeping" in caplog.text


async def test_a_failed_re_read_of_the_links_is_tried_again_and_events_still_flow(
    lab: Lab, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("afxdp.netwatch.RESYNC_RETRY", 0.05)
    dev, _ = lab.veth(lab.name("hr"), lab.name("hs"))
    seen: list[LinkEvent] = []
    resyncs: list[bool] = []  # whether each attempt succeeded

    def deliver(event: LinkEvent) -> None:
        if event.name == dev:
            seen.append(event)
            if len(seen) == 1:
                raise KeyError("a bug in the health bookkeeping")  # asks for a re-read

    async def resync() -> None:
        resyncs.append(len(resyncs) > 0)
        if not resyncs[-1]:
            raise OSError(105, "No buffer space available")  # the first one fails

    caplog.set_level(logging.ERROR, logger="afxdp.netwatch")
    async with watching(deliver, resync):
        with anyio.fail_after(10):
            ip("link", "set", dev, "up")
            while resyncs != [False, True]:  # tried again on its own, no event needed
                await anyio.sleep(0.01)
            ip("link", "set", dev, "down")
            while not any(e.change is Change.DOWN for e in seen):
                await anyio.sleep(0.01)
    assert "re-reading links failed; trying again in 0.05 s" in caplog.text


def fake_numa(sysfs: Path, numa: dict[str, int]) -> None:
    """A FAKE sysfs where each named netdev has a device on a NUMA node (veths have none)."""
    for name, node_id in numa.items():
        device = sysfs / "class" / "net" / name / "device"
        device.mkdir(parents=True)
        (device / "numa_node").write_text(f"{node_id}\n")


async def test_numa_nodes_from_sysfs_reach_list_and_watch_and_status(
    node: Node, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    d0, d1, d2 = node.devices
    fake_numa(tmp_path / "sys", {d0: 0, d1: 1})  # d2: no NUMA node (numa_node -1 or absent)
    monkeypatch.setattr(inventory, "SYSFS", tmp_path / "sys")
    async with running(node):
        stream = node.plugin().list_and_watch()
        try:
            first = await node.call(next, stream)
        finally:
            stream.cancel()
        topology = {d.ID: [n.ID for n in d.topology.nodes] for d in first.devices}
        assert topology == {d0: [0], d1: [1], d2: []}
        by_id = {d.ID: d for d in first.devices}
        assert not by_id[d2].HasField("topology")  # no NUMA node: no topology at all
        status = await node.call(control.read_status, node.paths.run_dir)
        assert {d["id"]: d["numa"] for d in status["pools"][0]["devices"]} == {
            d0: 0,
            d1: 1,
            d2: None,
        }


async def test_preferred_allocation_keeps_to_the_numa_node_of_the_devices(
    node: Node, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    d0, d1, d2 = node.devices  # by name d0 < d1 < d2: NUMA must beat name order
    fake_numa(tmp_path / "sys", {d0: 0, d1: 1, d2: 1})
    monkeypatch.setattr(inventory, "SYSFS", tmp_path / "sys")

    def request(must: list[str]) -> dp.PreferredAllocationRequest:
        return dp.PreferredAllocationRequest(container_requests=[
            dp.ContainerPreferredAllocationRequest(
                available_deviceIDs=[d0, d1, d2], must_include_deviceIDs=must, allocation_size=2)])  # fmt: skip

    async with running(node):
        client = node.plugin()
        # The must-include device's node decides.
        resp = await node.call(client.call, "GetPreferredAllocation", request([d2]))
        assert list(resp.container_responses[0].deviceIDs) == [d2, d1]
        # Without one, the node with the most candidates does.
        resp = await node.call(client.call, "GetPreferredAllocation", request([]))
        assert list(resp.container_responses[0].deviceIDs) == [d1, d2]
        resp = await node.call(client.call, "GetPreferredAllocation", request([d0]))
        assert list(resp.container_responses[0].deviceIDs) == [d0, d1]


async def test_netlink_messages_not_from_the_kernel_are_ignored(lab: Lab) -> None:
    dev, _ = lab.veth(lab.name("hf"), lab.name("hg"))
    seen: list[LinkEvent] = []

    async def resync() -> None:
        pass

    watch = NetWatch()
    watch.open()
    assert watch._sock is not None
    port = watch._sock.getsockname()[0]
    # A local process speaking as the kernel: "dev was destroyed".
    body = struct.pack("=BxHiII", 0, 1, 7, 0, 0)
    name = dev.encode() + b"\0"
    attr = struct.pack("=HH", 4 + len(name), 3) + name + b"\0" * (-len(name) % 4)
    msg = struct.pack("=IHHII", 16 + len(body) + len(attr), 17, 0, 0, 0) + body + attr
    async with watching(seen.append, resync, watch):
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0) as liar:
            liar.sendto(msg, (port, 0))
        with anyio.fail_after(10):
            ip("link", "set", dev, "up")  # a real event after it
            while not any(e.name == dev for e in seen):
                await anyio.sleep(0.01)
    assert Change.REMOVED not in [e.change for e in seen if e.name == dev]
    assert watch.foreign == 1


@pytest.fixture(params=[MAP_IN_MAP, PER_POD])
def layout(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The datapath layout the service runs with, forced (both are tested)."""
    monkeypatch.setenv(LAYOUT_ENV, request.param)
    return str(request.param)


async def _device_status(node: Node, device: str) -> dict[str, object]:
    status = await node.call(control.read_status, node.paths.run_dir)
    [dev] = [d for p in status["pools"] for d in p["devices"] if d["id"] == device]
    return dict(dev)


async def _until_status(node: Node, device: str, done: Callable[[dict[str, object]], bool]
                        ) -> dict[str, object]:  # fmt: skip
    """The device's status once ``done`` holds for it (status has no change stream)."""
    with anyio.fail_after(10):
        while not done(dev := await _device_status(node, device)):
            await anyio.sleep(0.02)
    return dev


async def _until_off(index: int) -> None:
    """Until no XDP program is on link ``index`` (taken off in the background)."""
    with anyio.fail_after(10):
        while libbpf.xdp_query_id(index):
            await anyio.sleep(0.02)


async def test_a_free_devices_link_renamed_is_withdrawn_and_our_program_leaves_it(
    node: Node, lab: Lab, layout: str
) -> None:
    """Issue 19 review, attack 8: a free device's link renamed is no longer
    the device (Unhealthy, status saying why, never handed out), and the
    program we prepared on it is taken off the renamed link; a link named
    the device later is a new one, prepared as any."""
    d0, d1, _ = node.devices
    renamed = lab.name("hrn")
    async with running(node):
        stream = node.plugin().list_and_watch()
        try:
            assert health(await node.call(next, stream)) == dict.fromkeys(node.devices, "Healthy")
            await _until_status(node, d1, lambda d: bool(d["prepared"]))
            index = socket_index(d1)
            assert libbpf.xdp_query_id(index)
            ip("link", "set", d1, "name", renamed)
            lab.host_links.append(renamed)
            got = await until(node, stream, {d1: "Unhealthy"})
            assert got[d0] == "Healthy"
            dev = await _device_status(node, d1)
            assert dev["fault"] == f"its link was renamed to {renamed}" and not dev["prepared"]
            await _until_off(index)  # the renamed link carries nothing of ours
            with pytest.raises(grpc.RpcError, match=f"{d1}: unhealthy"):
                await node.allocate(d1)
            # A new link under the device's name: a new device, prepared as any.
            lab.veth(d1, lab.name("hnw"))
            ip("link", "set", d1, "up")
            ip("link", "set", lab.name("hnw"), "up")
            await until(node, stream, {d1: "Healthy"})
            dev = await _until_status(node, d1, lambda d: bool(d["prepared"]))
            assert dev["fault"] is None
            assert libbpf.xdp_query_id(socket_index(d1)) == dev["xdp_prog_id"]
            assert libbpf.xdp_query_id(index) == 0
        finally:
            stream.cancel()


async def test_an_allocated_devices_link_renamed_says_so_and_loses_the_pods_program_at_the_end(
    node: Node, lab: Lab, layout: str
) -> None:
    """Issue 19 review, attack 7: an allocated device's link renamed while its
    pod holds it is a fault status shows; when the allocation ends, the pod's
    program is taken off the renamed link (by its index: no link of the
    device's name will ever bring it home)."""
    d0, d1, _ = node.devices
    renamed = lab.name("hrm")
    async with running(node):
        assert node.service is not None and node.service.devices is not None
        stream = node.plugin().list_and_watch()
        try:
            assert health(await node.call(next, stream)) == dict.fromkeys(node.devices, "Healthy")
            await node.allocate(d0)
            node.kubelet.hold("pod-a", "afxdp/pool1", d0)
            index = socket_index(d0)
            assert libbpf.xdp_query_id(index)
            ip("link", "set", d0, "name", renamed)
            lab.host_links.append(renamed)
            got = await until(node, stream, {d0: "Unhealthy"})
            assert got[d1] == "Healthy"
            dev = await _device_status(node, d0)
            assert dev["fault"] == f"its link was renamed to {renamed}"
            assert libbpf.xdp_query_id(index)  # still the pod's, while it holds the device
            node.kubelet.pods.clear()  # the pod ends
            assert await node.service.devices.reconcile(grace=0.0) == [d0]
            assert libbpf.xdp_query_id(index) == 0
            assert await node.states() == {d0: "unhealthy", d1: "free", node.devices[2]: "free"}
        finally:
            stream.cancel()
