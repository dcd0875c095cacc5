"""The pod-side client works without the node service's dependencies, the
commands say which extra they need, and libbpf is loaded on first use.

The wheel (built here, or the one $AFXDP_WHEEL names: ``nox -s wheel``) is for
any Python 3 on manylinux, carries a static stripped shim, and the pod client
installed from it runs on every newer Python this machine has. The release
bookkeeping: every place that names the version agrees with
src/afxdp/__init__.py, the CHANGELOG's newest release is it, a release build
needs the tag; the image's SBOM lists what is installed.
"""

from __future__ import annotations

import ast
import importlib.machinery
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path
from types import ModuleType

import anyio
import pyroute2
import pytest
from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator

import afxdp
from afxdp.bpf import libbpf
from afxdp.uds.handshake import HostCheck
from afxdp.uds.server import UdsServer, socket_path

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


@pytest.mark.parametrize("command", ["afxdpd", "afxdpctl"])
def test_version_works_without_the_node_extra(command: str) -> None:
    done = _run(f"""
        import sys
        from afxdp.cli import entry
        sys.argv = ["{command}", "--version"]
        sys.exit(entry.{command}())
    """)
    # What the command says with the extra installed (test_afxdpctl's version test).
    with_extra = subprocess.run([sys.executable, "-m", f"afxdp.cli.{command}", "--version"],
                                capture_output=True, text=True, env=ENV, check=True)  # fmt: skip
    assert (done.returncode, done.stdout, done.stderr) == (0, with_extra.stdout, "")


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


# --- the wheel -----------------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent
# The Pythons newer than the one the project builds with (requires-python >= 3.11).
NEWER_PYTHONS = ("3.12", "3.13")
WHEEL_TAG = f"py3-none-manylinux_2_17_{platform.machine()}"
SHIM = "afxdp/cni/afxdp-shim"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel $AFXDP_WHEEL names (nox -s wheel), else one built here by the
    locked hatchling, as the image's build stage builds it."""
    given = os.environ.get("AFXDP_WHEEL")
    if given:
        return Path(given)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "--wheel-dir", str(out), str(ROOT)],
                   check=True, capture_output=True, timeout=120)  # fmt: skip
    (built,) = out.glob("afxdp-*.whl")
    return built


