"""Our XDP redirect program on one netdev: load, attach, pin its map, detach.

Every call here blocks (libbpf, netlink); async callers run them in a worker
thread. ``bpf_xdp_attach`` resolves ifindexes in the calling thread's netns,
which is the service's (host) netns: programs are attached at allocation time,
before the CNI moves the device into the pod, and stay attached across the move.
"""

from __future__ import annotations

import enum
import errno
import os
from importlib import resources
from pathlib import Path

from afxdp import contracts
from afxdp.bpf import libbpf
from afxdp.bpf.libbpf import (
    BpfError,
    BpfObject,
    XdpFlags,
    obj_pin,
    xdp_attach,
    xdp_detach,
    xdp_query_id,
)
from afxdp.errors import DeviceError
from afxdp.inventory import index_of
from afxdp.netns import run_in

PROGRAM = "xdp_afxdp_redirect"  # per-pod layout: one program (and XSKMAP) per handout
MAP = contracts.MAP_NAME
SLOT_PROGRAM = "xdp_afxdp_slot"  # map-in-map layout: one program per device (bpf/slot.py)
SLOT_MAP = "slot"
# What each program's object file is, and the map its ``map_fd`` is.
OBJECTS = {PROGRAM: ("xdp_redirect", MAP), SLOT_PROGRAM: ("xdp_slot", SLOT_MAP)}
# Our programs as the kernel names them (15 characters kept): either is ours,
# whichever layout this run uses (a previous run may have used the other).
OURS = frozenset(name[: libbpf.BPF_OBJ_NAME_LEN - 1] for name in OBJECTS)


def object_path(program: str = PROGRAM) -> Path:
    """The compiled program shipped in the package (built by hatch_build.py)."""
    stem = OBJECTS[program][0]
    path = Path(str(resources.files("afxdp.bpf") / f"{stem}.o"))
    if not path.is_file():
        raise DeviceError(f"{path}: XDP object missing; the package was built without clang")
    return path


class AttachMode(enum.Enum):
    NATIVE = "native"
    GENERIC = "generic"

    @property
    def flag(self) -> XdpFlags:
        return XdpFlags.DRV_MODE if self is AttachMode.NATIVE else XdpFlags.SKB_MODE


# A driver without native XDP answers one of these to a DRV_MODE attach.
_NO_NATIVE = frozenset({errno.EOPNOTSUPP, errno.EINVAL})


def ifindex_of(netdev: str) -> int:
    """The ifindex of ``netdev`` in the calling thread's netns."""
    index = index_of(netdev)
    if index is None:
        raise DeviceError(f"{netdev}: no such netdev in this network namespace")
    return index


def _ours(ifindex: int) -> tuple[AttachMode, int] | None:
    """A program of ours on ``ifindex`` (by name: the kernel keeps 15
    characters of it) and the mode it is attached in; None when there is none."""
    for mode in AttachMode:
        prog_id = xdp_query_id(ifindex, mode.flag)
        if prog_id and libbpf.prog_name(prog_id) in OURS:
            return mode, prog_id
    return None


def _attach_here(
    netdev: str, prog_fd: int, modes: list[AttachMode], replace_ours: bool
) -> tuple[int, AttachMode, int, int | None]:
    """Attach in the calling thread's netns; (ifindex, mode used, program id,
    id of the program of ours it replaced)."""
    ifindex = ifindex_of(netdev)
    found = _ours(ifindex) if replace_ours else None
    if found is not None:
        # One change, in its mode: the kernel's XDP dispatcher waits one RCU
        # grace period per change (about 15 ms here), so a detach and an
        # attach cost twice that.
        mode, old_id = found
        old_fd = libbpf.prog_fd(old_id)
        try:
            xdp_attach(ifindex, prog_fd, mode.flag, replacing_fd=old_fd)
        except BpfError as exc:
            if exc.errno != errno.EINVAL:
                raise
            # Kernels before 5.7 know no XDP_FLAGS_REPLACE: ours goes, then
            # the fresh one comes (two changes; someone else's in between is
            # refused by UPDATE_IF_NOEXIST).
            xdp_detach(ifindex, mode.flag)
            xdp_attach(ifindex, prog_fd, XdpFlags.UPDATE_IF_NOEXIST | mode.flag)
        finally:
            os.close(old_fd)
        return ifindex, mode, xdp_query_id(ifindex, mode.flag), old_id
    for m in modes:
        try:
            xdp_attach(ifindex, prog_fd, XdpFlags.UPDATE_IF_NOEXIST | m.flag)
        except BpfError as exc:
            if exc.errno in (errno.EBUSY, errno.EEXIST):
                other = xdp_query_id(ifindex)
                raise DeviceError(
                    f"{netdev}: another XDP program (id {other}) is attached"
                ) from exc
            if m is modes[-1] or exc.errno not in _NO_NATIVE:
                raise
            continue
        return ifindex, m, xdp_query_id(ifindex, m.flag), None
    raise AssertionError("unreachable: the last mode either returns or raises")


