"""Logging as the original set it up: stderr, plus a file under the log dir."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from afxdp.config import LOG_DIR

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup(level: str = "info", log_file: str | None = None, log_dir: Path = LOG_DIR) -> None:
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
        handlers.append(logging.FileHandler(path))
    logging.basicConfig(
        level=_LEVELS.get(level, logging.INFO), format=_FORMAT, handlers=handlers, force=True
    )
