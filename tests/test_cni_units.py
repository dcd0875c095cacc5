"""The CNI parts that need no kernel: the shim's frames and netconf/env rules."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from afxdp.cni.errors import CniError
from afxdp.cni.frame import FrameError, Request, decode_reply, encode_reply, parse_netstrings
from afxdp.cni.netconf import parse_env, parse_netconf, peek_version
from afxdp.cni.result import build

ENV = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_NETNS": "/run/netns/x",
       "CNI_IFNAME": "net1", "CNI_PATH": "/usr/lib/cni"}  # fmt: skip


@given(st.dictionaries(st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ_", min_size=1, max_size=12),
                       st.text(max_size=40).filter(lambda v: "\0" not in v), max_size=8),
       st.binary(max_size=300))  # fmt: skip
def test_request_frames_round_trip(env: dict[str, str], stdin: bytes) -> None:
    assert Request.decode(Request.encode(Request(env, stdin))) == Request(env, stdin)


@given(st.binary(max_size=120))
def test_any_bytes_decode_or_raise_frame_error(data: bytes) -> None:
    try:
        req = Request.decode(data)
    except FrameError:
        return
    assert Request.decode(req.encode()) == req


def test_shim_frame_layout_is_netstrings() -> None:
    raw = Request({"CNI_COMMAND": "DEL"}, b"{}").encode()
    assert raw == b"16:CNI_COMMAND=DEL\0,2:{},"
    assert decode_reply(encode_reply(7, b"out", b"err")) == (7, b"out", b"err")
    for bad in (b"3:ab,", b"2:ab", b"x:ab,", b"2:ab,junk", b"99999999999:a,"):
        with pytest.raises(FrameError):
            parse_netstrings(bad, 1)


@pytest.mark.parametrize(
    ("env", "text"),
    [
        ({**ENV, "CNI_COMMAND": ""}, "CNI_COMMAND must be one of"),
        ({**ENV, "CNI_NETNS": ""}, "CNI_NETNS is required for ADD"),
        ({**ENV, "CNI_IFNAME": "a" * 16}, "CNI_IFNAME"),
        ({**ENV, "CNI_IFNAME": "a:b"}, "CNI_IFNAME"),
        ({**ENV, "CNI_CONTAINERID": "_x"}, "CNI_CONTAINERID"),
        ({**ENV, "CNI_ARGS": "A=1;=2"}, "CNI_ARGS"),
    ],
)
def test_env_errors_are_code_4(env: dict[str, str], text: str) -> None:
    with pytest.raises(CniError) as info:
        parse_env(env)
    assert info.value.code == 4 and text in info.value.msg


def test_env_parsing() -> None:
    env = parse_env({**ENV, "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAME=p;", "CNI_PATH": "/a::/b"})
    assert env.args == {"IgnoreUnknown": "1", "K8S_POD_NAME": "p"}
    assert env.path == ("/a", "/b")
    assert parse_env({"CNI_COMMAND": "DEL", "CNI_CONTAINERID": "c", "CNI_IFNAME": "e",
                      "CNI_PATH": "/p"}).netns == ""  # fmt: skip


def conf(**kw: Any) -> bytes:
    return json.dumps(
        {"cniVersion": "1.0.0", "name": "n", "type": "afxdp", "deviceID": "dev1", **kw}
    ).encode()


@pytest.mark.parametrize(
    ("data", "code", "text"),
    [
        (b"", 6, "not valid JSON"),
        (b"[1]", 6, "must be a JSON object"),
        (conf(cniVersion="0.2.0"), 1, "incompatible"),
        (conf(cniVersion=None), 7, "cniVersion: is required"),
        (conf(deviceID=""), 7, "deviceID: is required"),
        (conf(deviceID="dev1^"), 7, "deviceID: must be"),
        (conf(mode="Primary"), 7, "mode: must be primary or cdq"),
        (conf(ipam={"type": "../evil"}), 7, "ipam.type"),
        (conf(ethtoolCmds="-K dev"), 7, "ethtoolCmds: must be a list"),
        (
            conf(ethtoolCmds=["-N -device- flow-type udp4 dst-port 4000 action 2", "x,y"]),
            7,
            "ethtoolCmds[1]",
        ),
        (conf(ethtoolCmds=["  "]), 7, "ethtoolCmds[0]: must be a non-empty string"),
        (conf(logFile="/var/log/x.log"), 7, "logFile"),
        (conf(logLevel="trace"), 7, "logLevel"),
        (conf(skipUnloadBpf="yes"), 7, "skipUnloadBpf: must be a bool"),
        (conf(**{"cni.dev/valid-attachments": [{"ifname": "x"}]}), 7, "valid-attachments"),
    ],
)
def test_netconf_errors(data: bytes, code: int, text: str) -> None:
    with pytest.raises(CniError) as info:
        parse_netconf(data, "ADD")
    assert info.value.code == code and text in info.value.msg, info.value


def test_netconf_keys_fold_case_as_the_original() -> None:
    c = parse_netconf(conf(DeviceID="dev2", deviceID=None, Mode="cdq", Queues="4",
                           SkipUnloadBpf=True, EthtoolCmds=["-K -device- tx off"]), "ADD")  # fmt: skip
    assert (c.device_id, c.mode, c.skip_unload_bpf, c.ethtool_cmds) == (
        "dev2",
        "cdq",
        True,
        ("-K -device- tx off",),
    )
    assert parse_netconf(conf(deviceID=""), "GC").device_id == ""
    assert peek_version(b"junk") == "1.1.0" and peek_version(conf(cniVersion="0.4.0")) == "0.4.0"


def test_results_per_version() -> None:
    ipam = {"ips": [{"address": "10.0.0.2/24", "gateway": "10.0.0.1"}, {"address": "fd00::2/64"}],
            "routes": [{"dst": "0.0.0.0/0"}], "dns": {"nameservers": ["10.0.0.53"]}}  # fmt: skip
    old = build("0.3.1", ipam, "ens1", "02:00:00:00:00:01", "/run/netns/p")
    assert old["ips"] == [{"address": "10.0.0.2/24", "interface": 0, "gateway": "10.0.0.1", "version": "4"},
                          {"address": "fd00::2/64", "interface": 0, "version": "6"}]  # fmt: skip
    new = build("1.1.0", ipam, "ens1", "02:00:00:00:00:01", "/run/netns/p")
    assert new["interfaces"] == [
        {"name": "ens1", "mac": "02:00:00:00:00:01", "sandbox": "/run/netns/p"}
    ]
    assert all("version" not in ip for ip in new["ips"])
    assert new["routes"] == [{"dst": "0.0.0.0/0"}] and new["dns"] == {"nameservers": ["10.0.0.53"]}
    bare = build("1.0.0", None, "ens1", "m", "/n")
    assert bare["ips"] == [] and "routes" not in bare


@pytest.mark.parametrize(
    ("ips", "want"),
    [
        ([{"address": "10.1.0.5/24"}], "10.1.0.5"),
        ([{"address": "fd00::5/64"}, {"address": "10.1.0.6/24"}], "10.1.0.6"),  # IPv6 skipped
        ([{"address": "10.1.0.7/24"}, {"address": "10.1.0.8/24"}], "10.1.0.7"),  # the first
        ([{"address": "fd00::5/64"}], None),
        ([], None),
    ],
)
def test_ethtool_ip_is_the_first_ipv4_address_ipam_gave(
    ips: list[dict[str, str]], want: str | None
) -> None:
    from afxdp.cni.handler import _first_ipv4  # noqa: PLC0415 - a helper of the handler

    assert _first_ipv4({"ips": ips, "routes": []}) == want
    assert _first_ipv4(None) is None  # no IPAM at all
