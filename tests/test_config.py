"""Every config rule, valid and invalid, with the JSON path of each error.

The invalid cases port the original's own table (TestReadConfigFile) and add
the cases where we decided to do better (null handling, uniqueness, pinning).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import pytest

from afxdp.config import Config, load_config, load_config_file, parse_mac
from afxdp.errors import ConfigError

LONG = "x" * 78


def doc(**pool: Any) -> bytes:
    """A config with one cdq pool ``testPool`` holding ``pool``'s fields."""
    base: dict[str, Any] = {"name": "testPool", "mode": "cdq"}
    base.update(pool)
    return json.dumps({"pools": [base]}).encode()


def second_device(dev: dict[str, Any]) -> bytes:
    return doc(devices=[{"name": "dev1"}, dev])


def errors_of(data: bytes) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(data)
    return [str(i) for i in info.value.issues]


def valid(data: bytes | str) -> Config:
    return load_config(data).config


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        # Device rules
        (second_device({"name": "dev~2"}), "pools[0].devices[1].name: must only contain letters, digits, hyphen and underscore, got 'dev~2'"),
        (second_device({"name": "dev 2"}), "pools[0].devices[1].name: must only contain letters, digits, hyphen and underscore, got 'dev 2'"),
        (second_device({"name": LONG}), "pools[0].devices[1].name: must be between 1 and 50 characters, got 78"),
        (second_device({"mac": "dev2"}), "pools[0].devices[1].mac: must be a MAC address like 68:05:ca:2d:e9:1b, got 'dev2'"),
        (second_device({"mac": "98:03:9b:6a:b4"}), "pools[0].devices[1].mac: must be a MAC address like 68:05:ca:2d:e9:1b, got '98:03:9b:6a:b4'"),
        (second_device({"mac": "98:03:9b:6a:b4:ez"}), "pools[0].devices[1].mac: must be a MAC address like 68:05:ca:2d:e9:1b, got '98:03:9b:6a:b4:ez'"),
        (second_device({"pci": "0000:81:00"}), "pools[0].devices[1].pci: must be a PCI address in BDF form like 0000:81:00.1, got '0000:81:00'"),
        (second_device({"pci": "0000:81:00.z"}), "pools[0].devices[1].pci: must be a PCI address in BDF form like 0000:81:00.1, got '0000:81:00.z'"),
        (second_device({"pci": "xx0000:81:00.1yy"}), "pools[0].devices[1].pci: must be a PCI address in BDF form like 0000:81:00.1, got 'xx0000:81:00.1yy'"),
        (second_device({}), "pools[0].devices[1]: a device must be identified by one of name, mac or pci"),
        (second_device({"name": ""}), "pools[0].devices[1]: a device must be identified by one of name, mac or pci"),
        (second_device({"mac": ""}), "pools[0].devices[1]: a device must be identified by one of name, mac or pci"),
        (second_device({"pci": ""}), "pools[0].devices[1]: a device must be identified by one of name, mac or pci"),
        (second_device({"name": "dev2", "mac": "98:03:9b:6a:b4:e2"}), "pools[0].devices[1]: only one form of device identification can be used (name, mac or pci), got name and mac"),
        (second_device({"name": "dev2", "pci": "0000:81:00.1"}), "pools[0].devices[1]: only one form of device identification can be used (name, mac or pci), got name and pci"),
        (second_device({"mac": "98:03:9b:6a:b4:e2", "name": "dev2"}), "pools[0].devices[1]: only one form of device identification can be used (name, mac or pci), got name and mac"),
        (second_device({"mac": "98:03:9b:6a:b4:e2", "pci": "0000:81:00.1"}), "pools[0].devices[1]: only one form of device identification can be used (name, mac or pci), got mac and pci"),
        (second_device({"pci": "0000:81:00.1", "name": "dev2"}), "pools[0].devices[1]: only one form of device identification can be used (name, mac or pci), got name and pci"),
        (second_device({"pci": "0000:81:00.1", "mac": "98:03:9b:6a:b4:e2"}), "pools[0].devices[1]: only one form of device identification can be used (name, mac or pci), got mac and pci"),
        (second_device({"name": "d", "mac": "98:03:9b:6a:b4:e2", "pci": "0000:81:00.1"}), "pools[0].devices[1]: only one form of device identification can be used (name, mac or pci), got name and mac and pci"),
        (second_device({"name": "dev2", "secondary": -10}), "pools[0].devices[1].secondary: must be between 1 and 64, got -10"),
        (second_device({"name": "dev2", "secondary": 9999}), "pools[0].devices[1].secondary: must be between 1 and 64, got 9999"),
        (second_device({"name": "dev2", "secondary": 65}), "pools[0].devices[1].secondary: must be between 1 and 64, got 65"),
        # Driver rules
        (doc(drivers=[{"name": "i40e"}, {"name": "ice$"}]), "pools[0].drivers[1].name: must only contain letters, digits, hyphen and underscore, got 'ice$'"),
        (doc(drivers=[{"name": "i40e"}, {"name": "ice driver"}]), "pools[0].drivers[1].name: must only contain letters, digits, hyphen and underscore, got 'ice driver'"),
        (doc(drivers=[{"name": LONG}]), "pools[0].drivers[0].name: must be between 1 and 50 characters, got 78"),
        (doc(drivers=[{}]), "pools[0].drivers[0].name: is required: a driver must have a name"),
        (doc(drivers=[{"name": ""}]), "pools[0].drivers[0].name: is required: a driver must have a name"),
        (doc(drivers=[{"name": "ice", "primary": -5}]), "pools[0].drivers[0].primary: must be between 1 and 10, got -5"),
        (doc(drivers=[{"name": "ice", "primary": 105}]), "pools[0].drivers[0].primary: must be between 1 and 10, got 105"),
        (doc(drivers=[{"name": "ice", "primary": 11}]), "pools[0].drivers[0].primary: must be between 1 and 10, got 11"),
        (doc(drivers=[{"name": "ice", "secondary": -10}]), "pools[0].drivers[0].secondary: must be between 1 and 64, got -10"),
        (doc(drivers=[{"name": "ice", "secondary": 9999}]), "pools[0].drivers[0].secondary: must be between 1 and 64, got 9999"),
        (doc(drivers=[{"name": "ice", "excludeDevices": [{}]}]), "pools[0].drivers[0].excludeDevices[0]: a device must be identified by one of name, mac or pci"),
        (doc(drivers=[{"name": "ice", "excludeDevices": [{"pci": "0000:81:00.1", "mac": "98:03:9b:6a:b4:e2"}]}]), "pools[0].drivers[0].excludeDevices[0]: only one form of device identification can be used (name, mac or pci), got mac and pci"),
        # Node rules
        (doc(nodes=[{"hostname": "k8_node1", "devices": [{"name": "d"}]}]), "pools[0].nodes[0].hostname: must only contain letters, digits, hyphens and dots, labels of at most 63 characters (a node name as kubectl get nodes shows it), got 'k8_node1'"),
        (doc(nodes=[{"hostname": "k8s node1", "devices": [{"name": "d"}]}]), "pools[0].nodes[0].hostname: must only contain letters, digits, hyphens and dots, labels of at most 63 characters (a node name as kubectl get nodes shows it), got 'k8s node1'"),
        (doc(nodes=[{"hostname": LONG, "devices": [{"name": "d"}]}]), "pools[0].nodes[0].hostname: must only contain letters, digits, hyphens and dots, labels of at most 63 characters (a node name as kubectl get nodes shows it), got 'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx'"),
        (doc(nodes=[{"hostname": ".".join(["x" * 63] * 4), "devices": [{"name": "d"}]}]), "pools[0].nodes[0].hostname: must be between 1 and 253 characters, got 255"),
        (doc(nodes=[{"devices": [{"name": "d"}]}]), "pools[0].nodes[0].hostname: is required: a node must have a hostname"),
        (doc(nodes=[{"hostname": ""}]), "pools[0].nodes[0].hostname: is required: a node must have a hostname"),
        (doc(nodes=[{"hostname": "n1", "devices": [{}]}]), "pools[0].nodes[0].devices[0]: a device must be identified by one of name, mac or pci"),
        (doc(nodes=[{"hostname": "n1", "devices": [{"name": "d", "mac": "98:03:9b:6a:b4:e2"}]}]), "pools[0].nodes[0].devices[0]: only one form of device identification can be used (name, mac or pci), got name and mac"),
        (doc(nodes=[{"hostname": "n1", "drivers": [{}]}]), "pools[0].nodes[0].drivers[0].name: is required: a driver must have a name"),
        (doc(nodes=[{"hostname": "n1"}, {"hostname": "N1"}]), "pools[0].nodes[1].hostname: duplicate node entry: also at pools[0].nodes[0].hostname"),
        # Pool rules
        (json.dumps({"pools": [{"mode": "cdq", "devices": [{"name": "d"}]}]}).encode(), "pools[0].name: is required"),
        (doc(name="", devices=[{"name": "d"}]), "pools[0].name: is required"),
        (doc(name="test-pool-1", devices=[{"name": "d"}]), "pools[0].name: must only contain letters and digits, got 'test-pool-1'"),
        (doc(name="p" * 52, devices=[{"name": "d"}]), "pools[0].name: must be between 1 and 20 characters, got 52"),
        (json.dumps({"pools": [{"name": "p", "devices": [{"name": "d"}]}]}).encode(), "pools[0].mode: is required"),
        (doc(mode="", devices=[{"name": "d"}]), "pools[0].mode: is required"),
        (doc(mode="invalidMode", devices=[{"name": "d"}]), "pools[0].mode: must be one of primary, cdq, got 'invalidMode'"),
        (doc(mode="Primary", devices=[{"name": "d"}]), "pools[0].mode: must be one of primary, cdq, got 'Primary'"),
        (doc(), "pools[0]: must contain devices, drivers or nodes"),
        (doc(devices=[], drivers=[], nodes=[]), "pools[0]: must contain devices, drivers or nodes"),
        (doc(devices=[{"name": "d"}], udsTimeout=20), "pools[0].udsTimeout: must be -1, 0, or between 30 and 300 seconds, got 20"),
        (doc(devices=[{"name": "d"}], udsTimeout=-40), "pools[0].udsTimeout: must be -1, 0, or between 30 and 300 seconds, got -40"),
        (doc(devices=[{"name": "d"}], udsTimeout=999), "pools[0].udsTimeout: must be -1, 0, or between 30 and 300 seconds, got 999"),
        (doc(devices=[{"name": "d"}], api="DRA"), "pools[0].api: must be one of devicePlugin, dra, got 'DRA'"),
        (doc(devices=[{"name": "d"}], api=1), "pools[0].api: must be a string, got 1"),
        (doc(devices=[{"name": "d"}], uid=999), "pools[0].uid: must be 0 or between 1000 and 256000, got 999"),
        (doc(devices=[{"name": "d"}], uid=256001), "pools[0].uid: must be 0 or between 1000 and 256000, got 256001"),
        (doc(devices=[{"name": "d"}], bpfMapPinningEnable=True), "pools[0].bpfMapPinningEnable: requires udsServerDisable: true (the pinned map replaces the UDS handshake; with both, one XDP program would replace the other's)"),
        # Types and nulls: the original crashed on some of these
        (b"null", "<document>: must be an object, got null"),
        (b"[]", "<document>: must be an object, got array"),
        (b'{"pools": [null]}', "pools[0]: must be an object, got null"),
        (b'{"pools": {}}', "pools: must be an array, got object"),
        (doc(devices=[None]), "pools[0].devices[0]: must be an object, got null"),
        (doc(drivers=[{"name": "ice", "excludeDevices": [None]}]), "pools[0].drivers[0].excludeDevices[0]: must be an object, got null"),
        (doc(nodes=[None]), "pools[0].nodes[0]: must be an object, got null"),
        (doc(devices=[{"name": "d"}], uid="1500"), "pools[0].uid: must be an integer, got string"),
        (doc(devices=[{"name": "d"}], udsTimeout=30.5), "pools[0].udsTimeout: must be an integer, got 30.5"),
        (doc(devices=[{"name": "d"}], uid=True), "pools[0].uid: must be an integer, got True"),
        (doc(devices=[{"name": "d"}], udsServerDisable="yes"), "pools[0].udsServerDisable: must be a boolean, got string"),
        (doc(devices=[{"name": 7}]), "pools[0].devices[0].name: must be a string, got 7"),
        # Top level
        (json.dumps({"logLevel": "verbose"}).encode(), "logLevel: must be one of debug, info, warning, error, got 'verbose'"),
        (json.dumps({"logFile": "/var/log/x.log"}).encode(), "logFile: must be a bare file name of letters, digits, '_' and '-' ending in .log or .txt, got '/var/log/x.log'"),
        (json.dumps({"logFile": "dp.json"}).encode(), "logFile: must be a bare file name of letters, digits, '_' and '-' ending in .log or .txt, got 'dp.json'"),
        (json.dumps({"kindCluster": True, "pools": [{"name": "a", "mode": "primary", "drivers": [{"name": "veth"}]}, {"name": "b", "mode": "primary", "drivers": [{"name": "veth"}]}]}).encode(), "kindCluster: a kind cluster takes at most one pool, got 2"),
        (json.dumps({"pools": [{"name": "myPool", "mode": "primary", "drivers": [{"name": "a"}]}, {"name": "MYPOOL", "mode": "primary", "drivers": [{"name": "b"}]}]}).encode(), "pools[1].name: duplicate pool name (names may differ only in case: env vars are upper-cased): also at pools[0].name"),
    ],
)  # fmt: skip
def test_invalid(data: bytes, expected: str) -> None:
    """The whole message: the JSON path, the rule, and the value it got."""
    assert expected in errors_of(data)


