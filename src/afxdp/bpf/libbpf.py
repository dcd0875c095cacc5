"""Typed ctypes binding to the system ``libbpf.so.1``: only what the project needs.

Every failure raises ``BpfError`` carrying the operation and errno. This is the
one module that declares BPF functions with ctypes; everything else calls these
wrappers. libbpf 1.x returns negative errno (and sets errno); pointer-returning
calls return NULL and set errno.
"""

from __future__ import annotations

import ctypes
import enum
import errno as errno_mod
import functools
import os
from pathlib import Path
from typing import Any

from afxdp.errors import AfxdpError

c_void_p, c_int, c_uint32, c_uint64, c_char_p = (
    ctypes.c_void_p,
    ctypes.c_int,
    ctypes.c_uint32,
    ctypes.c_uint64,
    ctypes.c_char_p,
)


class BpfError(AfxdpError):
    """A libbpf call failed."""

    def __init__(self, op: str, err: int, detail: str = "") -> None:
        self.op = op
        self.errno = err
        what = f" ({detail})" if detail else ""
        super().__init__(f"{op}{what}: {os.strerror(err)} [errno {err}]")


class XdpFlags(enum.IntFlag):
    """``XDP_FLAGS_*`` of linux/if_link.h."""

    UPDATE_IF_NOEXIST = 1 << 0
    SKB_MODE = 1 << 1  # generic XDP
    DRV_MODE = 1 << 2  # native XDP
    HW_MODE = 1 << 3
    REPLACE = 1 << 4


BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_PERCPU_ARRAY = 6
BPF_MAP_TYPE_ARRAY_OF_MAPS = 12
BPF_MAP_TYPE_XSKMAP = 17
BPF_ANY = 0
BPF_OBJ_NAME_LEN = 16


class _XdpAttachOpts(ctypes.Structure):
    # struct bpf_xdp_attach_opts { size_t sz; int old_prog_fd; size_t :0; }
    _fields_ = (("sz", ctypes.c_size_t), ("old_prog_fd", c_int))


class MapInfo(ctypes.Structure):
    """The leading fields of ``struct bpf_map_info`` (the kernel fills what fits)."""

    _fields_ = (
        ("type", c_uint32),
        ("id", c_uint32),
        ("key_size", c_uint32),
        ("value_size", c_uint32),
        ("max_entries", c_uint32),
        ("map_flags", c_uint32),
        ("name", ctypes.c_char * BPF_OBJ_NAME_LEN),
    )


class ProgInfo(ctypes.Structure):
    """The leading fields of ``struct bpf_prog_info``, up to its name."""

    _fields_ = (
        ("type", c_uint32),
        ("id", c_uint32),
        ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", c_uint32),
        ("xlated_prog_len", c_uint32),
        ("jited_prog_insns", c_uint64),
        ("xlated_prog_insns", c_uint64),
        ("load_time", c_uint64),
        ("created_by_uid", c_uint32),
        ("nr_map_ids", c_uint32),
        ("map_ids", c_uint64),
        ("name", ctypes.c_char * BPF_OBJ_NAME_LEN),
    )


LIBRARY = "libbpf.so.1"


