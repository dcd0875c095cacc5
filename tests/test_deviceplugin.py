"""The device plugin end to end: the real service (grpclib servers on unix
sockets, netlink health, XDP, UDS) against the grpcio kubelet double, on real
veth pairs."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import grpc
import pytest

from afxdp import control
from afxdp.bpf import libbpf
from afxdp.datapath import MAP_IN_MAP
from afxdp.deviceplugin.v1beta1 import api_pb2 as dp
from afxdp.sockfile import file_id
from tests.kernel import Lab, foreign_xdp, ip
from tests.node import NodeUnderTest as Node
from tests.node import pool_config, running

pytestmark = [pytest.mark.privileged, pytest.mark.anyio]


@pytest.fixture
def devices(lab: Lab) -> Iterator[list[str]]:
    names = []
    for i in range(3):
        a, b = lab.veth(lab.name(f"dp{i}"), lab.name(f"dq{i}"))
        ip("link", "set", a, "up")
        ip("link", "set", b, "up")
        names.append(a)
    yield names


@pytest.fixture
def node(tmp_path: Path, lab: Lab, devices: list[str]) -> Node:
    return Node(tmp_path, lab, devices)


def health(resp: dp.ListAndWatchResponse) -> dict[str, str]:
    return {d.ID: d.health for d in resp.devices}


async def until(node: Node, stream: Any, want: dict[str, str]) -> dict[str, str]:
    """Read lists from the stream until one shows ``want``; that list. A read
    that times out is a quiet stream (lists come only on changes), not the end."""
    with anyio.fail_after(10):
        while True:
            try:
                got = health(await node.call(next, stream))
            except TimeoutError:
                continue
            if all(got.get(k) == v for k, v in want.items()):
                return got


async def test_registers_serving_first_and_advertises_preferred_allocation(node: Node) -> None:
    async with running(node):
        regs = await node.call(node.kubelet.wait_registrations, 1)
        assert len(regs) == 1
        reg = regs[0]
        assert (reg.version, reg.endpoint, reg.resource_name) == (
            "v1beta1",
            "afxdp-pool1.sock",
            "afxdp/pool1",
        )
        assert reg.options.get_preferred_allocation_available
        opts = await node.call(node.plugin().call, "GetDevicePluginOptions", dp.Empty())
        assert opts.get_preferred_allocation_available and not opts.pre_start_required
        resp = await node.call(
            node.plugin().call, "PreStartContainer", dp.PreStartContainerRequest()
        )
        assert isinstance(resp, dp.PreStartContainerResponse)
    # Shutdown removes our socket.
    assert not (node.kubelet.plugin_dir / "afxdp-pool1.sock").exists()


async def test_allocate_contents(node: Node) -> None:
    d0, d1, d2 = node.devices
    async with running(node):
        client = node.plugin()
        resp = await node.call(client.allocate, [d0], [d1, d2], [])
        first, second, empty = resp.container_responses
        assert dict(first.envs) == {"AFXDP_DEVICES_POOL1": d0}
        assert dict(second.envs) == {"AFXDP_DEVICES_POOL1": f"{d1} {d2}"}
        assert dict(empty.envs) == {"AFXDP_DEVICES_POOL1": ""} and not empty.mounts
        assert [(m.host_path, m.container_path, m.read_only) for m in second.mounts] == [
            # The device's directory, not the socket file: a socket a restarted
            # afxdpd re-creates stays visible to the pod.
            (str(node.paths.uds_dir / d), f"/tmp/afxdp_dp/{d}", False)
            for d in (d1, d2)
        ]
        for d in node.devices:
            # Listening when Allocate returned, and our program is on the link.
            assert (node.paths.uds_dir / d / "afxdp.sock").is_socket()
            assert libbpf.xdp_query_id(socket_index(d)) != 0
        status = await node.call(control.read_status, node.paths.run_dir)
        assert {a["device"]: a["xdp_mode"] for a in status["allocations"]} == dict.fromkeys(
            node.devices, "native"
        )
        assert {d["id"]: d["state"] for d in status["pools"][0]["devices"]} == dict.fromkeys(
            node.devices, "allocated"
        )
        empty_resp = await node.call(client.allocate)
        assert list(empty_resp.container_responses) == []
    # Shutdown takes everything back.
    for d in node.devices:
        assert libbpf.xdp_query_id(socket_index(d)) == 0
        assert not (node.paths.uds_dir / d).exists()


def socket_index(name: str) -> int:
    return socket.if_nametoindex(name)


async def test_allocate_errors_name_the_device_and_roll_back(node: Node) -> None:
    d0, d1, d2 = node.devices
    foreign = foreign_xdp(d2)
    try:
        async with running(node):
            client = node.plugin()
            await node.call(client.allocate, [d0])
            # d0 is held by a pod, so it is really busy.
            node.kubelet.hold("pod-a", "afxdp/pool1", d0)
            with pytest.raises(grpc.RpcError) as err:
                await node.call(client.allocate, [d1, "ghost", d0])
            assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION
            assert "ghost: unknown device in pool pool1" in err.value.details()
            assert f"{d0}: allocated" in err.value.details()
            stream = client.list_and_watch()
            ip("link", "set", d1, "down")
            await until(node, stream, {d1: "Unhealthy"})
            with pytest.raises(grpc.RpcError) as err:
                await node.call(client.allocate, [d1])
            assert f"{d1}: unhealthy" in err.value.details()
            ip("link", "set", d1, "up")
            await until(node, stream, {d1: "Healthy"})
            stream.cancel()
            # d2 carries someone else's program: no program of ours could be
            # prepared on it, so it is advertised Unhealthy with the reason, and
            # an Allocate naming it is refused before anything is done for d1.
            status = await node.call(control.read_status, node.paths.run_dir)
            by_id = {d["id"]: d for d in status["pools"][0]["devices"]}
            assert by_id[d2]["state"] == "unhealthy"
            assert f"another XDP program (id {foreign}) is attached" in by_id[d2]["fault"]
            with pytest.raises(grpc.RpcError) as err:
                await node.call(client.allocate, [d1, d2])
            assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION
            assert f"{d2}: unhealthy" in err.value.details()
            assert not (node.paths.uds_dir / d1).exists()
            states = {d["id"]: d["state"] for d in status["pools"][0]["devices"]}
            assert states == {d0: "allocated", d1: "free", d2: "unhealthy"}
            # And d1 is still usable.
            resp = await node.call(client.allocate, [d1])
            assert dict(resp.container_responses[0].envs) == {"AFXDP_DEVICES_POOL1": d1}
            assert libbpf.xdp_query_id(socket_index(d2)) == foreign  # theirs untouched
    finally:
        ip("link", "set", "dev", d2, "xdpgeneric", "off")


async def test_a_missed_release_is_reclaimed_when_no_pod_holds_the_device(node: Node) -> None:
    d0 = node.devices[0]
    async with running(node):
        client = node.plugin()
        await node.call(client.allocate, [d0])
        first_prog = libbpf.xdp_query_id(socket_index(d0))
        # The pod went away without a CNI DEL; kubelet offers d0 again.
        resp = await node.call(client.allocate, [d0])
        assert dict(resp.container_responses[0].envs) == {"AFXDP_DEVICES_POOL1": d0}
        assert node.service is not None
        now = libbpf.xdp_query_id(socket_index(d0))
        # A fresh program for the new pod (per-pod), or ours kept with a fresh
        # map in its slot (map-in-map).
        assert now != 0 and (now == first_prog) == (node.service.layout == MAP_IN_MAP)


async def test_list_and_watch_follows_real_link_state(node: Node) -> None:
    d0, d1, _ = node.devices
    async with running(node):
        stream = node.plugin().list_and_watch()
        try:
            first = await node.call(next, stream)
            assert health(first) == dict.fromkeys(node.devices, "Healthy")
            assert all(d.topology.nodes == [] or d.topology is not None for d in first.devices)
            ip("link", "set", d0, "down")
            await until(node, stream, {d0: "Unhealthy"})
            ip("link", "set", d0, "up")
            await until(node, stream, {d0: "Healthy"})
            peer = d1.replace("dp", "dq", 1)
            ip("link", "del", d1)  # removed
            await until(node, stream, {d1: "Unhealthy"})
            node.lab.veth(d1, peer)
            ip("link", "set", d1, "up")
            ip("link", "set", peer, "up")
            await until(node, stream, {d1: "Healthy"})
        finally:
            stream.cancel()


async def test_allocated_device_moved_into_a_pod_stays_healthy(node: Node) -> None:
    d0, d1, _ = node.devices
    pod = node.lab.netns("afdpod")
    async with running(node):
        stream = node.plugin().list_and_watch()
        try:
            await node.call(next, stream)
            await node.call(node.plugin().allocate, [d0])
            ip("link", "set", d0, "netns", pod)  # what the CNI does
            ip("link", "set", d1, "netns", pod)  # a free device taken by someone else
            update = await until(node, stream, {d1: "Unhealthy"})
            assert update[d0] == "Healthy"
            status = await node.call(control.read_status, node.paths.run_dir)
            assert {d["id"]: d["state"] for d in status["pools"][0]["devices"]}[d0] == "allocated"
        finally:
            stream.cancel()
            ip("link", "set", d0, "netns", str(os.getpid()), netns=pod)
            ip("link", "set", d1, "netns", str(os.getpid()), netns=pod)


async def test_an_allocation_sends_kubelet_no_device_list_only_a_health_change_does(
    node: Node,
) -> None:
    d0, d1, _ = node.devices
    async with running(node):
        stream = node.plugin().list_and_watch()
        try:
            assert health(await node.call(next, stream)) == dict.fromkeys(node.devices, "Healthy")
            await node.call(node.plugin().allocate, [d0])  # kubelet's view: unchanged
            ip("link", "set", d1, "down")
            # The very next list is the health change: no copy of the first one.
            assert health(await node.call(next, stream))[d1] == "Unhealthy"
        finally:
            stream.cancel()
            ip("link", "set", d1, "up")


async def test_kubelet_restart_reregisters_and_keeps_allocations(node: Node) -> None:
    d0 = node.devices[0]
    async with running(node):
        await node.call(node.kubelet.wait_registrations, 1)
        await node.call(node.plugin().allocate, [d0])
        node.kubelet.hold("pod-a", "afxdp/pool1", d0)
        # A restarting kubelet wipes the directory and comes back on a new socket.
        node.kubelet.stop()
        for sock in node.kubelet.plugin_dir.iterdir():
            sock.unlink()
        node.kubelet.start_registration()
        regs = await node.call(node.kubelet.wait_registrations, 2, 2.0)
        assert len(regs) == 2 and regs[1].endpoint == "afxdp-pool1.sock"
        stream = node.plugin().list_and_watch()
        try:
            assert health(await node.call(next, stream)) == dict.fromkeys(node.devices, "Healthy")
        finally:
            stream.cancel()
        with pytest.raises(grpc.RpcError) as err:
            await node.call(node.plugin().allocate, [d0])
        assert f"{d0}: allocated" in err.value.details()
        assert (node.paths.uds_dir / d0 / "afxdp.sock").is_socket()


async def test_a_live_socket_put_in_place_of_ours_is_waited_out_never_taken(
    node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    async with running(node):
        await node.call(node.kubelet.wait_registrations, 1)
        path = node.kubelet.plugin_dir / "afxdp-pool1.sock"
        # Another afxdpd with a pool of this name (one of an earlier version,
        # which took live sockets) puts its own socket at our path.
        path.unlink()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as other:
            other.bind(str(path))
            other.listen(4)
            theirs = file_id(path)
            with anyio.fail_after(10):
                while "serving again once it is gone" not in caplog.text:
                    await anyio.sleep(0.05)
            assert file_id(path) == theirs
            assert node.service is not None
            assert node.service.registrations["pool1"].registered is False
        # It is gone (its file stays behind, stale): ours is back, registered again.
        regs = await node.call(node.kubelet.wait_registrations, 2, 10.0)
        assert regs[1].endpoint == "afxdp-pool1.sock"
        await node.call(node.plugin().allocate, [node.devices[0]])  # served by us again


async def test_preferred_allocation(node: Node) -> None:
    d0, d1, d2 = node.devices
    async with running(node):
        req = dp.PreferredAllocationRequest(container_requests=[
            dp.ContainerPreferredAllocationRequest(available_deviceIDs=[d2, d1, d0],
                                                   must_include_deviceIDs=[d2], allocation_size=2)])  # fmt: skip
        resp = await node.call(node.plugin().call, "GetPreferredAllocation", req)
        assert list(resp.container_responses[0].deviceIDs) == [d2, *sorted([d0, d1])[:1]]


async def test_pinned_map_pool(tmp_path: Path, lab: Lab, devices: list[str]) -> None:
    d0 = devices[0]
    config = pool_config([d0], udsServerDisable=True, bpfMapPinningEnable=True, uid=1500)
    node = Node(tmp_path, lab, devices, config)
    async with running(node):
        resp = await node.call(node.plugin().allocate, [d0])
        (mount,) = resp.container_responses[0].mounts
        pin = node.paths.pin_dir / "pool1" / d0 / "xsks_map"
        assert (mount.host_path, mount.container_path) == (str(pin.parent), f"/tmp/afxdp_dp/{d0}")
        fd = libbpf.obj_get(pin)
        try:
            assert libbpf.map_info(fd).name == b"xsks_map"
        finally:
            os.close(fd)
        assert pin.stat().st_uid == 1500
        assert not (node.paths.uds_dir / d0).exists()  # no UDS server in this mode
    assert not pin.exists()
