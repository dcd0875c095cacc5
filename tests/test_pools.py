"""Pool assembly on plain data: the seed README's rules, one by one."""

from __future__ import annotations

import json
from typing import Any

import pytest

from afxdp.config import load_config
from afxdp.errors import DeviceError
from afxdp.inventory import NetDev
from afxdp.pools import Assembly, DeviceState, assemble, preferred
from tests.fakes import FakeSubfunctions


def nic(name: str, driver: str = "ice", **kw: Any) -> NetDev:
    n = sum(map(ord, name))
    defaults: dict[str, Any] = {
        "ifindex": n,
        "pci": f"0000:{n % 256:02x}:00.{n % 8}",
        "mac": f"02:00:00:00:{n // 256 % 256:02x}:{n % 256:02x}",
        "oper_state": "up",
        "admin_up": True,
        "virtual": False,
        "numa_node": 0,
    }
    defaults.update(kw)
    return NetDev(name=name, driver=driver, **defaults)


def veth(name: str, **kw: Any) -> NetDev:
    return nic(name, "veth", pci=None, virtual=True, kind="veth", numa_node=None, **kw)


NODE = [
    nic("ens801f0"),
    nic("ens801f1"),
    nic("ens801f2", ipv4=("10.0.0.5/24",)),
    nic("ens801f3"),
    nic("ens785f0", "i40e"),
    nic("ens785f1", "i40e", oper_state="down"),
    nic("eth0", "virtio_net"),
    nic("eno1", "ice"),
    veth("veth6"),
    veth("veth7"),
    NetDev(name="lo", ifindex=1, driver="", oper_state="unknown", admin_up=True),
]


def build(config: dict[str, Any], netdevs: list[NetDev] = NODE, node: str = "node1",
          unpriv: int | None = 2, fake: FakeSubfunctions | None = None) -> Assembly:  # fmt: skip
    loaded = load_config(json.dumps(config).encode())
    return assemble(
        loaded.config,
        netdevs,
        node,
        unprivileged_bpf_disabled=unpriv,
        secondary=fake or FakeSubfunctions(),
    )


def pool(name: str = "p", mode: str = "primary", **kw: Any) -> dict[str, Any]:
    return {"name": name, "mode": mode, **kw}


def ids(a: Assembly, i: int = 0) -> list[str]:
    return list(a.pools[i].devices)


def test_driver_takes_all_matching_sorted_and_never_reserved_names() -> None:
    a = build({"pools": [pool(drivers=[{"name": "ice"}])]})
    assert ids(a) == ["ens801f0", "ens801f1", "ens801f2", "ens801f3"]  # eno1 is reserved


def test_primary_limit_is_deterministic() -> None:
    for _ in range(3):
        a = build({"pools": [pool(drivers=[{"name": "ice", "primary": 2}])]})
        assert ids(a) == ["ens801f0", "ens801f1"]


def test_exclude_devices_by_name_mac_and_pci() -> None:
    f1, f3 = NODE[1], NODE[3]
    a = build(
        {"pools": [pool(drivers=[{"name": "ice", "excludeDevices": [
            {"name": "ens801f0"}, {"mac": f1.mac}, {"pci": f3.pci}, {"name": "absent"}]}])]}
    )  # fmt: skip
    assert ids(a) == ["ens801f2"]


def test_exclude_addressed_skips_only_ipv4_addressed() -> None:
    a = build({"pools": [pool(drivers=[{"name": "ice", "excludeAddressed": True}])]})
    assert ids(a) == ["ens801f0", "ens801f1", "ens801f3"]


def test_devices_by_name_mac_and_pci_are_resolved() -> None:
    a = build(
        {"pools": [pool(devices=[
            {"name": "ens785f0"}, {"mac": str(NODE[1].mac).upper()}, {"pci": NODE[3].pci},
            {"name": "ghost"}, {"mac": "68:05:ca:2d:e9:1b"}])]}
    )  # fmt: skip
    assert ids(a) == ["ens785f0", "ens801f1", "ens801f3"]
    assert any("devices[3] (name ghost): no such netdev" in w for w in a.warnings)
    assert any("devices[4] (mac 68:05:ca:2d:e9:1b): no such netdev" in w for w in a.warnings)