def _load() -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL(LIBRARY, use_errno=True)
    except OSError as exc:
        raise BpfError(
            f"dlopen {LIBRARY}", errno_mod.ENOENT,
            f"{exc}; install libbpf 1.x (Debian and Ubuntu: apt install libbpf1)",
        ) from None  # fmt: skip
    sigs: dict[str, tuple[type | None, list[type]]] = {
        "bpf_object__open_file": (c_void_p, [c_char_p, c_void_p]),
        "bpf_object__load": (c_int, [c_void_p]),
        "bpf_object__close": (None, [c_void_p]),
        "bpf_object__find_program_by_name": (c_void_p, [c_void_p, c_char_p]),
        "bpf_object__find_map_by_name": (c_void_p, [c_void_p, c_char_p]),
        "bpf_program__fd": (c_int, [c_void_p]),
        "bpf_map__fd": (c_int, [c_void_p]),
        "bpf_xdp_attach": (c_int, [c_int, c_int, c_uint32, c_void_p]),
        "bpf_xdp_detach": (c_int, [c_int, c_uint32, c_void_p]),
        "bpf_xdp_query_id": (c_int, [c_int, c_int, ctypes.POINTER(c_uint32)]),
        "bpf_obj_pin": (c_int, [c_int, c_char_p]),
        "bpf_obj_get": (c_int, [c_char_p]),
        "bpf_map_update_elem": (c_int, [c_int, c_void_p, c_void_p, c_uint64]),
        "bpf_map_delete_elem": (c_int, [c_int, c_void_p]),
        "bpf_map_lookup_elem": (c_int, [c_int, c_void_p, c_void_p]),
        "bpf_map_lookup_batch": (
            c_int,
            [c_int, c_void_p, c_void_p, c_void_p, c_void_p, ctypes.POINTER(c_uint32), c_void_p],
        ),
        "bpf_map_create": (c_int, [c_int, c_char_p, c_uint32, c_uint32, c_uint32, c_void_p]),
        "libbpf_num_possible_cpus": (c_int, []),
        "bpf_obj_get_info_by_fd": (c_int, [c_int, c_void_p, ctypes.POINTER(c_uint32)]),
        "bpf_prog_get_fd_by_id": (c_int, [c_uint32]),
        "bpf_map_get_fd_by_id": (c_int, [c_uint32]),
    }
    for name, (restype, argtypes) in sigs.items():
        fn = getattr(lib, name)
        fn.restype = restype
        fn.argtypes = argtypes
    return lib


@functools.cache
def _lib() -> ctypes.CDLL:
    """libbpf, loaded on first use: importing this module (the pod-side client
    does) needs no libbpf until a BPF call is made."""
    return _load()


def version_of(lib: ctypes.CDLL) -> str:
    """The version a loaded libbpf says it is ("1.1.2"); "older than 0.6" when
    it cannot say (``libbpf_version_string`` came in 0.6)."""
    try:
        fn = lib.libbpf_version_string
    except AttributeError:
        return "older than 0.6"
    fn.restype, fn.argtypes = c_char_p, []
    raw: bytes = fn()
    return raw.decode().lstrip("v")


def version() -> str:
    """The version of the libbpf afxdp uses; raises BpfError when it does not load."""
    return version_of(_lib())


def _check(op: str, rc: int, detail: str = "") -> int:
    if rc < 0:
        raise BpfError(op, -rc, detail)
    return rc


def _errno() -> int:
    return ctypes.get_errno() or errno_mod.EINVAL


class BpfObject:
    """An opened and loaded BPF object file; close it to release its fds."""

    def __init__(self, path: Path) -> None:
        ptr = _lib().bpf_object__open_file(os.fsencode(path), None)
        if not ptr:
            raise BpfError("bpf_object__open_file", _errno(), str(path))
        self._ptr: int | None = ptr
        try:
            _check("bpf_object__load", _lib().bpf_object__load(ptr), str(path))
        except BpfError:
            self.close()
            raise

    def _obj(self) -> int:
        if self._ptr is None:
            raise BpfError("bpf_object", errno_mod.EBADF, "object is closed")
        return self._ptr

    def program_fd(self, name: str) -> int:
        prog = _lib().bpf_object__find_program_by_name(self._obj(), name.encode())
        if not prog:
            raise BpfError("bpf_object__find_program_by_name", errno_mod.ENOENT, name)
        return _check("bpf_program__fd", _lib().bpf_program__fd(prog), name)

    def map_fd(self, name: str) -> int:
        found = _lib().bpf_object__find_map_by_name(self._obj(), name.encode())
        if not found:
            raise BpfError("bpf_object__find_map_by_name", errno_mod.ENOENT, name)
        return _check("bpf_map__fd", _lib().bpf_map__fd(found), name)

    def close(self) -> None:
        if self._ptr is not None:
            _lib().bpf_object__close(self._ptr)
            self._ptr = None


