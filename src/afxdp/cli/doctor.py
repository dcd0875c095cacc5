"""``afxdpctl doctor``: does this node have what afxdpd needs? Each failure with its fix.

Two halves, on purpose: ``probe`` gathers the node's facts (all the I/O, each
fact as plain data, a probe that fails recorded as a fact rather than raised),
and ``checks`` turns facts into verdicts with no I/O, so every verdict and its
fix text is tested on facts a test writes down. Informational checks (the
``unprivileged_bpf_disabled`` value, that clang is not needed) never fail.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import os
import re
import resource
import socket
import stat
import sys
from importlib import resources
from pathlib import Path

import msgspec

from afxdp.bpf import libbpf
from afxdp.bpf.pinning import fs_type
from afxdp.datapath import choose_layout
from afxdp.errors import AfxdpError
from afxdp.inventory import unprivileged_bpf_disabled

AF_XDP = 44  # not in the socket module
# AF_XDP is in 4.18, but its need_wakeup flag, which DPDK's AF_XDP PMD and CNDP
# use, came in 5.4: the oldest kernel a pod's AF_XDP app works with in practice.
MIN_KERNEL = (5, 4)
# From 5.11 BPF memory is charged to the memory cgroup, not RLIMIT_MEMLOCK.
MEMCG_KERNEL = (5, 11)
# afxdpd's own BPF objects (one program, one 64-entry map per device) fit in a
# few pages; 8 MiB is systemd's default since v253 and ample. (Pods' UMEMs are
# charged to the pods, not to afxdpd.)
MIN_MEMLOCK = 8 << 20
UNLIMITED = -1


class Facts(msgspec.Struct):
    """What ``probe`` found on this node; every field plain data."""

    kernel: str  # uname release
    bpffs_mounts: list[str]  # mount points of type bpf
    pin_dir: str
    pin_dir_fs: str | None  # type of the filesystem the pin dir is (or would be) on
    af_xdp_error: str | None  # None: an AF_XDP socket was created
    af_xdp_errno: int | None
    memlock: tuple[int, int]  # soft, hard; UNLIMITED for RLIM_INFINITY
    libbpf_version: str | None  # None: libbpf.so.1 did not load
    libbpf_error: str | None
    xdp_object: str | None  # the compiled program in the package; None: missing
    cni_bin_dir: str
    cni_bin_dir_error: str | None  # None: a directory we may write
    kubelet_dir: str
    device_plugins_dir: bool
    pod_resources_socket: bool
    unprivileged_bpf_disabled: int | None
    # The datapath layout afxdpd would run here (datapath.choose_layout) and
    # why; None: it could not be said (the reason says why).
    datapath: str | None = None
    datapath_reason: str | None = None


class Check(msgspec.Struct):
    name: str
    ok: bool
    detail: str
    fix: str | None = None  # how to make it pass (failures only)
    info: bool = False  # informational: never fails


# -- probing (I/O) -------------------------------------------------------------


def _bpffs_mounts(mountinfo: Path = Path("/proc/self/mountinfo")) -> list[str]:
    out = []
    for line in mountinfo.read_text().splitlines():
        fields = line.split()
        if fields[fields.index("-") + 1] == "bpf":
            out.append(fields[4].replace("\\040", " "))
    return out


def _af_xdp() -> tuple[str | None, int | None]:
    try:
        socket.socket(AF_XDP, socket.SOCK_RAW, 0).close()
    except OSError as exc:
        return exc.strerror or str(exc), exc.errno
    return None, None


def _libbpf() -> tuple[str | None, str | None]:
    # Loaded here, not through libbpf.version(): a library that does not load is
    # a fact to report in dlopen's own words.
    try:
        lib = ctypes.CDLL(libbpf.LIBRARY)
    except OSError as exc:
        return None, str(exc)
    return libbpf.version_of(lib), None


def _xdp_object() -> str | None:
    """The compiled programs' directory; None when either program is missing."""
    where = Path(str(resources.files("afxdp.bpf")))
    found = all((where / f"{stem}.o").is_file() for stem in ("xdp_redirect", "xdp_slot"))
    return str(where / "xdp_redirect.o") if found else None


