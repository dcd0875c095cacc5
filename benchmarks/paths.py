"""A small node (a few pooled veths): the latencies a pod waits on, each
interleaved round by round with its baseline so that both see the same load
(but Allocate, see below).

- allocate: Allocate of a distinct free device through grpcio, as kubelet
  does for a new pod, one after another; then as many of our program attached
  natively by bare libbpf calls (open, load, bpf_xdp_attach) on a veth of the
  same node (alternated, a bare attach's detach left kernel work on the next
  Allocate).
- allocate_reused: Allocate of a device whose last pod ended about a second
  before, as on a node that recycles NICs: pod A is allocated the device, its
  shim ADD and DEL run, kubelet forgets A, and a second later (afxdpd's
  reconcile has not run: it leaves allocations younger than its grace alone)
  kubelet Allocates the same device to pod B, so afxdpd still counts it
  allocated and reclaims it inline, asking kubelet's PodResources. Beside the
  Allocate of a free, prepared device above (allocate).

- cni_add_del: ADD then DEL through the installed shim with host-local IPAM,
  on a device allocated to the pod; beside Debian's host-device plugin doing
  the same veth move with the same IPAM, and the kernel's floor: the same veth
  moved into the netns and back with two netlink requests and nothing else.
- handshake: connect to /fin_ack (connect, version, xsk_map_fd, fin) on the
  device's socket as the pod kubelet lists; beside the same four messages
  echoed by a bare SEQPACKET server in its own process.
- handshake_first: pods one after another on one device, as a node recycles
  a NIC: kubelet forgets the last pod, Allocate for the next (reclaiming the
  device), its shim ADD, then its first handshake, at once after the ADD as a
  pod's app starts; beside the same pod's next handshake, right after it.
- health: link down to Unhealthy arriving on kubelet's ListAndWatch stream;
  beside the kernel's own RTM_NEWLINK reaching a bare netlink socket.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from pyroute2 import IPRoute

from afxdp.cni import shim
from afxdp.uds.client import UdsClient
from afxdp.workers import Work, run_program, run_sync
from benchmarks.node import BenchError, BenchNode, host_socket, veths
from benchmarks.scale import raw_attach_ms

CNI_PATH = "/usr/lib/cni"
WARM_PODS = 3  # lifecycles before handshake_first (and allocate_reused) is timed
# How long before the next pod's Allocate the last pod on a device ended: the
# scenario (issue 20's node), not a wait for an outcome. Below afxdpd's
# reconcile grace, so its Allocate finds the device still allocated.
REUSE_GAP_S = 1.0
HERE = Path(__file__).parent


@dataclass
class PathsRun:
    startup_s: float = 0.0
    devices: int = 0
    cni_ms: list[float] = field(default_factory=list)
    host_device_ms: list[float] = field(default_factory=list)
    move_floor_ms: list[float] = field(default_factory=list)
    allocate_ms: list[float] = field(default_factory=list)
    raw_attach_ms: list[float] = field(default_factory=list)
    allocate_reused_ms: list[float] = field(default_factory=list)
    handshake_ms: list[float] = field(default_factory=list)
    handshake_first_ms: list[float] = field(default_factory=list)
    handshake_next_ms: list[float] = field(default_factory=list)
    echo_ms: list[float] = field(default_factory=list)
    health_ms: list[float] = field(default_factory=list)
    netlink_ms: list[float] = field(default_factory=list)


def ipam(work: Path, subnet: str) -> dict[str, Any]:
    return {"type": "host-local", "ranges": [[{"subnet": f"{subnet}.0/24"}]],
            "dataDir": str(work / "ipam")}  # fmt: skip


async def plugin(binary: Path, command: str, conf: dict[str, Any], *, netns: str, pod: str,
                 cni_path: str) -> None:  # fmt: skip
    env = {"CNI_COMMAND": command, "CNI_CONTAINERID": pod, "CNI_NETNS": f"/run/netns/{netns}",
           "CNI_IFNAME": "net1", "CNI_PATH": cni_path,
           "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={pod}",
           "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")}  # fmt: skip
    done = await run_program([str(binary)], stdin=json.dumps(conf).encode(), env=env, timeout=30)
    if done.returncode != 0:
        raise BenchError(f"{binary.name} {command}: {done.stdout.decode()} {done.stderr.decode()}")


async def add_del(binary: Path, conf: dict[str, Any], netns: str, pod: str, cni_path: str) -> float:
    t0 = time.perf_counter()
    await plugin(binary, "ADD", conf, netns=netns, pod=pod, cni_path=cni_path)
    await plugin(binary, "DEL", conf, netns=netns, pod=pod, cni_path=cni_path)
    return (time.perf_counter() - t0) * 1000


class MoveFloor:
    """The kernel's floor of a CNI ADD+DEL: the veth into the netns and back,
    one netlink request each, on sockets opened once (one per netns)."""

    def __init__(self, device: str, netns: str) -> None:
        self.device = device
        self.ns_path = Path(f"/run/netns/{netns}")
        self.host = IPRoute()
        self.pod = IPRoute(netns=netns)  # its socket lives in the pod's netns
        self.host_fd = os.open("/proc/self/ns/net", os.O_RDONLY)
        self.pod_fd = os.open(self.ns_path, os.O_RDONLY)

    def round_trip_ms(self) -> float:
        idx = self.host.link_lookup(ifname=self.device)[0]
        t0 = time.perf_counter()
        self.host.link("set", index=idx, net_ns_fd=self.pod_fd)
        t1 = time.perf_counter()
        idx = self.pod.link_lookup(ifname=self.device)[0]  # not timed: the CNI knows it
        t2 = time.perf_counter()
        self.pod.link("set", index=idx, net_ns_fd=self.host_fd)
        t3 = time.perf_counter()
        return ((t1 - t0) + (t3 - t2)) * 1000

    def close(self) -> None:
        self.host.close()
        self.pod.close()
        os.close(self.host_fd)
        os.close(self.pod_fd)


def handshake_ms(path: Path, pod: str, device: str) -> float:
    t0 = time.perf_counter()
    with UdsClient(path) as c:
        c.connect(pod)
        c.version()
        fd = c.xsk_map_fd(device)
        c.fin()
    elapsed = (time.perf_counter() - t0) * 1000
    os.close(fd)
    return elapsed


def echo_ms(path: Path, pod: str, device: str) -> float:
    t0 = time.perf_counter()
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.connect(str(path))
        for msg in (f"/connect,{pod}", "/version", f"/xsk_map_fd,{device}", "/fin"):
            s.send(msg.encode())
            s.recv(128)
    return (time.perf_counter() - t0) * 1000


class NetlinkFloor:
    """A bare rtnetlink socket on RTMGRP_LINK, timestamping each message as it arrives."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)
        self.sock.bind((0, 1))  # RTMGRP_LINK
        self.sock.settimeout(0.1)
        self.arrivals: list[float] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="netlink-floor")
        self.thread.start()

    def _loop(self) -> None:
        while not self.stop.is_set():
            try:
                self.sock.recv(1 << 16)
            except TimeoutError:
                continue
            self.arrivals.append(time.perf_counter())

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.sock.close()


