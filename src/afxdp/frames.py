"""Datapath counters: what our XDP programs counted, read for /metrics and status.

The map-in-map program counts each frame's verdict per CPU and queue
(``bpf/slot.py``). A read takes, on the event loop, a new fd of each device's
counters map (so a program that ends meanwhile cannot recycle the number
under the reader), then reads every map in one worker thread: one map read per
device, never on the event loop.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING

import msgspec

from afxdp.bpf import slot
from afxdp.bpf.libbpf import BpfError
from afxdp.workers import Work, run_sync

if TYPE_CHECKING:
    from afxdp.datapath import Program

log = logging.getLogger(__name__)


class DeviceFrames(msgspec.Struct, frozen=True):
    """One device's counters: frames by (queue, action), summed over CPUs."""

    pool: str
    device: str
    counts: dict[tuple[int, str], int]


async def read(programs: Iterable[tuple[str, str, Program]]) -> list[DeviceFrames]:
    """The counters of every ``(pool, device, program)`` whose program counts."""
    fds: list[tuple[str, str, int]] = []
    for pool, device, program in programs:
        try:
            fd = program.counters_fd()
        except OSError as exc:  # its maps were closed: it ended
            log.debug("%s: no counters: %s", device, exc)
            continue
        if fd is not None:
            fds.append((pool, device, fd))
    if not fds:
        return []
    return await run_sync(Work.NETLINK, _read_all, fds)


def _read_all(fds: list[tuple[str, str, int]]) -> list[DeviceFrames]:
    out = []
    for pool, device, fd in fds:
        try:
            out.append(DeviceFrames(pool, device, slot.read_counters(fd)))
        except BpfError as exc:
            log.warning("%s: reading its XDP counters failed: %s", device, exc)
        finally:
            os.close(fd)
    return out
