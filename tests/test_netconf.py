"""The netconf and environment rules of ``afxdp.cni.netconf``, pinned one behaviour each.

Pure unit tests on plain data (no I/O, no privileges). The expected values come
from the CNI spec 1.1 ("Parameters", "Error codes") and DESIGN.md 3.6: the
spec's error code, the field the message names (as the spec spells it), the
defaults when a key is absent, and the accepted values of each field.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from afxdp.cni.errors import CniError
from afxdp.cni.netconf import LATEST, decode_json, parse_env, parse_netconf, peek_version

# CNI spec error codes (spec 1.1, "Error codes").
INCOMPATIBLE_VERSION, INVALID_ENV, DECODE_FAILURE, INVALID_CONFIG = 1, 4, 6, 7
VERSIONS = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]  # DESIGN.md 3.6: 0.3.0 to 1.1.0
VERBS = ["ADD", "DEL", "CHECK", "GC", "STATUS", "VERSION"]
# The ethtool subcommands a filter setup needs (the module docstring's rule 2).
SUBCOMMANDS = {"-N", "--config-ntuple", "-U", "--config-nfc", "-X", "--set-rxfh-indir", "--rxfh",
               "-K", "--features", "--offload", "-L", "--set-channels", "-G", "--set-ring"}  # fmt: skip

ADD_ENV = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_NETNS": "/run/netns/pod1",
           "CNI_IFNAME": "net1", "CNI_PATH": "/opt/cni/bin"}  # fmt: skip


def conf(**kw: Any) -> bytes:
    """A valid ADD netconf, with ``kw`` added (a value of None drops the key)."""
    doc = {"cniVersion": "1.1.0", "name": "afxdp-net", "type": "afxdp", "deviceID": "dev1", **kw}
    return json.dumps({k: v for k, v in doc.items() if v is not None}).encode()


def env_error(env: dict[str, str]) -> CniError:
    with pytest.raises(CniError) as info:
        parse_env(env)
    assert info.value.code == INVALID_ENV, info.value
    return info.value


def conf_error(data: bytes, command: str = "ADD", code: int = INVALID_CONFIG) -> CniError:
    with pytest.raises(CniError) as info:
        parse_netconf(data, command)
    assert info.value.code == code, info.value
    return info.value


# -- the environment (code 4) -----------------------------------------------------------------


def test_a_missing_cni_command_is_code_4_listing_every_verb_and_showing_the_empty_value() -> None:
    err = env_error({"CNI_PATH": "/opt/cni/bin"})
    assert err.msg == f"CNI_COMMAND must be one of {', '.join(VERBS)}"
    assert err.details == "got ''"


def test_an_unknown_cni_command_is_code_4_showing_the_value() -> None:
    assert env_error({**ADD_ENV, "CNI_COMMAND": "add"}).details == "got 'add'"


def test_the_env_of_an_add_is_read_into_its_fields() -> None:
    env = parse_env({**ADD_ENV, "CNI_ARGS": "K8S_POD_NAME=p1;K8S_POD_NAMESPACE=ns"})
    assert (env.command, env.container_id, env.netns, env.ifname) == (
        "ADD",
        "c1",
        "/run/netns/pod1",
        "net1",
    )
    assert env.args == {"K8S_POD_NAME": "p1", "K8S_POD_NAMESPACE": "ns"}
    assert env.path == ("/opt/cni/bin",)


def test_variables_a_verb_does_not_need_default_to_empty() -> None:
    # GC needs only CNI_PATH; VERSION needs nothing (spec 1.1, "Parameters").
    gc = parse_env({"CNI_COMMAND": "GC", "CNI_PATH": "/opt/cni/bin"})
    assert (gc.container_id, gc.netns, gc.ifname, gc.args) == ("", "", "", {})
    version = parse_env({"CNI_COMMAND": "VERSION"})
    assert (version.container_id, version.ifname, version.path) == ("", "", ())


def test_a_bad_container_id_is_code_4_naming_the_variable_and_showing_the_value() -> None:
    err = env_error({**ADD_ENV, "CNI_CONTAINERID": "c/1"})
    assert err.msg == "CNI_CONTAINERID must be letters, digits, '_', '.' and '-'"
    assert err.details == "got 'c/1'"


def test_an_ifname_of_15_bytes_is_valid_and_of_16_is_not() -> None:
    # IFNAMSIZ is 16 with the terminating NUL: 15 characters is the longest name.
    assert parse_env({**ADD_ENV, "CNI_IFNAME": "a" * 15}).ifname == "a" * 15
    assert env_error({**ADD_ENV, "CNI_IFNAME": "a" * 16}).details == f"got {'a' * 16!r}"


@pytest.mark.parametrize("ifname", [".", "..", "a/b", "a:b", "a b"])
def test_an_ifname_the_kernel_refuses_is_code_4_naming_the_variable(ifname: str) -> None:
    err = env_error({**ADD_ENV, "CNI_IFNAME": ifname})
    assert err.msg == "CNI_IFNAME is not a valid interface name"
    assert err.details == f"got {ifname!r}"


def test_an_ifname_of_dots_and_letters_is_valid() -> None:
    assert parse_env({**ADD_ENV, "CNI_IFNAME": "a.b"}).ifname == "a.b"


def test_an_ifname_is_counted_in_bytes_as_the_kernel_counts_it() -> None:
    assert parse_env({**ADD_ENV, "CNI_IFNAME": "é" * 7 + "a"}).ifname == "é" * 7 + "a"  # 15
    assert env_error({**ADD_ENV, "CNI_IFNAME": "é" * 8}).msg == (  # 8 characters, 16 bytes
        "CNI_IFNAME is not a valid interface name"
    )


@pytest.mark.parametrize(
    "netns",
    ["/run/netns/cni-1", "/var/run/netns/cni-1", "/proc/42/ns/net", "/proc/42/task/43/ns/net"],
)
def test_a_netns_where_runtimes_put_them_is_accepted(netns: str) -> None:
    for command in ("ADD", "CHECK"):
        assert parse_env({**ADD_ENV, "CNI_COMMAND": command, "CNI_NETNS": netns}).netns == netns


@pytest.mark.parametrize(
    "netns",
    ["/tmp/ns", "/run/netns/../../etc/passwd", "/run/netns/..", "/run/netns/a/b", "run/netns/a",
     "/proc/kmsg", "/proc/42/ns/mnt", "/dev/watchdog"],
)  # fmt: skip
def test_a_netns_anywhere_else_is_code_4_and_never_entered(netns: str) -> None:
    # afxdpd opens and enters CNI_NETNS as root: a FIFO would hang it, a
    # device file be opened. The same rule is how an attachment record is read.
    for command in ("ADD", "CHECK"):
        err = env_error({**ADD_ENV, "CNI_COMMAND": command, "CNI_NETNS": netns})
        assert err.msg == "CNI_NETNS is not where runtimes put network namespaces"
        assert repr(netns) in err.details
    # DEL and GC act on what ADD recorded, not on their CNI_NETNS.
    assert parse_env({**ADD_ENV, "CNI_COMMAND": "DEL", "CNI_NETNS": netns}).netns == netns


def test_cni_args_split_each_pair_at_its_first_equals_sign() -> None:
    env = parse_env({**ADD_ENV, "CNI_ARGS": "K8S_POD_NAME=a=b;X="})
    assert env.args == {"K8S_POD_NAME": "a=b", "X": ""}


@pytest.mark.parametrize("bad", ["novalue", "=v"])
def test_a_cni_args_entry_without_a_key_and_equals_sign_is_code_4_showing_it(bad: str) -> None:
    err = env_error({**ADD_ENV, "CNI_ARGS": f"A=1;{bad}"})
    assert err.msg == "CNI_ARGS must be K=V pairs separated by ';'"
    assert err.details == f"bad entry {bad!r}"


# -- decoding (code 6) ------------------------------------------------------------------------


@pytest.mark.parametrize(("data", "value"), [(b"5", 5), (b"null", None), (b'"x"', "x")])
def test_a_json_scalar_decodes_to_itself(data: bytes, value: Any) -> None:
    assert decode_json(data) == value


def test_a_json_scalar_is_code_6_as_a_netconf() -> None:
    err = conf_error(b"5", code=DECODE_FAILURE)
    assert err.msg == "network configuration must be a JSON object"


def test_a_bad_utf8_byte_is_code_6_saying_utf8_with_an_offset() -> None:
    with pytest.raises(CniError) as info:
        decode_json(b'{"name": "\xff"}')
    assert info.value.code == DECODE_FAILURE
    assert info.value.msg == "network configuration is not valid UTF-8"
    assert info.value.details == "bad byte at offset 10"  # the document's byte offset


def test_invalid_utf8_anywhere_is_code_6_utf8_not_json() -> None:
    """Outside a string too: our own check runs before the decoder, whatever its version."""
    for data, offset in ((b'{"cniVersion": "1.0.0"} \xff', 24), (b"\xc3", 0), (b'{"k\xe9": 1}', 3)):
        with pytest.raises(CniError) as info:
            decode_json(data)
        assert (info.value.code, info.value.msg) == (
            DECODE_FAILURE,
            "network configuration is not valid UTF-8",
        )
        assert info.value.details == f"bad byte at offset {offset}"


@pytest.mark.parametrize("depth", [64, 100_000])
def test_nesting_past_64_levels_is_code_6_saying_where(depth: int) -> None:
    """64 levels under the object: 65 in all, which the decoder takes; 100000:
    where it meets the recursion limit. Our bound and our message either way."""

    def nested(n: int) -> bytes:
        return b'{"cniVersion": "1.0.0", "x": ' + b"[" * n + b"]" * n + b"}"

    data = nested(depth)
    with pytest.raises(CniError) as info:
        decode_json(data)
    assert (info.value.code, info.value.msg) == (
        DECODE_FAILURE,
        "network configuration nests deeper than 64 levels",
    )
    assert info.value.details == f"at x{'[0]' * 63}, byte {data.index(b'[') + 63}"
    assert decode_json(nested(63))  # 64 levels in all: taken


def test_malformed_json_is_code_6_with_the_decoders_reason() -> None:
    with pytest.raises(msgspec.DecodeError) as reason:
        msgspec.json.decode(b'{"name": ')
    with pytest.raises(CniError) as info:
        decode_json(b'{"name": ')
    assert info.value.code == DECODE_FAILURE
    assert info.value.msg == "network configuration is not valid JSON"
    assert info.value.details == str(reason.value) != ""


# -- peek_version (for error replies) ---------------------------------------------------------


@pytest.mark.parametrize("data", [b"[]", b'"1.0.0"', b"7", b'{"cniVersion": "9.9.9"}',
                                  b'{"cniVersion": 1}'])  # fmt: skip
def test_peek_version_falls_back_to_the_latest_when_no_supported_version_is_given(
    data: bytes,
) -> None:
    assert peek_version(data) == "1.1.0"


# -- cniVersion (codes 1 and 7) ---------------------------------------------------------------


def test_an_unsupported_version_is_code_1_naming_it_and_every_supported_one() -> None:
    err = conf_error(conf(cniVersion="9.9.9"), code=INCOMPATIBLE_VERSION)
    assert err.msg == "incompatible CNI versions"
    assert "'9.9.9'" in err.details
    assert all(f"'{v}'" in err.details for v in VERSIONS)


@pytest.mark.parametrize("version", VERSIONS)
def test_every_version_from_030_to_110_is_accepted(version: str) -> None:
    assert parse_netconf(conf(cniVersion=version), "ADD").cni_version == version


def test_version_needs_no_cni_version_and_then_answers_with_the_latest() -> None:
    assert parse_netconf(b"{}", "VERSION").cni_version == "1.1.0"
    # Every other verb needs one.
    assert conf_error(b'{"deviceID": "dev1"}', "DEL").msg == "cniVersion: is required"


# -- each field's type, named as the spec spells it (code 7) ----------------------------------


@pytest.mark.parametrize(
    ("key", "value", "kind", "got"),
    [
        ("cniVersion", 1, "str", "int"),
        ("name", 1, "str", "int"),
        ("mode", 1, "str", "int"),
        ("deviceID", 1, "str", "int"),
        ("ipam", [], "dict", "list"),
        ("ethtoolCmds", "-K -device- tx off", "list", "str"),
        ("logFile", 1, "str", "int"),
        ("logLevel", 1, "str", "int"),
        ("dpSyncer", "yes", "bool", "str"),
        ("skipUnloadBpf", 1, "bool", "int"),
        ("prevResult", [], "dict", "list"),
    ],
)
def test_a_field_of_the_wrong_type_is_code_7_naming_the_field_and_both_types(
    key: str, value: Any, kind: str, got: str
) -> None:
    assert conf_error(conf(**{key: value})).msg == f"{key}: must be a {kind}, got {got}"


def test_a_bool_is_not_taken_for_a_string() -> None:
    assert conf_error(conf(name=True)).msg == "name: must be a str, got bool"


def test_absent_optional_fields_take_their_defaults() -> None:
    c = parse_netconf(conf(name=None), "ADD")
    assert (c.name, c.mode, c.ipam_type, c.ethtool_cmds) == ("", "", None, ())
    assert (c.skip_unload_bpf, c.prev_result, c.valid_attachments) == (False, None, None)


def test_the_fields_are_read_into_the_netconf() -> None:
    prev = {"cniVersion": "1.1.0", "interfaces": [{"name": "net1"}]}
    c = parse_netconf(conf(mode="primary", ipam={"type": "host-local"}, skipUnloadBpf=True,
                           dpSyncer=True, prevResult=prev), "ADD")  # fmt: skip
    assert (c.name, c.mode, c.device_id, c.ipam_type) == (
        "afxdp-net",
        "primary",
        "dev1",
        "host-local",
    )
    assert (c.skip_unload_bpf, c.prev_result) == (True, prev)


# -- mode, deviceID, ipam, logFile, logLevel ---------------------------------------------------


@pytest.mark.parametrize("mode", ["primary", "cdq"])
def test_both_modes_are_accepted(mode: str) -> None:
    assert parse_netconf(conf(mode=mode), "ADD").mode == mode


@pytest.mark.parametrize("command", ["ADD", "DEL", "CHECK"])
def test_a_verb_on_an_attachment_needs_a_device_id(command: str) -> None:
    err = conf_error(conf(deviceID=None), command)
    assert err.msg == "deviceID: is required (Multus sets it from the pod's allocation)"


@pytest.mark.parametrize("command", ["GC", "STATUS"])
def test_gc_and_status_need_no_device_id_and_it_defaults_to_empty(command: str) -> None:
    assert parse_netconf(conf(deviceID=None), command).device_id == ""


@pytest.mark.parametrize("ipam", [{"type": "../host-local"}, {"type": 1}, {"subnet": "x"}])
def test_an_ipam_section_must_name_its_plugin(ipam: dict[str, Any]) -> None:
    assert conf_error(conf(ipam=ipam)).msg == "ipam.type: must name an IPAM plugin"


def test_an_empty_ipam_section_is_no_ipam() -> None:
    assert parse_netconf(conf(ipam={}), "ADD").ipam_type is None


def test_a_log_file_with_a_directory_is_code_7_naming_the_field_and_value() -> None:
    err = conf_error(conf(logFile="../x.log"))
    assert err.msg == "logFile: must be a bare .log or .txt file name, got '../x.log'"


@pytest.mark.parametrize("level", ["debug", "info", "warning", "error"])
def test_every_log_level_is_accepted(level: str) -> None:
    parse_netconf(conf(logLevel=level), "ADD")


def test_an_unknown_log_level_is_code_7_naming_the_field_and_value() -> None:
    err = conf_error(conf(logLevel="DEBUG"))
    assert err.msg == "logLevel: must be debug, info, warning or error, got 'DEBUG'"


# -- ethtoolCmds ---------------------------------------------------------------------------------


def ethtool_error(cmd: Any, command: str = "ADD", device_id: str | None = "dev1") -> str:
    return conf_error(conf(deviceID=device_id, ethtoolCmds=[cmd]), command).msg


def test_a_non_ascii_space_is_a_forbidden_character_not_an_empty_entry() -> None:
    for cmd in ("\u2003", "\v"):
        msg = ethtool_error(cmd)
        assert msg.startswith("ethtoolCmds[0]: may only hold letters, digits, ASCII spaces"), msg


def test_a_forbidden_subcommand_is_refused_listing_the_allowed_ones() -> None:
    msg = ethtool_error("-f -device- fw.bin")
    assert msg.startswith("ethtoolCmds[0]: subcommand '-f' is not allowed")
    listed = msg[msg.rindex("(") + 1 : msg.rindex(")")]
    assert listed.split(" ") == sorted(SUBCOMMANDS)


@pytest.mark.parametrize(("command", "device_id"), [("ADD", "dev1"), ("GC", None)])
def test_a_subcommand_alone_names_no_device(command: str, device_id: str | None) -> None:
    msg = ethtool_error("-K", command, device_id)
    assert msg.startswith("ethtoolCmds[0]: must act on the pod's device"), msg
    assert msg.endswith("got ''")


def test_three_words_are_a_whole_command() -> None:
    # "ethtool -X <dev> default" resets the RSS table: subcommand, device, change.
    assert parse_netconf(conf(ethtoolCmds=["-X -device- default"]), "ADD").ethtool_cmds == (
        "-X -device- default",
    )


def test_a_command_with_nothing_to_change_names_the_subcommand_and_device() -> None:
    msg = ethtool_error("-K -device-")
    assert msg == "ethtoolCmds[0]: says nothing to change on the device after -K -device-"


# -- cni.dev/valid-attachments (GC) ----------------------------------------------------------------


def test_valid_attachments_are_container_id_and_ifname_pairs() -> None:
    valid = [{"containerID": "c1", "ifname": "net1"}, {"containerID": "c2"}]
    c = parse_netconf(conf(deviceID=None, **{"cni.dev/valid-attachments": valid}), "GC")
    assert c.valid_attachments == (("c1", "net1"), ("c2", ""))


def test_an_empty_valid_attachments_list_is_no_attachment() -> None:
    c = parse_netconf(conf(deviceID=None, **{"cni.dev/valid-attachments": []}), "GC")
    assert c.valid_attachments == ()


@pytest.mark.parametrize("value", [{"containerID": "c1"}, [{"containerID": 1}], ["c1"]])
def test_valid_attachments_of_the_wrong_shape_are_code_7_naming_the_key(value: Any) -> None:
    err = conf_error(conf(deviceID=None, **{"cni.dev/valid-attachments": value}), "GC")
    assert err.msg == "cni.dev/valid-attachments: must be a list of {containerID, ifname}"


@pytest.mark.parametrize("asked", ["0", "", "9.9.9"])
def test_a_version_request_in_a_version_we_do_not_speak_is_read_in_our_latest(asked: str) -> None:
    # Found by hypothesis: the netconf of a VERSION request kept any cniVersion.
    conf = parse_netconf(json.dumps({"cniVersion": asked}).encode(), "VERSION")
    assert conf.cni_version == LATEST == "1.1.0"
    assert parse_netconf(b'{"cniVersion": "0.4.0"}', "VERSION").cni_version == "0.4.0"
