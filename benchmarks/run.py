"""The benchmark document: ``nox -s bench`` (``-- --quick`` for smaller counts).

Measures every figure beside its baseline in this one run, writes
benchmarks/results.json (and the raw latency samples, for the plot, to
benchmarks/samples.json) and prints the document. Needs root. A figure whose
measurement fails is still in the document, unmet, with its error; the exit
code is then 1.

Keys, in the order measured: startup_1000_devices_s, rss_mb
(benchmarks/scale.py: one afxdpd on 1,000 veths); allocate_ms,
allocate_reused_ms, cni_add_del_ms, handshake_ms, handshake_first_ms, health_event_ms (benchmarks/paths.py: a small node, whose
start-up is also startup_1000_devices_s's baseline);
pod_lifecycle_per_s and xsk_rx_pps (benchmarks/rates.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from benchmarks import figures, paths, rates, scale
from benchmarks.figures import Figure, Goal

HERE = Path(__file__).parent
RESULTS = HERE / "results.json"
SAMPLES = HERE / "samples.json"

GOALS = {
    # Issue 20: a free device's Allocate, and one whose last pod ended a second
    # before (reclaimed inline), the common case on a node that recycles NICs.
    "allocate_ms": Goal("p50 <= 1 ms", p50_max=1),
    "allocate_reused_ms": Goal("p50 <= 1 ms, p99 <= 3 ms", p50_max=1, p99_max=3),
    # Issue 20 adds "within 5 ms of the two-move floor": shown beside it, not checked.
    "cni_add_del_ms": Goal("p50 <= host-device's p50", ratio_max=1.0),
    "handshake_ms": Goal("p99 <= 1 ms", p99_max=1),
    # A pod's first handshake, right after its ADD (issue 20): no wait on kubelet.
    "handshake_first_ms": Goal("p99 <= 1 ms", p99_max=1),
    # Not set by the issue: kubelet should learn of a dead link well inside a
    # scheduling decision; the kernel's own notification takes well under 1 ms.
    "health_event_ms": Goal("p99 <= 5 ms", p99_max=5),
    # Issue 20: the kernel's floor here is below the earlier 50/s.
    "pod_lifecycle_per_s": Goal(">= host-device's in the same run", ratio_min=1.0),
    "startup_1000_devices_s": Goal("<= 2 s", max=2),
    "rss_mb": Goal("<= 80 MB", max=80),
    # AF_XDP exists to beat the kernel's stack; in Python, at least match it.
    "xsk_rx_pps": Goal(">= kernel UDP socket, sender outran both", ratio_min=1.0),
}
UNITS = {"pod_lifecycle_per_s": "pods/s", "startup_1000_devices_s": "s", "rss_mb": "MB",
         "xsk_rx_pps": "pps"}  # fmt: skip


@dataclass(frozen=True)
class Counts:
    devices: int = 1000
    allocations: int = 100  # distinct free devices of the small node, one Allocate each
    cni_rounds: int = 200
    sessions: int = 1000
    events: int = 100
    first_handshakes: int = 200  # pods one after another on one device
    reused: int = 100  # the same, a second apart: one reclaiming Allocate each
    pods: int = 200
    concurrency: int = 4
    rx_seconds: float = 3.0


QUICK = Counts(allocations=30, cni_rounds=25, sessions=200, events=30, first_handshakes=40,
               reused=30, pods=40, rx_seconds=1.5)  # fmt: skip


class Document:
    def __init__(self) -> None:
        self.figures: dict[str, Figure] = {}
        self.samples: dict[str, dict[str, list[float]]] = {}
        self.failed = False

    async def measure(self, keys: list[str], fn: Callable[[], Awaitable[None]]) -> None:
        """Run one measurement that fills ``keys``; a failure fills them with its error."""
        try:
            await fn()
        except Exception as exc:
            traceback.print_exc()
            self.failed = True
            for key in keys:
                self.figures.setdefault(key, figures.failed(UNITS.get(key, "ms"), GOALS[key],
                                                            f"{type(exc).__name__}: {exc}"))  # fmt: skip

    def latency(self, key: str, ours: list[float], name: str, base: list[float],
                **more: list[float]) -> None:  # fmt: skip
        self.figures[key] = figures.latency(ours, name, base, GOALS[key])
        self.samples[key] = {"ours": ours, name: base, **more}

    def value(self, key: str, ours: float, name: str, base: float, **extra: Any) -> None:
        self.figures[key] = figures.value(UNITS[key], ours, name, base, GOALS[key], **extra)

    def document(self) -> dict[str, Any]:
        return {"figures": self.figures, "machine": figures.machine()}


async def measure_all(counts: Counts, work: Path) -> Document:
    doc = Document()

    async def big_node() -> None:
        run = big
        await scale.measure(work / "scale", counts.devices, run)
        at_scale = figures.latency(run.allocate_ms, "", run.allocate_ms, Goal(""))
        doc.value("rss_mb", run.rss_mb, f"afxdpd at ready, {counts.devices} devices, no allocations",
                  run.rss_ready_mb, uds_servers=scale.UDS_SERVERS,
                  allocate_ms_at_this_scale={k: at_scale[k] for k in ("p50", "p99", "n")})  # fmt: skip
        doc.samples["allocate_ms"] = {f"ours, {counts.devices} devices": run.allocate_ms}

    async def small_node() -> None:
        run = await paths.measure(work / "paths", counts.allocations, counts.cni_rounds,
                                  counts.sessions, counts.events,
                                  pods=counts.first_handshakes,
                                  reused=counts.reused)  # fmt: skip
        at_scale = doc.samples.pop("allocate_ms", {})
        doc.latency("allocate_ms", run.allocate_ms, "raw libbpf attach", run.raw_attach_ms,
                    **at_scale)  # fmt: skip
        doc.latency("allocate_reused_ms", run.allocate_reused_ms,
                    "a free, prepared device's Allocate", run.allocate_ms)  # fmt: skip
        doc.latency("cni_add_del_ms", run.cni_ms, "host-device + host-local", run.host_device_ms,
                    **{"netns move floor": run.move_floor_ms})  # fmt: skip
        floor = figures.latency(run.move_floor_ms, "", run.move_floor_ms, Goal(""))
        doc.figures["cni_add_del_ms"]["floor"] = {"name": "netns move floor", "p50": floor["p50"],
                                                  "p99": floor["p99"], "n": floor["n"]}  # fmt: skip
        doc.latency("handshake_ms", run.handshake_ms, "bare SEQPACKET echo", run.echo_ms)
        doc.latency("handshake_first_ms", run.handshake_first_ms,
                    "the same pod's next handshake", run.handshake_next_ms)  # fmt: skip
        doc.latency("health_event_ms", run.health_ms, "kernel netlink notification", run.netlink_ms)
        if big.startup_s:
            doc.value("startup_1000_devices_s", big.startup_s,
                      f"afxdpd with {run.devices} devices", run.startup_s)  # fmt: skip

    async def lifecycle() -> None:
        ours = await rates.lifecycles_per_s(counts.pods, counts.concurrency)
        base = await rates.host_device_per_s(work, counts.pods, counts.concurrency)
        doc.value("pod_lifecycle_per_s", ours, "host-device + host-local pod network", base,
                  pods=counts.pods, concurrency=counts.concurrency)  # fmt: skip

    async def rx() -> None:
        got = await rates.rx(work, counts.rx_seconds)
        for mode in ("xsk", "kernel"):
            if not outran(got[mode]):
                raise rx_error(mode, got[mode])
        doc.value("xsk_rx_pps", got["xsk"]["pps"], "kernel UDP socket", got["kernel"]["pps"],
                  sender_pps=round(got["xsk"]["sender_pps"]), dropped=got["xsk"]["dropped"],
                  baseline_sender_pps=round(got["kernel"]["sender_pps"]),
                  baseline_dropped=got["kernel"]["dropped"], attach_mode=got["attach_mode"],
                  seconds=counts.rx_seconds)  # fmt: skip

    big = scale.ScaleRun()
    await doc.measure(["startup_1000_devices_s", "rss_mb"], big_node)
    keys = ["allocate_ms", "allocate_reused_ms", "cni_add_del_ms", "handshake_ms",
            "handshake_first_ms", "health_event_ms"]  # fmt: skip
    await doc.measure([*keys, "startup_1000_devices_s"], small_node)
    await doc.measure(["pod_lifecycle_per_s"], lifecycle)
    await doc.measure(["xsk_rx_pps"], rx)
    return doc


def outran(rx: dict[str, Any]) -> bool:
    """A receive rate measures the receiver only if its queue overflowed in the
    window and it took less than was offered."""
    return bool(rx["dropped"] > 0 and rx["pps"] < rx["sender_pps"])


def rx_error(mode: str, rx: dict[str, Any]) -> Exception:
    return RuntimeError(f"{mode}: the sender ({rx['sender_pps']:.0f} pps) did not outrun the "
                        f"receiver ({rx['pps']:.0f} pps, {rx['dropped']} dropped): "
                        "not a receive rate")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="benchmarks/run.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--quick", action="store_true", help="smaller counts (under 2 minutes)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results file (%(default)s)")
    args = ap.parse_args(argv)
    counts = QUICK if args.quick else Counts()
    with tempfile.TemporaryDirectory(prefix="afxdp-bench-") as tmp:
        doc = anyio.run(measure_all, counts, Path(tmp), backend_options={"use_uvloop": True})
    text = json.dumps(doc.document(), indent=2)
    args.out.write_text(text + "\n")
    args.out.with_name(SAMPLES.name).write_text(json.dumps(
        {"quick": args.quick, "counts": counts.__dict__, "samples": doc.samples}) + "\n")  # fmt: skip
    print(text)
    return 1 if doc.failed else 0


if __name__ == "__main__":
    sys.exit(main())