def _datapath() -> tuple[str | None, str]:
    """The layout afxdpd would choose here, and why (it loads our program,
    attaching it nowhere)."""
    try:
        return choose_layout()
    except (AfxdpError, OSError) as exc:
        return None, str(exc)


def _writable_dir(path: Path) -> str | None:
    if not path.is_dir():
        return "does not exist" if not path.exists() else "is not a directory"
    # access(2) also says EROFS for a read-only mount, which the mode bits hide from root.
    if not os.access(path, os.W_OK):
        return "is not writable (read-only mount?)"
    return None


def _is_socket(path: Path) -> bool:
    try:
        return stat.S_ISSOCK(path.stat().st_mode)
    except OSError:
        return False


def _limit(value: int) -> int:
    return UNLIMITED if value == resource.RLIM_INFINITY else value


def probe(pin_dir: Path, cni_bin_dir: Path, kubelet_dir: Path) -> Facts:
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    af_xdp_error, af_xdp_errno = _af_xdp()
    libbpf_version, libbpf_error = _libbpf()
    layout, layout_reason = _datapath() if libbpf_version is not None else (None, "no libbpf")
    return Facts(
        kernel=os.uname().release,
        bpffs_mounts=_bpffs_mounts(),
        pin_dir=str(pin_dir),
        pin_dir_fs=fs_type(pin_dir),
        af_xdp_error=af_xdp_error,
        af_xdp_errno=af_xdp_errno,
        memlock=(_limit(soft), _limit(hard)),
        libbpf_version=libbpf_version,
        libbpf_error=libbpf_error,
        xdp_object=_xdp_object(),
        cni_bin_dir=str(cni_bin_dir),
        cni_bin_dir_error=_writable_dir(cni_bin_dir),
        kubelet_dir=str(kubelet_dir),
        device_plugins_dir=(kubelet_dir / "device-plugins").is_dir(),
        pod_resources_socket=_is_socket(kubelet_dir / "pod-resources" / "kubelet.sock"),
        unprivileged_bpf_disabled=unprivileged_bpf_disabled(),
        datapath=layout,
        datapath_reason=layout_reason,
    )


# -- verdicts (no I/O) ---------------------------------------------------------


def kernel_version(release: str) -> tuple[int, int] | None:
    m = re.match(r"(\d+)\.(\d+)", release)
    return (int(m[1]), int(m[2])) if m else None


def _mib(n: int) -> str:
    return "unlimited" if n == UNLIMITED else f"{n / (1 << 20):g} MiB"


def _kernel(f: Facts) -> Check:
    version = kernel_version(f.kernel)
    need = ".".join(map(str, MIN_KERNEL))
    if version is not None and version >= MIN_KERNEL:
        return Check("kernel", True, f"{f.kernel} ({need} or newer needed)")
    return Check("kernel", False, f"{f.kernel}: older than {need} or unreadable",
                 f"run a {need} or newer kernel (AF_XDP with need_wakeup)")  # fmt: skip


def _bpffs(f: Facts) -> Check:
    places = ["/sys/fs/bpf", f.pin_dir]
    found = [m for m in f.bpffs_mounts if m in places]
    if f.pin_dir_fs == "bpf" and f.pin_dir not in found:
        found.append(f"{f.pin_dir} (inside a bpffs)")
    if found:
        return Check("bpffs", True, "mounted at " + ", ".join(found))
    return Check(
        "bpffs", False, f"no bpffs at /sys/fs/bpf or the pin dir {f.pin_dir}",
        "mount -t bpf bpf /sys/fs/bpf (or let afxdpd mount one at its --pin-dir, which needs "
        "CAP_SYS_ADMIN; the DaemonSet mounts the pin dir with Bidirectional propagation)",
    )  # fmt: skip


