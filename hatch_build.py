"""Build hook: compile the XDP program (clang) and the static CNI shim (gcc), so
wheels ship both and nothing compiles at run time. Editable installs get them
beside the source (git-ignored)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

BPF_PROGRAMS = ["src/afxdp/bpf/xdp_redirect", "src/afxdp/bpf/xdp_slot"]
SHIM_SOURCE = "cni_shim/afxdp.c"
SHIM_OUTPUT = "src/afxdp/cni/afxdp-shim"


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
        out = root / SHIM_OUTPUT
        subprocess.run(
            [gcc, "-static", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(out),
             str(root / SHIM_SOURCE)],
            check=True,
        )  # fmt: skip
        built.append(out)
        # The outputs are git-ignored; artifacts are shipped all the same.
        build_data.setdefault("artifacts", []).extend(str(p.relative_to(root)) for p in built)
        if self.target_name == "wheel":
            # A native shim inside: the wheel is for this platform and Python
            # (cp311-cp311-linux_x86_64), not py3-none-any.
            build_data["pure_python"] = False
            build_data["infer_tag"] = True