@pytest.mark.parametrize("data", [b"", b"{", b'{"pools": [}', b"[1] 2"])
def test_malformed_json_is_one_document_error_with_the_decoders_reason(data: bytes) -> None:
    with pytest.raises(msgspec.DecodeError) as reason:  # its words, whatever its version
        msgspec.json.decode(data)
    assert errors_of(data) == [f"<document>: not valid JSON: {reason.value}"]


def test_error_message_format_names_path_bound_and_value() -> None:
    data = json.dumps(
        {
            "pools": [
                {"name": "a", "mode": "primary", "drivers": [{"name": "x"}]},
                {"name": "b", "mode": "primary", "drivers": [{"name": "ice", "primary": 11}]},
            ]
        }
    ).encode()
    assert errors_of(data) == ["pools[1].drivers[0].primary: must be between 1 and 10, got 11"]


def test_all_errors_are_reported_at_once() -> None:
    data = json.dumps(
        {
            "logLevel": "loud",
            "pools": [
                {"name": "a-b", "mode": "x", "uid": 5, "drivers": [{"name": "ice", "primary": 0}]},
                {"name": "ok", "mode": "cdq", "devices": [{"name": "d", "secondary": 70}]},
            ],
        }
    ).encode()
    assert errors_of(data) == [
        "logLevel: must be one of debug, info, warning, error, got 'loud'",
        "pools[0].name: must only contain letters and digits, got 'a-b'",
        "pools[0].mode: must be one of primary, cdq, got 'x'",
        "pools[0].uid: must be 0 or between 1000 and 256000, got 5",
        "pools[1].devices[0].secondary: must be between 1 and 64, got 70",
    ]