def test_reserved_names_are_refused_even_when_named() -> None:
    a = build({"pools": [pool(devices=[{"name": "eth0"}, {"name": "eno1"}, {"name": "ens801f0"}])]})
    assert ids(a) == ["ens801f0"]
    assert sum("reserved name prefix" in w for w in a.warnings) == 2


def test_a_device_is_in_at_most_one_pool_first_wins() -> None:
    a = build(
        {"pools": [
            pool("a", devices=[{"name": "ens801f1"}]),
            pool("b", drivers=[{"name": "ice"}], devices=[{"name": "ens801f1"}]),
        ]}
    )  # fmt: skip
    assert ids(a, 0) == ["ens801f1"]
    assert ids(a, 1) == ["ens801f0", "ens801f2", "ens801f3"]
    assert any("ens801f1 is already in pool a" in w for w in a.warnings)


def test_explicit_device_and_driver_in_one_pool_do_not_duplicate() -> None:
    a = build(
        {"pools": [pool(devices=[{"name": "ens801f3"}], drivers=[{"name": "ice", "primary": 2}])]}
    )
    assert ids(a) == ["ens801f3", "ens801f0", "ens801f1"]


def test_node_section_replaces_general_one_for_that_node_only() -> None:
    config = {
        "pools": [
            pool(
                drivers=[{"name": "ice", "excludeDevices": [{"name": "ens801f3"}]}],
                nodes=[
                    {"hostname": "k8snode1", "drivers": [{"name": "ice"}]},
                    {"hostname": "k8snode2", "devices": [{"name": "ens801f3"}, {"name": "ens801f1"}],
                     "drivers": [{"name": "ice", "primary": 1, "excludeDevices": [{"name": "ens801f0"}]}]},
                    {"hostname": "k8snode3"},
                ],
            )
        ]
    }  # fmt: skip
    assert ids(build(config, node="other")) == ["ens801f0", "ens801f1", "ens801f2"]
    assert ids(build(config, node="k8snode1")) == ["ens801f0", "ens801f1", "ens801f2", "ens801f3"]
    assert ids(build(config, node="K8SNODE2")) == ["ens801f3", "ens801f1", "ens801f2"]
    empty = build(config, node="k8snode3")
    assert empty.pools == []
    assert any("no devices on node k8snode3; not advertised" in w for w in empty.warnings)


def test_virtual_devices_only_when_asked_for() -> None:
    assert ids(build({"pools": [pool(drivers=[{"name": "ice"}, {"name": "i40e"}])]})) == [
        "ens801f0", "ens801f1", "ens801f2", "ens801f3", "ens785f0", "ens785f1"]  # fmt: skip
    assert ids(build({"pools": [pool(drivers=[{"name": "veth"}])]})) == ["veth6", "veth7"]
    assert ids(build({"pools": [pool(devices=[{"name": "veth7"}])]})) == ["veth7"]


def test_requires_unprivileged_bpf() -> None:
    config = {"pools": [pool(drivers=[{"name": "ice"}], requiresUnprivilegedBpf=True)]}
    assert build(config, unpriv=0).pools[0].name == "p"
    for value in (1, 2, None):
        refused = build(config, unpriv=value)
        assert refused.pools == []
        assert any(f"unprivileged_bpf_disabled={value}" in w for w in refused.warnings)


def test_initial_health_follows_link_state_and_numa_is_kept() -> None:
    a = build({"pools": [pool(drivers=[{"name": "i40e"}])]})
    devs = a.pools[0].devices
    assert devs["ens785f0"].state is DeviceState.FREE and devs["ens785f0"].numa_node == 0
    assert devs["ens785f1"].state is DeviceState.UNHEALTHY


