"""The dependency lock is whole and current: uv.lock matches pyproject.toml,
and every hashed export in requirements/ matches uv.lock (scripts/lock --check).

A fresh machine installs from these files; one that drifted from pyproject
would install something the suite never ran with."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "scripts" / "lock"


def check(root: Path) -> subprocess.CompletedProcess[str]:
    # This interpreter's environment has uv (the `lock` group of the tests export).
    return subprocess.run(
        [sys.executable, str(root / "scripts" / "lock"), "--check"],
        capture_output=True, text=True, timeout=50, check=False,
    )  # fmt: skip


def copy_of_the_lock(tmp_path: Path) -> Path:
    for name in ("pyproject.toml", "uv.lock", "README.md", "hatch_build.py"):
        shutil.copy(ROOT / name, tmp_path / name)
    for tree in ("requirements", "scripts"):
        shutil.copytree(ROOT / tree, tmp_path / tree)
    (tmp_path / "src" / "afxdp").mkdir(parents=True)
    shutil.copy(ROOT / "src" / "afxdp" / "__init__.py", tmp_path / "src" / "afxdp")
    return tmp_path


def test_the_lock_matches_pyproject_and_every_export_matches_the_lock() -> None:
    done = check(ROOT)
    assert done.returncode == 0, done.stderr
    assert re.search(r"uv\.lock and \d+ exports agree", done.stdout)


def test_an_export_edited_by_hand_is_caught(tmp_path: Path) -> None:
    root = copy_of_the_lock(tmp_path)
    export = root / "requirements" / "node.txt"
    export.write_text(re.sub(r"^msgspec==\S+", "msgspec==0.18.0", export.read_text(), flags=re.M))
    done = check(root)
    assert done.returncode == 1
    assert "requirements/node.txt does not match uv.lock" in done.stderr


def test_a_range_changed_in_pyproject_without_a_new_lock_is_caught(tmp_path: Path) -> None:
    root = copy_of_the_lock(tmp_path)
    pyproject = root / "pyproject.toml"
    pyproject.write_text(
        pyproject.read_text().replace('"msgspec>=0.18.5"', '"msgspec>=0.18.5,<0.19"')
    )
    done = check(root)
    assert done.returncode == 1
    assert "uv.lock" in done.stderr


def test_every_export_pins_every_line_with_a_hash() -> None:
    """pip checks hashes for a whole file once one line has one; a line without
    would make the install fail, not skip the check, but say it here first."""
    for path in sorted((ROOT / "requirements").glob("*.txt")):
        text = path.read_text()
        requirements = re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+)(.*?)(?=^\S|\Z)", text, re.M | re.S)
        assert requirements, path
        for name, _version, rest in requirements:
            assert "--hash=sha256:" in rest, f"{path.name}: {name} has no hash"
        lines = [line for line in text.splitlines() if line and not line[0].isspace()]
        assert all(line.startswith("#") or "==" in line for line in lines), path.name
