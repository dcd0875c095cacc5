"""Blocking work off the event loop, in bounded, separate limiters.

Every blocking call goes to a worker thread through ``run_sync`` with the kind
of work it is. Each kind has its own limiter, so one kind cannot starve another:
45 CNI requests whose IPAM plugin hangs hold at most ``CNI``'s threads, and
kubelet's Allocate (``DEVICES``) and link health (``NETLINK``) still get theirs.

A call that may never return (the config file's read: a hung filesystem)
runs through ``run_detached``: a daemon thread of its own, waited for until a
deadline, then left behind holding no limiter's thread.

External programs (IPAM plugins, ethtool) run through ``run_program``: in their
own process group, with a deadline, and the whole group is killed when it
passes (a plugin's children must not outlive it).
"""

from __future__ import annotations

import asyncio
import enum
import os
import signal
import subprocess
import threading
import weakref
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from functools import partial
from typing import Any, TypeVar

import anyio
import anyio.to_thread

T = TypeVar("T")


class Work(enum.Enum):
    """Kinds of blocking work, each with its own number of threads."""

    DEVICES = 8  # Allocate, release, XDP attach/detach: kubelet waits on these
    PREPARE = 3  # programs attached ahead of Allocate, in the background
    CNI = 16  # CNI verbs: netns moves, IPAM and ethtool programs
    NETLINK = 4  # link health, inventory scans
    DISK = 2  # the durable records


_limiters: weakref.WeakKeyDictionary[
    asyncio.AbstractEventLoop, dict[Work, anyio.CapacityLimiter]
] = weakref.WeakKeyDictionary()


def limiter(work: Work) -> anyio.CapacityLimiter:
    """The limiter of ``work`` for the running event loop (one set per loop)."""
    per_loop = _limiters.setdefault(asyncio.get_running_loop(), {})
    if work not in per_loop:
        per_loop[work] = anyio.CapacityLimiter(work.value)
    return per_loop[work]


async def run_sync(work: Work, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in a worker thread, counted against ``work``'s limiter."""
    return await anyio.to_thread.run_sync(partial(fn, *args), limiter=limiter(work))


async def run_detached(name: str, fn: Callable[..., T], *args: Any, timeout: float) -> T:
    """``fn(*args)`` in a daemon thread of its own, waited for at most
    ``timeout`` seconds: TimeoutError past it, and the call is left to end on
    its own.

    For a call that may block for ever and cannot be interrupted (a read on a
    hung filesystem): in ``run_sync`` it would take a thread of its limiter
    for good, and a pooled thread would hold up the process's exit. This
    thread counts against no limiter: the caller bounds how many it leaves.
    """
    loop = asyncio.get_running_loop()
    done = anyio.Event()
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(fn(*args))
        except BaseException as exc:  # re-raised in the caller's task
            error.append(exc)
        finally:
            with suppress(RuntimeError):  # the loop has closed: nobody waits
                loop.call_soon_threadsafe(done.set)

    threading.Thread(target=target, name=name, daemon=True).start()
    with anyio.move_on_after(timeout):
        await done.wait()
    if error:
        raise error[0]
    if not result:
        raise TimeoutError(f"{name} did not return within {timeout:g} s; left behind")
    return result[0]


def usage() -> dict[str, dict[str, float]]:
    """Threads in use per kind (for status)."""
    per_loop = _limiters.get(asyncio.get_running_loop(), {})
    return {
        w.name.lower(): {
            "limit": w.value,
            "busy": per_loop[w].borrowed_tokens if w in per_loop else 0,
        }
        for w in Work
    }


class ProgramTimeout(Exception):
    """An external program ran past its deadline; its process group was killed."""

    def __init__(self, argv: Sequence[str], timeout: float) -> None:
        self.argv = list(argv)
        self.timeout = timeout
        super().__init__(f"{argv[0]} did not finish within {timeout:g} s; killed")


def _run_program(
    argv: Sequence[str], stdin: bytes, env: Mapping[str, str] | None, timeout: float
) -> subprocess.CompletedProcess[bytes]:
    with subprocess.Popen(
        list(argv),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(env) if env is not None else None,
        start_new_session=True,  # its own process group, so we can kill all of it
    ) as proc:
        try:
            out, err = proc.communicate(stdin, timeout=timeout)
        except subprocess.TimeoutExpired:
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise ProgramTimeout(argv, timeout) from None
        except BaseException:
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            raise
        # A child the program left behind in its group goes with it.
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        return subprocess.CompletedProcess(list(argv), proc.returncode, out, err)


async def run_program(
    argv: Sequence[str],
    *,
    stdin: bytes = b"",
    env: Mapping[str, str] | None = None,
    timeout: float,
    work: Work = Work.CNI,
) -> subprocess.CompletedProcess[bytes]:
    """Run ``argv`` to completion in a worker thread of ``work``.

    Raises ``ProgramTimeout`` (the process group killed) past ``timeout``, and
    OSError when it cannot be started. A plugin that exits without reading its
    stdin is fine (the reason this is not ``anyio.run_process`` under uvloop).
    """
    return await run_sync(work, _run_program, argv, stdin, env, timeout)
