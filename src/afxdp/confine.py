"""Tasks whose failure must end them alone.

A task of an anyio task group that ends with an exception ends the whole group
with it. In afxdpd that group is the service's (background work, each device's
UDS server) or a server's (its every connection). ``confined`` runs such a task
so that a failure is logged and ends it alone, and so does a cancellation that
no scope around it made: seen under load (nox -s soak), a prefetch's own
``move_on_after`` deadline escaped it as a CancelledError, and the service
stopped with every pod's socket. The servers' connections and the UDS
handshake use such deadlines too.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Any

import anyio
import anyio.lowlevel


async def confined(
    log: logging.Logger,
    what: Callable[[], str],
    whole: str,
    fn: Callable[..., Coroutine[Any, Any, Any]],
    *args: Any,
) -> bool:
    """``fn(*args)``; True when it returned. A failure, or a cancellation that
    no scope around this call made, is logged on ``log`` (``what()`` names the
    task, ``whole`` what goes on without it) and False returned; a real
    cancellation is raised again. ``what`` is called only to log: building a
    description on every call cost start-up seconds (a Pool's repr lists its
    thousand devices)."""
    try:
        await fn(*args)
    except Exception:
        log.exception("%s failed; %s goes on", what(), whole)
        return False
    except anyio.get_cancelled_exc_class():
        await anyio.lowlevel.checkpoint_if_cancelled()  # a real stop: raised again
        log.error("%s was cancelled by no scope around it; %s goes on", what(), whole,
                  exc_info=True)  # fmt: skip
        return False
    return True