@pytest.mark.timeout(180)
def test_the_wheel_is_for_any_python3_on_manylinux(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        (name,) = [n for n in z.namelist() if n.endswith(".dist-info/WHEEL")]
        meta = z.read(name).decode()
    assert re.findall(r"^Tag: (\S+)$", meta, re.M) == [WHEEL_TAG]
    assert wheel.name == f"afxdp-{afxdp.__version__}-{WHEEL_TAG}.whl"


@pytest.mark.timeout(180)
def test_the_shim_in_the_wheel_is_static_and_stripped(wheel: Path, tmp_path: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        shim = Path(z.extract(SHIM, tmp_path))
    headers = subprocess.run(["readelf", "--wide", "--program-headers", "--section-headers",
                              str(shim)], capture_output=True, text=True, check=True).stdout  # fmt: skip
    segments = re.findall(r"^\s+([A-Z_]+)\s+0x", headers, re.M)
    sections = re.findall(r"^\s+\[\s*\d+\]\s+(\S+)", headers, re.M)
    assert "LOAD" in segments and ".text" in sections  # the parse saw the file
    # Static: no program interpreter, no dynamic section (no libc to match on a node).
    assert "INTERP" not in segments and "DYNAMIC" not in segments
    # Stripped: no symbol table (the shim's size is static glibc, not symbols).
    assert ".symtab" not in sections and ".strtab" not in sections


@pytest.mark.timeout(180)
@pytest.mark.parametrize("python", ["3.11", *NEWER_PYTHONS])
def test_pip_takes_the_wheel_for(wheel: Path, python: str, tmp_path: Path) -> None:
    """pip's own tag check, as pip on that Python on this platform makes it."""
    report = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--no-index",
         "--only-binary=:all:", "--python-version", python, "--target", str(tmp_path / "t"),
         "--report", str(report), "--quiet", str(wheel)],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    installs = json.loads(report.read_text())["install"]
    assert [(i["metadata"]["name"], i["metadata"]["version"]) for i in installs] == [
        ("afxdp", afxdp.__version__)
    ]


def _interpreter(version: str) -> str:
    """python<version> from pyenv (this machine's kind has 3.12 and 3.13) or PATH."""
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    candidates = sorted(pyenv.glob(f"{version}.*/bin/python{version}"), reverse=True)
    on_path = shutil.which(f"python{version}")
    for exe in [*map(str, candidates), *([on_path] if on_path else [])]:
        done = subprocess.run([exe, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                              capture_output=True, text=True, check=False)  # fmt: skip
        if done.returncode == 0 and done.stdout.strip() == version:
            return exe
    problem = f"no Python {version} here (pyenv or PATH)"
    if os.environ.get("CI"):
        pytest.fail(problem, pytrace=False)
    pytest.skip(problem)


# Runs in the venv of the newer Python, outside the source tree: the pod side of
# the handshake as a pod's app does it, printing what it got.
POD_CLIENT = textwrap.dedent("""
    import json, os, sys
    import afxdp
    from afxdp.bpf import libbpf
    from afxdp.uds.client import UdsClient
    from afxdp.xsk import XskSocket
    with UdsClient(sys.argv[1]) as client:
        client.connect("pod-a")
        version = client.version()
        map_fd = client.xsk_map_fd("devA")
        inode = os.fstat(map_fd).st_ino
        os.close(map_fd)
        client.fin()
    print(json.dumps({"python": "%d.%d" % sys.version_info[:2], "afxdp": afxdp.__file__,
                      "package": afxdp.__version__, "protocol": version, "inode": inode}))
""")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("python", NEWER_PYTHONS)
@pytest.mark.anyio
async def test_the_pod_client_from_the_wheel_runs_on(
    wheel: Path, python: str, tmp_path: Path
) -> None:
    """A pod's install (the wheel and the locked core dependencies, no node extra)
    on a real newer interpreter does the UDS handshake with a real UdsServer and
    receives the map fd it passes (a pipe stands in for the XSKMAP: the server
    passes any fd on unchanged)."""
    exe = _interpreter(python)
    venv = tmp_path / "venv"
    subprocess.run([exe, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet",
           "--disable-pip-version-check"]  # fmt: skip
    subprocess.run([*pip, "-r", str(ROOT / "requirements" / "pod.txt")], check=True, timeout=180)
    subprocess.run([*pip, "--no-deps", str(wheel)], check=True, timeout=120)
    read_end, write_end = os.pipe()
    server = UdsServer(netdev="devA", map_fd=read_end, path=socket_path(tmp_path / "uds", "devA"),
                       check_host=_allow)  # fmt: skip
    try:
        server.listen()
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
        async with anyio.create_task_group() as tg:
            tg.start_soon(server.serve)
            done = await anyio.run_process(
                [str(venv / "bin" / "python"), "-c", POD_CLIENT, str(server.path)],
                cwd=tmp_path,
                env=env,
                check=False,
            )
            tg.cancel_scope.cancel()
        assert done.returncode == 0, done.stderr.decode()
        got = json.loads(done.stdout)
        assert got["python"] == python
        assert Path(got["afxdp"]).is_relative_to(venv)  # the wheel's, not this tree's
        assert got["package"] == afxdp.__version__
        assert got["inode"] == os.fstat(read_end).st_ino
        assert server.connections == 1 and server.failed == 0
    finally:
        server.close()
        os.close(read_end)
        os.close(write_end)


async def _allow(_host: str) -> HostCheck:
    return HostCheck.OK  # kubelet's answer, as test_uds_server's fake kubelet gives it


# --- the version, the release, the SBOM -----------------------------------------


def _build_image_script() -> ModuleType:
    """scripts/build-image as a module (it has no .py: it is a command)."""
    loader = importlib.machinery.SourceFileLoader("build_image", str(ROOT / "scripts/build-image"))
    spec = importlib.util.spec_from_loader("build_image", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


build_image = _build_image_script()

# How the other places name the version: an image reference or a kustomize tag.
VERSION_MENTION = re.compile(r"\bafxdp:(\d+\.\d+\.\d+\S*?)\b(?![.\d])|^\s*newTag:\s*[\"']?([^\s\"']+)",
                             re.M)  # fmt: skip
VERSIONED_FILES = ("*.md", "Containerfile", "deploy/**/*", "scripts/*", "src/**/*.py")


def version_mentions(root: Path) -> list[tuple[str, str]]:
    """(file:line, version) for every place under ``root`` that names a version."""
    found = []
    for pattern in VERSIONED_FILES:
        for path in sorted(root.glob(pattern)):
            if not path.is_file():
                continue
            text = path.read_text(errors="replace")
            for m in VERSION_MENTION.finditer(text):
                line = text.count("\n", 0, m.start()) + 1
                found.append((f"{path.relative_to(root)}:{line}", m.group(1) or m.group(2)))
    return found


def test_every_place_that_names_the_version_names_the_one_in_init() -> None:
    assert build_image.version() == afxdp.__version__ == importlib.metadata.version("afxdp")
    mentions = version_mentions(ROOT)
    # The deploy files name it (image references, kustomize's newTag).
    assert any(where.startswith("deploy/kustomization.yaml") for where, _ in mentions)
    assert any(where.startswith("deploy/daemonset.yaml") for where, _ in mentions)
    wrong = [f"{where} says {found}" for where, found in mentions if found != afxdp.__version__]
    assert not wrong, f"src/afxdp/__init__.py says {afxdp.__version__}; " + "; ".join(wrong)


def test_a_place_with_another_version_is_found(tmp_path: Path) -> None:
    for name in ("deploy/kustomization.yaml", "deploy/daemonset.yaml", "README.md"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ROOT / name, tmp_path / name)
    before = version_mentions(tmp_path)
    path = tmp_path / "deploy/daemonset.yaml"
    path.write_text(path.read_text().replace(f"afxdp:{afxdp.__version__}", "afxdp:9.9.9", 1))
    after = version_mentions(tmp_path)
    assert len(after) == len(before)
    (changed,) = set(after) - set(before)
    assert changed[0].startswith("deploy/daemonset.yaml:") and changed[1] == "9.9.9"


def test_the_changelogs_newest_release_is_the_version() -> None:
    text = (ROOT / "CHANGELOG.md").read_text()
    assert "Keep a Changelog" in text and "Semantic Versioning" in text
    headings = re.findall(r"^## \[([^\]]+)\](?: - (\d{4}-\d{2}-\d{2}))?$", text, re.M)
    assert headings[0][0] == "Unreleased"
    released = [(v, date) for v, date in headings[1:]]
    assert released and released[0][0] == afxdp.__version__ and released[0][1]


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t",
                    *args], check=True, capture_output=True)  # fmt: skip


def test_a_release_build_needs_a_clean_tree_tagged_with_the_version(tmp_path: Path) -> None:
    init = tmp_path / "src" / "afxdp" / "__init__.py"
    init.parent.mkdir(parents=True)
    shutil.copyfile(ROOT / "src" / "afxdp" / "__init__.py", init)
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-q", "-m", "x")
    want = f"v{afxdp.__version__}"
    (untagged,) = build_image.release_problems(tmp_path)
    assert f"HEAD is not tagged {want}" in untagged
    _git(tmp_path, "tag", "v0.0.0-other")
    assert build_image.release_problems(tmp_path) == [
        f"HEAD is not tagged {want} (tags at HEAD: v0.0.0-other)"
    ]
    _git(tmp_path, "tag", "-a", want, "-m", want)
    assert build_image.release_problems(tmp_path) == []
    revision = build_image.git_revision(tmp_path)
    assert re.fullmatch(r"[0-9a-f]{40}", revision)
    init.write_text(init.read_text() + "\n")
    assert build_image.release_problems(tmp_path) == ["the work tree has uncommitted changes"]
    assert build_image.git_revision(tmp_path) == f"{revision}-dirty"


@pytest.fixture(scope="module")
def sbom_here() -> dict[str, object]:
    """The SBOM of this machine's test venv and Debian packages, read by the very
    code the image session runs inside the image."""
    done = subprocess.run([sys.executable, "-c", build_image.SBOM_COLLECT],
                          capture_output=True, text=True, check=True)  # fmt: skip
    collected = json.loads(done.stdout)
    doc: dict[str, object] = build_image.sbom(
        collected, image="localhost/afxdp:test", digest="sha256:0", revision="r", created="now"
    )
    return doc


def test_the_sbom_lists_every_python_distribution_and_debian_package(
    sbom_here: dict[str, object],
) -> None:
    doc = sbom_here
    assert doc["bomFormat"] == "CycloneDX" and doc["specVersion"] == "1.5"
    components = doc["components"]
    assert isinstance(components, list)
    purls = [c["purl"] for c in components]
    assert len(purls) == len(set(purls)) and all(c["bom-ref"] == c["purl"] for c in components)
    pypi = {(c["name"], c["version"]) for c in components if c["purl"].startswith("pkg:pypi/")}
    assert pypi == {(d.metadata["Name"], d.version) for d in importlib.metadata.distributions()}
    listed = subprocess.run(["dpkg-query", "-W", "-f=${Package} ${Version} ${Architecture}\n"],
                            capture_output=True, text=True, check=True).stdout.split("\n")  # fmt: skip
    debs = {tuple(ln.split()) for ln in listed if ln}
    got = {(c["name"], c["version"], re.search(r"arch=([^&]+)", c["purl"])[1])  # type: ignore[index]
           for c in components if c["purl"].startswith("pkg:deb/")}  # fmt: skip
    assert got == debs
    # purl versions are percent-encoded: Debian's "+" and epochs' ":" would split them.
    assert all("+" not in p.partition("?")[0] for p in purls)


def test_the_sbom_is_valid_cyclonedx(sbom_here: dict[str, object]) -> None:
    """The CycloneDX project's own schema (strict), not a check of ours."""
    validator = JsonStrictValidator(SchemaVersion.V1_5)
    assert validator.validate_str(json.dumps(sbom_here)) is None
    broken = {**sbom_here, "metadata": {**sbom_here["metadata"], "component": {"type": "box"}}}  # type: ignore[dict-item]
    assert validator.validate_str(json.dumps(broken)) is not None  # the validator looks


def test_the_sbom_is_checked_against_the_lock(sbom_here: dict[str, object]) -> None:
    # This venv was installed from requirements/tests.txt (nox -s tests, or the setup).
    assert build_image.sbom_problems(sbom_here, ROOT / "requirements" / "tests.txt") == []
    components = sbom_here["components"]
    assert isinstance(components, list)
    without = {**sbom_here, "components": [c for c in components if c["name"] != "msgspec"]}
    (problem,) = build_image.sbom_problems(without, ROOT / "requirements" / "tests.txt")
    assert problem.startswith("msgspec==") and "(locked) is not in the image" in problem
    # A line whose marker holds here counts (typing-extensions: python < 3.15); one
    # whose marker does not (colorama: win32) is not expected.
    for name, expected in (("typing_extensions", 1), ("colorama", 0)):
        without = {**sbom_here, "components": [c for c in components if c["name"] != name]}
        found = build_image.sbom_problems(without, ROOT / "requirements" / "tests.txt")
        assert len(found) == expected, (name, found)


def test_every_label_build_arg_comes_from_its_one_source() -> None:
    args = build_image.labels_args(
        "localhost/base:x", "sha256:ab", "0123abc", "2026-01-01T00:00:00Z"
    )
    given = dict(a.removeprefix("--build-arg=").split("=", 1) for a in args)
    runtime = (ROOT / "Containerfile").read_text().rpartition("\nFROM ")[2]
    label_block = runtime[runtime.index("LABEL ") : runtime.index("\nRUN ")]
    used = set(re.findall(r"\$\{([A-Z_]+)\}", label_block))
    assert used == set(given), "every label's arg is passed, and nothing else"
    urls = build_image.project()["urls"]
    assert given["VERSION"] == afxdp.__version__
    assert (given["SOURCE"], given["URL"]) == (urls["Source"], urls["Homepage"])
    assert (given["BASE_IMAGE"], given["BASE_DIGEST"]) == ("localhost/base:x", "sha256:ab")
    assert (given["REVISION"], given["CREATED"]) == ("0123abc", "2026-01-01T00:00:00Z")


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
