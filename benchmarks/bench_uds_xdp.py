"""UDS handshake latency, memory per idle UDS server, AF_XDP RX rate. Needs root.

Prints one JSON object. Baselines are measured in the same run:
- handshake: the same four request/reply exchanges against a bare SEQPACKET
  server that answers without any logic (the transport's floor), and ours
  without the PodResources lookup (to show what kubelet's API costs);
- memory: the same number of bare listening sockets, without our coroutines;
- RX: the kernel's own UDP socket receiving the same traffic in the same pod.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
from tests.kubelet import FakeKubelet

from afxdp.bpf import pinning
from afxdp.bpf.xdp import XdpAttachment
from afxdp.podresources import PodResourcesChecker
from afxdp.uds.client import UdsClient
from afxdp.uds.handshake import HostCheck
from afxdp.uds.server import UdsServer

HERE = Path(__file__).parent

SESSIONS = 500
IDLE_SERVERS = 2000


def percentiles(samples: list[float]) -> dict[str, float]:
    samples = sorted(samples)
    return {
        "p50_ms": round(statistics.median(samples), 3),
        "p99_ms": round(samples[int(len(samples) * 0.99) - 1], 3),
    }


def serve_in_thread(server: UdsServer) -> Callable[[], None]:
    """Run ``server`` on uvloop in a thread; returns a stopper."""
    stop = threading.Event()

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(server.serve)
            await anyio.to_thread.run_sync(stop.wait)
            tg.cancel_scope.cancel()

    thread = threading.Thread(
        target=anyio.run, args=(main,), kwargs={"backend_options": {"use_uvloop": True}}
    )
    thread.start()

    def stopper() -> None:
        stop.set()
        thread.join()

    return stopper


def session(path: Path) -> None:
    with UdsClient(path) as c:
        c.connect("pod-a")
        os.close(c.xsk_map_fd("devA"))
        c.fin()


def bare_session(path: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.connect(str(path))
        for msg in (b"/connect,pod-a", b"/version", b"/xsk_map_fd,devA", b"/fin"):
            s.send(msg)
            s.recv(128)


def bare_server(path: Path) -> Callable[[], None]:
    lst = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    lst.bind(str(path))
    lst.listen(16)
    lst.settimeout(0.2)
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            try:
                conn, _ = lst.accept()
            except TimeoutError:
                continue
            with conn:
                while conn.recv(256):
                    conn.send(b"/ok")
        lst.close()

    t = threading.Thread(target=loop)
    t.start()

    def stopper() -> None:
        stop.set()
        t.join()

    return stopper


def timed_sessions(fn: Callable[[Path], None], path: Path) -> dict[str, float]:
    for _ in range(20):
        fn(path)  # warm up
    samples = []
    for _ in range(SESSIONS):
        t0 = time.perf_counter()
        fn(path)
        samples.append((time.perf_counter() - t0) * 1000)
    return percentiles(samples)


def handshake_latency(tmp: Path) -> dict[str, Any]:
    kubelet = FakeKubelet(tmp / "kubelet")
    kubelet.start_pod_resources()
    kubelet.hold("pod-a", "afxdp/pool1", "devA")
    checker = PodResourcesChecker(kubelet.dir / "pod-resources" / "kubelet.sock")
    r, w = os.pipe()
    results: dict[str, Any] = {}
    try:

        async def via_kubelet(host: str) -> HostCheck:
            return await checker.check(host, resource="afxdp/pool1", device="devA")

        async def static(host: str) -> HostCheck:
            return HostCheck.OK

        for name, check in (("ours", via_kubelet), ("ours_without_pod_lookup", static)):
            server = UdsServer(
                netdev="devA", map_fd=r, path=tmp / name / "afxdp.sock", check_host=check
            )
            server.listen()
            stop = serve_in_thread(server)
            try:
                results[name] = timed_sessions(session, server.path)
            finally:
                stop()
        path = tmp / "bare.sock"
        stop_bare = bare_server(path)
        try:
            results["baseline_bare_seqpacket"] = timed_sessions(bare_session, path)
        finally:
            stop_bare()
    finally:
        kubelet.stop()
        os.close(r)
        os.close(w)
    results["ratio_p50_to_baseline"] = round(
        results["ours"]["p50_ms"] / results["baseline_bare_seqpacket"]["p50_ms"], 1
    )
    results["sessions"] = SESSIONS
    return results


MEMORY_PROBE = r"""
import anyio, os, socket, sys, json
from pathlib import Path
from afxdp.uds.server import UdsServer
from afxdp.uds.handshake import HostCheck

