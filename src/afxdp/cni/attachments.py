"""The attachments ADD made, kept on disk so DEL and GC work across restarts.

Record first, then act: ADD writes its record, marked incomplete, before its
first step and notes each step before taking it (``ipam``, ``ethtool``,
``moved``; steps that run side by side are noted together before either
starts); only its end marks it complete. So whatever a crash interrupted, a
later DEL finds what may have been done and undoes it. An undo that brought
the device home notes ``home`` until the device side has been told.

One file, a journal (journal.py): every attachment on its first line, then one
line per change; a crash of afxdpd leaves whole lines, never half of one. No
fsync: the record must outlive afxdpd, not the node (a rebooted node has no pod
netns left to undo), and it is on every ADD's path.

What an undo acts on is checked where the file is read: the netns it enters
(as CNI_NETNS is at ADD: netconf.netns_problem), the device and interface
names (netdev names), the container ID. A file with an entry that fails is
moved aside like an unreadable one, and none of its entries is acted on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from afxdp.cni.netconf import netns_problem, valid_container_id
from afxdp.journal import Journal, Unreadable
from afxdp.netdev import description_problem, name_problem

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
        # The snapshot line is the list of attachments: the whole file as
        # versions before the journal wrote it.
        self._journal: Journal[tuple[str, str], Attachment] = Journal(
            path,
            key=lambda a: a.key,
            key_type=tuple[str, str],
            value_type=Attachment,
            snapshot=lambda items: items,
            from_snapshot=lambda line: msgspec.json.decode(line, type=list[Attachment]),
            check=_problem,
        )
        try:
            self._journal.load()
        except Unreadable as exc:
            log.error("%s; starting with no attachments", exc)

    def get(self, key: tuple[str, str]) -> Attachment | None:
        return self._journal.entries.get(key)

    def all(self) -> list[Attachment]:
        return list(self._journal.entries.values())

    async def put(self, attachment: Attachment) -> None:
        await self._journal.put([attachment])

    async def remove(self, key: tuple[str, str]) -> None:
        await self._journal.remove(key)


def _problem(a: Attachment) -> str | None:
    """Why ``a`` names something an undo must not act on; None when it does not."""
    found = [] if valid_container_id(a.container_id) else ["the container ID is not one"]
    for role, name in (("interface", a.ifname), ("device", a.device)):
        if problem := name_problem(name):
            found.append(f"the {role} {problem}")
    found += filter(None, (netns_problem(a.netns), description_problem(a.netdev, a.device)))
    return f"attachment {a.container_id!r}/{a.ifname!r}: {', '.join(found)}" if found else None
