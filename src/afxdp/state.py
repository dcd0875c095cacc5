"""The durable record: what kubelet cannot tell a restarted afxdpd.

Kubelet's PodResources says which pod holds which device; it does not say how
we set that device up. One JSON file under ``--state-dir`` (default
``/var/lib/afxdp/state.json``) keeps, per allocated device: its pool, the id of
the program we attached (so its XSKMAP can be had again), whether the map is
pinned, and the netdev as the host saw it (a device in its pod is not in our
netns, yet its pool must still count it). It is replaced atomically (write a
temp file, rename): a crash of afxdpd leaves the old record or the new one, never
half of either. No fsync, on purpose: the record must outlive afxdpd, and the
page cache does that; what only an fsync would add is surviving the node's own
crash, after which no program, map or pod netns of the record exists any more
and kubelet allocates again (it cost 1.3 ms of every Allocate's 2.2 ms). An
unreadable record is moved aside, never trusted.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import anyio
import msgspec

from afxdp.workers import Work, run_sync

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
        self._writing = anyio.Lock()

    def load(self) -> Record:
        """The record on disk (an empty one when there is none or it is unreadable)."""
        if self.path is None:
            return self.record
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return self.record
        try:
            self.record = msgspec.json.decode(data, type=Record)
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            aside = self.path.with_name(f"{FILE_NAME}.unreadable")
            os.replace(self.path, aside)
            log.error("%s is unreadable (%s); moved to %s, starting from kubelet's view",
                      self.path, exc, aside.name)  # fmt: skip
        return self.record

    async def put(self, allocations: list[Allocation]) -> None:
        for a in allocations:
            self.record.allocations[a.device] = a
        await self.save()

    async def remove(self, device: str) -> None:
        if self.record.allocations.pop(device, None) is not None:
            await self.save()

    async def save(self) -> None:
        # One write at a time, each of the record as it is when its turn comes
        # (encoded on the event loop: a consistent snapshot), in a thread.
        if self.path is None:
            return
        async with self._writing:
            await run_sync(Work.DISK, self._write, msgspec.json.encode(self.record))

    def _write(self, data: bytes) -> None:
        assert self.path is not None
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(data)
        tmp.replace(self.path)