def rss_kib():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024

mode, count, base = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
r, w = os.pipe()

async def ok(host):
    return HostCheck.OK

async def main():
    before = rss_kib()
    keep = []
    async with anyio.create_task_group() as tg:
        for i in range(count):
            if mode == "ours":
                s = UdsServer(netdev=f"d{i}", map_fd=r, path=base / f"d{i}" / "afxdp.sock", check_host=ok)
                s.listen()
                tg.start_soon(s.serve)
            else:
                (base / f"d{i}").mkdir(mode=0o700)
                s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                s.bind(str(base / f"d{i}" / "afxdp.sock"))
                s.listen(16)
            keep.append(s)
        await anyio.sleep(0.5)
        print(json.dumps({"before_kib": before, "after_kib": rss_kib()}), flush=True)
        tg.cancel_scope.cancel()

anyio.run(main, backend_options={"use_uvloop": True})
"""


def idle_memory(tmp: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"servers": IDLE_SERVERS}
    for mode in ("ours", "bare_sockets"):
        base = tmp / f"mem-{mode}"
        base.mkdir()
        done = subprocess.run([sys.executable, "-c", MEMORY_PROBE, mode, str(IDLE_SERVERS), str(base)],
                              capture_output=True, text=True, check=True)  # fmt: skip
        m = json.loads(done.stdout)
        out[f"{mode}_kib_per_server"] = round((m["after_kib"] - m["before_kib"]) / IDLE_SERVERS, 2)
    out["baseline"] = "bare_sockets"
    return out


def ip(*args: str) -> str:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=True).stdout


def rx_rate(tmp: Path, seconds: float = 3.0) -> dict[str, Any]:
    tag = secrets.token_hex(3)
    pod, peer, dev, src = f"bpod{tag}", f"bpeer{tag}", f"bd{tag}", f"bs{tag}"
    blast = tmp / "udp_blast"
    subprocess.run(["gcc", "-O2", "-o", str(blast), str(HERE / "udp_blast.c")], check=True)
    pin_dir = tmp / "pins"
    pinning.ensure_bpffs(pin_dir)
    results: dict[str, Any] = {"seconds": seconds, "mode": "copy", "frame_bytes": 64}
    att = None
    try:
        ip("netns", "add", pod)
        ip("netns", "add", peer)
        ip("link", "add", dev, "type", "veth", "peer", "name", src)
        att = XdpAttachment.attach(dev)
        results["attach_mode"] = att.mode.value
        att.pin_map(pin_dir / "xsks_map")
        ip("link", "set", dev, "netns", pod)
        ip("link", "set", src, "netns", peer)
        ip("-n", pod, "addr", "add", "10.252.0.2/24", "dev", dev)
        ip("-n", pod, "link", "set", dev, "up")
        ip("-n", peer, "link", "set", src, "up")
        mac = json.loads(ip("-n", pod, "-j", "link", "show", dev))[0]["address"]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        for mode in ("xsk", "kernel"):
            rx = subprocess.Popen(
                ["nsenter", f"--net=/run/netns/{pod}", sys.executable, str(HERE / "xsk_rx.py"), mode,
                 str(pin_dir / "xsks_map"), dev, "9999", str(seconds)],
                stdout=subprocess.PIPE, text=True, env=env,
            )  # fmt: skip
            assert rx.stdout is not None
            assert rx.stdout.readline().strip() == "ready"
            sent = subprocess.run(
                ["nsenter", f"--net=/run/netns/{peer}", str(blast), src, mac, "10.252.0.1",
                 "10.252.0.2", "9999", str(seconds + 1.5)],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            got = json.loads(rx.stdout.readline())
            rx.wait()
            results[mode] = {
                "pps": round(got["frames"] / got["seconds"]),
                "sender_pps": round(int(sent.stdout) / (seconds + 1.5)),
            }
    finally:
        for ns in (pod, peer):
            subprocess.run(["ip", "netns", "del", ns], check=False)
        if att is not None:
            att.detach()
        subprocess.run(["umount", str(pin_dir)], check=False)
    results["baseline"] = "kernel"
    results["ratio_to_kernel_udp"] = round(results["xsk"]["pps"] / results["kernel"]["pps"], 2)
    return results


def main() -> None:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        report = {
            "handshake_roundtrip": handshake_latency(tmp),
            "idle_uds_server_rss": idle_memory(tmp),
            "af_xdp_rx_veth": rx_rate(tmp),
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
