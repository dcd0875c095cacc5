"""The map-in-map layout (``xdp_slot.c``): one program per device for the
device's whole life in its pool, and a pod's XSKMAP in the program's one slot.

A handout is ``give``: a fresh XSKMAP, put in the slot with one map update (no
program change, so no rtnl and no RCU grace period on Allocate's path). Its end
is ``take_back``: the slot emptied (frames go to the kernel) and the map
dropped, so no earlier pod's map can feed a later pod's traffic. The program
counts each frame's verdict per CPU and queue (``counters``).

Which kernels take it: an XSKMAP (4.18) may be an inner map like any map but a
program array since map-in-map came (4.12); since 5.10 each map type says so
itself (``map_meta_equal``), and the XSKMAP keeps ``max_entries`` among what
must match. Whether this kernel's verifier also accepts ``bpf_redirect_map``
on the inner map is not documented per version: ``probe`` loads the program
and puts an XSKMAP in its slot, and a kernel that refuses either runs the
per-pod layout. Every call here blocks (bpf syscalls): async callers use a
worker thread.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from afxdp import contracts
from afxdp.bpf import libbpf
from afxdp.bpf.libbpf import BpfError, BpfObject
from afxdp.bpf.xdp import SLOT_MAP, SLOT_PROGRAM, object_path

COUNTERS_MAP, CONFIG_MAP = "counters", "config"
OTHER_MAPS = (COUNTERS_MAP, CONFIG_MAP)  # besides the slot
N_QUEUES = 64  # the inner XSKMAP's size; must match xdp_slot.c's xsk_inner
# Counter rows: one per queue, and a last one for every queue from N_QUEUES up.
N_ROWS = N_QUEUES + 1
# xdp_slot.c's ``enum action``, in its order (the counter index is
# queue * len(ACTIONS) + action).
ACTIONS = ("redirected", "no_socket", "control")
CONTROL_TO_KERNEL = 1  # bit of config[0]: ARP and IPv6 ND go to the kernel

Counters = dict[tuple[int, str], int]  # (queue, action) -> frames, summed over CPUs


def new_xskmap() -> int:
    """A fresh, empty XSKMAP of the slot's inner kind; the caller owns the fd.
    Named as the per-pod program's map: pod clients that check the name of
    the map they are given see the same."""
    return libbpf.map_create(libbpf.BPF_MAP_TYPE_XSKMAP, contracts.MAP_NAME, 4, 4, N_QUEUES)


class SlotMaps:
    """The maps of one loaded slot program (fds of its own, closed by ``close``)."""

    def __init__(self, slot_fd: int, counters_fd: int, config_fd: int) -> None:
        self.slot_fd, self.counters_fd, self.config_fd = slot_fd, counters_fd, config_fd
        self._control: bool | None = None  # what config holds, when known

    @classmethod
    def of(cls, fds: dict[str, int]) -> SlotMaps:
        """From fds of the program's maps by name (duplicated: the caller keeps its own)."""
        dups: list[int] = []
        try:
            for name in (SLOT_MAP, COUNTERS_MAP, CONFIG_MAP):
                if name not in fds:
                    raise BpfError("slot program maps", 2, f"no map {name!r}")  # ENOENT
                dups.append(os.dup(fds[name]))
        except BaseException:
            for fd in dups:
                os.close(fd)
            raise
        return cls(*dups)

    def fresh(self, control_to_kernel: bool = False) -> int:
        """A fresh XSKMAP for the slot (not in it yet: ``install``); its fd
        (the caller's: the pod's map lives while that fd, a pin, or the slot
        holds it). Control frames to the kernel or not, as asked. Fast: no
        map of maps changes."""
        self.set_control(control_to_kernel)
        return new_xskmap()

    def give(self, control_to_kernel: bool = False) -> int:
        """``fresh``, and in the slot at once (``install``)."""
        inner = self.fresh(control_to_kernel)
        try:
            install(self.slot_fd, inner)
        except BaseException:
            os.close(inner)
            raise
        return inner

    def take_back(self, inner_fd: int) -> bool:
        return take_back(self.slot_fd, inner_fd)

    def empty(self) -> None:
        """Empty the slot, whatever it holds (a left-over program taken again
        for a free device: the map there is no pod's any more)."""
        libbpf.map_delete_u32(self.slot_fd, 0)

    def held(self) -> int | None:
        """An fd of the XSKMAP in the slot (the caller closes it); None when empty."""
        map_id = libbpf.map_lookup_u32(self.slot_fd, 0)
        return None if map_id is None else libbpf.map_fd(map_id)

    def set_control(self, on: bool) -> None:
        """Whether ARP and IPv6 neighbour discovery go to the kernel (one map
        update, only when it changes)."""
        if self._control is not on:
            libbpf.map_update_u32(self.config_fd, 0, CONTROL_TO_KERNEL if on else 0)
            self._control = on

    def counters(self) -> Counters:
        return read_counters(self.counters_fd)

    def close(self) -> None:
        for fd in (self.slot_fd, self.counters_fd, self.config_fd):
            if fd >= 0:
                os.close(fd)
        self.slot_fd = self.counters_fd = self.config_fd = -1


def install(slot_fd: int, inner_fd: int) -> None:
    """Put ``inner_fd``'s map in the slot, in place of whatever was there.
    Slow: the kernel waits an RCU grace period in every update of a map of
    maps (so that no program still runs with the old value when it returns),
    8-16 ms here; hence afxdpd does it in the background (handouts.py)."""
    libbpf.map_update_u32(slot_fd, 0, inner_fd)


def take_back(slot_fd: int, inner_fd: int) -> bool:
    """Empty the slot if it holds ``inner_fd``'s map (never another pod's);
    whether it did. Slow as ``install``. The caller closes ``inner_fd``."""
    held = libbpf.map_lookup_u32(slot_fd, 0)
    if held is None or held != libbpf.map_info(inner_fd).id:
        return False
    return libbpf.map_delete_u32(slot_fd, 0)


def read_counters(fd: int) -> Counters:
    """Frames by (queue, action) a slot program counted in its counters map
    ``fd`` since it was loaded, summed over CPUs; those never seen are left
    out. One map read. The row of queue ``N_QUEUES`` counts every queue from
    there up."""
    sums = libbpf.percpu_u64_sums(fd, N_ROWS * len(ACTIONS))
    n = len(ACTIONS)
    return {(i // n, ACTIONS[i % n]): frames for i, frames in enumerate(sums) if frames}


def maps_of_program(prog_id: int) -> SlotMaps:
    """The maps of loaded slot program ``prog_id`` (one a previous run left)."""
    fds = libbpf.prog_map_fds(prog_id)
    try:
        return SlotMaps.of(fds)
    finally:
        for fd in fds.values():
            os.close(fd)


@contextmanager
def _loaded() -> Iterator[BpfObject]:
    obj = BpfObject(object_path(SLOT_PROGRAM))
    try:
        yield obj
    finally:
        obj.close()


def probe() -> str | None:
    """Whether this kernel runs the map-in-map layout: None if it does, else
    why not. Loads the program (the verifier must accept ``bpf_redirect_map``
    on the inner map), puts a fresh XSKMAP in its slot and reads its counters
    (nothing is attached anywhere; everything is closed again)."""
    try:
        with _loaded() as obj:
            maps = SlotMaps.of({n: obj.map_fd(n) for n in (SLOT_MAP, COUNTERS_MAP, CONFIG_MAP)})
            try:
                os.close(maps.give())
                maps.empty()
                maps.counters()
            finally:
                maps.close()
    except (BpfError, OSError) as exc:
        return str(exc)
    return None
