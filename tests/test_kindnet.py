"""kind mode: the secondary network afxdpd builds on a kind node, and the pool rule.

The planner and the pool rule are checked on plain data; the network itself on
real links in a private netns (checked with iproute2, an independent reader).
"""

from __future__ import annotations

import json
import secrets
import socket
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import pytest

from afxdp import inventory, kindnet
from afxdp.config import load_config
from afxdp.inventory import NetDev
from afxdp.kindnet import BRIDGE, MARKER, KindNetError, Link, Op, Step, plan_build, plan_remove
from afxdp.netns import run_in
from afxdp.pools import assemble
from tests.fakes import FakeSubfunctions
from tests.kernel import Lab, ip

# -- the planner, on plain data -----------------------------------------------


def intact(pairs: int, **port_changes: Any) -> list[Link]:
    """The links of a built network of ``pairs`` pairs (port changes apply to pair 0)."""
    links = [Link(BRIDGE, 2, "bridge", MARKER, up=True, addresses=("192.168.1.1/24",))]
    for i in range(pairs):
        port, pooled = 10 + 2 * i, 11 + 2 * i
        link = Link(kindnet.port_name(i), port, "veth", MARKER, up=True, master=BRIDGE,
                    peer=pooled, xdp_native=True)  # fmt: skip
        links.append(replace(link, **port_changes) if i == 0 else link)
        links.append(Link(kindnet.pooled_name(i), pooled, "veth", MARKER, up=True, peer=port))
    return links


def test_plan_on_an_empty_netns_builds_everything() -> None:
    steps = plan_build(2, [Link("lo", 1)])
    assert steps[:4] == [
        Step(Op.ADD_BRIDGE, BRIDGE),
        Step(Op.MARK, BRIDGE),
        Step(Op.ADD_ADDRESS, BRIDGE, "192.168.1.1/24"),
        Step(Op.UP, BRIDGE),
    ]
    for i in range(2):
        pooled, port = kindnet.pooled_name(i), kindnet.port_name(i)
        assert Step(Op.ADD_PAIR, pooled, port) in steps
        assert {Step(Op.MARK, pooled), Step(Op.MARK, port)} <= set(steps)
        assert Step(Op.ENSLAVE, port, BRIDGE) in steps
        assert Step(Op.ATTACH_XDP, port) in steps  # the bridge side, never the pooled end
        assert Step(Op.ATTACH_XDP, pooled) not in steps
        assert Step(Op.UP, pooled) in steps
    assert not any(s.op is Op.DELETE for s in steps)


def test_plan_for_a_built_network_does_nothing() -> None:
    assert plan_build(3, intact(3)) == []


def test_plan_mends_a_damaged_pair_in_place() -> None:
    damaged = intact(1, up=False, master=None, xdp_native=False)
    assert plan_build(1, damaged) == [
        Step(Op.ENSLAVE, "afxk0-br", BRIDGE),
        Step(Op.UP, "afxk0-br"),
        Step(Op.ATTACH_XDP, "afxk0-br"),
    ]


def test_plan_keeps_a_pair_whose_pooled_end_is_in_a_pod() -> None:
    links = [lk for lk in intact(2) if lk.name != "afxk1"]
    links = [replace(lk, peer=None, peer_away=True) if lk.name == "afxk1-br" else lk
             for lk in links]  # fmt: skip
    assert plan_build(2, links) == []
    # Removal for a restart spares it and the bridge; a full removal does not.
    assert plan_remove(links, keep_in_use=True) == [
        Step(Op.DELETE, "afxk0"),
        Step(Op.DELETE, "afxk0-br"),
    ]
    assert [s.link for s in plan_remove(links)] == ["afxk0", "afxk0-br", "afxk1-br", BRIDGE]


def test_plan_refuses_names_held_by_links_that_are_not_ours() -> None:
    links = [Link("afxk1", 7, "veth", alias=None), Link(BRIDGE, 8, "bridge", alias="other")]
    with pytest.raises(KindNetError, match=r"afxdp-kind-br, afxk1: .*not made by afxdpd"):
        plan_build(2, links)