def test_cdq_secondaries_with_device_driver_and_default_limits() -> None:
    fake = FakeSubfunctions(capacity=64)
    a = build(
        {"pools": [pool("c", "cdq", devices=[{"name": "ens801f0", "secondary": 3}],
                        drivers=[{"name": "ice", "secondary": 2, "primary": 1}, {"name": "i40e"}])]},
        fake=fake,
    )  # fmt: skip
    devs = a.pools[0].devices
    assert list(devs) == ["ens801f0sf1", "ens801f0sf2", "ens801f0sf3", "ens801f1sf1", "ens801f1sf2"]
    assert devs["ens801f1sf2"].parent == "ens801f1" and devs["ens801f1sf2"].index == 2
    assert sum("cannot back cdq secondary devices" in w for w in a.warnings) == 2  # both i40e
    unlimited = build({"pools": [pool("c", "cdq", devices=[{"name": "ens801f3"}])]}, fake=fake)
    assert len(unlimited.pools[0].devices) == 64
    assert fake.created == []  # assembly plans; creation is the allocation's job


def test_allocation_bookkeeping_names_every_problem_and_is_all_or_nothing() -> None:
    p = build({"pools": [pool(drivers=[{"name": "ice"}, {"name": "i40e"}])]}).pools[0]
    p.allocate(["ens801f0"])
    with pytest.raises(DeviceError) as info:
        p.allocate(["ens801f1", "ens801f0", "nope", "ens785f1", "ens801f2", "ens801f2"])
    text = str(info.value)
    assert "ens801f0: allocated" in text
    assert "nope: unknown device in pool p" in text
    assert "ens785f1: unhealthy" in text
    assert "ens801f2: requested 2 times" in text
    assert p.devices["ens801f1"].state is DeviceState.FREE  # nothing of the failed call stuck
    p.release(["ens801f0", "ghost"])
    assert p.devices["ens801f0"].state is DeviceState.FREE


def test_link_health_applies_to_device_and_its_secondaries() -> None:
    p = build({"pools": [pool("c", "cdq", devices=[{"name": "ens801f0", "secondary": 2}])]}).pools[
        0
    ]
    assert p.set_link("ens801f0", healthy=False) == ["ens801f0sf1", "ens801f0sf2"]
    assert p.set_link("ens801f0", healthy=False) == []
    assert all(d.state is DeviceState.UNHEALTHY for d in p.devices.values())


def numa_pool() -> Any:
    netdevs = [nic(f"n{i}", numa_node=i % 2) for i in range(6)]  # n0,n2,n4 on 0; n1,n3,n5 on 1
    netdevs.append(nic("n9", numa_node=None))
    return build({"pools": [pool(drivers=[{"name": "ice"}])]}, netdevs).pools[0]


def test_preferred_allocation_honours_must_include_and_numa() -> None:
    p = numa_pool()
    everything = list(p.devices)
    assert preferred(p, everything, [], 2) == [
        "n0",
        "n2",
    ]  # node 0 has as many as node 1: lower wins
    assert preferred(p, everything, ["n3"], 3) == ["n3", "n1", "n5"]  # follow n3 to node 1
    assert preferred(p, everything, ["n3", "n0"], 2) == ["n3", "n0"]
    assert preferred(p, everything, ["n4"], 2) == ["n4", "n0"]  # node 0 is node 0, not "no node"
    p.allocate(["n1"])
    p.set_link("n5", healthy=False)
    # n1 allocated, n5 unhealthy: node 1 has only n3 left, then node-less and others.
    assert preferred(p, everything, ["n3"], 3) == ["n3", "n0", "n2"]
    assert preferred(p, ["n5", "n1"], [], 1) == ["n1"]  # only bad ones offered: still an answer
    assert preferred(p, everything, [], 0) == []


def test_preferred_anchors_on_the_node_with_most_free_candidates_even_a_higher_one() -> None:
    p = numa_pool()
    # Offered: one device on node 0, two on node 1 (and the node-less n9).
    assert preferred(p, ["n0", "n1", "n3", "n9"], [], 2) == ["n1", "n3"]
    assert preferred(p, ["n9", "n5", "n0", "n2", "n4"], [], 1) == ["n0"]


