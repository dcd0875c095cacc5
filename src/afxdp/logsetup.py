"""Logging: stderr, plus a file under the log dir, as text or JSON lines.

The config's level applies to afxdp's own loggers only: at ``debug`` the root
logger would let pyroute2 and hpack flood the log (74 of 80 lines once), so
third-party loggers stay at WARNING. The file is reopened when a log rotator
moves it away (WatchedFileHandler), so rotation never loses lines.

Records are written by a thread of their own: a write to
stderr blocks while the container runtime does not read its pipe, and the
file handler stats its path before every line; neither may stall the event
loop that serves kubelet, the CNI and every pod's socket. A record's message
and traceback are made when it is logged; what is queued is written at exit
(waiting STOP_WAIT at most). At most QUEUED records wait: past that, records
are counted and dropped, and the next one written says how many.
"""

from __future__ import annotations

import atexit
import copy
import datetime
import json
import logging
import logging.handlers
import os
import queue
import threading
from pathlib import Path
from typing import Literal

from afxdp.config import LOG_DIR

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
OWN_LOGGERS = ("afxdp", "afxdpd")
THIRD_PARTY_LEVEL = logging.WARNING
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

LogFormat = Literal["text", "json"]
FORMATS: tuple[LogFormat, ...] = ("text", "json")


# What a record may say it concerns, as fields of its JSON line (``about``).
FIELDS = ("pool", "device")


def about(*, pool: str | None = None, device: str | None = None) -> dict[str, str]:
    """``extra=`` for a log call that concerns a pool or a device (several
    devices: comma-separated): JSON lines carry them as the fields ``pool`` and
    ``device``, so a log pipeline can select them without parsing messages.
    The one way to say it: every such call passes ``extra=about(...)``."""
    found = {"pool": pool, "device": device}
    return {k: v for k, v in found.items() if v is not None}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (RFC 3339, UTC, with its offset), level,
    logger, message, the pool and device it concerns when it says (``about``),
    and exc_info."""

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        doc = {
            "time": when.isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for field in FIELDS:
            value = getattr(record, field, None)
            if value is not None:
                doc[field] = str(value)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            doc["exc_info"] = record.exc_text
        return json.dumps(doc, ensure_ascii=False)


QUEUED = 10_000  # records waiting for the writer at most; past that they are counted, not kept
STOP_WAIT = 5.0  # seconds the exit waits for the writer (a stuck stderr must not hold it)


class _Handoff(logging.handlers.QueueHandler):
    """Queues a record for the writer thread with its message and traceback
    already made (its arguments may change once the call returns, and the
    traceback's frames go away), but not yet formatted: each handler formats
    it its own way. A full queue (the writer is stuck on a reader that stopped
    reading) drops the record and counts it; the next record that fits says
    how many went."""

    def __init__(self, records: queue.Queue[logging.LogRecord | None]) -> None:
        super().__init__(records)
        self.dropped = 0

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        record = copy.copy(record)
        record.msg, record.args = record.getMessage(), None
        if record.exc_info:
            record.exc_text = _TRACEBACKS.formatException(record.exc_info)
            record.exc_info = None
        return record

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            if self.dropped:
                note = logging.LogRecord(__name__, logging.WARNING, __file__, 0,
                                         "%d log records were dropped: the log's reader "
                                         "fell behind", (self.dropped,), None)  # fmt: skip
                self.queue.put_nowait(self.prepare(note))
                self.dropped = 0
            self.queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1


class _Writer(threading.Thread):
    """Writes the queued records to every handler, in order, until it gets None.
    A daemon: a writer stuck on stderr must not keep afxdpd from exiting."""

    def __init__(
        self, records: queue.Queue[logging.LogRecord | None], handlers: list[logging.Handler]
    ) -> None:
        super().__init__(name="afxdp-log-writer", daemon=True)
        self.records, self.handlers = records, handlers

    def run(self) -> None:
        while True:
            record = self.records.get()
            try:
                if record is None:
                    return
                for handler in self.handlers:
                    if record.levelno >= handler.level:
                        handler.handle(record)
            finally:
                self.records.task_done()


_TRACEBACKS = logging.Formatter()
# The writer threads running now (setup's; an older one while a new setup
# replaces it).
_writers: list[_Writer] = []


def setup(
    level: str = "info",
    log_file: str | None = None,
    log_dir: Path = LOG_DIR,
    fmt: LogFormat = "text",
) -> None:
    """Log to stderr and, when ``log_file`` is set, to ``log_dir/log_file``.

    The directory is created with mode 0744 and the file with 0644, as the
    original did (operators' log shippers expect those). Raises OSError when the
    file cannot be opened: a logging error is fatal at start-up (exit code 2).
    """
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if log_file:
        log_dir.mkdir(mode=0o744, parents=True, exist_ok=True)
        path = log_dir / log_file
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.close(fd)
        handlers.append(logging.handlers.WatchedFileHandler(path))
    formatter = JsonFormatter() if fmt == "json" else logging.Formatter(_FORMAT)
    for handler in handlers:
        handler.setFormatter(formatter)
    records: queue.Queue[logging.LogRecord | None] = queue.Queue(QUEUED)
    writer = _Writer(records, handlers)
    writer.start()
    older = list(_writers)
    _writers.append(writer)
    # The new writer takes records before the old one stops: none is lost between.
    logging.basicConfig(level=THIRD_PARTY_LEVEL, handlers=[_Handoff(records)], force=True)
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(LEVELS.get(level, logging.INFO))
    for old in older:
        _stop(old)


def flush() -> None:
    """Return once every record logged so far is written."""
    for writer in list(_writers):
        writer.records.join()


def _stop(writer: _Writer) -> None:
    _writers.remove(writer)
    try:
        writer.records.put(None, timeout=STOP_WAIT)
    except queue.Full:
        return  # stuck on a reader that stopped reading: left to die with us
    writer.join(STOP_WAIT)
    if not writer.is_alive():
        for handler in writer.handlers:
            handler.close()


@atexit.register
def stop() -> None:
    """Write what is queued (waiting STOP_WAIT at most for a stuck writer),
    end the writer threads and close their handlers."""
    for writer in list(_writers):
        _stop(writer)
