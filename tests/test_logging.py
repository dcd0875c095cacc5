"""Logs: afxdp's own level only, JSON lines, rotation, and the reason for a failure."""

from __future__ import annotations

import datetime
import json
import logging
import os
import select
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from afxdp import logsetup

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    own = {n: logging.getLogger(n).level for n in logsetup.OWN_LOGGERS}
    yield
    logsetup.stop()
    for h in root.handlers:
        if h not in saved[0]:
            h.close()
    root.handlers[:], root.level = saved
    for n, level in own.items():
        logging.getLogger(n).setLevel(level)


def _lines(path: Path) -> list[str]:
    logsetup.flush()  # written by the writer thread
    return path.read_text().splitlines()


def test_debug_applies_to_afxdp_loggers_and_not_to_third_party_ones(tmp_path: Path) -> None:
    logsetup.setup("debug", "dp.log", tmp_path)
    logging.getLogger("afxdp.netwatch").debug("ours at debug")
    logging.getLogger("afxdpd").debug("the daemon at debug")
    logging.getLogger("pyroute2.netlink").debug("theirs at debug")
    logging.getLogger("hpack.hpack").info("theirs at info")
    logging.getLogger("pyroute2.netlink").warning("theirs at warning")
    text = "\n".join(_lines(tmp_path / "dp.log"))
    assert "ours at debug" in text and "the daemon at debug" in text
    assert "theirs at debug" not in text and "theirs at info" not in text
    assert "theirs at warning" in text


def test_the_configured_level_filters_afxdp_records(tmp_path: Path) -> None:
    logsetup.setup("warning", "dp.log", tmp_path)
    logging.getLogger("afxdp.service").info("an info line")
    logging.getLogger("afxdp.service").warning("a warning line")
    text = "\n".join(_lines(tmp_path / "dp.log"))
    assert "a warning line" in text and "an info line" not in text


def test_json_lines_carry_time_level_logger_message_and_exception(tmp_path: Path) -> None:
    logsetup.setup("info", "dp.log", tmp_path, fmt="json")
    log = logging.getLogger("afxdp.cni.server")
    before = time.time()
    log.info("served %s", "ADD")
    after = time.time()
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed: %d", 7)
    first, second = (json.loads(line) for line in _lines(tmp_path / "dp.log"))
    assert (first["level"], first["logger"], first["message"]) == ("info", log.name, "served ADD")
    # RFC 3339: UTC, with its offset, to the millisecond (cut, not rounded).
    when = datetime.datetime.fromisoformat(first["time"])
    assert when.utcoffset() == datetime.timedelta(0) and first["time"].endswith("+00:00")
    assert before - 0.001 <= when.timestamp() <= after
    assert "pool" not in first and "device" not in first  # this line is about neither
    assert second["message"] == "failed: 7" and second["level"] == "error"
    assert "ValueError: boom" in second["exc_info"]


def test_json_lines_carry_the_pool_and_device_a_record_is_about(tmp_path: Path) -> None:
    logsetup.setup("info", "dp.log", tmp_path, fmt="json")
    log = logging.getLogger("afxdp.devices")
    log.info("%s: %s -> down", "p1", "eth7", extra=logsetup.about(pool="p1", device="eth7"))
    log.info("%s: connection ended", "eth8", extra=logsetup.about(device="eth8"))
    first, second = (json.loads(line) for line in _lines(tmp_path / "dp.log"))
    assert (first["pool"], first["device"], first["message"]) == ("p1", "eth7", "p1: eth7 -> down")
    assert second["device"] == "eth8" and "pool" not in second


def test_a_rotated_log_file_is_reopened(tmp_path: Path) -> None:
    logsetup.setup("info", "dp.log", tmp_path)
    log = logging.getLogger("afxdp.test")
    log.info("before rotation")
    logsetup.flush()  # written (by the writer thread) before the rotator moves the file
    (tmp_path / "dp.log").rename(tmp_path / "dp.log.1")
    log.info("after rotation")
    assert _lines(tmp_path / "dp.log") == [_lines(tmp_path / "dp.log")[0]]
    assert "after rotation" in _lines(tmp_path / "dp.log")[0]
    assert "after rotation" not in (tmp_path / "dp.log.1").read_text()


