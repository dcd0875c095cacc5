"""Any input gives a config or a ConfigError, never another exception."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from afxdp.config import LoadedConfig, load_config
from afxdp.errors import ConfigError

KEYS = [
    "pools", "logLevel", "logFile", "kindCluster", "name", "mode", "drivers", "devices",
    "nodes", "uid", "udsServerDisable", "bpfMapPinningEnable", "udsTimeout",
    "requiresUnprivilegedBpf", "primary", "secondary", "excludeDevices", "excludeAddressed",
    "mac", "pci", "hostname", "NAME", "Pools",
]  # fmt: skip

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=30)
    | st.sampled_from(
        ["primary", "cdq", "ice", "veth", "0000:81:00.1", "68:05:ca:2d:e9:1b", "debug"]
    )
)
json_values: st.SearchStrategy[Any] = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=8), inner, max_size=6)
    ),
    max_leaves=40,
)


def check(data: bytes) -> None:
    try:
        result = load_config(data)
    except ConfigError as exc:
        assert exc.issues, "a ConfigError must carry at least one issue"
        assert all(i.path and i.message for i in exc.issues)
    else:
        assert isinstance(result, LoadedConfig)


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_any_bytes(data: bytes) -> None:
    check(data)


@settings(max_examples=500)
@given(json_values)
def test_any_json_shaped_like_a_config(value: Any) -> None:
    check(json.dumps(value).encode())


@settings(max_examples=200)
@given(st.dictionaries(st.sampled_from(KEYS), json_values, max_size=5))
def test_any_pool(pool: dict[str, Any]) -> None:
    check(json.dumps({"pools": [pool]}).encode())


def test_deep_nesting_is_an_error_not_a_crash() -> None:
    check(b"[" * 100_000 + b"]" * 100_000)
