"""Sessions: tests, lint, typecheck. ``make test`` runs all three.

Every session but ``deps-latest`` installs from the lock (requirements/, exported
from uv.lock by scripts/lock, with hashes), so a fresh machine gets the versions
the suite passed with, not whatever was released last night.
"""

import json
import shutil
from pathlib import Path

import nox

nox.options.sessions = ["lint", "typecheck", "tests"]
nox.options.reuse_venv = "yes"
nox.options.error_on_missing_interpreters = True


def install_locked(session: nox.Session, export: str, *, editable: bool = True) -> None:
    """requirements/<export>.txt (hash-checked), then afxdp itself without its
    dependencies, built by the locked hatchling (no isolated build, which would
    fetch an unpinned one)."""
    session.install("-r", f"requirements/{export}.txt")
    project = ["-e", "."] if editable else ["."]
    session.install("--no-deps", "--no-build-isolation", *project)


@nox.session(python="3.11")
def tests(session: nox.Session) -> None:
    install_locked(session, "tests")
    session.run("pytest", *session.posargs)


@nox.session(name="deps-latest", python="3.11", default=False, reuse_venv=False)
def deps_latest(session: nox.Session) -> None:
    """The whole suite on the newest versions pyproject's ranges allow, not the
    lock's: drift seen before it lands. A refresh of the lock (scripts/lock
    --upgrade) passes this session first."""
    # --group lock: uv, which tests/test_lock.py runs (PEP 735 groups: pip >= 25.1).
    session.install("--upgrade", "--upgrade-strategy", "eager", "-e", ".[test]", "--group", "lock")
    session.run("pip", "list", "--format", "freeze", silent=False)
    session.run("pytest", *session.posargs)


@nox.session(python="3.11")
def lint(session: nox.Session) -> None:
    install_locked(session, "lint", editable=False)
    paths = [
        "src",
        "tests",
        "benchmarks",
        "noxfile.py",
        "hatch_build.py",
        "scripts/build-image",
        "scripts/lock",
        "deploy/image/daemonset-demo",
    ]
    session.run("ruff", "check", *paths)
    session.run("ruff", "format", "--check", *paths)
    # The layering contracts in pyproject.toml ([tool.importlinter]), on this tree's source.
    session.run("lint-imports", env={"PYTHONPATH": "src"})


@nox.session(python="3.11")
def typecheck(session: nox.Session) -> None:
    install_locked(session, "typecheck")
    session.run("mypy")


@nox.session(python="3.11")
def bench(session: nox.Session) -> None:
    """The benchmark document (root): every figure beside its baseline, measured in
    the same run, in benchmarks/results.json; then the README table and
    benchmarks/latency.png. ``nox -s bench -- --quick`` uses smaller counts."""
    install_locked(session, "bench")
    env = {"PYTHONPATH": "."}  # the benchmarks reuse tests/kubelet.py and tests/soak.py
    # Exit 1 says a figure could not be measured: the document is still written.
    session.run("python", "-m", "benchmarks.run", *session.posargs, env=env, success_codes=[0, 1])
    session.run(
        "python", "-m", "benchmarks.table", "benchmarks/results.json",
        "--plot", "benchmarks/latency.png", "--readme", "README.md", env=env,
    )  # fmt: skip


@nox.session(python="3.11", default=False)
def lock(session: nox.Session) -> None:
    """Refresh uv.lock and requirements/ (scripts/lock; ``-- --upgrade`` for the
    newest versions the ranges allow, after ``nox -s deps-latest`` passed)."""
    session.install("-r", "requirements/uv.txt")
    session.run("python", "scripts/lock", *session.posargs)


# What ``mutants`` mutates, and the tests that must kill each module's mutants
# (unprivileged ones, but for the handler's). One mutmut run per module, so a
# mutant is only ever tried against the tests that speak for its module.
MUTATION_TARGETS: dict[str, tuple[str, list[str]]] = {
    "pools": ("src/afxdp/pools.py", ["tests/test_pools.py"]),
    "config": ("src/afxdp/config.py", ["tests/test_config.py", "tests/test_config_fuzz.py"]),
    "handshake": ("src/afxdp/uds/handshake.py", ["tests/test_handshake.py"]),
    "netconf": (
        "src/afxdp/cni/netconf.py",
        [
            "tests/test_cni_units.py",
            "tests/test_cni_fuzz.py",
            "tests/test_cni_input.py",
            "tests/test_netconf.py",
        ],
    ),
    # The handler moves real links between netns: its tests need root, and its
    # mutants run against them (see PRIVILEGED_MUTATION_TARGETS).
    "handler": (
        "src/afxdp/cni/handler.py",
        [
            "tests/test_cni_handler.py",
            "tests/test_cni_units.py",
            "tests/test_cni.py",
            "tests/test_cni_parallel.py",
            "tests/test_cni_input.py",
        ],
    ),
    "devices": (
        "src/afxdp/devices.py",
        ["tests/test_devices.py", "tests/test_device_state.py", "tests/test_handouts.py"],
    ),
    "handouts": (
        "src/afxdp/handouts.py",
        ["tests/test_devices.py", "tests/test_device_state.py", "tests/test_handouts.py"],
    ),
}
MUTATION_DEFAULT = ["pools", "config", "handshake", "netconf", "handler", "devices", "handouts"]
# Targets whose tests need root and real kernel objects. Each of their tests makes
# its own uniquely named netns and links (tests/kernel.py's Lab), so two mutants
# run side by side without meeting.
PRIVILEGED_MUTATION_TARGETS = {"handler"}


