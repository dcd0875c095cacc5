"""Sessions: tests, lint, typecheck. ``make test`` runs all three."""

import nox

nox.options.sessions = ["lint", "typecheck", "tests"]
nox.options.reuse_venv = "yes"
nox.options.error_on_missing_interpreters = True


@nox.session(python="3.11")
def tests(session: nox.Session) -> None:
    session.install("-e", ".[test]")
    session.run("pytest", *session.posargs)


@nox.session(python="3.11")
def lint(session: nox.Session) -> None:
    session.install(".[lint]")
    paths = ["src", "tests", "benchmarks", "noxfile.py", "hatch_build.py"]
    session.run("ruff", "check", *paths)
    session.run("ruff", "format", "--check", *paths)


@nox.session(python="3.11")
def typecheck(session: nox.Session) -> None:
    session.install("-e", ".[typecheck]")
    session.run("mypy")


@nox.session(python="3.11")
def bench(session: nox.Session) -> None:
    """Benchmarks (not part of the test run): each prints its figures as JSON."""
    session.install("-e", ".[test]")
    scripts = session.posargs or [
        "benchmarks/bench_foundation.py",
        "benchmarks/bench_uds_xdp.py",
        "benchmarks/bench_deviceplugin.py",
    ]
    for script in scripts:
        # The benchmarks reuse the test doubles (tests/kubelet.py, tests/fakes.py).
        session.run("python", script, env={"PYTHONPATH": "."})
