"""Logging: stderr, plus a file under the log dir, as text or JSON lines.

The config's level applies to afxdp's own loggers only: at ``debug`` the root
logger would let pyroute2 and hpack flood the log (74 of 80 lines once), so
third-party loggers stay at WARNING. The file is reopened when a log rotator
moves it away (WatchedFileHandler), so rotation never loses lines.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
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


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (and exc_info)."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            doc["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


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
    logging.basicConfig(level=THIRD_PARTY_LEVEL, handlers=handlers, force=True)
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(LEVELS.get(level, logging.INFO))