def _af_xdp_check(f: Facts) -> Check:
    if f.af_xdp_error is None:
        return Check("af_xdp socket", True, "socket(AF_XDP, SOCK_RAW) works")
    detail = f"socket(AF_XDP, SOCK_RAW): {f.af_xdp_error}"
    if f.af_xdp_errno == errno.EAFNOSUPPORT:
        fix = "use a kernel built with CONFIG_XDP_SOCKETS=y"
    elif f.af_xdp_errno in (errno.EPERM, errno.EACCES):
        fix = "run afxdpd with CAP_NET_RAW (the DaemonSet runs it privileged)"
    else:
        fix = "see the error; AF_XDP needs CONFIG_XDP_SOCKETS=y and CAP_NET_RAW"
    return Check("af_xdp socket", False, detail, fix)


def _memlock(f: Facts) -> Check:
    version = kernel_version(f.kernel)
    soft, hard = f.memlock
    limits = f"soft {_mib(soft)}, hard {_mib(hard)}"
    if version is not None and version >= MEMCG_KERNEL:
        return Check("memlock", True,
                     f"{limits}; not used: kernel >= 5.11 charges BPF memory to the memory "
                     "cgroup")  # fmt: skip
    if soft == UNLIMITED or soft >= MIN_MEMLOCK:
        return Check("memlock", True, limits)
    return Check("memlock", False, f"{limits}: BPF maps may fail with EPERM below "
                 f"{_mib(MIN_MEMLOCK)} on kernels before 5.11",
                 "raise RLIMIT_MEMLOCK for afxdpd: LimitMEMLOCK=infinity (systemd), "
                 "ulimit -l unlimited, or the runtime's default_ulimits memlock=-1:-1")  # fmt: skip


def _libbpf_check(f: Facts) -> Check:
    if f.libbpf_version is not None:
        return Check("libbpf", True, f"libbpf.so.1 loads, version {f.libbpf_version}")
    return Check("libbpf", False, f"libbpf.so.1 does not load: {f.libbpf_error}",
                 "install libbpf 1.x (Debian/Ubuntu: apt-get install libbpf1; "
                 "Fedora: dnf install libbpf); the afxdp image ships it")  # fmt: skip


def _xdp_program(f: Facts) -> Check:
    if f.xdp_object is not None:
        detail = f"shipped compiled at {f.xdp_object}; clang is not needed at run time"
        return Check("xdp program", True, detail)
    return Check("xdp program", False, "the compiled XDP program is missing from the package",
                 "install afxdp from a wheel built with clang (hatch_build.py compiles it); "
                 "clang is needed to build, never at run time")  # fmt: skip


def _cni_bin(f: Facts) -> Check:
    if f.cni_bin_dir_error is None:
        return Check("cni bin dir", True, f"{f.cni_bin_dir} is writable")
    return Check("cni bin dir", False, f"{f.cni_bin_dir} {f.cni_bin_dir_error}",
                 "pass the runtime's CNI bin dir with --cni-bin-dir, and make it writable "
                 "for afxdpctl install-cni (in a DaemonSet: mount the host's "
                 "/opt/cni/bin)")  # fmt: skip


def _kubelet(f: Facts) -> list[Check]:
    where = f"is kubelet running here with root dir {f.kubelet_dir}? Otherwise pass its " \
            "--root-dir as --kubelet-dir (also afxdpd's); in a DaemonSet mount it"  # fmt: skip
    plugins = f"{f.kubelet_dir}/device-plugins"
    pod_resources = f"{f.kubelet_dir}/pod-resources/kubelet.sock"
    return [
        Check("kubelet device-plugins", True, f"{plugins}/ exists")
        if f.device_plugins_dir
        else Check("kubelet device-plugins", False, f"{plugins}/ is missing", where),
        Check("kubelet pod-resources", True, f"{pod_resources} is a socket")
        if f.pod_resources_socket
        else Check("kubelet pod-resources", False, f"{pod_resources} is missing or not a socket",
                   where + " (PodResources is on by default since Kubernetes 1.20)"),
    ]  # fmt: skip


