"""The attachments ADD made, kept on disk so GC works across restarts.

One JSON file, replaced atomically (write, fsync, rename): a crash leaves the
old file or the new one, never half of either.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

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

    @property
    def key(self) -> tuple[str, str]:
        return (self.container_id, self.ifname)


class AttachmentStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._items: dict[tuple[str, str], Attachment] = {}
        self._writing = anyio.Lock()
        try:
            for item in json.loads(path.read_text()):
                a = Attachment(**item)
                self._items[a.key] = a
        except FileNotFoundError:
            pass
        except (ValueError, TypeError) as exc:
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
            await anyio.to_thread.run_sync(self._write, doc)

    def _write(self, doc: list[dict[str, Any]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        with tmp.open("w") as f:
            json.dump(doc, f)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(self.path)
