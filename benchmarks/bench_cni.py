"""CNI ADD+DEL latency through our shim, beside Debian's host-device plugin
doing the same move of a veth into a netns with the same host-local IPAM (the
reference a user would compare against). Needs root. Prints one JSON object.

Ours is measured twice: a pool with udsServerDisable (the CNI work alone, the
like-for-like comparison) and a default pool, where DEL also detaches the XDP
program and stops the UDS server (kernel RCU waits, see bench_deviceplugin).
Kubelet's Allocate before each ADD is not timed.
"""

from __future__ import annotations

import json
import secrets
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
from tests.fakes import FakeSubfunctions
from tests.kubelet import FakeKubelet, PluginClient

from afxdp.cni import shim
from afxdp.config import load_config
from afxdp.service import Paths, Service

ROUNDS = 200
CNI_PATH = "/usr/lib/cni"


def pct(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)
    return {"p50_ms": round(statistics.median(s), 2), "p99_ms": round(s[int(len(s) * 0.99) - 1], 2)}


def ipam(tmp: Path, subnet: str) -> dict[str, Any]:
    return {"type": "host-local", "ranges": [[{"subnet": f"{subnet}.0/24"}]],
            "dataDir": str(tmp / "ipam")}  # fmt: skip


def run_plugin(binary: str, command: str, conf: dict[str, Any], netns: str) -> None:
    env = {"CNI_COMMAND": command, "CNI_CONTAINERID": "bench", "CNI_NETNS": netns,
           "CNI_IFNAME": "net1", "CNI_PATH": CNI_PATH}  # fmt: skip
    done = subprocess.run([binary], input=json.dumps(conf).encode(), env=env,
                          capture_output=True, check=False)  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"{binary} {command}: {done.stdout.decode()} {done.stderr.decode()}")


def add_del(binary: str, conf: dict[str, Any], netns: str) -> tuple[float, float]:
    t0 = time.perf_counter()
    run_plugin(binary, "ADD", conf, netns)
    t1 = time.perf_counter()
    run_plugin(binary, "DEL", conf, netns)
    t2 = time.perf_counter()
    return (t1 - t0) * 1000, (t2 - t1) * 1000


def summary(rounds: list[tuple[float, float]]) -> dict[str, Any]:
    return {
        "add": pct([a for a, _ in rounds]),
        "del": pct([d for _, d in rounds]),
        "add_plus_del": pct([a + d for a, d in rounds]),
    }


async def measure(tmp: Path, devs: dict[str, str], netns: str) -> dict[str, Any]:
    kubelet = FakeKubelet(tmp / "kubelet")
    kubelet.start_registration()
    kubelet.start_pod_resources()
    config = load_config(json.dumps({"pools": [
        {"name": "raw", "mode": "primary", "udsServerDisable": True, "devices": [{"name": devs["raw"]}]},
        {"name": "uds", "mode": "primary", "devices": [{"name": devs["uds"]}]},
    ]}).encode()).config  # fmt: skip
    paths = Paths(tmp / "kubelet", tmp / "uds", tmp / "pins", tmp / "run")
    service = Service(config, "bench", paths, FakeSubfunctions())
    results: dict[str, Any] = {"rounds": ROUNDS}
    async with anyio.create_task_group() as tg:
        await tg.start(service.run)
        for pool in ("raw", "uds"):
            client = PluginClient(kubelet.plugin_dir / f"afxdp-{pool}.sock")
            conf = {"cniVersion": "1.0.0", "name": f"afxdp-{pool}", "type": "afxdp", "mode": "primary",
                    "deviceID": devs[pool], "daemonSocket": str(paths.run_dir / "cni.sock"),
                    "ipam": ipam(tmp, "10.90.1")}  # fmt: skip
            rounds = []
            for _ in range(ROUNDS):
                await anyio.to_thread.run_sync(client.allocate, [devs[pool]])
                rounds.append(
                    await anyio.to_thread.run_sync(add_del, str(shim.path()), conf, netns)
                )
            results[f"afxdp_{pool}_pool"] = summary(rounds)
        tg.cancel_scope.cancel()
    kubelet.stop()
    hd_conf = {"cniVersion": "1.0.0", "name": "hostdev", "type": "host-device",
               "device": devs["hd"], "ipam": ipam(tmp, "10.90.2")}  # fmt: skip
    hd = [add_del(f"{CNI_PATH}/host-device", hd_conf, netns) for _ in range(ROUNDS)]
    results["host_device_baseline"] = summary(hd)
    base = results["host_device_baseline"]["add_plus_del"]["p50_ms"]
    for pool in ("raw", "uds"):
        ours = results[f"afxdp_{pool}_pool"]["add_plus_del"]["p50_ms"]
        results[f"ratio_{pool}_to_host_device_p50"] = round(ours / base, 2)
    return results


def main() -> None:
    tag = secrets.token_hex(3)
    devs = {"raw": f"cr{tag}", "uds": f"cu{tag}", "hd": f"ch{tag}"}
    ns = f"cbench{tag}"
    try:
        subprocess.run(["ip", "netns", "add", ns], check=True)
        for d in devs.values():
            subprocess.run(
                ["ip", "link", "add", d, "type", "veth", "peer", "name", f"{d}p"], check=True
            )
            for link in (d, f"{d}p"):
                subprocess.run(["ip", "link", "set", link, "up"], check=True)
        with tempfile.TemporaryDirectory() as d:
            result = anyio.run(measure, Path(d), devs, f"/run/netns/{ns}",
                               backend_options={"use_uvloop": True})  # fmt: skip
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
        for d in devs.values():
            subprocess.run(["ip", "link", "del", d], capture_output=True, check=False)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
