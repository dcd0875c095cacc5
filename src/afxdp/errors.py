"""The project's error tree.

Errors carry meaning inside the process; they are mapped to the outside world
(exit code, gRPC status, CNI code, ``/nak``) only at the edges.
"""

from __future__ import annotations

from collections.abc import Iterable

import msgspec


class AfxdpError(Exception):
    """Base of every error this project raises on purpose."""


class ConfigIssue(msgspec.Struct, frozen=True):
    """One problem (or warning) found in a config document, at a JSON path."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class ConfigError(AfxdpError):
    """A config document is invalid; carries every issue found, not only the first."""

    def __init__(self, issues: Iterable[ConfigIssue]) -> None:
        self.issues = tuple(issues)
        super().__init__("\n".join(str(i) for i in self.issues))


class DeviceError(AfxdpError):
    """A device cannot be used as asked (unknown, unhealthy, already allocated...)."""
