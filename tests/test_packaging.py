"""The pod-side client works without the node service's dependencies, the
commands say which extra they need, and libbpf is loaded on first use."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pyroute2
import pytest

from afxdp.bpf import libbpf

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
NODE_ONLY = ["grpclib", "pyroute2", "uvloop", "prometheus_client", "google.protobuf"]

# As if only the core dependencies were installed: the node extra's modules
# cannot be imported.
_WITHOUT_NODE_EXTRA = textwrap.dedent(f"""
    import importlib.abc, sys
    class Absent(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if any(name == m or name.startswith(m + ".") for m in {NODE_ONLY!r}):
                raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
            return None
    sys.meta_path.insert(0, Absent())
""")


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", _WITHOUT_NODE_EXTRA + textwrap.dedent(code)],
                          capture_output=True, text=True, env=ENV, check=False)  # fmt: skip


def test_the_pod_side_client_imports_without_the_node_extra() -> None:
    done = _run("""
        from afxdp.uds.client import UdsClient, AsyncUdsClient
        from afxdp.xsk import XskSocket
        from afxdp.bpf.libbpf import map_update_u32
        import sys
        assert not any(m in sys.modules for m in ("grpclib", "pyroute2", "uvloop"))
        print("client ok")
    """)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "client ok"


@pytest.mark.parametrize("command", ["afxdpd", "afxdpctl"])
def test_the_commands_name_the_extra_they_need(command: str) -> None:
    done = _run(f"""
        import sys
        from afxdp.cli import entry
        sys.exit(entry.{command}())
    """)
    assert done.returncode == 3
    assert f"{command}: needs the node extra" in done.stderr
    assert "pip install 'afxdp[node]'" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_missing_libbpf_is_a_clear_error_at_first_use(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(libbpf, "LIBRARY", "libbpf-not-installed.so.1")
    libbpf._lib.cache_clear()
    try:
        with pytest.raises(libbpf.BpfError) as err:
            libbpf.xdp_query_id(1)
        assert "dlopen libbpf-not-installed.so.1" in str(err.value)
        assert "apt install libbpf1" in str(err.value)
    finally:
        libbpf._lib.cache_clear()


def test_afxdp_takes_pyroute2_names_from_its_top_level_only() -> None:
    """``from pyroute2 import NetlinkError``, never ``pyroute2.netlink.exceptions``:
    the top level is what pyroute2 exports; the module a name lives in is its
    own business and moves between releases."""
    src = Path(libbpf.__file__).parents[1]  # src/afxdp
    deep: list[str] = []
    names: set[str] = set()
    for path in sorted(src.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pyroute2"):
                if node.module != "pyroute2":
                    deep.append(f"{path.relative_to(src)}:{node.lineno}: {node.module}")
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.Import):
                deep += [f"{path.relative_to(src)}:{node.lineno}: {a.name}"
                         for a in node.names if a.name.startswith("pyroute2.")]  # fmt: skip
    assert deep == []
    assert "NetlinkError" in names
    assert all(hasattr(pyroute2, name) for name in names)  # in the locked version
