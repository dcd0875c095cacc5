"""Shared fixtures; the rule that privileged tests never skip in CI."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.kernel import Lab, privilege_problem


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("privileged") is None:
        return
    problem = privilege_problem()
    if problem is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"privileged test cannot run in CI: {problem}", pytrace=False)
    pytest.skip(f"needs privileges: {problem}")


@pytest.fixture
def lab() -> Iterator[Lab]:
    """Network namespaces and veth pairs that are removed even when the test fails."""
    with Lab() as lab:
        yield lab


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, bool]]:
    """Async tests run on uvloop, as the service does."""
    return ("asyncio", {"use_uvloop": True})