@nox.session(python="3.11", default=False)
def mutants(session: nox.Session) -> None:
    """Mutation testing (mutmut) of the core logic; prints each module's kill rate.

    ``nox -s mutants -- pools config`` picks modules (see MUTATION_TARGETS).
    Each run works on a copy of the tree in the session's tmp dir, so the work
    tree gets no ``mutants/`` directory. Not part of the default run: it takes
    minutes per module (``nice -n 19 nox -s mutants`` on a shared machine).
    """
    install_locked(session, "mutants")
    names = session.posargs or MUTATION_DEFAULT
    unknown = sorted(set(names) - MUTATION_TARGETS.keys())
    if unknown:
        session.error(f"unknown targets {unknown}; known: {sorted(MUTATION_TARGETS)}")
    root = Path.cwd()
    totals = dict.fromkeys(("killed", "survived", "timeout", "no_tests", "suspicious"), 0)
    for name in names:
        source, tests = MUTATION_TARGETS[name]
        work = Path(session.create_tmp()) / f"mutants-{name}"
        shutil.rmtree(work, ignore_errors=True)
        for tree in ("src", "tests", "deploy"):  # deploy/: the shipped config is tested
            shutil.copytree(root / tree, work / tree, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy(root / "pyproject.toml", work / "pyproject.toml")
        selection = "\n    ".join(tests)
        markers = "" if name in PRIVILEGED_MUTATION_TARGETS else "    -m\n    not privileged\n"
        (work / "setup.cfg").write_text(
            "[mutmut]\n"
            "source_paths = src\n"
            f"only_mutate = {source}\n"
            "also_copy =\n    deploy\n"
            f"pytest_add_cli_args_test_selection =\n    {selection}\n"
            # Only the unprivileged tests, except for the privileged targets: they
            # are the fast ones, and no other mutant runs with root's kernel objects.
            f"pytest_add_cli_args =\n{markers}    -p\n    no:cacheprovider\n"
        )
        with session.chdir(work):
            # mutmut stops before trying any mutant when the clean run fails.
            # TMPDIR: create_tmp points it into .nox, where the tests' unix socket
            # paths would pass the 108-byte limit.
            session.run("mutmut", "run", "--max-children", "2", env={"TMPDIR": "/tmp"})
            session.run("mutmut", "export-cicd-stats")
            stats = json.loads(Path("mutants/mutmut-cicd-stats.json").read_text())
            session.run("mutmut", "results")  # the survivors, one per line
        for key in totals:
            totals[key] += stats[key]
        session.log(f"{name}: {_rate(stats)}")
    session.log(f"kill rate over {', '.join(names)}: {_rate(totals)}")


def _rate(stats: dict[str, int]) -> str:
    """Killed (a test failed, or the mutant hung until mutmut's timeout) over
    every mutant tried; mutants that no test covers count as survivors."""
    caught = stats["killed"] + stats["timeout"]
    tried = caught + stats["survived"] + stats["no_tests"] + stats["suspicious"]
    return (
        f"{caught}/{tried} killed ({100 * caught / max(tried, 1):.1f} %): "
        f"{stats['survived']} survived, {stats['no_tests']} without tests, "
        f"{stats['timeout']} timed out, {stats['suspicious']} suspicious"
    )


@nox.session(python="3.11")
def soak(session: nox.Session) -> None:
    """1,000 pod lifecycles at concurrency 8 through afxdpd (root), with slowloris
    clients on the metrics port and config reloads (valid and invalid) meanwhile:
    zero leaks, flat fds, threads and RSS, every probe answered, no device with two
    pods. Not part of the default run; tests/test_soak.py is its short version in
    the suite."""
    install_locked(session, "tests")
    session.run(
        "python", "-m", "tests.soak", "--lifecycles", "1000", "--concurrency", "8",
        *session.posargs,
    )  # fmt: skip


@nox.session(python="3.11", default=False)
def wheel(session: nox.Session) -> None:
    """The release wheel in dist/ (py3-none-manylinux_2_17_<arch>, by the locked
    hatchling), then tests/test_packaging.py on that very file: its tag, the
    static stripped shim in it, pip's tag check for every supported Python, and
    the pod client installed from it on Python 3.12 and 3.13."""
    install_locked(session, "tests")
    dist = Path("dist")
    for old in dist.glob("afxdp-*.whl"):
        old.unlink()
    session.run("pip", "wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", str(dist), ".")
    (built,) = dist.glob("afxdp-*.whl")
    session.run("pytest", "tests/test_packaging.py", *session.posargs,
                env={"AFXDP_WHEEL": str(built.resolve())})  # fmt: skip
    session.log(f"built {built}")


@nox.session(python=False, default=False)
def image(session: nox.Session) -> None:
    """Build the image with podman on a local mmdebstrap base, check it and write
    its SBOM to dist/ (root)."""
    session.run("scripts/build-image", *session.posargs, external=True)
