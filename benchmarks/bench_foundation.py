"""Config load+validate (100 pools) and pool assembly (1,000 netdevs).

Prints one JSON object. Each figure comes with a baseline measured in the same
run: the bare JSON decode of the same document for the config, and building the
lookup of the same netdevs by name for assembly. Target: both under 50 ms.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import msgspec

from afxdp.config import load_config
from afxdp.inventory import NetDev
from afxdp.pools import assemble
from afxdp.secondary import DevlinkSubfunctions

RUNS = 50
LIMIT_MS = 50.0


def timed(fn: Callable[[], object], runs: int = RUNS) -> dict[str, float]:
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1000)
    samples.sort()
    return {
        "median_ms": round(statistics.median(samples), 3),
        "p95_ms": round(samples[int(len(samples) * 0.95) - 1], 3),
    }


def config_doc(pools: int) -> bytes:
    doc: dict[str, Any] = {"logLevel": "info", "logFile": "afxdp-dp.log", "pools": []}
    for i in range(pools):
        doc["pools"].append(
            {
                "name": f"pool{i}",
                "mode": "cdq" if i % 2 else "primary",
                "uid": 1500,
                "udsTimeout": 120,
                "drivers": [
                    {"name": f"drv{i % 10}", "primary": 3,
                     "excludeDevices": [{"name": f"ens{i}f9"}, {"mac": "68:05:ca:2d:e9:1b"}]},
                    {"name": "ice", "excludeAddressed": True},
                ],
                "devices": [{"name": f"ens{i}f0"}, {"pci": f"0000:{i % 256:02x}:00.1"},
                            {"mac": f"02:00:00:00:{i % 256:02x}:01", "secondary": 4}],
                "nodes": [{"hostname": f"node{i}", "drivers": [{"name": "ice", "primary": 1}]},
                          {"hostname": f"other{i}"}],
            }
        )  # fmt: skip
    return json.dumps(doc).encode()


def netdevs(count: int) -> list[NetDev]:
    return [
        NetDev(
            name=f"ens{i}f{i % 4}",
            ifindex=i + 2,
            driver=f"drv{i % 10}" if i % 3 else "ice",
            pci=f"0000:{i // 256 % 256:02x}:{i % 256:02x}.{i % 8}",
            mac=f"02:00:00:00:{i // 256 % 256:02x}:{i % 256:02x}",
            ipv4=("10.0.0.1/24",) if i % 7 == 0 else (),
            oper_state="up",
            admin_up=True,
            virtual=False,
        )
        for i in range(count)
    ]


def main() -> None:
    data = config_doc(100)
    config = load_config(data).config
    devs = netdevs(1000)

    def run_assemble() -> None:
        assemble(config, devs, "node7", unprivileged_bpf_disabled=0,
                 secondary=DevlinkSubfunctions())  # fmt: skip

    load = timed(lambda: load_config(data))
    load_base = timed(lambda: msgspec.json.decode(data))
    asm = timed(run_assemble)
    asm_base = timed(lambda: {d.name: d for d in sorted(devs, key=lambda d: d.name)})
    result = {
        "config_load_validate_100_pools": {
            **load,
            "bytes": len(data),
            "baseline_json_decode_median_ms": load_base["median_ms"],
            "ratio_to_baseline": round(load["median_ms"] / load_base["median_ms"], 1),
            "under_limit": load["p95_ms"] < LIMIT_MS,
        },
        "assemble_pools_1000_netdevs": {
            **asm,
            "pools": len(config.pools),
            "baseline_sort_index_median_ms": asm_base["median_ms"],
            "ratio_to_baseline": round(asm["median_ms"] / asm_base["median_ms"], 1),
            "under_limit": asm["p95_ms"] < LIMIT_MS,
        },
        "limit_ms": LIMIT_MS,
        "runs": RUNS,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
