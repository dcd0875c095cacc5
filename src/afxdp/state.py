"""The durable record: what kubelet cannot tell a restarted afxdpd.

Kubelet's PodResources says which pod holds which device; it does not say how
we set that device up. One file under ``--state-dir`` (default
``/var/lib/afxdp/state.json``) keeps, per allocated device: its pool, the id of
the program we attached (so its XSKMAP can be had again), whether the map is
pinned, and the netdev as the host saw it (a device in its pod is not in our
netns, yet its pool must still count it). It is a journal (journal.py): the
whole record on its first line, then one line per allocation made or ended;
a crash of afxdpd leaves whole lines, never half of one. No fsync, on purpose:
the record must outlive afxdpd, and the page cache does that; what only an
fsync would add is surviving the node's own crash, after which no program, map
or pod netns of the record exists any more and kubelet allocates again (it cost
1.3 ms of every Allocate's 2.2 ms). An unreadable record is moved aside, never
trusted.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import msgspec

from afxdp.journal import Journal, Unreadable

log = logging.getLogger(__name__)

FILE_NAME = "state.json"
VERSION = 1


class Allocation(msgspec.Struct, forbid_unknown_fields=False):
    pool: str
    device: str
    prog_id: int | None = None  # our program on the device; None in a raw pool
    pinned: str | None = None  # the pinned map's path, in pinned-map pools
    secondary: bool = False  # a cdq secondary we created (deleted when it ends)
    netdev: dict[str, Any] = {}  # inventory.NetDev as builtins


class Record(msgspec.Struct, forbid_unknown_fields=False):
    version: int = VERSION
    allocations: dict[str, Allocation] = {}


class StateStore:
    """The record, kept in memory and (with a ``state_dir``) on disk."""

    def __init__(self, state_dir: Path | None) -> None:
        self.path = state_dir / FILE_NAME if state_dir is not None else None
        self.record = Record()
        self._journal: Journal[str, Allocation] = Journal(
            self.path,
            key=lambda a: a.device,
            key_type=str,
            value_type=Allocation,
            snapshot=lambda allocs: Record(allocations={a.device: a for a in allocs}),
            from_snapshot=lambda line: msgspec.json.decode(line, type=Record).allocations.values(),
        )
        # One dict: the record's allocations are the journal's entries.
        self.record.allocations = self._journal.entries

    def load(self) -> Record:
        """The record on disk (an empty one when there is none or it is unreadable)."""
        try:
            self._journal.load()
        except Unreadable as exc:
            log.error("%s, starting from kubelet's view", exc)
        return self.record

    async def put(self, allocations: list[Allocation]) -> None:
        await self._journal.put(allocations)

    async def remove(self, device: str) -> None:
        await self._journal.remove(device)
