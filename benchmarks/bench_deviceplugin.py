"""Allocate round-trip latency and link-down-to-Unhealthy latency. Needs root.

The service runs in-process on uvloop; kubelet is the grpcio test double
(tests/kubelet.py) calling over the real unix socket from a thread.
Attaching XDP costs one or two RCU grace periods in the kernel (8-16 ms here,
native or generic alike), so Allocate cannot be faster than that while it
attaches a fresh program. Baselines measured in the same run:
- Allocate vs GetDevicePluginOptions on the same socket (the RPC floor), and
  vs Allocate in a pool with udsServerDisable (no XDP program, no UDS server);
- Unhealthy-on-the-stream vs the kernel's own notification reaching a bare
  netlink socket (the floor set by the kernel).
Prints one JSON object.
"""

from __future__ import annotations

import json
import secrets
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import grpc
from pyroute2 import IPRoute
from tests.fakes import FakeSubfunctions
from tests.kubelet import FakeKubelet, PluginClient

from afxdp.config import load_config
from afxdp.deviceplugin.v1beta1 import api_pb2 as dp
from afxdp.service import Paths, Service

ALLOCATIONS = 500
LINK_EVENTS = 100


def pct(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)
    return {"p50_ms": round(statistics.median(s), 3), "p99_ms": round(s[int(len(s) * 0.99) - 1], 3)}


async def run(tmp: Path, devs: list[str]) -> dict[str, Any]:
    kubelet = FakeKubelet(tmp / "kubelet")
    kubelet.start_registration()
    kubelet.start_pod_resources()
    config = load_config(json.dumps({"pools": [
        {"name": "uds", "mode": "primary", "devices": [{"name": devs[0]}]},
        {"name": "raw", "mode": "primary", "udsServerDisable": True, "devices": [{"name": devs[1]}]},
    ]}).encode()).config  # fmt: skip
    service = Service(config, "bench", Paths(tmp / "kubelet", tmp / "uds", tmp / "pins", tmp / "run"),
                      FakeSubfunctions())  # fmt: skip
    out: dict[str, Any] = {}
    async with anyio.create_task_group() as tg:
        await tg.start(service.run)
        uds = PluginClient(kubelet.plugin_dir / "afxdp-uds.sock")
        raw = PluginClient(kubelet.plugin_dir / "afxdp-raw.sock")

        async def timed_allocs(client: PluginClient, dev: str) -> dict[str, float]:
            samples = []
            for _ in range(ALLOCATIONS):
                t0 = time.perf_counter()
                await anyio.to_thread.run_sync(client.allocate, [dev])
                samples.append((time.perf_counter() - t0) * 1000)
                assert service.devices is not None  # the allocation ends between pods
                await service.devices.release(dev)
            return pct(samples)

        async def timed_options(client: PluginClient) -> dict[str, float]:
            samples = []
            for _ in range(ALLOCATIONS):
                t0 = time.perf_counter()
                await anyio.to_thread.run_sync(client.call, "GetDevicePluginOptions", dp.Empty())
                samples.append((time.perf_counter() - t0) * 1000)
            return pct(samples)

        out["allocate_uds_pool"] = await timed_allocs(uds, devs[0])
        out["allocate_raw_pool_baseline"] = await timed_allocs(raw, devs[1])
        out["get_options_rpc_baseline"] = await timed_options(uds)
        out["allocations"] = ALLOCATIONS
        out["ratio_p50_to_rpc_floor"] = round(
            out["allocate_uds_pool"]["p50_ms"] / out["get_options_rpc_baseline"]["p50_ms"], 1)  # fmt: skip
        out["health"] = await health_latency(uds, devs[0])
        tg.cancel_scope.cancel()
    kubelet.stop()
    return out


async def health_latency(client: PluginClient, dev: str) -> dict[str, Any]:
    """Time from the netlink request that takes the link down to the Unhealthy list
    arriving at kubelet, against a bare netlink listener seeing the same change."""
    stream = client.list_and_watch()
    arrivals: list[float] = []
    bare: list[float] = []
    got = threading.Condition()

    def reader() -> None:
        try:
            for resp in stream:
                state = {d.ID: d.health for d in resp.devices}.get(dev)
                with got:
                    now = time.perf_counter()
                    arrivals.append(now if state == "Unhealthy" else -now)
                    got.notify_all()
        except grpc.RpcError:
            pass  # cancelled at the end

    def netlink_floor(stop: threading.Event) -> None:
        s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)
        s.bind((0, 1))
        s.settimeout(0.2)
        while not stop.is_set():
            try:
                s.recv(1 << 16)
                bare.append(time.perf_counter())
            except TimeoutError:
                pass
        s.close()

    threading.Thread(target=reader, daemon=True).start()
    stop = threading.Event()
    floor = threading.Thread(target=netlink_floor, args=(stop,))
    floor.start()
    ours, kernel = [], []
    # Sync pyroute2 cannot run on the event loop's thread (it runs a loop of its own).
    ipr = await anyio.to_thread.run_sync(IPRoute)
    idx = socket.if_nametoindex(dev)

    def wait_for(n: int) -> None:
        with got:
            got.wait_for(lambda: len(arrivals) >= n, timeout=5)

    await anyio.to_thread.run_sync(wait_for, 1)  # the initial list
    for _ in range(LINK_EVENTS):
        for state in ("down", "up"):
            before, n_bare = len(arrivals), len(bare)
            t0 = time.perf_counter()
            await anyio.to_thread.run_sync(partial(ipr.link, "set", index=idx, state=state))
            await anyio.to_thread.run_sync(wait_for, before + 1)
            if state == "down":
                ours.append((abs(arrivals[before]) - t0) * 1000)
                if len(bare) > n_bare:
                    kernel.append((bare[n_bare] - t0) * 1000)
    stop.set()
    floor.join()
    stream.cancel()
    await anyio.to_thread.run_sync(ipr.close)
    return {
        "events": LINK_EVENTS,
        "link_down_to_unhealthy_on_stream": pct(ours),
        "kernel_notification_baseline": pct(kernel),
    }


def main() -> None:
    tag = secrets.token_hex(3)
    devs, peers = [f"bq{tag}", f"br{tag}"], [f"bqp{tag}", f"brp{tag}"]
    try:
        for d, p in zip(devs, peers, strict=True):
            subprocess.run(["ip", "link", "add", d, "type", "veth", "peer", "name", p], check=True)
            subprocess.run(["ip", "link", "set", d, "up"], check=True)
            subprocess.run(["ip", "link", "set", p, "up"], check=True)
        time.sleep(0.5)
        with tempfile.TemporaryDirectory() as d:
            result = anyio.run(run, Path(d), devs, backend_options={"use_uvloop": True})
    finally:
        for d in devs:
            subprocess.run(["ip", "link", "del", d], check=False)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
