"""Renders the benchmark document: the README's markdown table, and one plot of
the latency distributions (ours beside each baseline) at benchmarks/latency.png.

usage: python -m benchmarks.table [RESULTS] [--plot PNG]; prints the table.
The plot needs matplotlib (the ``bench`` extra) and the raw samples that
run.py keeps beside the results (samples.json).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from benchmarks.figures import Figure, ratio

HERE = Path(__file__).parent


def _num(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.3g}" if abs(x) < 10 else f"{x:.1f}"


def _ours(fig: Figure) -> str:
    if "p50" in fig:
        return f"{_num(fig['p50'])} / {_num(fig['p99'])} {fig['unit']}"
    return f"{_num(fig.get('value'))} {fig['unit']}"


def _baseline(fig: Figure) -> str:
    parts = []
    for base in (fig.get("baseline") or {}, fig.get("floor") or {}):
        if not base:
            continue
        shown = (f"{_num(base['p50'])} / {_num(base['p99'])}" if "p50" in base
                 else _num(base.get("value")))  # fmt: skip
        parts.append(f"{base['name']}: {shown}")
    return "; ".join(parts) or "-"


def markdown(doc: dict[str, Any]) -> str:
    """One row per figure: ours (p50 / p99, or the value), baseline, ratio, goal, met."""
    rows = [
        "| figure | ours (p50 / p99) | baseline (same run) | ratio | goal | met |",
        "|---|---|---|---|---|---|",
    ]
    for key, fig in doc["figures"].items():
        r = ratio(fig)
        met = "yes" if fig.get("met") else "**no**"
        ours = (
            _ours(fig) if "error" not in fig else f"failed: {' '.join(fig['error'].split())[:80]}"
        )
        rows.append(f"| `{key}` | {ours} | {_baseline(fig)} | "
                    f"{'-' if r is None else f'{r:.2f}x'} | {fig['goal']} | {met} |")  # fmt: skip
    m = doc["machine"]
    rows.append("")
    rows.append(f"{m['cpus']} CPUs, kernel {m['kernel']}; ratio is ours over the baseline "
                "(p50 for latencies).")  # fmt: skip
    return "\n".join(rows)


def plot(samples: dict[str, dict[str, list[float]]], path: Path) -> None:
    """Box plots of each latency figure's samples: ours beside its baselines."""
    # The bench extra; the table needs none of it (no stubs: mypy may lack it).
    import matplotlib  # type: ignore[import-not-found,unused-ignore]  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # type: ignore[import-not-found,unused-ignore]  # noqa: PLC0415

    keys = [k for k, series in samples.items() if series]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 4.2), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        names = list(samples[key])
        ax.boxplot([samples[key][n] for n in names], whis=(1, 99), showfliers=False)
        ax.set_xticks(range(1, len(names) + 1), [n.replace(" + ", " +\n") for n in names],
                      fontsize=8, rotation=15)  # fmt: skip
        ax.set_title(key)
        ax.set_ylabel("ms (whiskers: p1..p99)")
        ax.set_ylim(bottom=0)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


START, END = "<!-- bench-table:start -->", "<!-- bench-table:end -->"


def replace_between_markers(path: Path, table: str) -> None:
    """The README's table is generated: what lies between the markers is replaced."""
    text = path.read_text()
    head, sep1, rest = text.partition(START)
    _old, sep2, tail = rest.partition(END)
    if not (sep1 and sep2):
        raise SystemExit(f"{path}: no {START} ... {END} markers")
    path.write_text(f"{head}{START}\n{table.strip()}\n{END}{tail}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.table", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("results", type=Path, nargs="?", default=HERE / "results.json")
    ap.add_argument("--plot", type=Path, default=None, help="write the latency plot (PNG) here")
    ap.add_argument("--readme", type=Path, default=None,
                    help="replace the table between the bench-table markers in this file")  # fmt: skip
    args = ap.parse_args(argv)
    doc = json.loads(args.results.read_text())
    table = markdown(doc)
    print(table)
    if args.readme is not None:
        replace_between_markers(args.readme, table)
    if args.plot is not None:
        side = args.results.with_name("samples.json")
        plot(json.loads(side.read_text())["samples"], args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
