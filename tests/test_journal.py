"""The durable records are journals: each change one appended line, the file
rewritten whole only when the changes outnumber the entries or a write failed;
what a crash or an older version left reads back; what cannot be trusted is
moved aside."""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path

import anyio
import msgspec
import pytest

from afxdp import journal
from afxdp.bpf import pinning
from afxdp.cni.attachments import Attachment, AttachmentStore
from afxdp.netdev import NetDev
from afxdp.state import Allocation, Record, StateStore

pytestmark = pytest.mark.anyio


def _alloc(device: str, prog_id: int = 7) -> Allocation:
    netdev = msgspec.json.decode(msgspec.json.encode(NetDev(name=device, ifindex=1, driver="veth")))
    return Allocation(pool="p", device=device, prog_id=prog_id, netdev=netdev)


def _attachment(container: str, device: str = "d0") -> Attachment:
    return Attachment(container, "net1", device, f"/run/netns/{container}", "n1")


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines()


async def test_changes_are_appended_to_the_snapshot_and_read_back(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    await store.put([_alloc("a"), _alloc("b")])  # the first write: a snapshot
    path = tmp_path / "state.json"
    inode = path.stat().st_ino
    await store.put([_alloc("c")])
    await store.remove("a")
    await store.put([_alloc("b", prog_id=9)])
    await store.remove("nothing")  # not recorded: no line
    assert path.stat().st_ino == inode  # appended to, never replaced
    lines = _lines(path)
    assert len(lines) == 4
    assert sorted(msgspec.json.decode(lines[0], type=Record).allocations) == ["a", "b"]
    assert msgspec.json.decode(lines[2]) == {"remove": "a"}
    again = StateStore(tmp_path).load().allocations
    assert again == {"b": _alloc("b", prog_id=9), "c": _alloc("c")}
    assert again == store.record.allocations


async def test_the_file_is_rewritten_as_a_snapshot_once_changes_outnumber_entries(
    tmp_path: Path,
) -> None:
    store = StateStore(tmp_path)
    path = tmp_path / "state.json"
    await store.put([_alloc("keep")])
    inode = path.stat().st_ino
    for i in range(journal.COMPACT_AT):
        await store.put([_alloc(f"x{i}")])
        await store.remove(f"x{i}")
        if path.stat().st_ino != inode:
            break
    assert path.stat().st_ino != inode, "never compacted"
    assert len(_lines(path)) < journal.COMPACT_AT + 1
    assert StateStore(tmp_path).load().allocations == {"keep": _alloc("keep")}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temp file left


async def test_a_file_an_older_version_wrote_reads_as_the_snapshot(tmp_path: Path) -> None:
    # Before the journal: the whole record, one JSON document, no newline.
    old = Record(allocations={"a": _alloc("a")})
    (tmp_path / "state.json").write_bytes(msgspec.json.encode(old))
    store = StateStore(tmp_path)
    assert store.load().allocations == {"a": _alloc("a")}
    await store.put([_alloc("b")])  # and is carried on
    assert sorted(StateStore(tmp_path).load().allocations) == ["a", "b"]
    path = tmp_path / "cni.json"
    path.write_text(
        '[{"container_id": "c1", "ifname": "net1", "device": "d0", "netns": "/run/netns/c1",'
        ' "network": "n1", "field_of_a_newer_version": 1}]'
    )
    assert AttachmentStore(path).all() == [_attachment("c1")]


async def test_an_unfinished_last_line_is_skipped_and_the_next_write_replaces_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "cni.json"
    store = AttachmentStore(path)
    await store.put(_attachment("c1"))
    await store.put(_attachment("c2"))
    with path.open("ab") as f:  # a node crash (or a full disk) mid-append
        f.write(b'{"put": {"container_id": "c3", "ifn')
    with caplog.at_level(logging.WARNING, logger="afxdp.journal"):
        again = AttachmentStore(path)
    assert [a.container_id for a in again.all()] == ["c1", "c2"]
    assert "skipping an unfinished last line" in caplog.text
    await again.remove(("c1", "net1"))
    assert b"c3" not in path.read_bytes()
    assert [a.container_id for a in AttachmentStore(path).all()] == ["c2"]


async def test_an_unreadable_file_is_moved_aside_and_not_trusted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = StateStore(tmp_path)
    await store.put([_alloc("a")])
    path = tmp_path / "state.json"
    with path.open("ab") as f:  # a whole line, but not a change we wrote
        f.write(b'{"put": {"pool": 3}}\n{"remove": "a"}\n')
    with caplog.at_level(logging.ERROR, logger="afxdp.state"):
        assert StateStore(tmp_path).load().allocations == {}
    assert "state.json is unreadable" in caplog.text
    assert "moved to state.json.unreadable" in caplog.text
    assert not path.exists()
    assert b'"pool":3' in (tmp_path / "state.json.unreadable").read_bytes().replace(b" ", b"")
    path.write_bytes(b'[]\n{"neither": 1}\n')
    with caplog.at_level(logging.ERROR, logger="afxdp.cni.attachments"):
        assert AttachmentStore(path).all() == []
    assert "a change line without put or remove" in caplog.text


@pytest.mark.parametrize(
    ("line", "why"),
    [
        # Deep enough for the decoder to meet the recursion limit (RecursionError).
        (b'{"remove": "a", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
         "nests deeper than 64 levels (at x"),
        # One level past the bound: the decoder would take it; the bound is ours.
        (b'{"remove": "a", "x": ' + b"[" * 64 + b"]" * 64 + b"}", "nests deeper than 64"),
        (b'{"remove": "\xff"}', "not UTF-8: byte 12 of a line"),
    ],
    ids=["recursion-deep", "one-past-the-bound", "not-utf8"],
)  # fmt: skip
async def test_a_line_too_deep_or_not_utf8_is_moved_aside_like_any_unreadable_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, line: bytes, why: str
) -> None:
    store = StateStore(tmp_path)
    await store.put([_alloc("a")])
    path = tmp_path / "state.json"
    with path.open("ab") as f:
        f.write(line + b"\n")
    with caplog.at_level(logging.ERROR, logger="afxdp.state"):
        assert StateStore(tmp_path).load().allocations == {}
    assert "state.json is unreadable" in caplog.text
    assert why in caplog.text
    assert (tmp_path / "state.json.unreadable").exists() and not path.exists()
    path.write_bytes(line + b"\n")  # a snapshot line too
    with caplog.at_level(logging.ERROR, logger="afxdp.cni.attachments"):
        assert AttachmentStore(path).all() == []
    assert caplog.text.count(why) == 2