async def measure(work: Path, allocations: int, rounds: int, sessions: int,
                  events: int, *, pods: int, reused: int) -> PathsRun:  # fmt: skip
    tag = secrets.token_hex(3)
    cni_dev, hd_dev, floor_dev = f"bpc{tag}", f"bph{tag}", f"bpf{tag}"
    hs_dev, health_dev, raw_dev = f"bpk{tag}", f"bpl{tag}", f"bpr{tag}"
    first_dev, reused_dev = f"bpn{tag}", f"bpu{tag}"
    fresh = [f"bpa{tag}{i:03d}" for i in range(allocations)]  # one per timed Allocate
    pooled = [cni_dev, hs_dev, health_dev, first_dev, reused_dev, *fresh]
    out = PathsRun(devices=len(pooled))
    async with AsyncExitStack() as stack:
        await veths(stack, [*pooled, hd_dev, floor_dev, raw_dev], f"afxdp-bench-{tag}-wire")
        node = BenchNode(work, pooled)
        out.startup_s = await node.start(stack)
        await node.settle()
        # Distinct free devices one after another, as kubelet admits new pods;
        # then as many attaches of the same program by bare libbpf calls. Not
        # one of each in turn: a bare attach's detach leaves the kernel work
        # that follows a grace period (the program's free, text patching) to
        # land on the next Allocate (+2 ms at p50 when they alternated).
        for dev in fresh:
            t0 = time.perf_counter()
            await node.allocate(dev, f"bench-{tag}-{dev}")
            out.allocate_ms.append((time.perf_counter() - t0) * 1000)
        for _ in fresh:
            out.raw_attach_ms.append(await run_sync(Work.DEVICES, raw_attach_ms, raw_dev))
        bench = Bench(stack, node, work, tag, out)
        await reused_allocates(bench, reused_dev, reused)
        await cni(bench, rounds, (cni_dev, hd_dev, floor_dev))
        await handshake(bench, hs_dev, sessions)
        await first_handshakes(bench, first_dev, pods)
        await health(node, health_dev, events, out)
    return out


