"""The committed gRPC stubs are exactly what scripts/gen-protos makes.

(The wire names are checked where the grpcio kubelet double calls them by hand.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent
GENERATED = [
    f"afxdp/deviceplugin/{api}/{name}"
    for api in ("v1beta1", "podresources")
    for name in ("api_pb2.py", "api_pb2.pyi", "api_grpc.py")
]


def test_committed_stubs_match_the_protos(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHON": sys.executable}
    subprocess.run(
        ["bash", str(ROOT / "scripts" / "gen-protos"), str(tmp_path)], check=True, env=env
    )
    for rel in GENERATED:
        assert (tmp_path / rel).read_text() == (ROOT / "src" / rel).read_text(), (
            f"{rel} is stale: run scripts/gen-protos"
        )
