"""The shim binary shipped in the package, and installing it into a CNI bin dir.

The shim runs as root with a netconf that anyone allowed to write a
NetworkAttachmentDefinition chose, so where it may reach afxdpd is decided at
install time, not by the netconf: ``afxdp.conf`` beside the shim lists the
allowed directories (one absolute path per line); without that file the shim
allows ``DEFAULT_DIRS``. The rule itself lives in the shim (cni_shim/afxdp.c).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from importlib import resources
from pathlib import Path, PurePosixPath

NAME = "afxdp"  # the CNI plugin type
CONF_NAME = "afxdp.conf"  # the allowed directories, beside the shim
# The host's run dir, and the same seen from the Multus thick daemon's container.
DEFAULT_DIRS = (Path("/run/afxdp"), Path("/host/run/afxdp"))
MAX_DIRS = 16  # the shim refuses a longer list


def path() -> Path:
    shim = Path(str(resources.files("afxdp.cni") / "afxdp-shim"))
    if not shim.is_file():
        raise FileNotFoundError(f"{shim}: the package was built without the CNI shim (needs gcc)")
    return shim


def allowed_dirs_text(dirs: Sequence[Path]) -> str:
    """The ``afxdp.conf`` text for ``dirs``; ValueError names a directory the shim would refuse."""
    if len(dirs) > MAX_DIRS:
        raise ValueError(f"at most {MAX_DIRS} allowed directories, not {len(dirs)}")
    lines = [
        "# Written by afxdpctl install-cni: the directories where the afxdp CNI shim",
        "# may reach afxdpd (daemonSocket, <dir>/cni.sock) and queue DELs.",
        "# One absolute directory per line; this list replaces the built-in defaults.",
    ]
    for d in dirs:
        text = str(d)
        # The shim compares paths, and a '..' could climb out of what the
        # operator meant to allow: refuse it rather than guess.
        if not d.is_absolute() or ".." in PurePosixPath(text).parts:
            raise ValueError(f"allowed directory {text!r}: must be absolute, without '..'")
        if "\n" in text or "\r" in text or "\0" in text or text != text.strip():
            raise ValueError(f"allowed directory {text!r}: no line breaks or edge whitespace")
        lines.append(os.path.normpath(text))
    return "\n".join(lines) + "\n"


def install(bin_dir: Path, allow_dirs: Sequence[Path] | None = None) -> Path:
    """Copy the shim to ``bin_dir/afxdp`` atomically (a runtime may be running it).

    ``allow_dirs`` replaces the shim's default allowed directories; None keeps
    the defaults (an ``afxdp.conf`` from an earlier install is removed).
    """
    text = None if allow_dirs is None else allowed_dirs_text(allow_dirs)
    bin_dir.mkdir(parents=True, exist_ok=True)
    conf = bin_dir / CONF_NAME
    # The allowed dirs first: a new shim never runs with an old list.
    if text is None:
        conf.unlink(missing_ok=True)
    else:
        tmp_conf = bin_dir / f".{CONF_NAME}.tmp-{os.getpid()}"
        tmp_conf.write_text(text)
        tmp_conf.chmod(0o644)
        tmp_conf.replace(conf)
    dest = bin_dir / NAME
    tmp = bin_dir / f".{NAME}.tmp-{os.getpid()}"
    shutil.copyfile(path(), tmp)
    tmp.chmod(0o755)
    tmp.replace(dest)
    return dest
