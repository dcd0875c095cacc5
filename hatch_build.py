"""Build hook: compile the XDP program with clang, so wheels ship the object and
nothing compiles at run time. Editable installs get it beside the source."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

BPF_DIR = Path("src/afxdp/bpf")
PROGRAMS = ["xdp_redirect"]


class BpfBuildHook(BuildHookInterface):  # type: ignore[type-arg]
    PLUGIN_NAME = "bpf"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name not in ("wheel", "editable"):
            return
        clang = shutil.which("clang")
        if clang is None:
            raise RuntimeError("clang is needed to build the XDP program: apt-get install clang")
        # Debian keeps asm/types.h in the multiarch include dir.
        triplet = subprocess.run(
            ["gcc", "-dumpmachine"], capture_output=True, text=True, check=True
        ).stdout.strip()
        root = Path(self.root)
        for name in PROGRAMS:
            src = root / BPF_DIR / f"{name}.c"
            out = root / BPF_DIR / f"{name}.o"
            subprocess.run(
                [clang, "-O2", "-g", "-Wall", "-Werror", "-target", "bpf",
                 f"-I/usr/include/{triplet}", "-c", str(src), "-o", str(out)],
                check=True,
            )  # fmt: skip
            # The object is git-ignored; artifacts are shipped all the same.
            build_data.setdefault("artifacts", []).append(str(out.relative_to(root)))
