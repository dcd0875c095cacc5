"""A keyed record on disk that costs one small append per change.

Both durable records (state.py's allocations, cni/attachments.py's attachments)
are written on the paths kubelet and the CNI runtime wait on. Rewriting the
whole file for every change (temp file, rename) costs in proportion to what is
recorded, and on ext4 the rename frees the old file's blocks (with ``discard``,
0.4 ms here). So the file is JSON lines:

- the first line is a snapshot of every entry, in the shape its store chooses
  (the shape the whole file had before, so an older file, one line without a
  newline, reads as a snapshot);
- each later line is one change: ``{"put": <entry>}`` or ``{"remove": <key>}``.

Each change is appended (``O_APPEND``, one write) and the file is rewritten as
a snapshot (temp file, rename: atomic) once the changes outnumber the entries,
and after a write failed (so a change that may be half on disk is never read).
A crash of afxdpd leaves whole lines; a last line without its newline (the
node's own crash, or a disk full) was never acknowledged and is skipped. No
fsync: the records must outlive afxdpd, not the node (see state.py).

Writes go one at a time, in a worker thread, in the order of the changes;
changes made while a write is under way go out together in the next one.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Generic, NoReturn, TypeVar

import anyio
import msgspec

from afxdp.jsondepth import too_deep
from afxdp.workers import Work, run_sync

log = logging.getLogger(__name__)

K = TypeVar("K")
V = TypeVar("V")

COMPACT_AT = 64  # changes always allowed before a snapshot, however few entries


class Unreadable(Exception):
    """The file is not a journal we can trust, or names what must not be
    touched (it was moved aside)."""


class _NotJson(Exception):
    """A line that our own checks refuse before a decoder sees it."""


def _checked(line: bytes) -> bytes:
    """``line``, or _NotJson when it is not UTF-8 or nests too deep.

    Ours, not the decoder's, so that every such file is moved aside alike:
    msgspec raises UnicodeDecodeError for a bad byte before 0.23 (DecodeError
    since), and RecursionError for deep nesting, which would stop afxdpd's
    start instead (a record is 4 levels deep; no line of ours nests deeper).
    """
    try:
        line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _NotJson(f"not UTF-8: byte {exc.start} of a line") from None
    if (deep := too_deep(line)) is not None:
        raise _NotJson(f"a line {deep}")
    return line


class Journal(Generic[K, V]):
    """Entries of type ``V`` by key, in memory and (with a ``path``) on disk.

    ``key`` names an entry; ``snapshot`` and ``from_snapshot`` give the first
    line's shape; ``key_type`` and ``value_type`` read the change lines.
    """

    def __init__(
        self,
        path: Path | None,
        *,
        key: Callable[[V], K],
        key_type: Any,
        value_type: type[V],
        snapshot: Callable[[list[V]], object],
        from_snapshot: Callable[[bytes], Iterable[V]],
        check: Callable[[V], str | None] = lambda _: None,
    ) -> None:
        self.path = path
        self.entries: dict[K, V] = {}
        self._key, self._key_type, self._value_type = key, key_type, value_type
        self._snapshot, self._from_snapshot = snapshot, from_snapshot
        self._check = check
        self._pending: list[bytes] = []
        self._changes = 0  # change lines in the file after its snapshot
        self._rewrite = True  # the file must be rewritten whole before appending
        self._writing = anyio.Lock()
        # The last load skipped an unfinished last line: a change that may or
        # may not have counted (its writer was killed mid-write) is not known.
        self.torn = False

    def load(self) -> dict[K, V]:
        """The entries on disk (none when there is no file). A file that is
        unreadable, or has an entry that ``check`` finds a problem with (one
        that names what must not be touched), is moved aside (to
        ``<name>.unreadable``) and Unreadable raised: the journal is then
        empty, none of its entries acted on."""
        self.entries.clear()  # in place: a store may share this dict
        self._rewrite = True
        self.torn = False
        if self.path is None:
            return self.entries
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return self.entries
        try:
            entries = self._replay(data)
        except (_NotJson, msgspec.DecodeError, msgspec.ValidationError) as exc:
            self._set_aside(f"is unreadable ({exc})", exc)
        problems = [p for p in map(self._check, entries.values()) if p]
        if problems:
            self._set_aside(f"cannot be trusted: {'; '.join(problems)}", None)
        self.entries.update(entries)
        return self.entries

    def _set_aside(self, why: str, cause: Exception | None) -> NoReturn:
        assert self.path is not None
        aside = self.path.with_name(f"{self.path.name}.unreadable")
        os.replace(self.path, aside)
        raise Unreadable(f"{self.path} {why}; moved to {aside.name}") from cause

    def _replay(self, data: bytes) -> dict[K, V]:
        lines = data.split(b"\n")
        if len(lines) == 1:  # the whole file as older versions wrote it (by rename)
            lines.append(b"")
        if lines[-1]:  # no newline after it: a write that never finished
            self.torn = True
            log.warning(
                "%s: skipping an unfinished last line (%d bytes)", self.path, len(lines[-1])
            )
        lines = lines[:-1]
        if not lines:
            return {}
        entries = {self._key(v): v for v in self._from_snapshot(_checked(lines[0]))}
        for line in lines[1:]:
            change = msgspec.json.decode(_checked(line), type=dict[str, Any])
            if "put" in change:
                value = msgspec.convert(change["put"], self._value_type)
                entries[self._key(value)] = value
            elif "remove" in change:
                entries.pop(msgspec.convert(change["remove"], self._key_type), None)
            else:
                raise msgspec.ValidationError(f"a change line without put or remove: {line!r}")
        return entries

    async def put(self, values: Iterable[V]) -> None:
        lines = []
        for value in values:
            self.entries[self._key(value)] = value
            lines.append(msgspec.json.encode({"put": value}))
        await self._write(lines)

    async def remove(self, key: K) -> None:
        if self.entries.pop(key, None) is not None:
            await self._write([msgspec.json.encode({"remove": key})])

    async def _write(self, lines: list[bytes]) -> None:
        if self.path is None:
            return
        self._pending.extend(lines)
        async with self._writing:
            if not self._pending and not self._rewrite:
                return  # a write that ran while this one waited took its lines
            if self._rewrite or self._changes + len(self._pending) > max(
                COMPACT_AT, 2 * len(self.entries)
            ):
                # The snapshot holds every change made so far: pending ones too.
                self._pending.clear()
                data = msgspec.json.encode(self._snapshot(list(self.entries.values()))) + b"\n"
                changes, append = 0, False
            else:
                data = b"".join(line + b"\n" for line in self._pending)
                changes, append = self._changes + len(self._pending), True
                self._pending.clear()
            try:
                await run_sync(Work.DISK, self._store, data, append)
            except BaseException:
                self._rewrite = True  # what is on disk may lack changes, or end in half a line
                raise
            self._changes, self._rewrite = changes, False

    def _store(self, data: bytes, append: bool) -> None:
        assert self.path is not None
        if append:
            with self.path.open("ab") as f:
                f.write(data)
            return
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{self.path.name}.tmp{os.getpid()}")
        tmp.write_bytes(data)
        tmp.replace(self.path)
