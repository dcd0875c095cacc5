"""Run a blocking call inside another network namespace.

setns(2) moves only the calling thread, so the call runs in a fresh thread that
enters the namespace and then ends: no pooled thread is ever left in a foreign
netns (where a later, unrelated call would silently act on the wrong links).
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)
_libc.setns.argtypes = (ctypes.c_int, ctypes.c_int)
_libc.setns.restype = ctypes.c_int


def _enter(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns {path}: {os.strerror(err)}")
    finally:
        os.close(fd)


def run_in(netns: Path | None, fn: Callable[..., T], *args: object) -> T:
    """``fn(*args)`` with the thread inside ``netns`` (the caller's own when None)."""
    if netns is None:
        return fn(*args)
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            _enter(netns)
            result.append(fn(*args))
        except BaseException as exc:  # re-raised in the caller's thread
            error.append(exc)

    thread = threading.Thread(target=target, name=f"netns:{netns.name}")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]