@dataclass
class Bench:
    """What each measurement of the small node shares."""

    stack: AsyncExitStack
    node: BenchNode
    work: Path
    tag: str
    out: PathsRun


async def cni(b: Bench, rounds: int, devs: tuple[str, str, str]) -> None:
    stack, node, work, tag, out = b.stack, b.node, b.work, b.tag, b.out
    cni_dev, hd_dev, floor_dev = devs
    netns, pod = f"afxdp-bench-{tag}-pod", f"bench-{tag}-cni"
    await run_program(["ip", "netns", "add", netns], timeout=10, work=Work.NETLINK)
    stack.push_async_callback(run_program, ["ip", "netns", "del", netns], timeout=10)
    bin_dir = work / "cni-bin"
    shim.install(bin_dir, [node.run_dir])
    await node.allocate(cni_dev, pod)
    ours = {"cniVersion": "1.0.0", "name": "afxdp-bench", "type": shim.NAME, "mode": "primary",
            "deviceID": cni_dev, "ipam": ipam(work, "10.91.1")}  # fmt: skip
    hd = {"cniVersion": "1.0.0", "name": "hostdev-bench", "type": "host-device",
          "device": hd_dev, "ipam": ipam(work, "10.91.2")}  # fmt: skip
    floor = await run_sync(Work.NETLINK, MoveFloor, floor_dev, netns)
    try:
        for _ in range(rounds):
            out.cni_ms.append(await add_del(bin_dir / shim.NAME, ours, netns, pod,
                                            f"{bin_dir}:{CNI_PATH}"))  # fmt: skip
            out.host_device_ms.append(await add_del(Path(CNI_PATH) / "host-device", hd, netns,
                                                    f"{pod}-hd", CNI_PATH))  # fmt: skip
            out.move_floor_ms.append(await run_sync(Work.NETLINK, floor.round_trip_ms))
    finally:
        await run_sync(Work.NETLINK, floor.close)


async def handshake(b: Bench, device: str, sessions: int) -> None:
    stack, node, work, tag, out = b.stack, b.node, b.work, b.tag, b.out
    pod = f"bench-{tag}-uds"
    answer = await node.allocate(device, pod)
    sock = host_socket(answer, device)
    echo_path = work / "echo.sock"
    echo = await anyio.open_process([sys.executable, str(HERE / "seqpacket_echo.py"), str(echo_path)],
                                    stdout=subprocess.PIPE)  # fmt: skip
    stack.push_async_callback(_end, echo)
    assert echo.stdout is not None
    with anyio.fail_after(10):
        await echo.stdout.receive()  # "ready"
    for _ in range(20):  # warm-up: first connections pay imports and the PodResources dial
        await run_sync(Work.CNI, handshake_ms, sock, pod, device)
        await run_sync(Work.CNI, echo_ms, echo_path, pod, device)
    for _ in range(sessions):
        out.handshake_ms.append(await run_sync(Work.CNI, handshake_ms, sock, pod, device))
        out.echo_ms.append(await run_sync(Work.CNI, echo_ms, echo_path, pod, device))


