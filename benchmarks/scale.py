"""A node of 1,000 pooled veths: afxdpd's start-up and RSS.

One afxdpd, in the order a node lives: it starts (timed to ready), settles
(anything done to free devices in the background is finished), then 256
distinct free devices are Allocated one by one (each timed: how Allocate
scales with the pool, beside allocate_ms on the small node), and its RSS is
read with 256 UDS servers. Kubelet's ListAndWatch is held open throughout.
"""

from __future__ import annotations

import secrets
import socket
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path

from afxdp.bpf import libbpf
from afxdp.bpf.xdp import PROGRAM, object_path
from benchmarks.node import BenchNode, veths

UDS_SERVERS = 256  # rss_mb is read with this many allocations (one UDS server each)


@dataclass
class ScaleRun:
    startup_s: float = 0.0
    rss_ready_mb: float = 0.0
    rss_mb: float = 0.0
    allocate_ms: list[float] = field(default_factory=list)


def raw_attach_ms(device: str) -> float:
    """Load and attach a fresh copy of our program with bare libbpf calls; the
    detach and close that follow are not timed (Allocate's are not either)."""
    t0 = time.perf_counter()
    obj = libbpf.BpfObject(object_path())
    try:
        ifindex = socket.if_nametoindex(device)
        libbpf.xdp_attach(ifindex, obj.program_fd(PROGRAM),
                          libbpf.XdpFlags.UPDATE_IF_NOEXIST | libbpf.XdpFlags.DRV_MODE)  # fmt: skip
        elapsed = (time.perf_counter() - t0) * 1000
        libbpf.xdp_detach(ifindex, libbpf.XdpFlags.DRV_MODE)
    finally:
        obj.close()
    return elapsed


async def measure(work: Path, devices: int, out: ScaleRun) -> None:
    """Fills ``out`` as it goes: a start-up time survives a failed Allocate."""
    tag = secrets.token_hex(3)
    names = [f"bs{tag}{i:04d}" for i in range(devices)]  # 12 characters
    async with AsyncExitStack() as stack:
        await veths(stack, names, f"afxdp-bench-{tag}-wire")
        node = BenchNode(work, names)
        out.startup_s = await node.start(stack)
        await node.settle()
        out.rss_ready_mb = node.rss_mb()
        for dev in names[:UDS_SERVERS]:
            t0 = time.perf_counter()
            await node.allocate(dev, f"bench-{tag}-{dev}")
            out.allocate_ms.append((time.perf_counter() - t0) * 1000)
        out.rss_mb = node.rss_mb()
