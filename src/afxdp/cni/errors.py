"""CNI errors: the spec's codes, and the JSON a runtime reads on stdout."""

from __future__ import annotations

import json
from typing import Any

from afxdp.errors import AfxdpError

INCOMPATIBLE_VERSION = 1
UNSUPPORTED_FIELD = 2
UNKNOWN_CONTAINER = 3
INVALID_ENV = 4
IO_FAILURE = 5
DECODE_FAILURE = 6
INVALID_CONFIG = 7
TRY_AGAIN_LATER = 11
NOT_READY = 50
# Plugin-specific codes start at 100.
CHECK_MISMATCH = 100


class CniError(AfxdpError):
    """Something a CNI runtime must be told, with its spec code."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        self.code = code
        self.msg = msg
        self.details = details
        super().__init__(f"[{code}] {msg}" + (f": {details}" if details else ""))

    def to_json(self, cni_version: str) -> bytes:
        doc: dict[str, Any] = {"cniVersion": cni_version, "code": self.code, "msg": self.msg}
        if self.details:
            doc["details"] = self.details
        return json.dumps(doc).encode() + b"\n"