def test_plan_replaces_half_pairs_and_drops_extra_pairs() -> None:
    links = intact(3)
    # Pair 1's ends are no longer each other's peers; pair 2 is beyond the new size.
    links = [replace(lk, peer=99) if lk.name == "afxk1" else lk for lk in links]
    steps = plan_build(2, links)
    assert steps[:2] == [Step(Op.DELETE, "afxk2"), Step(Op.DELETE, "afxk2-br")]
    assert steps[2:5] == [
        Step(Op.DELETE, "afxk1"),
        Step(Op.DELETE, "afxk1-br"),
        Step(Op.ADD_PAIR, "afxk1", "afxk1-br"),
    ]


def test_remove_plan_needs_our_name_and_our_marker() -> None:
    links = [
        Link(BRIDGE, 2, "bridge", MARKER),
        Link("afxk0", 3, "veth", MARKER),
        Link("afxk5", 4, "veth", None),  # our kind of name, not our marker
        Link("veth6", 5, "veth", MARKER),  # our marker, not our name
        Link("afxk0x", 6, "veth", MARKER),
    ]
    assert [s.link for s in plan_remove(links)] == ["afxk0", BRIDGE]


# -- the pool rule, on plain data ---------------------------------------------


def veth(name: str, up: bool = True) -> NetDev:
    return NetDev(name=name, ifindex=sum(map(ord, name)), driver="veth", kind="veth",
                  oper_state="up" if up else "down", admin_up=up)  # fmt: skip


def kind_pools(pool: dict[str, Any], netdevs: list[NetDev], kind_devices: list[str]) -> Any:
    config = load_config(json.dumps({"kindCluster": True, "pools": [pool]}).encode()).config
    return assemble(config, netdevs, "node1", unprivileged_bpf_disabled=2,
                    secondary=FakeSubfunctions(), kind_devices=kind_devices)  # fmt: skip


def test_kind_pool_takes_exactly_the_kind_devices() -> None:
    # The original's kind config: driver veth. kindnet's pod veths, another
    # veth with an even-digit name, and the bridge-side ends all fit that driver.
    netdevs = [veth(n) for n in ("afxk0", "afxk0-br", "afxk1", "afxk1-br", "veth6",
                                 "veth2a4c6e80", "vethab12cd34")] + [veth("afxk2", up=False)]  # fmt: skip
    pool = {"name": "myPool", "mode": "primary", "drivers": [{"name": "veth"}],
            "devices": [{"name": "veth6"}]}  # fmt: skip
    a = kind_pools(pool, netdevs, ["afxk0", "afxk1", "afxk2", "afxk3"])
    assert [(d.id, d.healthy) for d in a.pools[0].devices.values()] == [
        ("afxk0", True),
        ("afxk1", True),
        ("afxk2", False),
    ]
    assert any("afxk3 is not on this node" in w for w in a.warnings)


def test_kind_pool_without_a_built_network_takes_nothing() -> None:
    a = kind_pools({"name": "p", "mode": "primary", "drivers": [{"name": "veth"}]},
                   [veth("veth6")], [])  # fmt: skip
    assert a.pools == []
    assert any("no kind network was built" in w for w in a.warnings)


# -- the network, on real links ----------------------------------------------


def links(netns: str) -> dict[str, dict[str, Any]]:
    """``ip -d link`` of ``netns`` by name (iproute2 as the independent reader)."""
    return {lk["ifname"]: lk for lk in json.loads(ip("-j", "-d", "link", "show", netns=netns))}


def addresses(netns: str, dev: str) -> list[str]:
    data = json.loads(ip("-j", "-4", "addr", "show", "dev", dev, netns=netns))
    return [f"{a['local']}/{a['prefixlen']}" for a in data[0]["addr_info"]]


def assert_built(netns: str, pairs: int) -> dict[str, dict[str, Any]]:
    seen = links(netns)
    ours = {n for n, lk in seen.items() if lk.get("ifalias") == MARKER}
    expected = {BRIDGE} | {f"afxk{i}{end}" for i in range(pairs) for end in ("", "-br")}
    assert ours == expected
    assert addresses(netns, BRIDGE) == ["192.168.1.1/24"]
    assert "UP" in seen[BRIDGE]["flags"]
    for i in range(pairs):
        port, pooled = seen[kindnet.port_name(i)], seen[kindnet.pooled_name(i)]
        assert port["link"] == pooled["ifname"]
        assert port["master"] == BRIDGE
        assert port["xdp"]["mode"] == 1  # native (driver) mode
        assert "xdp" not in pooled  # the pooled end is free for a pod's program
        assert "UP" in port["flags"] and "UP" in pooled["flags"]
        assert pooled["operstate"] == "UP"
    return seen


