"""Build hook: compile the XDP program (clang) and the static CNI shim (gcc), so
wheels ship both and nothing compiles at run time. Editable installs get them
beside the source (git-ignored)."""

from __future__ import annotations

import platform
import shutil
import subprocess
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

BPF_PROGRAMS = ["src/afxdp/bpf/xdp_redirect", "src/afxdp/bpf/xdp_slot"]
SHIM_SOURCE = "cni_shim/afxdp.c"
SHIM_OUTPUT = "src/afxdp/cni/afxdp-shim"
# The wheel's platform tag. Nothing in the wheel uses the CPython ABI (the shim
# is a program, the rest is Python and ctypes), so any Python 3 takes it. The
# shim is static (no glibc symbol versions, no interpreter), so it needs no
# particular libc: manylinux_2_17 (manylinux2014) is the baseline PyPA's tools
# build for today, and claims nothing the shim needs; AF_XDP needs a far newer
# kernel than any manylinux baseline anyway.
MANYLINUX = "manylinux_2_17"


def _tool(name: str, package: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} is needed to build afxdp: apt-get install {package}")
    return found


class AfxdpBuildHook(BuildHookInterface):  # type: ignore[type-arg]
    PLUGIN_NAME = "afxdp"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name not in ("wheel", "editable"):
            return
        root = Path(self.root)
        clang, gcc = _tool("clang", "clang"), _tool("gcc", "gcc libc6-dev")
        # Debian keeps asm/types.h in the multiarch include dir.
        triplet = subprocess.run(
            [gcc, "-dumpmachine"], capture_output=True, text=True, check=True
        ).stdout.strip()
        built = []
        for stem in BPF_PROGRAMS:
            out = root / f"{stem}.o"
            subprocess.run(
                [clang, "-O2", "-g", "-Wall", "-Werror", "-target", "bpf",
                 f"-I/usr/include/{triplet}", "-c", str(root / f"{stem}.c"), "-o", str(out)],
                check=True,
            )  # fmt: skip
            built.append(out)
        # Static: the shim runs on hosts that may have no (or another) libc.
        # Stripped (-s): it is installed onto every node; symbols would only
        # double its size.
        out = root / SHIM_OUTPUT
        subprocess.run(
            [gcc, "-static", "-s", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(out),
             str(root / SHIM_SOURCE)],
            check=True,
        )  # fmt: skip
        built.append(out)
        # The outputs are git-ignored; artifacts are shipped all the same.
        build_data.setdefault("artifacts", []).extend(str(p.relative_to(root)) for p in built)
        if self.target_name == "wheel":
            # A native program inside: the wheel is for this architecture, but
            # for any Python 3 (py3-none-manylinux_2_17_x86_64), not
            # py3-none-any, nor only this interpreter's cp3XX (what
            # infer_tag would say).
            build_data["pure_python"] = False
            build_data["tag"] = wheel_tag()


def wheel_tag() -> str:
    """py3-none-<manylinux>_<arch>: the shim is built for this machine's arch."""
    return f"py3-none-{MANYLINUX}_{platform.machine()}"
