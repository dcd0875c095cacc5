"""What both entry points share: exit codes and the node's name."""

from __future__ import annotations

import enum
import os
import socket
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from afxdp.config import Config, LoadedConfig, load_config_file
from afxdp.errors import ConfigError


class Exit(enum.IntEnum):
    """Process exit codes of the original device plugin, kept for operators' alerts."""

    OK = 0
    CONFIG = 1
    LOGGING = 2
    HOST = 3
    POOL = 4
    KIND = 5  # the kind network cannot be built
    RUNNING = 6  # another afxdpd already serves the run dir (not in the original)
    METRICS = 7  # the metrics address cannot be had (not in the original)


def default_node_name() -> str:
    """``$NODE_NAME`` (the DaemonSet passes ``spec.nodeName``), else the hostname."""
    return os.environ.get("NODE_NAME") or socket.gethostname()


def load_or_report(
    path: Path, check: Callable[[Config], None] | None = None
) -> LoadedConfig | None:
    """The config at ``path`` (and passing ``check``, which raises ConfigError),
    or None after printing every error to stderr."""
    try:
        loaded = load_config_file(path)
        if check is not None:
            check(loaded.config)
        return loaded
    except ConfigError as exc:
        print(f"{path}: invalid, {len(exc.issues)} error(s):", file=sys.stderr)
        for issue in exc.issues:
            print(f"  {issue}", file=sys.stderr)
        return None


NONE = "<none>"  # kubectl's word for an empty cell


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    """kubectl's layout: upper-case headers, columns left-aligned, three spaces apart."""
    cells = [list(headers), *([NONE if c is None else str(c) for c in r] for r in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return ["   ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
            for row in cells]  # fmt: skip