def _expecting(flags: XdpFlags, prog_fd: int | None) -> tuple[XdpFlags, Any]:
    """``flags`` and opts that make the kernel act only if ``prog_fd`` is the
    program attached now (XDP_FLAGS_REPLACE; EEXIST otherwise; kernels before
    5.7 refuse the flag with EINVAL)."""
    if prog_fd is None:
        return flags, None
    opts = _XdpAttachOpts(ctypes.sizeof(_XdpAttachOpts), prog_fd)
    return flags | XdpFlags.REPLACE, ctypes.byref(opts)


def xdp_attach(
    ifindex: int, prog_fd: int, flags: XdpFlags, replacing_fd: int | None = None
) -> None:
    """Attach ``prog_fd``; with ``replacing_fd``, in place of that program, in one
    change (one RCU grace period in the kernel's XDP dispatcher, not two)."""
    flags, opts = _expecting(flags, replacing_fd)
    _check("bpf_xdp_attach", _lib().bpf_xdp_attach(ifindex, prog_fd, int(flags), opts))


def xdp_detach(ifindex: int, flags: XdpFlags, expected_prog_fd: int | None = None) -> None:
    """Detach the XDP program in ``flags``' mode; with ``expected_prog_fd``, only
    if that program is the one attached (never remove someone else's)."""
    flags, opts = _expecting(flags, expected_prog_fd)
    _check("bpf_xdp_detach", _lib().bpf_xdp_detach(ifindex, int(flags), opts))


def xdp_query_id(ifindex: int, flags: int = 0) -> int:
    """ID of the XDP program attached in ``flags``' mode (any mode when 0); 0 if none."""
    prog_id = c_uint32(0)
    _check("bpf_xdp_query_id", _lib().bpf_xdp_query_id(ifindex, int(flags), ctypes.byref(prog_id)))
    return prog_id.value


def obj_pin(fd: int, path: Path) -> None:
    _check("bpf_obj_pin", _lib().bpf_obj_pin(fd, os.fsencode(path)), str(path))


def obj_get(path: Path) -> int:
    """Open a pinned object; the caller owns the returned fd."""
    return _check("bpf_obj_get", _lib().bpf_obj_get(os.fsencode(path)), str(path))


def map_update_u32(fd: int, key: int, value: int) -> None:
    k, v = c_uint32(key), c_uint32(value)
    _check(
        "bpf_map_update_elem",
        _lib().bpf_map_update_elem(fd, ctypes.byref(k), ctypes.byref(v), BPF_ANY),
        f"key {key}",
    )


def map_delete_u32(fd: int, key: int) -> bool:
    """Delete ``key``; False when there was none (ENOENT)."""
    k = c_uint32(key)
    rc = _lib().bpf_map_delete_elem(fd, ctypes.byref(k))
    if rc == -errno_mod.ENOENT:
        return False
    _check("bpf_map_delete_elem", rc, f"key {key}")
    return True


def map_lookup_u32(fd: int, key: int) -> int | None:
    """The u32 value at ``key``; None when there is none (ENOENT). In a map
    of maps, the value is the inner map's ID."""
    k, v = c_uint32(key), c_uint32(0)
    rc = _lib().bpf_map_lookup_elem(fd, ctypes.byref(k), ctypes.byref(v))
    if rc == -errno_mod.ENOENT:
        return None
    _check("bpf_map_lookup_elem", rc, f"key {key}")
    return v.value


def map_create(map_type: int, name: str, key_size: int, value_size: int, max_entries: int) -> int:
    """A new map; the caller owns the returned fd (the map lives while an fd,
    a pin or a map holding it does)."""
    return _check(
        "bpf_map_create",
        _lib().bpf_map_create(map_type, name.encode(), key_size, value_size, max_entries, None),
        name,
    )


@functools.cache
def possible_cpus() -> int:
    """How many values a per-CPU map's element has."""
    return _check("libbpf_num_possible_cpus", _lib().libbpf_num_possible_cpus())


