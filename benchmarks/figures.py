"""The figures of the benchmark document: latency percentiles or single values,
each beside its baseline (measured in the same run) with its goal and whether
the goal is met. No I/O here: ``run.py`` measures, ``table.py`` renders.

A goal is data (``Goal``), not prose, so that "met" is computed, never typed;
its ``text`` is what the document and the README table show.
"""

from __future__ import annotations

import math
import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

Figure = dict[str, Any]


def percentile(samples: Sequence[float], q: float) -> float:
    """The nearest-rank percentile: a value that was actually observed (no
    interpolation), so p99 of 100 samples is the 99th smallest."""
    if not samples:
        raise ValueError("no samples")
    ordered = sorted(samples)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def _r(x: float) -> float:
    return round(x, 3)


@dataclass(frozen=True)
class Goal:
    """What a figure must reach. Bounds on ours: ``p50_max``/``p99_max`` (ms),
    ``max``/``min`` (values); ``ratio_max`` bounds ours p50 (or value) over the
    named baseline's."""

    text: str
    p50_max: float | None = None
    p99_max: float | None = None
    max: float | None = None
    min: float | None = None
    ratio_max: float | None = None
    ratio_min: float | None = None

    def met(self, ours: Figure, baseline: Figure) -> bool:
        central = ours.get("p50", ours.get("value"))
        if central is None:
            return False
        r = _ratio(ours, baseline)
        checks: list[tuple[float | None, bool]] = [
            (self.p50_max, self.p50_max is not None and ours["p50"] <= self.p50_max),
            (self.p99_max, self.p99_max is not None and ours["p99"] <= self.p99_max),
            (self.max, self.max is not None and central <= self.max),
            (self.min, self.min is not None and central >= self.min),
            (self.ratio_max, self.ratio_max is not None and r <= self.ratio_max),
            (self.ratio_min, self.ratio_min is not None and r >= self.ratio_min),
        ]
        return all(ok for bound, ok in checks if bound is not None)


def _ratio(ours: Figure, baseline: Figure) -> float:
    a = ours.get("p50", ours.get("value"))
    b = baseline.get("p50", baseline.get("value"))
    if a is None or not b:
        return math.inf
    return float(a) / float(b)


def ratio(figure: Figure) -> float | None:
    """Ours over the baseline (p50 for latencies, the value otherwise)."""
    r = _ratio(figure, figure.get("baseline", {}))
    return None if math.isinf(r) else round(r, 2)


def latency(samples: Sequence[float], baseline_name: str, baseline: Sequence[float],
            goal: Goal) -> Figure:  # fmt: skip
    """A latency figure in ms from raw samples of ours and of the baseline."""
    fig: Figure = {"unit": "ms", "p50": _r(percentile(samples, 50)),
                   "p99": _r(percentile(samples, 99)), "n": len(samples)}  # fmt: skip
    base: Figure = {"name": baseline_name, "p50": _r(percentile(baseline, 50)),
                    "p99": _r(percentile(baseline, 99)), "n": len(baseline)}  # fmt: skip
    return {**fig, "baseline": base, "goal": goal.text, "met": goal.met(fig, base)}


def value(unit: str, ours: float, baseline_name: str, baseline: float, goal: Goal,
          **extra: Any) -> Figure:  # fmt: skip
    """A single-value figure (a rate, a size, a duration) beside its baseline."""
    fig: Figure = {"unit": unit, "value": _r(ours)}
    base: Figure = {"name": baseline_name, "value": _r(baseline)}
    return {**fig, "baseline": base, "goal": goal.text, "met": goal.met(fig, base), **extra}


def failed(unit: str, goal: Goal, error: str) -> Figure:
    """A figure whose measurement failed: it is in the document, unmet, with why."""
    return {"unit": unit, "value": None, "baseline": {}, "goal": goal.text, "met": False,
            "error": error}  # fmt: skip


def machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "kernel": platform.release()}