def test_preferred_returns_must_include_cut_to_size_and_survives_unknown_ids() -> None:
    p = numa_pool()
    assert preferred(p, ["n0", "n1"], ["n1", "n0"], 1) == ["n1"]
    # An ID this pool does not know (kubelet out of date) has no NUMA node; no crash.
    assert preferred(p, ["ghost", "n1", "n3"], ["ghost"], 2) == ["ghost", "n1"]


def test_refused_allocation_names_every_problem_in_one_message() -> None:
    p = numa_pool()
    p.allocate(["n0"])
    p.set_link("n1", healthy=False)
    with pytest.raises(DeviceError) as err:
        p.allocate(["n0", "n1"])
    assert str(err.value) == "n0: allocated; n1: unhealthy"


def test_cdq_secondaries_keep_their_primarys_numa_node_and_odd_drivers_are_named() -> None:
    netdevs = [nic("p0", numa_node=1), veth("v0")]
    config = {"pools": [{"name": "sf", "mode": "cdq", "devices": [
        {"name": "p0", "secondary": 2}, {"name": "v0"}]}]}  # fmt: skip
    assembly = build(config, netdevs)
    assert {d.id: d.numa_node for d in assembly.pools[0].devices.values()} == {
        "p0sf1": 1,
        "p0sf2": 1,
    }
    assert "v0 (driver veth) cannot back cdq secondary devices; skipped" in " ".join(
        assembly.warnings
    )


def test_a_driver_with_no_netdevs_on_the_node_gives_no_pool() -> None:
    assembly = build({"pools": [pool(drivers=[{"name": "mlx5_core"}])]})
    assert assembly.pools == []
    assert any("no devices on node node1" in w for w in assembly.warnings)


def test_a_kind_cluster_pools_only_the_kind_networks_ends_and_says_what_is_missing() -> None:
    loaded = load_config(json.dumps({"kindCluster": True, "pools": [
        {"name": "kind", "mode": "primary", "drivers": [{"name": "veth"}]}]}).encode())  # fmt: skip
    netdevs = [*NODE, veth("afkind0"), veth("afkind1")]

    def kind(*devices: str) -> Assembly:
        return assemble(loaded.config, netdevs, "node1", unprivileged_bpf_disabled=0,
                        secondary=FakeSubfunctions(), kind_devices=devices)  # fmt: skip

    got = kind("afkind1", "afkind0", "afkind9")
    # Only the kind network's ends, whatever the pool's drivers rule would take.
    assert list(got.pools[0].devices) == ["afkind1", "afkind0"]
    assert got.warnings == [
        "pools[0] (kind): kind network device afkind9 is not on this node; skipped"
    ]
    empty = kind()
    assert empty.pools == []
    assert empty.warnings == ["pools[0] (kind): kindCluster is set but no kind network was built",
                              "pools[0] (kind): no devices on node node1; not advertised"]  # fmt: skip


def test_a_devices_status_summary_says_its_state_numa_parent_and_fault() -> None:
    got = build({"pools": [{"name": "p", "mode": "primary", "devices": [{"name": "ens801f0"}]}]})
    dev = got.pools[0].devices["ens801f0"]
    assert dev.summary() == {"id": "ens801f0", "state": "free", "numa": 0, "parent": None,
                             "fault": None}  # fmt: skip
    got.pools[0].allocate(["ens801f0"])
    assert dev.summary()["state"] == "allocated"
    dev.fault = "another XDP program (id 9) is attached"
    assert dev.summary() == {"id": "ens801f0", "state": "unhealthy", "numa": 0, "parent": None,
                             "fault": "another XDP program (id 9) is attached"}  # fmt: skip
    cdq = build({"pools": [{"name": "c", "mode": "cdq", "drivers": [{"name": "ice"}]}]},
                fake=FakeSubfunctions(capacity=1))  # fmt: skip
    secondary = next(iter(cdq.pools[0].devices.values()))
    assert secondary.summary()["parent"] == secondary.parent is not None