async def test_after_a_failed_write_the_next_one_rewrites_every_change(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    path = tmp_path / "state.json"
    await store.put([_alloc("a")])
    os.unlink(path)
    path.mkdir()  # the append cannot open it
    with pytest.raises(IsADirectoryError):
        await store.put([_alloc("b")])
    path.rmdir()
    await store.remove("a")
    assert StateStore(tmp_path).load().allocations == {"b": _alloc("b")}
    assert len(_lines(path)) == 1  # a snapshot, not an append to what was lost


async def test_concurrent_changes_reach_the_disk_in_their_order(tmp_path: Path) -> None:
    path = tmp_path / "cni.json"
    store = AttachmentStore(path)
    await store.put(_attachment("c0"))
    first = _attachment("c1")
    async with anyio.create_task_group() as tg:
        for n in range(30):
            tg.start_soon(store.put, replace(first, device=f"d{n}"))
            tg.start_soon(store.put, _attachment(f"other{n}"))
    assert AttachmentStore(path).get(("c1", "net1")) == replace(first, device="d29")
    assert len(AttachmentStore(path).all()) == 32


def _write_record(tmp_path: Path, *allocations: Allocation) -> Path:
    path = tmp_path / "state.json"
    record = Record(allocations={a.device: a for a in allocations})
    path.write_bytes(msgspec.json.encode(record) + b"\n")
    return path


async def test_a_state_record_naming_what_is_not_afxdpds_is_moved_aside_naming_each_entry(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pins = tmp_path / "pins"
    good = Allocation(pool="p", device="b", pinned=str(pinning.map_path(pins, "p", "b")))
    bad = [
        Allocation(pool="p", device="../../x", prog_id=3),
        Allocation(pool="p", device="nul\0", prog_id=3),
        Allocation(pool="p", device="a", pinned=str(tmp_path / "elsewhere" / "xsks_map")),
        Allocation(pool="..", device="c", pinned=str(pinning.map_path(pins, "..", "c"))),
        Allocation(pool="p", device="d", netdev=_alloc("eth0").netdev),
        Allocation(pool="p", device="e", netdev={"name": "e"}),
    ]
    path = _write_record(tmp_path, good)
    store = StateStore(tmp_path, pins)
    assert store.load().allocations == {"b": good} and not store.unreadable
    for alloc in bad:
        _write_record(tmp_path, good, alloc)
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="afxdp.state"):
            assert store.load().allocations == {}  # not one entry of it is acted on
        assert store.unreadable
        assert f"allocation of {alloc.device!r}: " in caplog.text, caplog.text
        assert "state.json cannot be trusted" in caplog.text and not path.exists()
        assert (tmp_path / "state.json.unreadable").exists()
    # Without a pin dir no pinned map is afxdpd's.
    _write_record(tmp_path, good)
    assert StateStore(tmp_path).load().allocations == {}


async def test_an_attachment_record_naming_what_is_not_afxdpds_is_moved_aside(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "cni.json"
    good = _attachment("c1")
    bad = [
        replace(good, netns="/tmp/a-fifo"),  # opened and entered at DEL
        replace(good, netns="/run/netns/../../dev/watchdog"),
        replace(good, device="../x"),
        replace(good, ifname="a/b"),
        replace(good, container_id="../c"),
        replace(good, netdev=_alloc("eth0").netdev),
    ]
    for attachment in bad:
        path.write_bytes(msgspec.json.encode([_attachment("c0"), attachment]) + b"\n")
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="afxdp.cni.attachments"):
            assert AttachmentStore(path).all() == []
        assert f"attachment {attachment.container_id!r}/{attachment.ifname!r}: " in caplog.text
        assert "cni.json cannot be trusted" in caplog.text and not path.exists()
    path.write_bytes(msgspec.json.encode([good]) + b"\n")
    assert AttachmentStore(path).all() == [good]


async def test_load_says_when_the_record_could_not_be_trusted_and_an_empty_one_is_not_that(
    tmp_path: Path,
) -> None:
    store = StateStore(tmp_path)
    assert store.load().allocations == {} and not store.unreadable  # none yet: nothing handed out
    await store.put([_alloc("a"), _alloc("b")])  # the first write: one snapshot line
    path = tmp_path / "state.json"
    whole = path.read_bytes()
    await store.put([_alloc("c")])
    with path.open("ab") as f:  # a change line cut short is skipped, the rest trusted
        f.write(b'{"put": {"pool": "p", "dev')
    assert sorted(store.load().allocations) == ["a", "b", "c"] and not store.unreadable
    for damaged in (whole[: len(whole) // 2], whole[:-1][:-3], b"\x00\xffgarbage\n", b""):
        path.write_bytes(damaged)  # the snapshot itself cut short, or not a record at all
        assert store.load().allocations == {}
        assert store.unreadable, damaged
        assert (tmp_path / "state.json.unreadable").read_bytes() == damaged
