"""Property tests for the CNI input parsers: whatever arrives, the answer is a
parsed value or a CniError with a code of the spec (or a FrameError for the
shim's frames), never any other exception."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from afxdp.cni.errors import CniError
from afxdp.cni.frame import MAX_FIELD, FrameError, Request, netstring
from afxdp.cni.netconf import (
    COMMANDS,
    DEVICE_WORD,
    ETHTOOL_SUBCOMMANDS,
    SUPPORTED_VERSIONS,
    Env,
    NetConf,
    parse_env,
    parse_netconf,
    peek_version,
)
from afxdp.jsondepth import MAX_DEPTH

NETCONF_CODES = {1, 2, 6, 7}  # version, unsupported field, decode, invalid config
KEYS = ["cniVersion", "name", "type", "mode", "deviceID", "ipam", "ethtoolCmds", "logFile",
        "logLevel", "skipUnloadBpf", "queues", "dpSyncer", "prevResult",
        "cni.dev/valid-attachments", "DeviceID", "MODE"]  # fmt: skip
ENV_KEYS = ["CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS", "CNI_PATH"]

scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
plausible = (
    st.sampled_from([*SUPPORTED_VERSIONS, "0.2.0", "primary", "cdq", "dev1", "host-local"])
    | st.sampled_from([f"{c} {DEVICE_WORD} tx off" for c in sorted(ETHTOOL_SUBCOMMANDS)])
    | st.sampled_from(["-K eth9 tx off", "-f -device- x", "-K\u2003-device- tx off"])
)
json_values = st.recursive(
    scalars | plausible,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=20,
)
documents = st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=8), json_values, max_size=10)


def parse_or_spec_error(data: bytes, command: str) -> NetConf | None:
    try:
        return parse_netconf(data, command)
    except CniError as exc:
        assert exc.code in NETCONF_CODES, exc
        assert exc.msg and isinstance(exc.to_json("1.1.0"), bytes)
        return None


@given(st.binary(max_size=400), st.sampled_from(COMMANDS))
def test_netconf_from_any_bytes_is_a_netconf_or_a_spec_error(data: bytes, command: str) -> None:
    parse_or_spec_error(data, command)
    assert peek_version(data) in SUPPORTED_VERSIONS


@given(documents, st.sampled_from(COMMANDS))
def test_netconf_from_any_json_document_is_a_netconf_or_a_spec_error(
    doc: dict[str, Any], command: str
) -> None:
    conf = parse_or_spec_error(json.dumps(doc).encode(), command)
    if conf is not None:
        assert conf.cni_version in SUPPORTED_VERSIONS
        for cmd in conf.ethtool_cmds:  # what got through follows the ethtoolCmds rule
            words = cmd.split()
            assert words[0] in ETHTOOL_SUBCOMMANDS and len(words) >= 3
            if conf.device_id:
                assert words[1] in (DEVICE_WORD, conf.device_id)


@given(documents, st.data())
def test_netconf_with_a_corrupted_byte_is_a_netconf_or_a_spec_error(
    doc: dict[str, Any], data: st.DataObject
) -> None:
    raw = bytearray(json.dumps(doc, ensure_ascii=False).encode())
    at = data.draw(st.integers(0, len(raw)))
    raw[at:at] = data.draw(st.binary(min_size=1, max_size=2))  # e.g. a stray \xe9
    parse_or_spec_error(bytes(raw), data.draw(st.sampled_from(COMMANDS)))
    assert peek_version(bytes(raw)) in SUPPORTED_VERSIONS


@settings(max_examples=50)
@given(st.integers(1, 3000))
def test_netconf_nesting_past_the_bound_is_code_6(depth: int) -> None:
    nested = b"[" * depth + b"]" * depth
    conf = b'{"cniVersion":"1.0.0","deviceID":"dev1","x":' + nested + b"}"
    try:
        parse_netconf(conf, "ADD")
    except CniError as exc:
        assert exc.code == 6 and depth + 1 > MAX_DEPTH, exc
        assert exc.msg == f"network configuration nests deeper than {MAX_DEPTH} levels", exc
    else:
        assert depth + 1 <= MAX_DEPTH


@given(st.dictionaries(st.sampled_from(ENV_KEYS) | st.text(max_size=12),
                       st.sampled_from(["ADD", "DEL", "GC", "VERSION", "c1", "/x", "A=1;B"])
                       | st.text(max_size=30), max_size=8))  # fmt: skip
def test_env_from_any_dict_is_an_env_or_code_4(env: dict[str, str]) -> None:
    try:
        parsed = parse_env(env)
    except CniError as exc:
        assert exc.code == 4, exc
    else:
        assert isinstance(parsed, Env) and parsed.command in COMMANDS


env_keys = st.text(min_size=1, max_size=20).filter(lambda k: "=" not in k and "\0" not in k)
env_values = st.text(max_size=60).filter(lambda v: "\0" not in v)


@given(st.dictionaries(env_keys, env_values, max_size=10), st.binary(max_size=500))
def test_request_frames_round_trip_any_env_and_stdin(env: dict[str, str], stdin: bytes) -> None:
    assert Request.decode(Request(env, stdin).encode()) == Request(env, stdin)


@given(st.binary(max_size=300))
def test_request_decode_of_any_bytes_raises_only_frame_error(data: bytes) -> None:
    try:
        req = Request.decode(data)
    except FrameError:
        return
    assert Request.decode(req.encode()) == req


@given(st.binary(max_size=200), st.binary(max_size=200), st.binary(max_size=4))
def test_request_decode_of_well_framed_junk_raises_only_frame_error(
    env_block: bytes, stdin: bytes, tail: bytes
) -> None:
    try:
        req = Request.decode(netstring(env_block) + netstring(stdin) + tail)
    except FrameError:
        return
    assert req.stdin == stdin and not tail


def test_request_fields_over_the_bound_are_frame_errors() -> None:
    for data in (b"%d:" % (MAX_FIELD + 1), netstring(b"") + b"%d:x," % (MAX_FIELD + 1)):
        try:
            Request.decode(data)
        except FrameError as exc:
            assert "over the limit" in str(exc)
        else:
            raise AssertionError("decoded")
