"""The nesting bound is measured on the JSON text, by our own scan: it agrees
with the depth of the decoded document, names where the bound is passed, and
never depends on the interpreter's recursion limit."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from afxdp.jsondepth import MAX_DEPTH, too_deep

# Keys and strings full of what the scan must not count: brackets, quotes, escapes.
_text = st.text(alphabet=st.sampled_from('ab[]{}":,\\\n\u00e9'), max_size=6)
documents = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | _text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
    max_leaves=30,
)


def depth(doc: Any) -> int:
    """How many containers deep ``doc`` is (a scalar: 0)."""
    if isinstance(doc, dict):
        return 1 + max(map(depth, doc.values()), default=0)
    if isinstance(doc, list):
        return 1 + max(map(depth, doc), default=0)
    return 0


@given(documents, st.integers(0, 8), st.booleans())
def test_the_scan_agrees_with_the_decoded_documents_depth(
    doc: Any, limit: int, ascii_only: bool
) -> None:
    text = json.dumps(doc, ensure_ascii=ascii_only, indent=1 if ascii_only else None)
    found = too_deep(text.encode(), limit)
    assert (found is not None) == (depth(doc) > limit)
    assert (too_deep(text, limit) is None) == (found is None)  # str or bytes alike


def test_it_names_the_json_path_and_byte_where_the_bound_is_passed() -> None:
    text = b'{"pools": [{"a\\"[": "]]", "x": {"k": [1, [2, [[]]]]}}]}'
    found = too_deep(text, 5)
    assert found is not None
    assert (found.path, found.offset) == ("pools[0].x.k[1]", text.index(b"[2"))
    assert str(found) == f"nests deeper than 5 levels (at pools[0].x.k[1], byte {found.offset})"
    assert too_deep(text, 7) is not None and too_deep(text, 8) is None  # [2, [[]]] is 3 deep


def test_far_past_any_recursion_limit_it_is_the_same_answer() -> None:
    deep = b"[" * 1_000_000 + b"]" * 1_000_000
    found = too_deep(deep)
    assert found is not None and found.offset == MAX_DEPTH
    assert too_deep(b"[" * MAX_DEPTH + b"]" * MAX_DEPTH) is None


@given(st.binary(max_size=200))
def test_any_bytes_are_measured_without_raising(data: bytes) -> None:
    too_deep(data, 3)
