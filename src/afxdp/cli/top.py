"""``afxdpctl top``: each device's XDP verdicts per second, refreshed in the terminal.

What the map-in-map program counts (``afxdpctl status``'s ``xdp_frames``),
as rates between two status reads: a user sees at once that traffic arrives
on queue 3 while the socket is bound on queue 0 (``no_socket/s`` on queue 3).
``rates`` and ``lines`` do no I/O and are tested on plain data; ``run`` reads
the status every ``--interval`` seconds until interrupted (or ``--count``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import msgspec

from afxdp import control
from afxdp.cli.common import Exit, table
from afxdp.status import QueueFrames, Status

ACTIONS = ("redirected", "no_socket", "control")
CLEAR = "\x1b[H\x1b[2J"  # cursor home, clear the screen
Row = tuple[str, str, int, tuple[float, ...], tuple[int, ...]]  # pool, device, queue, rates, totals


def _frames(doc: Status) -> dict[tuple[str, str, int], QueueFrames]:
    return {(p.label, d.id, q.queue): q for p in doc.pools for d in p.devices
            for q in d.xdp_frames or ()}  # fmt: skip


def rates(before: Status, now: Status, seconds: float) -> list[Row]:
    """Each (pool, device, queue) ``now`` counts frames on: frames per second
    of each action since ``before`` (a counter that went back, a program
    loaded again, counts from zero), and the totals."""
    old = _frames(before)
    rows = []
    for key, q in sorted(_frames(now).items()):
        totals = tuple(getattr(q, a) for a in ACTIONS)
        prev = old.get(key)
        then = tuple(getattr(prev, a) for a in ACTIONS) if prev else (0,) * len(ACTIONS)
        per_s = tuple(max(n - b if n >= b else n, 0) / seconds for n, b in zip(totals, then,
                                                                          strict=True))  # fmt: skip
        rows.append((*key, per_s, totals))
    return rows


def lines(now: Status, rows: list[Row], seconds: float) -> list[str]:
    head = f"{now.node}: datapath {now.datapath or 'unknown'}, every {seconds:g} s (Ctrl-C ends)"
    if not rows:
        why = ("no device counts frames (the per-pod datapath does not count)"
               if now.datapath != "map-in-map" else "no frames yet")  # fmt: skip
        return [head, why]
    rows_out = table(
        ["POOL", "DEVICE", "QUEUE", "REDIRECTED/S", "NO-SOCKET/S", "CONTROL/S", "TOTAL(R/N/C)"],
        [(pool, dev, queue, *(f"{r:,.0f}" for r in per_s), "/".join(map(str, totals)))
         for pool, dev, queue, per_s, totals in rows],
    )  # fmt: skip
    return [head, "", *rows_out]


def configure(p: argparse.ArgumentParser, *, run_dir: Path) -> None:
    p.add_argument("--run-dir", type=Path, default=run_dir,
                   help="afxdpd's --run-dir (default: %(default)s)")  # fmt: skip
    p.add_argument("--interval", type=float, default=1.0, metavar="S",
                   help="seconds between two reads (default: %(default)s)")  # fmt: skip
    p.add_argument("--count", type=int, default=0, metavar="N",
                   help="end after N refreshes (default: until Ctrl-C)")  # fmt: skip
    p.set_defaults(func=run)


def _read(run_dir: Path) -> Status | None:
    try:
        return control.fetch_status(run_dir)
    except (OSError, msgspec.MsgspecError) as exc:
        print(f"afxdpd is not answering on {run_dir / control.SOCKET_NAME}: {exc}",
              file=sys.stderr)  # fmt: skip
        return None


def run(args: argparse.Namespace) -> int:
    if args.interval <= 0:
        print("top: --interval must be above 0", file=sys.stderr)
        return Exit.CONFIG
    before = _read(args.run_dir)
    if before is None:
        return 3  # afxdpctl status's "not answering"
    then, shown = time.monotonic(), 0
    clear = CLEAR if sys.stdout.isatty() else ""
    try:
        while not args.count or shown < args.count:
            time.sleep(args.interval)
            now = _read(args.run_dir)
            if now is None:
                return 3
            at = time.monotonic()
            out = lines(now, rates(before, now, at - then), args.interval)
            sys.stdout.write(clear + "\n".join(out) + "\n")
            sys.stdout.flush()
            before, then, shown = now, at, shown + 1
    except KeyboardInterrupt:
        pass
    return Exit.OK
