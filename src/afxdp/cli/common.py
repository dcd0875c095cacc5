"""What both entry points share: exit codes and the node's name."""

from __future__ import annotations

import enum
import os
import socket
import sys
from collections.abc import Callable
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
