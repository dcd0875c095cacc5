"""Pinned-map mode: bpffs under ``--pin-dir`` and one directory per allocation.

The original mounted a fresh bpffs per allocation; one bpffs at the pin dir,
with a directory per allocation inside it, gives pods the same file and leaves
one mount to propagate to kubelet (the DaemonSet mounts the pin dir with
Bidirectional propagation).
"""

from __future__ import annotations

import os
import subprocess
from contextlib import suppress
from pathlib import Path

from afxdp import contracts
from afxdp.errors import DeviceError

MAP_FILE = contracts.MAP_NAME


def fs_type(path: Path, mountinfo: Path = Path("/proc/self/mountinfo")) -> str | None:
    """The type of the filesystem that holds ``path`` (which must exist)."""
    real = os.path.realpath(path)
    best, best_type = "", None
    for line in mountinfo.read_text().splitlines():
        fields = line.split()
        mount_point = fields[4].replace("\\040", " ")
        fstype = fields[fields.index("-") + 1]
        inside = real == mount_point or real.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) >= len(best):
            best, best_type = mount_point, fstype
    return best_type


def ensure_bpffs(pin_dir: Path) -> None:
    """Make ``pin_dir`` a bpffs (mounting one, shared, if it is not on one already)."""
    pin_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    if fs_type(pin_dir) == "bpf":
        return
    for cmd in (
        ["mount", "-t", "bpf", "bpf", str(pin_dir)],
        ["mount", "--make-shared", str(pin_dir)],
    ):
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise DeviceError(f"{' '.join(cmd)}: {done.stderr.strip()}")


def map_path(pin_dir: Path, pool: str, netdev: str) -> Path:
    """Host path of an allocation's pinned XSKMAP."""
    return pin_dir / pool / netdev / MAP_FILE


def prepare(path: Path, uid: int) -> None:
    """Create the allocation's directory (inside the bpffs) for ``path``."""
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    path.unlink(missing_ok=True)  # a stale pin from a previous run
    if uid:
        os.chown(path.parent, uid, -1)


def grant(path: Path, uid: int) -> None:
    """Let the pool's user open the pin (bpf_obj_get needs read and write)."""
    os.chmod(path, 0o600)
    if uid:
        os.chown(path, uid, -1)


def remove(path: Path) -> None:
    """Unpin and remove the allocation's directory; absent is fine."""
    path.unlink(missing_ok=True)
    with suppress(OSError):
        path.parent.rmdir()