def test_seed_readme_examples_are_valid(tmp_path: Path) -> None:
    """The README's complete examples (the node with neither list included)."""
    nodes_example = {
        "pools": [
            {
                "name": "myPool",
                "mode": "cdq",
                "drivers": [{"name": "ice", "excludeDevices": [{"name": "ens801f3"}]}],
                "nodes": [
                    {"hostname": "k8snode1", "drivers": [{"name": "ice"}]},
                    {
                        "hostname": "k8snode2",
                        "devices": [{"name": "ens801f3"}, {"name": "ens801f1"}],
                        "drivers": [
                            {
                                "name": "ice",
                                "ExcludeDevices": [{"name": "ens802f2"}],
                                "primary": 1,
                                "secondary": 20,
                            }
                        ],
                    },
                    {"hostname": "k8snode3"},
                ],
            }
        ]
    }
    pool = valid(json.dumps(nodes_example)).pools[0]
    assert [n.hostname for n in pool.nodes] == ["k8snode1", "k8snode2", "k8snode3"]
    assert pool.nodes[1].drivers[0].exclude_devices[0].name == "ens802f2"
    assert pool.nodes[2].drivers == () and pool.nodes[2].devices == ()

    examples = {
        "pools": [
            {
                "name": "myPrimarypool",
                "mode": "primary",
                "uid": 1500,
                "udsTimeout": 300,
                "RequiresUnprivilegedBpf": True,
                "drivers": [{"name": "i40e"}],
            },
            {
                "name": "myCdqPool",
                "mode": "cdq",
                "UdsServerDisable": True,
                "drivers": [{"name": "ice"}],
            },
        ]
    }
    primary, cdq = valid(json.dumps(examples)).pools
    assert (primary.uid, primary.uds_timeout, primary.requires_unprivileged_bpf) == (
        1500,
        300,
        True,
    )
    assert cdq.uds_server_disable and cdq.mode == "cdq"
    assert primary.resource_name == "afxdp/myPrimarypool"
    assert primary.env_var == "AFXDP_DEVICES_MYPRIMARYPOOL"

    devices = {
        "pools": [
            {
                "name": "myPool",
                "mode": "cdq",
                "devices": [
                    {"name": "ens801f0", "secondary": 10},
                    {"mac": "68:05:CA:2D:E9:1B", "secondary": 20},
                    {"pci": "0000:81:00.1", "secondary": 30},
                ],
            }
        ],
        "logLevel": "debug",
        "logFile": "afxdp-dp.log",
        "kindCluster": True,
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(devices))
    config = load_config_file(path).config
    assert [(d.name, d.mac, d.pci, d.secondary) for d in config.pools[0].devices] == [
        ("ens801f0", None, None, 10),
        (None, "68:05:ca:2d:e9:1b", None, 20),
        (None, None, "0000:81:00.1", 30),
    ]
    assert (config.log_level, config.log_file, config.kind_cluster) == (
        "debug",
        "afxdp-dp.log",
        True,
    )


