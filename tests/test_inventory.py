"""Inventory on real veth pairs in private network namespaces."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import uvloop

from afxdp import inventory
from afxdp.inventory import _pci_address
from tests.kernel import Lab, ip


def test_pci_address_found_behind_virtio(tmp_path: Path) -> None:
    """sysfs layout of a virtio NIC: class/net/X/device -> .../0000:00:03.0/virtio2."""
    pci_dev = tmp_path / "devices" / "pci0000:00" / "0000:00:03.0"
    virtio = pci_dev / "virtio2"
    virtio.mkdir(parents=True)
    (tmp_path / "bus" / "pci").mkdir(parents=True)
    (tmp_path / "bus" / "virtio").mkdir(parents=True)
    (pci_dev / "subsystem").symlink_to(tmp_path / "bus" / "pci")
    (virtio / "subsystem").symlink_to(tmp_path / "bus" / "virtio")
    link = tmp_path / "device"
    link.symlink_to(virtio)
    assert _pci_address(link) == "0000:00:03.0"
    assert _pci_address(tmp_path / "missing") is None


def discover(netns: str, config: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    """Run ``afxdpctl discover`` inside ``netns`` as an operator would.

    ``ip netns exec`` remounts /sys for that netns, so sysfs and netlink agree.
    """
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        ["ip", "netns", "exec", netns, sys.executable, "-m", "afxdp.cli.afxdpctl", "discover",
         "--json", "--config", str(path), "--node-name", "node1"],
        capture_output=True, text=True, env=env, check=False, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    return report


@pytest.mark.privileged
def test_veth_inventory_and_pools_in_private_netns(lab: Lab, tmp_path: Path) -> None:
    ns = lab.netns()
    lab.veth("pa0", "pb0", netns=ns, queues=4, mac="02:aa:00:00:00:01")
    lab.veth("pa1", "pb1", netns=ns)
    ip("addr", "add", "10.250.0.1/24", "dev", "pa1", netns=ns)
    for link in ("pa0", "pb0", "pa1", "pb1"):
        ip("link", "set", link, "up", netns=ns)

    config = {
        "pools": [
            {"name": "byMac", "mode": "primary", "devices": [{"mac": "02:AA:00:00:00:01"}]},
            {"name": "veths", "mode": "primary",
             "drivers": [{"name": "veth", "excludeAddressed": True}]},
        ]
    }  # fmt: skip
    report = discover(ns, config, tmp_path)
    netdevs = {nd["name"]: nd for nd in report["netdevs"]}
    assert set(netdevs) == {"lo", "pa0", "pb0", "pa1", "pb1"}
    pa0 = netdevs["pa0"]
    assert (pa0["driver"], pa0["kind"], pa0["virtual"], pa0["pci"]) == ("veth", "veth", True, None)
    assert pa0["mac"] == "02:aa:00:00:00:01"
    assert (pa0["rx_queues"], pa0["tx_queues"]) == (4, 4)
    assert pa0["oper_state"] == "up" and pa0["admin_up"]
    assert netdevs["pa1"]["ipv4"] == ["10.250.0.1/24"]
    assert netdevs["pb1"]["ipv4"] == []

    pools = {p["resource"]: p["devices"] for p in report["pools"]}
    assert [d["id"] for d in pools["afxdp/byMac"]] == ["pa0"]
    # pa0 is taken by the first pool, pa1 has an IPv4 address.
    assert [(d["id"], d["state"]) for d in pools["afxdp/veths"]] == [
        ("pb0", "free"),
        ("pb1", "free"),
    ]

    # Link state is read for real: with its peer down, pb0 cannot carry traffic.
    ip("link", "set", "pa0", "down", netns=ns)
    report = discover(ns, config, tmp_path)
    netdevs = {nd["name"]: nd for nd in report["netdevs"]}
    assert netdevs["pa0"]["oper_state"] == "down" and not netdevs["pa0"]["admin_up"]
    assert netdevs["pb0"]["oper_state"] == "lowerlayerdown"
    states = {d["id"]: d["state"] for p in report["pools"] for d in p["devices"]}
    assert states == {"pa0": "unhealthy", "pb0": "unhealthy", "pb1": "free"}


@pytest.mark.privileged
def test_scan_under_uvloop_sees_a_new_link(lab: Lab) -> None:
    a, b = lab.veth(lab.name("afi"), lab.name("afj"))
    netdevs = {nd.name: nd for nd in uvloop.run(inventory.scan())}
    assert netdevs[a].driver == "veth" and netdevs[b].kind == "veth"
    assert netdevs[a].ifindex > 0 and not netdevs[a].link_up


def test_unprivileged_bpf_sysctl_is_read(tmp_path: Path) -> None:
    assert inventory.unprivileged_bpf_disabled(tmp_path) is None
    (tmp_path / "sys" / "kernel").mkdir(parents=True)
    (tmp_path / "sys" / "kernel" / "unprivileged_bpf_disabled").write_text("2\n")
    assert inventory.unprivileged_bpf_disabled(tmp_path) == 2


@pytest.mark.privileged
def test_read_one_finds_a_link_of_the_threads_netns_by_name_and_none_for_a_missing_one(
    lab: Lab,
) -> None:
    ns = lab.netns()
    lab.veth("pr0", "pr1", netns=ns, mac="02:aa:00:00:00:07")
    from afxdp.netns import run_in  # noqa: PLC0415 - only this test enters a netns

    found = run_in(Path("/run/netns") / ns, inventory.read_one, "pr0")
    assert found is not None and (found.name, found.mac) == ("pr0", "02:aa:00:00:00:07")
    assert found.ifindex == run_in(Path("/run/netns") / ns, inventory.index_of, "pr0")
    assert run_in(Path("/run/netns") / ns, inventory.read_one, "pr9") is None
    assert inventory.read_one("pr0") is None  # not in this (the host's) netns
