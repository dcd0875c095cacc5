"""The committed gRPC stubs are exactly what scripts/gen-protos makes.

(The wire names are checked where the grpcio kubelet double calls them by hand.)"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent
GENERATED = [
    f"afxdp/{api}/{name}"
    for api in (
        "deviceplugin/v1beta1",
        "deviceplugin/podresources",
        "dra/pluginregistration",
        "dra/v1",
        "dra/v1beta1",
    )
    for name in ("api_pb2.py", "api_pb2.pyi", "api_grpc.py")
]
# Kubelet's own protos, vendored byte for byte from kubernetes/kubelet at
# 63b3249724f7d89a8aa48f9acb3811f193c9aa68 (2026-07-23): an edit here would
# change the wire contract with kubelet behind its back.
UPSTREAM = {
    "afxdp/dra/pluginregistration/api.proto": (  # pkg/apis/pluginregistration/v1/api.proto
        "7a67a0000a1a167c155286834bc9ccb489f8bcdb394e006daba270189c272afa"
    ),
    "afxdp/dra/v1/api.proto": (  # pkg/apis/dra/v1/api.proto
        "b3066ad7f6abcfd0003c47b06ceb801d76997d78d6be505597478d3905b9cc57"
    ),
    "afxdp/dra/v1beta1/api.proto": (  # pkg/apis/dra/v1beta1/api.proto
        "7900b11793ad897d0375d67b3bbae675869b574e21dfb1bf5334cc1556138c42"
    ),
}


def test_committed_stubs_match_the_protos(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHON": sys.executable}
    subprocess.run(
        ["bash", str(ROOT / "scripts" / "gen-protos"), str(tmp_path)], check=True, env=env
    )
    for rel in GENERATED:
        assert (tmp_path / rel).read_text() == (ROOT / "src" / rel).read_text(), (
            f"{rel} is stale: run scripts/gen-protos"
        )


def test_kubelet_protos_are_upstream_byte_for_byte() -> None:
    for rel, digest in UPSTREAM.items():
        assert hashlib.sha256((ROOT / "src" / rel).read_bytes()).hexdigest() == digest, rel