def test_shipped_config_is_valid() -> None:
    shipped = Path(__file__).parent.parent / "deploy" / "config.json"
    assert load_config_file(shipped).config.pools[0].name == "myPool"


@pytest.mark.parametrize(
    ("given", "expected"), [(-1, None), (0, 30), (30, 30), (300, 300), (None, 30)]
)
def test_uds_timeout_normalisation(given: int | None, expected: int | None) -> None:
    fields: dict[str, Any] = {"devices": [{"name": "d"}]}
    if given is not None:
        fields["udsTimeout"] = given
    assert valid(doc(**fields)).pools[0].uds_timeout == expected


@pytest.mark.parametrize("uid", [0, 1000, 256000])
def test_uid_bounds_accept(uid: int) -> None:
    assert valid(doc(devices=[{"name": "d"}], uid=uid)).pools[0].uid == uid


def test_keys_match_case_insensitively_and_last_spelling_wins() -> None:
    config = valid(
        b'{"POOLS": [{"NAME": "p", "Mode": "primary", "dRiVeRs": [{"Name": "ice", "PRIMARY": 2,'
        b' "excludeaddressed": true}], "udstimeout": 60, "UID": 2000, "name": "q"}],'
        b' "LOGLEVEL": "debug"}'
    )
    pool = config.pools[0]
    assert (pool.name, pool.uds_timeout, pool.uid, config.log_level) == ("q", 60, 2000, "debug")
    assert pool.drivers[0].primary == 2 and pool.drivers[0].exclude_addressed


