"""The attachments ADD made, kept on disk so DEL and GC work across restarts.

Record first, then act: ADD writes its record, marked incomplete, before its
first step and notes each step before taking it (``ipam``, ``ethtool``,
``moved``; steps that run side by side are noted together before either
starts); only its end marks it complete. So whatever a crash interrupted, a
later DEL finds what may have been done and undoes it. An undo that brought
the device home notes ``home`` until the device side has been told.

One JSON file, replaced atomically (write, rename): a crash of afxdpd leaves the
old file or the new one, never half of either.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import anyio

from afxdp.workers import Work, run_sync

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Attachment:
    container_id: str
    ifname: str
    device: str
    netns: str
    network: str
    # The ADD request, so a GC can undo this attachment as its DEL would.
    env: dict[str, str] = field(default_factory=dict)
    netconf: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] = field(default_factory=dict)
    host_up: bool = True
    # The device as the host saw it before the move, so that a restarted afxdpd
    # can still count it in its pool while it is in the pod.
    netdev: dict[str, Any] = field(default_factory=dict)
    # False from before ADD's first step until its last; records written by
    # older versions were complete ones (they were written only at the end).
    complete: bool = True
    # The steps ADD began, so that an undo runs only those (and only once).
    ipam: bool = False  # the IPAM plugin's ADD ran (or may have)
    moved: bool = False  # the device was (or may have been) moved into netns
    ethtool: list[dict[str, Any]] = field(default_factory=list)  # ethtool.Change docs
    # Undone and home, but the device side has not been told yet (it is told
    # after DEL's reply): a crash before that leaves this for the next touch.
    home: bool = False

    @property
    def key(self) -> tuple[str, str]:
        return (self.container_id, self.ifname)


class AttachmentStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._items: dict[tuple[str, str], Attachment] = {}
        self._writing = anyio.Lock()
        try:
            known = {f.name for f in fields(Attachment)}
            for item in json.loads(path.read_text()):
                # Fields a newer version added are dropped, not fatal.
                a = Attachment(**{k: v for k, v in item.items() if k in known})
                self._items[a.key] = a
        except FileNotFoundError:
            pass
        except (ValueError, TypeError, AttributeError) as exc:
            log.error("%s is unreadable (%s); starting with no attachments", path, exc)

    def get(self, key: tuple[str, str]) -> Attachment | None:
        return self._items.get(key)

    def all(self) -> list[Attachment]:
        return list(self._items.values())

    async def put(self, attachment: Attachment) -> None:
        self._items[attachment.key] = attachment
        await self._save()

    async def remove(self, key: tuple[str, str]) -> None:
        if self._items.pop(key, None) is not None:
            await self._save()

    async def _save(self) -> None:
        # fsync blocks: write in a worker thread, one write at a time, from a
        # snapshot taken on the event loop.
        doc = [asdict(a) for a in self._items.values()]
        async with self._writing:
            await run_sync(Work.DISK, self._write, doc)

    def _write(self, doc: list[dict[str, Any]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        # No fsync: the record must outlive afxdpd, not the node (a rebooted node
        # has no pod netns left to undo), and it is on every ADD's path.
        tmp.write_text(json.dumps(doc))
        tmp.replace(self.path)
