"""Rates: pod lifecycles per second, and AF_XDP receive through our program.

pod_lifecycle: tests/soak.py's lifecycle (Allocate reclaiming the NIC from the
previous, forgotten pod, the pod's netns, shim ADD, the UDS handshake as the
pod, shim DEL, netns gone, kubelet forgets the pod) against afxdpd as its own
process, at the given concurrency with one veth NIC per worker. Baseline: the
same pods' network with Debian's host-device + host-local (netns add, ADD,
DEL, netns del), same count and concurrency: what the Go plugins cost a pod.

xsk_rx: xdp_blast floods 64-byte UDP frames from a peer netns into a veth in
the "pod" netns that carries our program; xsk_rx.py receives them with the
Python AF_XDP client (afxdp.xsk), then with a kernel UDP socket. The sender is
pinned to one CPU and the receiver to the other. A receive rate is reported
only where the sender outran the receiver: the receiver's own queue dropped
frames in the window (else the figure would measure the sender), and the rate
is below the rate offered in that same window (else the measurement is wrong).
"""

from __future__ import annotations

import itertools
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
from tests.soak import Bounds, soak

from afxdp.bpf import pinning
from afxdp.bpf.xdp import XdpAttachment
from afxdp.workers import Work, run_program, run_sync
from benchmarks.node import BenchError
from benchmarks.paths import CNI_PATH, ipam, plugin

HERE = Path(__file__).parent


async def lifecycles_per_s(pods: int, concurrency: int) -> float:
    work = Path(tempfile.mkdtemp(prefix="afxdp-bench-soak-"))
    try:
        # A rate, not the soak: RSS is still warming up after a few hundred
        # lifecycles (the 5 % bound is for 1,000, nox -s soak); leaks still fail it.
        summary = await soak(pods, concurrency, work, Bounds(rss_percent=15.0))
    finally:
        await run_program(["rm", "-rf", str(work)], timeout=60, work=Work.DISK)
    return float(pods / summary.seconds)


async def host_device_per_s(work: Path, pods: int, concurrency: int) -> float:
    tag = secrets.token_hex(3)
    devs = [f"bhd{tag}{i}" for i in range(concurrency)]
    netns = [f"afxdp-bench-{tag}-hd{i}" for i in range(concurrency)]
    numbers = iter(range(pods))

    async def worker(i: int) -> None:
        conf = {"cniVersion": "1.0.0", "name": "hostdev-rate", "type": "host-device",
                "device": devs[i], "ipam": ipam(work, "10.92.1")}  # fmt: skip
        for n in numbers:
            await run_program(["ip", "netns", "add", netns[i]], timeout=10, work=Work.NETLINK)
            try:
                for verb in ("ADD", "DEL"):
                    await plugin(Path(CNI_PATH) / "host-device", verb, conf, netns=netns[i],
                                 pod=f"hd{n}", cni_path=CNI_PATH)  # fmt: skip
            finally:
                await run_program(["ip", "netns", "del", netns[i]], timeout=10, work=Work.NETLINK)

    try:
        for dev in devs:
            await run_program(["ip", "link", "add", dev, "type", "veth", "peer", "name", f"{dev}p"],
                              timeout=10, work=Work.NETLINK)  # fmt: skip
        t0 = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for i in range(concurrency):
                tg.start_soon(worker, i)
        return pods / (time.perf_counter() - t0)
    finally:
        for dev in devs:
            await run_program(["ip", "link", "del", dev], timeout=10, work=Work.NETLINK)