def percpu_u64_sums(fd: int, entries: int) -> list[int]:
    """Each element of a per-CPU array of u64 (keys 0 to ``entries`` - 1),
    summed over CPUs: one batch read (kernels before 5.6 refuse it with
    EINVAL: then one read per element)."""
    cpus = possible_cpus()
    values = (c_uint64 * (entries * cpus))()
    keys = (c_uint32 * entries)()
    count = c_uint32(entries)
    out_batch = c_uint32(0)
    rc = _lib().bpf_map_lookup_batch(
        fd, None, ctypes.byref(out_batch), keys, values, ctypes.byref(count), None
    )
    if rc < 0 and -rc == errno_mod.ENOENT:  # the whole map fit: read to its end
        rc = 0
    if rc < 0 and -rc in (errno_mod.EINVAL, errno_mod.ENOTSUP, 524):  # 524: ENOTSUPP
        one = (c_uint64 * cpus)()
        sums = []
        for key in range(entries):
            k = c_uint32(key)
            _check("bpf_map_lookup_elem", _lib().bpf_map_lookup_elem(fd, ctypes.byref(k), one))
            sums.append(sum(one))
        return sums
    _check("bpf_map_lookup_batch", rc)
    sums = [0] * entries
    for i in range(count.value):
        sums[keys[i]] = sum(values[i * cpus : (i + 1) * cpus])
    return sums


def _info(fd: int, info: ctypes.Structure) -> None:
    size = c_uint32(ctypes.sizeof(info))
    _check(
        "bpf_obj_get_info_by_fd",
        _lib().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)),
    )


def map_info(fd: int) -> MapInfo:
    info = MapInfo()
    _info(fd, info)
    return info


def prog_fd(prog_id: int) -> int:
    """An fd of the loaded program ``prog_id``; the caller closes it."""
    return _check("bpf_prog_get_fd_by_id", _lib().bpf_prog_get_fd_by_id(prog_id), f"id {prog_id}")


def prog_name(prog_id: int) -> str:
    """The name of the loaded program ``prog_id`` (cut at 15 characters by the kernel)."""
    fd = prog_fd(prog_id)
    try:
        info = ProgInfo()
        _info(fd, info)
        name: str = info.name.decode()
        return name
    finally:
        os.close(fd)


def map_fd(map_id: int) -> int:
    """An fd of map ``map_id``; the caller closes it."""
    return _check("bpf_map_get_fd_by_id", _lib().bpf_map_get_fd_by_id(map_id), f"id {map_id}")


MAX_PROG_MAPS = 8  # more than any program of ours uses


def prog_map_ids(prog_id: int) -> list[int]:
    """The IDs of the maps loaded program ``prog_id`` uses."""
    fd = prog_fd(prog_id)
    try:
        ids = (c_uint32 * MAX_PROG_MAPS)()
        info = ProgInfo()
        info.nr_map_ids = MAX_PROG_MAPS
        info.map_ids = ctypes.addressof(ids)
        _info(fd, info)
    finally:
        os.close(fd)
    return list(ids[: min(info.nr_map_ids, MAX_PROG_MAPS)])


def prog_map_fds(prog_id: int) -> dict[str, int]:
    """Fds of the maps loaded program ``prog_id`` uses, by map name (cut at 15
    characters by the kernel): how a restarted afxdpd gets the maps of a
    program it left attached. The caller closes them."""
    fds: dict[str, int] = {}
    try:
        for map_id in prog_map_ids(prog_id):
            fd = map_fd(map_id)
            fds[map_info(fd).name.decode()] = fd
    except BaseException:
        for fd in fds.values():
            os.close(fd)
        raise
    return fds


def prog_map_fd(prog_id: int) -> int:
    """An fd of the (first) map that loaded program ``prog_id`` uses: how a
    restarted afxdpd gets the XSKMAP of a per-pod program it left attached.
    The caller closes it."""
    ids = prog_map_ids(prog_id)
    if not ids:
        raise BpfError("bpf_obj_get_info_by_fd", errno_mod.ENOENT, f"program {prog_id} has no map")
    return map_fd(ids[0])