def path(netns: str) -> Path:
    return Path("/run/netns") / netns


@pytest.mark.privileged
@pytest.mark.anyio
async def test_build_makes_the_network_and_remove_leaves_nothing(lab: Lab) -> None:
    ns = lab.netns("afkn")
    net = await kindnet.build(3, netns=path(ns))
    assert net.devices == ("afxk0", "afxk1", "afxk2")
    assert_built(ns, 3)
    # remove needs no state from build: it finds what is ours by name and marker.
    removed = await kindnet.remove(netns=path(ns))
    assert BRIDGE in removed
    assert set(links(ns)) == {"lo"}
    assert await kindnet.remove(netns=path(ns)) == []


@pytest.mark.privileged
@pytest.mark.anyio
async def test_build_after_a_crash_mends_without_duplicating(lab: Lab) -> None:
    ns = lab.netns("afkc")
    await kindnet.build(4, netns=path(ns))
    before = links(ns)
    # A crash (or a meddling admin) left the network damaged.
    ip("link", "set", "dev", "afxk0-br", "xdpdrv", "off", netns=ns)
    ip("link", "set", "dev", "afxk1", "down", netns=ns)
    ip("link", "set", "dev", "afxk2-br", "nomaster", netns=ns)
    ip("link", "del", "afxk3", netns=ns)
    ip("addr", "flush", "dev", BRIDGE, netns=ns)
    await kindnet.build(4, netns=path(ns))
    after = assert_built(ns, 4)
    assert len(after) == len(before)
    # Mended in place, not recreated: a pod holding a pair keeps it.
    for name in ("afxk0", "afxk1", "afxk2", BRIDGE):
        assert after[name]["ifindex"] == before[name]["ifindex"]
    # A smaller network drops the extra pairs.
    await kindnet.build(2, netns=path(ns))
    assert_built(ns, 2)


@pytest.mark.privileged
@pytest.mark.anyio
async def test_foreign_links_are_never_touched_nor_pooled(lab: Lab) -> None:
    ns = lab.netns("afkf")
    # Links that look like the kind network's but are somebody else's.
    lab.veth("afxk7", "afxk7-br", netns=ns)
    lab.veth("veth6", "veth7", netns=ns)
    ip("link", "set", "veth6", "up", netns=ns)
    ip("link", "set", "veth7", "up", netns=ns)
    foreign = {n: links(ns)[n]["ifindex"] for n in ("afxk7", "afxk7-br", "veth6", "veth7")}

    net = await kindnet.build(2, netns=path(ns))
    netdevs = run_in(path(ns), inventory.read_inventory)
    pool = {"name": "myPool", "mode": "primary", "drivers": [{"name": "veth"}]}
    a = kind_pools(pool, list(netdevs), list(net.devices))
    assert list(a.pools[0].devices) == ["afxk0", "afxk1"]

    await kindnet.remove(netns=path(ns))
    left = links(ns)
    assert {n: left[n]["ifindex"] for n in foreign} == foreign
    assert set(left) == {"lo", *foreign}

    # A name the network needs, held by a foreign link: refused, nothing made.
    lab.veth("afxk1", "other1", netns=ns)
    with pytest.raises(KindNetError, match="afxk1"):
        await kindnet.build(2, netns=path(ns))
    assert set(links(ns)) == {"lo", "afxk1", "other1", *foreign}


def udp_socket(netns: str, address: str) -> socket.socket:
    """A UDP socket bound to ``address`` in ``netns`` (a socket stays in the netns
    it was made in)."""

    def make() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((address, 0))
        sock.settimeout(5)
        return sock

    return run_in(path(netns), make)