def test_records_are_written_by_a_thread_and_none_is_lost_at_exit(tmp_path: Path) -> None:
    # stderr is a pipe the container runtime may stop reading: its write must
    # block the writer thread, not the event loop. A child that logs and exits
    # at once (no flush of its own) still writes everything.
    script = textwrap.dedent(f"""
        import logging, threading
        from pathlib import Path
        from afxdp import logsetup
        logsetup.setup("info", "dp.log", Path({str(tmp_path)!r}))
        log = logging.getLogger("afxdp.test")
        for i in range(2000):
            log.info("line %d", i)
        writers = [t.name for t in threading.enumerate() if t is not threading.current_thread()]
        print(len(writers))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=ENV, timeout=60, check=True)  # fmt: skip
    assert done.stdout.strip() == "1"  # the writer thread
    lines = (tmp_path / "dp.log").read_text().splitlines()
    assert [ln.rsplit(" ", 1)[1] for ln in lines] == [str(i) for i in range(2000)]
    assert len(done.stderr.splitlines()) == 2000


def test_a_blocked_stderr_does_not_block_the_caller() -> None:
    r, w = os.pipe()
    saved = os.dup(2)
    os.dup2(w, 2)  # stderr: a pipe nobody reads yet (64 KiB fill it)
    os.close(w)
    logsetup.setup("info")
    log = logging.getLogger("afxdp.test")

    def caller() -> None:  # the event loop, say: 500 KB of log lines
        for i in range(5000):
            log.info("a line long enough to fill the pipe quickly: %d %s", i, "x" * 60)

    calling = threading.Thread(target=caller)
    try:
        calling.start()
        calling.join(5.0)
        blocked = calling.is_alive()
    finally:
        os.dup2(saved, 2)  # a write in progress still holds the pipe
        os.close(saved)
        reader = threading.Thread(target=_drained, args=(r, 30.0))
        reader.start()  # read at last: whoever waited on the pipe finishes
        calling.join()
        logsetup.stop()
        reader.join()
        os.close(r)
    assert not blocked  # the caller never waited for the pipe


def _drained(fd: int, timeout: float) -> bool:
    """Read ``fd`` until its writers are gone (True) or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        if select.select([fd], [], [], left)[0] and not os.read(fd, 1 << 16):
            return True
    return False


def test_afxdpd_says_why_its_log_file_cannot_be_opened(tmp_path: Path) -> None:
    cfg = tmp_path / "config.json"
    cfg.write_text(
        '{"logFile": "dp.log", "pools": [{"name": "p", "mode": "primary", "drivers": [{"name": "ice"}]}]}'
    )
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    done = subprocess.run(
        [sys.executable, "-m", "afxdp.cli.afxdpd", "--config", str(cfg),
         "--log-dir", str(not_a_dir)],
        capture_output=True, text=True, env=ENV, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert "cannot set up logging" in done.stderr
    assert str(not_a_dir) in done.stderr


def test_records_past_the_queues_room_are_counted_and_said(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logsetup, "QUEUED", 20)
    logsetup.setup("info", "dp.log", tmp_path)
    log = logging.getLogger("afxdp.test")
    gate = threading.Event()
    # The writer stuck (on a stderr nobody reads, say): a handler that waits.
    (writer,) = logsetup._writers
    stuck = logging.Handler()
    stuck.handle = lambda record: gate.wait(10) or True  # type: ignore[method-assign]
    writer.handlers.insert(0, stuck)
    for i in range(100):
        log.info("line %d", i)
    gate.set()
    logsetup.flush()  # the writer caught up
    log.info("after")
    lines = _lines(tmp_path / "dp.log")
    dropped = [ln for ln in lines if "log records were dropped" in ln]
    assert len(dropped) == 1 and lines[-1].endswith("after")
    kept = [ln for ln in lines if " line " in ln]
    said = int(dropped[0].split(" log records")[0].rsplit(" ", 1)[1])
    assert len(kept) + said == 100 and said > 0