async def reused_allocates(b: Bench, device: str, pods: int) -> None:
    """Pods one after another on ``device``, each ending about a second before
    the next one's Allocate, which is timed (see the module's docstring)."""
    stack, node, work, tag, out = b.stack, b.node, b.work, b.tag, b.out
    netns = f"afxdp-bench-{tag}-reuse"
    await run_program(["ip", "netns", "add", netns], timeout=10, work=Work.NETLINK)
    stack.push_async_callback(run_program, ["ip", "netns", "del", netns], timeout=10)
    bin_dir = work / "cni-bin"
    shim.install(bin_dir, [node.run_dir])
    conf = {"cniVersion": "1.0.0", "name": "afxdp-bench-reuse", "type": shim.NAME,
            "mode": "primary", "deviceID": device, "ipam": ipam(work, "10.91.4")}  # fmt: skip
    cni_path = f"{bin_dir}:{CNI_PATH}"
    previous = None
    for n in range(-WARM_PODS, pods):  # the first few pay imports and first dials
        pod = f"bench-{tag}-reuse{n + WARM_PODS}"
        if previous is not None:
            await anyio.sleep(REUSE_GAP_S)  # the last pod's DEL was this long ago
            node.forget(previous)  # kubelet frees its device and admits the next pod
        t0 = time.perf_counter()
        await node.allocate(device, pod)
        elapsed = (time.perf_counter() - t0) * 1000
        if n >= 0:
            out.allocate_reused_ms.append(elapsed)
        await plugin(bin_dir / shim.NAME, "ADD", conf, netns=netns, pod=pod, cni_path=cni_path)
        await plugin(bin_dir / shim.NAME, "DEL", conf, netns=netns, pod=pod, cni_path=cni_path)
        previous = pod


async def first_handshakes(b: Bench, device: str, pods: int) -> None:
    stack, node, work, tag, out = b.stack, b.node, b.work, b.tag, b.out
    netns = f"afxdp-bench-{tag}-first"
    await run_program(["ip", "netns", "add", netns], timeout=10, work=Work.NETLINK)
    stack.push_async_callback(run_program, ["ip", "netns", "del", netns], timeout=10)
    bin_dir = work / "cni-bin"
    shim.install(bin_dir, [node.run_dir])
    conf = {"cniVersion": "1.0.0", "name": "afxdp-bench-first", "type": shim.NAME,
            "mode": "primary", "deviceID": device, "ipam": ipam(work, "10.91.3")}  # fmt: skip
    cni_path = f"{bin_dir}:{CNI_PATH}"
    previous = None
    for n in range(-WARM_PODS, pods):  # the first few pay imports and first dials
        pod = f"bench-{tag}-first{n + WARM_PODS}"
        if previous is not None:
            node.forget(previous)  # kubelet forgets the last pod: its Allocate reclaims
        sock = host_socket(await node.allocate(device, pod), device)
        await plugin(bin_dir / shim.NAME, "ADD", conf, netns=netns, pod=pod, cni_path=cni_path)
        first = await run_sync(Work.CNI, handshake_ms, sock, pod, device)
        later = await run_sync(Work.CNI, handshake_ms, sock, pod, device)
        if n >= 0:
            out.handshake_first_ms.append(first)
            out.handshake_next_ms.append(later)
        await plugin(bin_dir / shim.NAME, "DEL", conf, netns=netns, pod=pod, cni_path=cni_path)
        previous = pod


async def _end(proc: anyio.abc.Process) -> None:
    if proc.returncode is None:
        proc.terminate()
        await proc.wait()


async def health(node: BenchNode, device: str, events: int, out: PathsRun) -> None:
    stream = node.stream
    assert stream is not None
    ipr = await run_sync(Work.NETLINK, IPRoute)
    floor = NetlinkFloor()
    try:
        idx = socket.if_nametoindex(device)

        def until(health: str) -> float:
            """Read the stream until ``device`` has ``health``; when that update arrived."""
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                try:
                    resp = next(stream)
                except TimeoutError:
                    continue
                if {d.ID: d.health for d in resp.devices}.get(device) == health:
                    return time.perf_counter()
            raise BenchError(f"{device} not {health} on ListAndWatch within 5 s")

        def flip(state: str) -> float:
            t0 = time.perf_counter()
            ipr.link("set", index=idx, state=state)
            return t0

        for _ in range(events):
            n_bare = len(floor.arrivals)
            t0 = await run_sync(Work.NETLINK, flip, "down")
            arrived = await run_sync(Work.NETLINK, until, "Unhealthy")
            out.health_ms.append((arrived - t0) * 1000)
            later = [t for t in floor.arrivals[n_bare:] if t >= t0]
            if later:
                out.netlink_ms.append((later[0] - t0) * 1000)
            await run_sync(Work.NETLINK, flip, "up")
            await run_sync(Work.NETLINK, until, "Healthy")
    finally:
        floor.close()
        await run_sync(Work.NETLINK, ipr.close)
