"""What a handout does to the kernel, behind one small interface.

``Handouts`` sets up and tears down allocations (attach our program, pin its
map, serve the UDS handshake, detach) only through a ``Datapath``. The real
one, ``KernelDatapath``, is a thin adapter over ``bpf/`` and ``uds/``;
``tests/fakes.py`` has a fake (named as one) that records calls and fails on
demand, so the all-or-nothing rollback, reclaim and restart rules are tested
without privileges. Every method here may block: callers run them in a
worker thread (``Work.DEVICES``), except ``uds_server`` (no I/O until
``listen``).

Two layouts (``choose_layout``): map-in-map, where a device carries one
program of ours for its whole life in its pool and a pod's handout is a fresh
XSKMAP put in that program's slot (``bpf/slot.py``: ``carry`` then
``give``); and per-pod, for kernels that refuse the first (or when
``AFXDP_DATAPATH=per-pod`` asks for it), where each handout is a fresh
program with its own XSKMAP (``attach``).
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Protocol

from afxdp.bpf import libbpf, pinning, slot
from afxdp.bpf.slot import Counters, SlotMaps
from afxdp.bpf.xdp import (
    OBJECTS,
    SLOT_MAP,
    SLOT_PROGRAM,
    AttachMode,
    XdpAttachment,
    attach_again,
    detach_at,
    detach_stale,
    ifindex_of,
    ours_on,
)
from afxdp.errors import ConfigError, ConfigIssue, DeviceError
from afxdp.inventory import index_of
from afxdp.uds.handshake import HostCheck
from afxdp.uds.server import ConnectionBudget, UdsServer

PER_POD, MAP_IN_MAP = "per-pod", "map-in-map"
LAYOUTS = (MAP_IN_MAP, PER_POD)
LAYOUT_ENV = "AFXDP_DATAPATH"  # "per-pod" forces the fallback (tests; a kernel we distrust)


def forced_layout(env: Mapping[str, str] = os.environ) -> str | None:
    """The layout ``AFXDP_DATAPATH`` asks for; None when unset (probe).
    ConfigError for any other value."""
    forced = env.get(LAYOUT_ENV, "")
    if forced not in ("", *LAYOUTS):
        raise ConfigError([ConfigIssue(LAYOUT_ENV, f"must be {' or '.join(LAYOUTS)} or unset, "
                                                   f"got {forced!r}")])  # fmt: skip
    return forced or None


def choose_layout(env: Mapping[str, str] = os.environ) -> tuple[str, str]:
    """The datapath layout this run uses and why: map-in-map where the kernel
    takes it (``slot.probe``), else per-pod; ``AFXDP_DATAPATH`` forces either
    (map-in-map on a kernel that refuses it is a ConfigError)."""
    forced = forced_layout(env)
    if forced == PER_POD:
        return PER_POD, f"{LAYOUT_ENV}={PER_POD}"
    problem = slot.probe()
    if problem is None:
        return MAP_IN_MAP, "the kernel takes an XSKMAP in a map of maps"
    if forced == MAP_IN_MAP:
        raise ConfigError([ConfigIssue(LAYOUT_ENV, f"{MAP_IN_MAP}, but the kernel refuses it: "
                                                   f"{problem}")])  # fmt: skip
    return PER_POD, f"the kernel refuses the map-in-map layout ({problem})"


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

    def detach(self) -> None:
        """End it: a program comes off its device; a pod's slot (map-in-map)
        is emptied and its map dropped, while the device's program stays (its
        ``carrier``)."""
        ...

    def abandon(self) -> None:
        """Forget it without detaching (it stays on a device in a pod; a
        pod's slot keeps the pod's map)."""
        ...

    @property
    def carrier(self) -> Program | None:
        """Map-in-map, a pod's slot: the device's program that holds it. None
        for a program (per-pod, or a device's program itself)."""
        ...

    def give(self, control_to_kernel: bool) -> Program:
        """Map-in-map, the device's program: a fresh XSKMAP for its slot, as
        the pod's handout (control frames to the kernel or not); in the slot
        once ``install`` has run."""
        ...

    def install(self) -> None:
        """Map-in-map, a pod's handout: put its map in its device's slot (the
        kernel waits an RCU grace period in it). Nothing to do for a program."""
        ...

    def counters(self) -> Counters | None:
        """Frames by (queue, action) its program counted; None when it does
        not count (the per-pod program)."""
        ...

    def counters_fd(self) -> int | None:
        """A new fd of its program's counters map, for ``slot.read_counters``
        in a worker thread (the caller closes it: a program ended meanwhile
        cannot recycle the number under the reader); None: it counts nothing."""
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
    @property
    def layout(self) -> str:
        """MAP_IN_MAP or PER_POD."""
        ...

    def carry(self, device: str) -> Program:
        """Map-in-map: our program on ``device`` with an empty slot: a program
        of ours found there is taken as it is (its slot emptied) or, a per-pod
        one, replaced in one kernel change; another's is refused."""
        ...

    def detach_stale(self, device: str) -> int | None:
        """Detach a program of ours left on a free device; its id, or None."""
        ...

    def detach_at(self, ifindex: int, prog_id: int | None) -> int | None:
        """Take our program ``prog_id`` (None: any of ours) off the link
        ``ifindex`` of our netns, whatever it is called now (a device's link
        renamed away); its id, or None when it is not there."""
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

    carrier = None

    def give(self, control_to_kernel: bool) -> Program:
        raise DeviceError(f"{self.xdp.netdev}: a per-pod program has no slot to give")

    def install(self) -> None:
        pass

    def counters(self) -> Counters | None:
        return None

    def counters_fd(self) -> int | None:
        return None


class _Adopted:
    """A program a previous run attached: we hold its maps, and the program
    itself (an fd of it keeps it loaded when its link is deleted, so that it
    can go on a link re-created under the device's name). ``map_fd`` is its
    XSKMAP (per-pod) or its slot (map-in-map); ``maps`` has each by name."""

    def __init__(self, device: str, prog_id: int) -> None:
        self.device = device
        self.prog_id = prog_id
        self.prog_fd = libbpf.prog_fd(prog_id)
        try:
            self.maps = libbpf.prog_map_fds(prog_id)
        except BaseException:
            os.close(self.prog_fd)
            raise
        self.program = libbpf.prog_name(prog_id)
        # Its map by name (the kernel keeps 15 characters of a program's name).
        name = next((m for n, (_, m) in OBJECTS.items() if n[:15] == self.program), "")
        if name not in self.maps:
            self.abandon()
            raise DeviceError(f"{device}: program {prog_id} ({self.program}) is not one of ours")
        self.map_fd = self.maps[name]
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
        for fd in [*self.maps.values(), self.prog_fd]:
            if fd >= 0:
                os.close(fd)
        self.maps, self.map_fd, self.prog_fd = {}, -1, -1

    carrier = None

    def give(self, control_to_kernel: bool) -> Program:
        raise DeviceError(f"{self.device}: a per-pod program has no slot to give")

    def install(self) -> None:
        pass

    def counters(self) -> Counters | None:
        return None

    def counters_fd(self) -> int | None:
        return None


class _Carrier:
    """Map-in-map: our program on a device, for the device's whole life in its
    pool (``base``: attached by this run, or adopted), and its maps. Its slot
    is empty unless a pod holds it (``give``)."""

    def __init__(self, base: _Attached | _Adopted, maps: SlotMaps) -> None:
        self.base = base
        self.maps = maps

    @property
    def map_fd(self) -> int:
        return self.maps.slot_fd

    @property
    def prog_id(self) -> int:
        return self.base.prog_id

    @property
    def mode_name(self) -> str:
        return self.base.mode_name

    @property
    def replaced(self) -> int | None:
        return self.base.replaced

    @property
    def ifindex(self) -> int:
        return self.base.ifindex

    carrier = None

    def ensure_attached(self, *, ask: bool = False) -> bool:
        return self.base.ensure_attached(ask=ask)

    def give(self, control_to_kernel: bool) -> Program:
        inner = self.maps.fresh(control_to_kernel)
        try:
            return _Given(self, inner)
        except BaseException:
            os.close(inner)
            raise

    def install(self) -> None:
        pass

    def counters(self) -> Counters | None:
        return self.maps.counters()

    def counters_fd(self) -> int | None:
        return os.dup(self.maps.counters_fd) if self.maps.counters_fd >= 0 else None

    def detach(self) -> None:
        try:
            self.base.detach()
        finally:
            self.maps.close()

    def abandon(self) -> None:
        self.base.abandon()
        self.maps.close()


class _Given:
    """Map-in-map: a pod's handout, the fresh XSKMAP for its device's slot
    (``map_fd``: what the handshake sends and the pin is). It holds a slot fd
    of its own: ``install`` and ``detach`` run in the background, and the
    device's program may be closed meanwhile without the number being
    recycled under them."""

    def __init__(self, carrier: _Carrier, inner_fd: int) -> None:
        self._carrier = carrier
        self._slot_fd = os.dup(carrier.maps.slot_fd)
        self.map_fd = inner_fd

    @property
    def carrier(self) -> Program:
        return self._carrier

    @property
    def prog_id(self) -> int:
        return self._carrier.prog_id

    @property
    def mode_name(self) -> str:
        return self._carrier.mode_name

    @property
    def replaced(self) -> int | None:
        return self._carrier.replaced

    @property
    def ifindex(self) -> int:
        return self._carrier.ifindex

    def ensure_attached(self, *, ask: bool = False) -> bool:
        return self._carrier.ensure_attached(ask=ask)

    def give(self, control_to_kernel: bool) -> Program:
        raise DeviceError("a pod's slot is given already")

    def install(self) -> None:
        slot.install(self._slot_fd, self.map_fd)

    def counters(self) -> Counters | None:
        return self._carrier.counters()

    def counters_fd(self) -> int | None:
        return self._carrier.counters_fd()

    def detach(self) -> None:
        """Empty the slot (if it still holds this map) and drop the map; the
        device's program stays."""
        if self.map_fd < 0:
            return
        try:
            slot.take_back(self._slot_fd, self.map_fd)
        finally:
            self._close()

    def abandon(self) -> None:
        """The slot keeps the pod's map; our handles go."""
        self._close()
        self._carrier.abandon()

    def _close(self) -> None:
        for fd in (self.map_fd, self._slot_fd):
            if fd >= 0:
                os.close(fd)
        self.map_fd = self._slot_fd = -1


class KernelDatapath:
    """The real datapath: libbpf for programs and maps, bpffs pins, UDS servers."""

    def __init__(self, pin_dir: Path, layout: str = PER_POD) -> None:
        self.pin_dir = pin_dir
        self.layout = layout

    def carry(self, device: str) -> Program:
        found = ours_on(device)
        if found is not None and libbpf.prog_name(found) == SLOT_PROGRAM[:15]:
            # Left by a previous run (or by this one before its link came back):
            # taken as it is, no program change; what its slot held is no pod's now.
            adopted = _Adopted(device, found)
            try:
                carrier = _Carrier(adopted, SlotMaps.of(adopted.maps))
            except BaseException:
                adopted.abandon()
                raise
            try:
                carrier.maps.empty()
            except BaseException:
                carrier.abandon()
                raise
            return carrier
        xdp = XdpAttachment.attach(device, replace_ours=True, program=SLOT_PROGRAM)
        try:
            maps = SlotMaps.of({n: xdp.other_map_fd(n) for n in (SLOT_MAP, *slot.OTHER_MAPS)})
        except BaseException:
            xdp.detach()
            raise
        return _Carrier(_Attached(xdp), maps)

    def detach_stale(self, device: str) -> int | None:
        return detach_stale(device)

    def detach_at(self, ifindex: int, prog_id: int | None) -> int | None:
        return detach_at(ifindex, prog_id)

    def attach(self, device: str) -> Program:
        return _Attached(XdpAttachment.attach(device, replace_ours=True))

    def adopt(self, device: str, prog_id: int) -> Program:
        adopted = _Adopted(device, prog_id)
        if adopted.program != SLOT_PROGRAM[:15]:
            return adopted
        try:
            carrier = _Carrier(adopted, SlotMaps.of(adopted.maps))
        except BaseException:
            adopted.abandon()
            raise
        try:
            inner = carrier.maps.held()
        except BaseException:
            carrier.abandon()
            raise
        if inner is None:
            carrier.abandon()
            raise DeviceError(f"{device}: the slot of program {prog_id} is empty: "
                              "the pod's map is gone")  # fmt: skip
        return _Given(carrier, inner)

    def ours(self, device: str) -> int | None:
        return ours_on(device)

    def pin(self, program: Program, path: Path, uid: int) -> None:
        pinning.ensure_bpffs(self.pin_dir)
        pinning.prepare(path, uid)
        if isinstance(program, _Attached):
            program.xdp.pin_map(path)
        else:  # a pod's slot: its XSKMAP (unpinned by ``unpin``)
            libbpf.obj_pin(program.map_fd, path)
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
