"""The documents name tests as proof: each named test must exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_REF = re.compile(r"`(?:(test_\w+\.py))?::(\w+)`|`(test_\w+\.py)`")


def test_every_test_security_md_names_exists() -> None:
    text = (ROOT / "SECURITY.md").read_text()
    current: str | None = None
    named = 0
    for m in _REF.finditer(text):
        file, name, bare = m.groups()
        if bare:
            assert (ROOT / "tests" / bare).is_file(), bare
            continue
        current = file or current
        assert current is not None, f"::{name} before any file"
        source = (ROOT / "tests" / current).read_text()
        assert re.search(rf"^(async )?def {name}\b|^{name} = ", source, re.M), f"{current}::{name}"
        named += 1
    assert named >= 20