def test_unknown_keys_warn_with_path_and_suggestion() -> None:
    loaded = load_config(
        doc(
            drivers=[{"name": "ice", "excludeDevice": [{"name": "x"}]}],
            ethtoolCmds=["-K -device- ntuple on"],
        )
    )
    warnings = [str(w) for w in loaded.warnings]
    assert (
        "pools[0].drivers[0].excludeDevice: unknown key ignored (did you mean 'excludeDevices'?)"
        in warnings
    )
    assert "pools[0].ethtoolCmds: unknown key ignored" in warnings
    # The misspelt key really was ignored, not guessed at.
    assert loaded.config.pools[0].drivers[0].exclude_devices == ()


def test_null_scalars_count_as_absent_as_in_go() -> None:
    pool = valid(doc(devices=[{"name": "d"}], uid=None, udsTimeout=None)).pools[0]
    assert (pool.uid, pool.uds_timeout) == (0, 30)


def test_fqdn_node_names_are_valid() -> None:
    config = valid(doc(nodes=[{"hostname": "node-1.example.com", "devices": [{"name": "d"}]}]))
    assert config.pools[0].nodes[0].hostname == "node-1.example.com"


def test_pinning_with_uds_disabled_is_valid() -> None:
    pool = valid(doc(devices=[{"name": "d"}], udsServerDisable=True, bpfMapPinningEnable=True))
    assert pool.pools[0].bpf_map_pinning_enable


