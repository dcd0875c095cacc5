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
1.3 ms of every Allocate's 2.2 ms).

An unreadable record is moved aside (``state.json.unreadable``), never trusted,
and so is one with an entry that names what is not afxdpd's: a device that
cannot be a netdev name (``../../x``), a pinned map other than the one
afxdpd pins for that pool and device (``pinning.map_path``), a netdev
description of another device. Every name and path acted on at a start
(socket dirs removed, maps unpinned, programs detached) is checked here, where
records are read. Such a record tells nothing about who holds what: ``load``
says so (``unreadable``), and until kubelet's PodResources answers no device
may be handed out, prepared or released (devices.py, ``distrust``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import msgspec

from afxdp.bpf import pinning
from afxdp.journal import Journal, Unreadable
from afxdp.netdev import description_problem, name_problem

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
    # Taken over from kubelet's word alone (the record was lost) while the
    # device was in its pod: what program and map it carries is not known.
    setup_unknown: bool = False


class Record(msgspec.Struct, forbid_unknown_fields=False):
    version: int = VERSION
    allocations: dict[str, Allocation] = {}


class StateStore:
    """The record, kept in memory and (with a ``state_dir``) on disk."""

    def __init__(self, state_dir: Path | None, pin_dir: Path | None = None) -> None:
        """``pin_dir``: where afxdpd pins maps (a record naming a pin when there
        is none is not trusted)."""
        self.path = state_dir / FILE_NAME if state_dir is not None else None
        self.pin_dir = pin_dir
        self.record = Record()
        self.unreadable = False  # the last load found a record it could not trust
        self._journal: Journal[str, Allocation] = Journal(
            self.path,
            key=lambda a: a.device,
            key_type=str,
            value_type=Allocation,
            snapshot=lambda allocs: Record(allocations={a.device: a for a in allocs}),
            from_snapshot=lambda line: msgspec.json.decode(line, type=Record).allocations.values(),
            check=self._problem,
        )
        # One dict: the record's allocations are the journal's entries.
        self.record.allocations = self._journal.entries

    @property
    def torn(self) -> bool:
        """The last load skipped a change whose write never finished: the record
        may lack the allocation it was recording (Allocate may have answered)."""
        return self._journal.torn

    def load(self) -> Record:
        """The record on disk: an empty one when there is none, and when it
        cannot be trusted (then ``unreadable`` is set: an empty record is not
        "nothing is allocated")."""
        self.unreadable = False
        try:
            self._journal.load()
        except Unreadable as exc:
            self.unreadable = True
            log.error("%s; no device is handed out, prepared or released until kubelet's "
                      "PodResources says who holds it", exc)  # fmt: skip
        return self.record

    def _problem(self, alloc: Allocation) -> str | None:
        """Why ``alloc`` names something that is not afxdpd's; None when it does not."""
        what = f"allocation of {alloc.device!r}"
        problem = name_problem(alloc.device)
        if problem is not None:
            return f"{what}: the device {problem}"
        if alloc.pool in ("", ".", "..") or "/" in alloc.pool or "\0" in alloc.pool:
            return f"{what}: the pool {alloc.pool!r} is not a name"
        if alloc.pinned is not None:
            ours = self.pin_dir and pinning.map_path(self.pin_dir, alloc.pool, alloc.device)
            if ours is None or alloc.pinned != str(ours):
                return (f"{what}: the pinned map {alloc.pinned!r} is not the one afxdpd pins "
                        f"for it ({ours or 'no pin dir'})")  # fmt: skip
        problem = description_problem(alloc.netdev, alloc.device)
        return f"{what}: {problem}" if problem is not None else None

    async def put(self, allocations: list[Allocation]) -> None:
        await self._journal.put(allocations)

    async def remove(self, device: str) -> None:
        await self._journal.remove(device)
