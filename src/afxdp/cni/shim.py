"""The shim binary shipped in the package, and installing it into a CNI bin dir."""

from __future__ import annotations

import os
import shutil
from importlib import resources
from pathlib import Path

NAME = "afxdp"  # the CNI plugin type


def path() -> Path:
    shim = Path(str(resources.files("afxdp.cni") / "afxdp-shim"))
    if not shim.is_file():
        raise FileNotFoundError(f"{shim}: the package was built without the CNI shim (needs gcc)")
    return shim


def install(bin_dir: Path) -> Path:
    """Copy the shim to ``bin_dir/afxdp`` atomically (a runtime may be running it)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    dest = bin_dir / NAME
    tmp = bin_dir / f".{NAME}.tmp-{os.getpid()}"
    shutil.copyfile(path(), tmp)
    tmp.chmod(0o755)
    tmp.replace(dest)
    return dest
