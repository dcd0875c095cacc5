"""What both entry points share: exit codes and the node's name."""

from __future__ import annotations

import enum
import os
import socket


class Exit(enum.IntEnum):
    """Process exit codes of the original device plugin, kept for operators' alerts."""

    OK = 0
    CONFIG = 1
    LOGGING = 2
    HOST = 3
    POOL = 4


def default_node_name() -> str:
    """``$NODE_NAME`` (the DaemonSet passes ``spec.nodeName``), else the hostname."""
    return os.environ.get("NODE_NAME") or socket.gethostname()
