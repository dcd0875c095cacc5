"""What a handout does to the kernel, behind one small interface.

``Handouts`` sets up and tears down allocations (attach our program, pin its
map, serve the UDS handshake, detach) only through a ``Datapath``. The real
one, ``KernelDatapath``, is a thin adapter over ``bpf/`` and ``uds/``;
``tests/fakes.py`` has a fake (named as one) that records calls and fails on
demand, so the all-or-nothing rollback, reclaim and restart rules are tested
without privileges. Every method here may block: callers run them in a
worker thread (``Work.DEVICES``), except ``uds_server`` (no I/O until
``listen``).
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol

from afxdp.bpf import libbpf, pinning
from afxdp.bpf.xdp import (
    AttachMode,
    XdpAttachment,
    attach_again,
    detach_stale,
    ifindex_of,
    ours_on,
)
from afxdp.errors import DeviceError
from afxdp.inventory import index_of
from afxdp.uds.handshake import HostCheck
from afxdp.uds.server import ConnectionBudget, UdsServer


class Program(Protocol):
    """Our XDP program attached to one device, with its XSKMAP."""

    @property
    def map_fd(self) -> int: ...

    @property
    def prog_id(self) -> int: ...

    @property
    def mode_name(self) -> str: ...

    @property
    def replaced(self) -> int | None:
        """The left-over program of ours this one took the place of, if any."""
        ...

    @property
    def ifindex(self) -> int:
        """The link it is on in our netns (0: not known)."""
        ...

    def ensure_attached(self, *, ask: bool = False) -> bool:
        """Make sure it is on its device's link in our netns, attached again
        when the link lost it (deleted and re-created under the same name); True
        when it was. Another program there is refused (DeviceError). Without
        ``ask``, the link it is known to be on is trusted without asking the
        kernel."""
        ...

    def detach(self) -> None: ...

    def abandon(self) -> None:
        """Forget it without detaching (it stays on a device in a pod)."""
        ...


class Handshake(Protocol):
    """A device's UDS handshake server, as Handouts uses it."""

    path: Path
    idle_timeout: float | None
    connections: int
    active: int
    refused: int
    denied: int
    failed: int

    def listen(self) -> None: ...

    async def serve(self) -> None: ...

    def close(self, *, keep_dir: bool = False) -> None: ...


class Datapath(Protocol):
    def detach_stale(self, device: str) -> int | None:
        """Detach a program of ours left on a free device; its id, or None."""
        ...

    def attach(self, device: str) -> Program:
        """A fresh program and XSKMAP on ``device``, in place of a program of
        ours found on it (one kernel change); another's is refused."""
        ...

    def adopt(self, device: str, prog_id: int) -> Program:
        """Our program ``prog_id``, left attached to ``device`` by a previous run
        (the device may be in its pod's netns), with its XSKMAP."""
        ...

    def ours(self, device: str) -> int | None:
        """The id of our program attached to ``device``; None when there is
        none, or ``device`` is not in our netns."""
        ...

    def pin(self, program: Program, path: Path, uid: int) -> None: ...

    def unpin(self, path: Path) -> None: ...

    def in_host(self, device: str) -> bool:
        """Whether ``device`` is in our netns (False: it is in its pod's)."""
        ...

    def uds_server(
        self,
        *,
        netdev: str,
        map_fd: int,
        path: Path,
        check_host: Callable[[str], Awaitable[HostCheck]],
        uid: int,
        idle_timeout: float | None,
        budget: ConnectionBudget,
        count: Callable[[str], None] | None = None,
    ) -> Handshake: ...


class _Attached:
    """XdpAttachment as a Program."""

    def __init__(self, xdp: XdpAttachment) -> None:
        self.xdp = xdp

    @property
    def map_fd(self) -> int:
        return self.xdp.map_fd

    @property
    def prog_id(self) -> int:
        return self.xdp.prog_id

    @property
    def mode_name(self) -> str:
        return self.xdp.mode.value

    @property
    def replaced(self) -> int | None:
        return self.xdp.replaced

    @property
    def ifindex(self) -> int:
        return self.xdp.ifindex

    def ensure_attached(self, *, ask: bool = False) -> bool:
        return self.xdp.ensure_attached(ask=ask)

    def detach(self) -> None:
        self.xdp.detach()

    def abandon(self) -> None:
        self.xdp.abandon()


class _Adopted:
    """A program a previous run attached: we hold its map, and the program
    itself (an fd of it keeps it loaded when its link is deleted, so that it
    can go on a link re-created under the device's name)."""

    def __init__(self, device: str, prog_id: int) -> None:
        self.device = device
        self.prog_id = prog_id
        self.prog_fd = libbpf.prog_fd(prog_id)
        try:
            self.map_fd = libbpf.prog_map_fd(prog_id)
        except BaseException:
            os.close(self.prog_fd)
            raise
        self.mode_name = "adopted"
        self.replaced: int | None = None
        self.ifindex = 0  # not known (it may be in its pod's netns) until asked

    def ensure_attached(self, *, ask: bool = False) -> bool:
        if not ask and self.ifindex and index_of(self.device) == self.ifindex:
            return False
        modes = [AttachMode.NATIVE, AttachMode.GENERIC]
        self.ifindex, mode, again = attach_again(self.device, self.prog_fd, self.prog_id, modes)
        self.mode_name = mode.value
        return again

    def detach(self) -> None:
        try:
            detach_stale(self.device)  # ours only, by name; nothing if it is in a pod
        except DeviceError:
            pass
        finally:
            self.abandon()

    def abandon(self) -> None:
        for fd in (self.map_fd, self.prog_fd):
            if fd >= 0:
                os.close(fd)
        self.map_fd = self.prog_fd = -1


class KernelDatapath:
    """The real datapath: libbpf for programs and maps, bpffs pins, UDS servers."""

    def __init__(self, pin_dir: Path) -> None:
        self.pin_dir = pin_dir

    def detach_stale(self, device: str) -> int | None:
        return detach_stale(device)

    def attach(self, device: str) -> Program:
        return _Attached(XdpAttachment.attach(device, replace_ours=True))

    def adopt(self, device: str, prog_id: int) -> Program:
        return _Adopted(device, prog_id)

    def ours(self, device: str) -> int | None:
        return ours_on(device)

    def pin(self, program: Program, path: Path, uid: int) -> None:
        assert isinstance(program, _Attached)
        pinning.ensure_bpffs(self.pin_dir)
        pinning.prepare(path, uid)
        program.xdp.pin_map(path)
        pinning.grant(path, uid)

    def unpin(self, path: Path) -> None:
        pinning.remove(path)

    def in_host(self, device: str) -> bool:
        try:
            ifindex_of(device)
        except DeviceError:
            return False
        return True

    def uds_server(
        self,
        *,
        netdev: str,
        map_fd: int,
        path: Path,
        check_host: Callable[[str], Awaitable[HostCheck]],
        uid: int,
        idle_timeout: float | None,
        budget: ConnectionBudget,
        count: Callable[[str], None] | None = None,
    ) -> Handshake:
        return UdsServer(
            count=count,
            netdev=netdev,
            map_fd=map_fd,
            path=path,
            check_host=check_host,
            uid=uid,
            idle_timeout=idle_timeout,
            budget=budget,
        )