def _again_here(
    netdev: str, prog_fd: int, prog_id: int, modes: list[AttachMode]
) -> tuple[int, AttachMode, bool]:
    """Program ``prog_id`` on ``netdev`` in the calling thread's netns, attached
    again (``prog_fd``) when the link does not carry it; (ifindex, its mode,
    whether it was attached now). Another program there is refused, never
    replaced: not even one of ours (this link is a pod's)."""
    ifindex = ifindex_of(netdev)
    for mode in AttachMode:
        if xdp_query_id(ifindex, mode.flag) == prog_id:
            return ifindex, mode, False
    ifindex, mode, _id, _ = _attach_here(netdev, prog_fd, modes, replace_ours=False)
    return ifindex, mode, True


def attach_again(
    netdev: str, prog_fd: int, prog_id: int, modes: list[AttachMode], netns: Path | None = None
) -> tuple[int, AttachMode, bool]:
    """Make sure the loaded program ``prog_id`` (``prog_fd``) is on ``netdev``
    in ``netns``, attaching it in the first of ``modes`` that works when it is
    not: the same program, so the same XSKMAP. (ifindex, mode, whether it was
    attached now); DeviceError when another program is there."""
    return run_in(netns, _again_here, netdev, prog_fd, prog_id, modes)


def _detach_here(netdev: str, mode: AttachMode, prog_fd: int) -> None:
    xdp_detach(ifindex_of(netdev), mode.flag, expected_prog_fd=prog_fd)


def _detach_stale_here(netdev: str) -> int | None:
    ifindex = ifindex_of(netdev)
    found = _ours(ifindex)
    if found is None:
        return None
    mode, prog_id = found
    xdp_detach(ifindex, mode.flag)
    return prog_id


def detach_at(ifindex: int, prog_id: int | None = None) -> int | None:
    """Take our program ``prog_id`` (None: any program of ours) off the link
    ``ifindex`` in the calling thread's netns, by its index, not its name: a
    link renamed away from a device's name still carries what we put on it.
    Its id, or None when it is not there (nor, maybe, the link: nothing to do).
    The detach names the program it expects: never another's, nor one
    attached in between."""
    for mode in AttachMode:
        on = xdp_query_id(ifindex, mode.flag)
        if not on or (on != prog_id if prog_id is not None else libbpf.prog_name(on) not in OURS):
            continue
        fd = libbpf.prog_fd(on)
        try:
            xdp_detach(ifindex, mode.flag, expected_prog_fd=fd)
        except BpfError as exc:
            # ENODEV: the link went meanwhile; EEXIST: another program took its place.
            if exc.errno not in (errno.ENODEV, errno.ENOENT, errno.EEXIST):
                raise
            return None
        finally:
            os.close(fd)
        return on
    return None


def ours_on(netdev: str) -> int | None:
    """The id of our program attached to ``netdev`` in the calling thread's
    netns; None when there is none, or no such netdev here (in a pod's netns)."""
    ifindex = index_of(netdev)
    found = _ours(ifindex) if ifindex is not None else None
    return found[1] if found is not None else None


def detach_stale(netdev: str, netns: Path | None = None) -> int | None:
    """Detach a program of ours that nothing owns any more (left by a previous run of
    afxdpd); its id, or None. Programs of others are never touched."""
    return run_in(netns, _detach_stale_here, netdev)