def delivered(src: tuple[str, str], dst: tuple[str, str]) -> bool:
    """Whether a datagram from ``src`` (netns, address) reaches ``dst``."""
    with udp_socket(*src) as tx, udp_socket(*dst) as rx:
        payload = secrets.token_bytes(16)
        tx.sendto(payload, rx.getsockname())  # queued by the kernel until ARP resolves
        try:
            return rx.recv(64) == payload
        except TimeoutError:
            return False


def into_pod(lab: Lab, host: str, dev: str, address: str) -> str:
    pod = lab.netns(f"afp{dev[-1]}")
    ip("link", "set", dev, "netns", pod, netns=host)
    ip("addr", "add", address, "dev", dev, netns=pod)
    ip("link", "set", dev, "up", netns=pod)
    return pod


@pytest.mark.privileged
@pytest.mark.anyio
async def test_pods_on_pooled_ends_reach_each_other_and_the_node(lab: Lab) -> None:
    ns = lab.netns("afkp")
    await kindnet.build(2, netns=path(ns))
    pod0 = into_pod(lab, ns, "afxk0", "192.168.1.11/24")
    pod1 = into_pod(lab, ns, "afxk1", "192.168.1.12/24")
    # Across the bridge, through the pass-through programs on both ports.
    assert delivered((pod0, "192.168.1.11"), (pod1, "192.168.1.12"))
    assert delivered((pod1, "192.168.1.12"), (ns, "192.168.1.1"))

    # afxdpd restarts while the pods hold their devices: their network stays.
    await kindnet.remove(keep_in_use=True, netns=path(ns))
    await kindnet.build(2, netns=path(ns))
    assert {"afxk0-br", "afxk1-br", BRIDGE} <= set(links(ns))
    assert delivered((pod0, "192.168.1.11"), (pod1, "192.168.1.12"))

    # A full removal takes the pods' ends with it (a veth pair goes as one).
    await kindnet.remove(netns=path(ns))
    assert set(links(ns)) == {"lo"}
    assert "afxk0" not in links(pod0)


# A pod's XDP program that bounces every frame back out (XDP_TX): written
# here, it exists only for this test.
_BOUNCE_C = """
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
SEC("xdp") int bounce(struct xdp_md *ctx) { return XDP_TX; }
char _license[] SEC("license") = "GPL";
"""


def rx_packets(netns: str, dev: str) -> int:
    data = json.loads(ip("-j", "-s", "link", "show", "dev", dev, netns=netns))
    return int(data[0]["stats64"]["rx"]["packets"])


def send_frames(netns: str, dev: str, count: int) -> None:
    """``count`` raw broadcast frames out of ``dev`` (an experimental ethertype)."""

    def make() -> socket.socket:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
        sock.bind((dev, 0))
        return sock

    with run_in(path(netns), make) as sock:
        for _ in range(count):
            sock.send(b"\xff" * 6 + b"\x02" * 6 + b"\x88\xb5" + b"x" * 50)


@pytest.mark.privileged
@pytest.mark.anyio
async def test_frames_a_pods_xdp_sends_back_reach_the_bridge(lab: Lab, tmp_path: Path) -> None:
    """Why the bridge side carries a program: frames that XDP transmits out of
    the pooled end land in the peer's XDP ring, which veth has only while the
    peer has a native XDP program; without it they are dropped."""
    source, obj = tmp_path / "bounce.c", tmp_path / "bounce.o"
    source.write_text(_BOUNCE_C)
    triplet = subprocess.run(["gcc", "-dumpmachine"], capture_output=True, text=True,
                             check=True).stdout.strip()  # fmt: skip
    subprocess.run(["clang", "-O2", "-g", "-target", "bpf", f"-I/usr/include/{triplet}",
                    "-c", str(source), "-o", str(obj)], check=True)  # fmt: skip
    ns = lab.netns("afkx")
    await kindnet.build(1, netns=path(ns))
    ip("link", "set", "dev", "afxk0", "xdpdrv", "obj", str(obj), "sec", "xdp", netns=ns)
    before = rx_packets(ns, "afxk0-br")
    send_frames(ns, "afxk0-br", 100)
    # Counted in NAPI (softirq) after the sends: wait for the count, not a time.
    with anyio.move_on_after(5):
        while rx_packets(ns, "afxk0-br") - before < 100:
            await anyio.sleep(0.01)
    assert rx_packets(ns, "afxk0-br") - before >= 100