def test_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config_file(tmp_path / "missing.json")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("68:05:CA:2D:E9:1B", "68:05:ca:2d:e9:1b"),
        ("68-05-ca-2d-e9-1b", "68:05:ca:2d:e9:1b"),
        ("6805.ca2d.e91b", "68:05:ca:2d:e9:1b"),
        ("02:00:5e:10:00:00:00:01", "02:00:5e:10:00:00:00:01"),
        ("0200.5e10.0000.0001", "02:00:5e:10:00:00:00:01"),
        ("00:00:00:00:fe:80:00:00:00:00:00:00:02:00:5e:10:00:00:00:01", "00:00:00:00:fe:80:00:00:00:00:00:00:02:00:5e:10:00:00:00:01"),
        ("68:05:ca:2d:e9", None),
        ("68:05-ca:2d:e9:1b", None),
        ("68:05:ca:2d:e9:1g", None),
        ("6805.ca2d.e91", None),
        ("", None),
    ],
)  # fmt: skip
def test_parse_mac_follows_go(text: str, expected: str | None) -> None:
    assert parse_mac(text) == expected


@pytest.mark.parametrize("depth", [62, 100_000])
def test_nesting_past_64_levels_is_one_error_at_its_json_path(depth: int) -> None:
    # pools[0].x is at level 4: 62 levels there are 65 in all, which a decoder
    # takes; 100000 meet its recursion limit. The bound, and the error, are ours.
    def nested(n: int) -> bytes:
        return doc(devices=[{"name": "d"}]).replace(b'"cdq"', b'"cdq", "x": ' + b"[" * n + b"]" * n)

    data = nested(depth)
    at = data.index(b"[" * 62) + 61
    assert errors_of(data) == [f"pools[0].x{'[0]' * 61}: nests deeper than 64 levels (byte {at})"]
    assert valid(nested(61))  # 64 levels in all: taken (the unknown key is a warning)


def test_invalid_utf8_is_reported_at_each_json_path_key_or_value() -> None:
    data = (
        b'{"pools": [{"name": "caf\xe9", "mode": "primary", '
        b'"drivers": [{"name": "ice"}, {"name": "x\xffy"}]}], "k\xe8y": 1}'
    )
    assert errors_of(data) == [
        "pools[0].name: is not valid UTF-8 (byte 0xe9 at character 3)",
        "pools[0].drivers[1].name: is not valid UTF-8 (byte 0xff at character 1)",
        "k?y: key is not valid UTF-8 (byte 0xe8 at character 1)",
    ]


def test_a_pool_is_offered_through_the_device_plugin_unless_it_says_dra() -> None:
    """Every config written before the key means what it meant."""
    plain = load_config(doc(devices=[{"name": "d"}])).config.pools[0]
    assert (plain.api, plain.dra) == ("devicePlugin", False)
    dra = load_config(doc(devices=[{"name": "d"}], api="dra")).config.pools[0]
    assert (dra.api, dra.dra) == ("dra", True)
    named = load_config(doc(devices=[{"name": "d"}], api="devicePlugin")).config.pools[0]
    assert named == plain