def _unprivileged_bpf(f: Facts) -> Check:
    value = f.unprivileged_bpf_disabled
    meaning = {
        0: "unprivileged processes may use bpf()",
        1: "only privileged processes may use bpf() (until reboot)",
        2: "only privileged processes may use bpf()",
    }.get(value if value is not None else -1, "unreadable")
    also = "; pools with requiresUnprivilegedBpf take no devices here" if value else ""
    detail = f"kernel.unprivileged_bpf_disabled={value}: {meaning}{also}"
    return Check("unprivileged bpf", True, detail, info=True)


def _datapath_check(f: Facts) -> Check:
    """Which layout afxdpd runs here: informational (both work)."""
    if f.datapath is None:
        detail = f"not known: {f.datapath_reason}"
    elif f.datapath == "map-in-map":
        detail = (f"map-in-map ({f.datapath_reason}): one program per device, a pod's "
                  "XSKMAP put in its slot; frames counted")  # fmt: skip
    else:
        detail = (f"{f.datapath} ({f.datapath_reason}): a program per pod, each "
                  "Allocate changes the device's program; no counters")  # fmt: skip
    return Check("datapath", True, detail, info=True)


def checks(f: Facts) -> list[Check]:
    """Every verdict on ``f``, in the order a reader fixes them."""
    return [
        _kernel(f),
        _af_xdp_check(f),
        _bpffs(f),
        _memlock(f),
        _libbpf_check(f),
        _xdp_program(f),
        _cni_bin(f),
        *_kubelet(f),
        _unprivileged_bpf(f),
        _datapath_check(f),
    ]


def render(results: list[Check]) -> list[str]:
    width = max(len(c.name) for c in results)
    lines = []
    for c in results:
        word = "INFO" if c.info else "PASS" if c.ok else "FAIL"
        lines.append(f"{word}  {c.name:<{width}}  {c.detail}")
        if not c.ok and c.fix:
            lines.append(f"{'':<{width + 6}}  fix: {c.fix}")
    failed = sum(not c.ok for c in results)
    lines.append(f"{failed} check(s) failed" if failed else "all checks passed")
    return lines


# -- the subcommand ------------------------------------------------------------


def configure(p: argparse.ArgumentParser, *, kubelet_dir: Path, pin_dir: Path) -> None:
    p.add_argument("--kubelet-dir", type=Path, default=kubelet_dir,
                   help="kubelet's root dir, as afxdpd's --kubelet-dir "
                        "(default: %(default)s)")  # fmt: skip
    p.add_argument("--pin-dir", type=Path, default=pin_dir,
                   help="afxdpd's --pin-dir, where a bpffs may be "
                        "(default: %(default)s)")  # fmt: skip
    p.add_argument("--cni-bin-dir", type=Path, default=Path("/opt/cni/bin"),
                   help="the container runtime's CNI bin dir (default: %(default)s)")  # fmt: skip
    p.add_argument("-o", "--output", choices=("text", "json"), default="text",
                   help="text (default) or json (every check and the facts probed)")  # fmt: skip
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Exit 0 only when every check passes, else 1."""
    facts = probe(args.pin_dir, args.cni_bin_dir, args.kubelet_dir)
    results = checks(facts)
    if args.output == "json":
        doc = {"ok": all(c.ok for c in results), "checks": results, "facts": facts}
        sys.stdout.write(msgspec.json.format(msgspec.json.encode(doc)).decode() + "\n")
    else:
        print("\n".join(render(results)))
    return 0 if all(c.ok for c in results) else 1