def offered_at(progress: list[tuple[float, int]], t: float) -> float:
    """Frames the sender had offered at time ``t`` (CLOCK_MONOTONIC), from its
    (time, frames so far) stamps, linear between two; the receiver's window is
    compared with what was offered in that same window, not with the sender's
    whole run (its rate varies: the whole run's average once fell below what
    the receiver got in its window)."""
    if not progress or not progress[0][0] <= t <= progress[-1][0]:
        raise BenchError(f"the sender's stamps do not cover {t:.3f}: the windows do not overlap")
    for (t0, n0), (t1, n1) in itertools.pairwise(progress):
        if t0 <= t <= t1:
            return n0 + (n1 - n0) * ((t - t0) / (t1 - t0) if t1 > t0 else 0.0)
    return float(progress[-1][1])


def _ip(*args: str) -> str:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=True).stdout


def rx_rates(tmp: Path, seconds: float) -> dict[str, Any]:
    """pps received by ``xsk`` and ``kernel``, each with the sender's pps and the
    receiver's drops; blocking."""
    tag = secrets.token_hex(3)
    pod, peer, dev, src = f"afxdp-bench-{tag}-rx", f"afxdp-bench-{tag}-tx", f"brx{tag}", f"btx{tag}"
    blast = tmp / "xdp_blast"
    subprocess.run(["gcc", "-O2", "-o", str(blast), str(HERE / "xdp_blast.c"), "-lbpf"], check=True)
    pin_dir = tmp / "pins"
    pinning.ensure_bpffs(pin_dir)
    results: dict[str, Any] = {}
    att = None
    try:
        _ip("netns", "add", pod)
        _ip("netns", "add", peer)
        _ip("link", "add", dev, "type", "veth", "peer", "name", src)
        att = XdpAttachment.attach(dev)
        results["attach_mode"] = att.mode.value
        att.pin_map(pin_dir / "xsks_map")
        _ip("link", "set", dev, "netns", pod)
        _ip("link", "set", src, "netns", peer)
        _ip("-n", pod, "addr", "add", "10.252.0.2/24", "dev", dev)
        _ip("-n", pod, "link", "set", dev, "up")
        _ip("-n", peer, "link", "set", src, "up")
        mac = json.loads(_ip("-n", pod, "-j", "link", "show", dev))[0]["address"]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        for mode in ("xsk", "kernel"):
            # nsenter, not ip netns exec: that remounts /sys and hides the pin.
            rx = subprocess.Popen(
                ["nsenter", f"--net=/run/netns/{pod}", "taskset", "-c", "1", sys.executable,
                 str(HERE / "xsk_rx.py"), mode, str(pin_dir / "xsks_map"), dev, "9999", str(seconds)],
                stdout=subprocess.PIPE, text=True, env=env,
            )  # fmt: skip
            try:
                assert rx.stdout is not None
                if rx.stdout.readline().strip() != "ready":
                    raise BenchError(f"xsk_rx.py {mode} did not start")
                send_s = seconds + 1.5
                sent = subprocess.run(
                    ["nsenter", f"--net=/run/netns/{peer}", "taskset", "-c", "0", str(blast), src, mac,
                     "10.252.0.1", "10.252.0.2", "9999", str(send_s)],
                    capture_output=True, text=True, check=True, timeout=send_s + 30,
                )  # fmt: skip
                got = json.loads(rx.stdout.readline())
            finally:
                rx.kill()
                rx.wait()
            progress = [(float(t), int(n)) for _, t, n in
                        (ln.split() for ln in sent.stdout.splitlines() if ln.startswith("at "))]  # fmt: skip
            start, end = got["start"], got["start"] + got["seconds"]
            offered = offered_at(progress, end) - offered_at(progress, start)
            results[mode] = {"pps": got["frames"] / got["seconds"], "dropped": got["dropped"],
                             "sender_pps": offered / got["seconds"]}  # fmt: skip
    finally:
        for ns in (pod, peer):
            subprocess.run(["ip", "netns", "del", ns], check=False)
        if att is not None:
            att.detach()
        subprocess.run(["umount", str(pin_dir)], check=False)
    return results


async def rx(tmp: Path, seconds: float) -> dict[str, Any]:
    return await run_sync(Work.DEVICES, rx_rates, tmp, seconds)