class XdpAttachment:
    """Our program attached to ``netdev``, and its XSKMAP."""

    def __init__(
        self, netdev: str, obj: BpfObject, netns: Path | None, program: str = PROGRAM
    ) -> None:
        self.netdev = netdev
        self.netns = netns
        self._obj = obj
        self.program = program
        self.prog_fd = obj.program_fd(program)
        self.map_fd = obj.map_fd(OBJECTS[program][1])
        self.ifindex = 0
        self.mode = AttachMode.NATIVE
        self.prog_id = 0
        self.replaced: int | None = None  # the left-over program of ours it replaced
        self.pinned: Path | None = None
        self.attached = False

    @classmethod
    def attach(
        cls,
        netdev: str,
        mode: AttachMode | None = None,
        netns: Path | None = None,
        *,
        replace_ours: bool = False,
        program: str = PROGRAM,
    ) -> XdpAttachment:
        """Load a fresh copy of ``program`` (its own maps) and attach it to
        ``netdev`` in ``netns`` (a netns file; the caller's netns when None).

        Without ``mode``, native is tried first and generic used when the driver
        has no native XDP. A netdev that already has an XDP program is refused:
        replacing it would silently break whoever put it there. With
        ``replace_ours``, a program of ours found there (left over: nobody owns
        it) is replaced in place, in its mode (``replaced`` says which).
        """
        obj = BpfObject(object_path(program))
        try:
            self = cls(netdev, obj, netns, program)
            modes = [mode] if mode else [AttachMode.NATIVE, AttachMode.GENERIC]
            self.ifindex, self.mode, self.prog_id, self.replaced = run_in(
                netns, _attach_here, netdev, self.prog_fd, modes, replace_ours
            )
        except BaseException:
            obj.close()
            raise
        self.attached = True
        return self

    def ensure_attached(self, *, ask: bool = False) -> bool:
        """Make sure the program is on ``netdev`` (in the netns it was attached
        in), attaching it again when the link there lost it: deleted and
        re-created under the same name, a new link (a new ifindex) with nothing
        on it. The same program, so the same XSKMAP: a pod that has its map fd
        (or the pin) receives on the new link. True when it attached it again;
        another program found there is refused (DeviceError), never replaced.

        The link it was attached to (the same ifindex: the kernel gives a new
        link a new one) is trusted without asking the kernel, unless ``ask``:
        bpf_xdp_query_id dumps every link of the netns (1 ms per 500 links),
        and this runs on the CNI ADD's path."""
        if not ask and run_in(self.netns, index_of, self.netdev) == self.ifindex:
            return False
        modes = [self.mode, *([AttachMode.GENERIC] if self.mode is AttachMode.NATIVE else [])]
        self.ifindex, self.mode, again = attach_again(
            self.netdev, self.prog_fd, self.prog_id, modes, self.netns
        )
        return again

    def other_map_fd(self, name: str) -> int:
        """The fd of the program's map ``name`` (closed with the program)."""
        return self._obj.map_fd(name)

    def pin_map(self, path: Path) -> None:
        """Pin the XSKMAP at ``path`` (on bpffs) for pinned-map pools."""
        obj_pin(self.map_fd, path)
        self.pinned = path

    def detach(self, netns: Path | None = None) -> None:
        """Unpin, detach (only if our program is still the attached one), close.

        ``netns`` says where the netdev is now (default: where it was attached).
        Idempotent, and a netdev that is gone from there is not an error: there
        is nothing left for us to detach.
        """
        if self.pinned is not None:
            self.pinned.unlink(missing_ok=True)
            self.pinned = None
        if self.attached:
            try:
                run_in(netns or self.netns, _detach_here, self.netdev, self.mode, self.prog_fd)
            except DeviceError:
                pass
            except BpfError as exc:
                # EEXIST: a different program is attached now; not ours to remove.
                if exc.errno not in (errno.ENODEV, errno.ENOENT, errno.EEXIST):
                    raise
            self.attached = False
        self._obj.close()

    def abandon(self) -> None:
        """Close our handles but leave the program attached and the map pinned
        (a pod is using them; ``detach_stale`` finds the program later)."""
        self.attached = False
        self.pinned = None
        self._obj.close()
