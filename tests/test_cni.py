"""CNI through the built static shim, executed as a runtime executes a plugin
(env + stdin), against the running service: real netns, real veth, real
host-local IPAM from containernetworking-plugins."""

from __future__ import annotations

import errno
import json
import socket
import subprocess
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import pytest
from pyroute2 import NetlinkError

from afxdp import control
from afxdp.bpf import libbpf
from afxdp.bpf.xdp import XdpAttachment
from afxdp.cli.afxdpctl import status_lines
from afxdp.cni import link, shim
from afxdp.datapath import MAP_IN_MAP
from afxdp.netns import run_in
from afxdp.status import AllocationStatus, DeviceStatus, Status
from tests.kernel import Lab, foreign_xdp, ip
from tests.node import NodeUnderTest, pool_config, running
from tests.test_cni_handler import FakeIpam
from tests.test_xdp_e2e import COUNT, PORT, PodApp, plug, run_pod

pytestmark = [pytest.mark.privileged, pytest.mark.anyio]
CNI_PATH = "/usr/lib/cni"
SUBNET = "10.78.0"


class Node(NodeUnderTest):
    """A node whose CNI requests go through the shim to its service."""

    def __init__(self, tmp: Path, lab: Lab, devices: list[str]) -> None:
        super().__init__(tmp, lab, devices)
        self.ipam_dir = tmp / "ipam"
        # Installed as afxdpctl install-cni does, allowed to reach this node's run dir.
        self.shim = shim.install(tmp / "cni-bin", [self.paths.run_dir])

    async def cni(self, command: str, conf: dict[str, Any] | bytes | None, **kw: Any) -> tuple[int, Any, str]:  # fmt: skip
        """Run this node's shim as a runtime would (see ``cni``)."""
        return await cni(command, conf, shim_path=self.shim, **kw)

    def netconf(self, dev: str, version: str = "1.0.0", **extra: Any) -> dict[str, Any]:
        conf: dict[str, Any] = {
            "cniVersion": version,
            "name": "afxdp-net",
            "type": "afxdp",
            "mode": "primary",
            "deviceID": dev,
            "daemonSocket": str(self.paths.run_dir / "cni.sock"),
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": f"{SUBNET}.0/24", "gateway": f"{SUBNET}.1"}]],
                "routes": [{"dst": "0.0.0.0/0"}],
                "dataDir": str(self.ipam_dir),
            },
        }
        conf.update(extra)
        return conf

    def leases(self) -> set[str]:
        d = self.ipam_dir / "afxdp-net"
        return {p.name for p in d.iterdir() if p.name.startswith(SUBNET)} if d.exists() else set()


async def cni(command: str, conf: dict[str, Any] | bytes | None, *, shim_path: Path,
              netns: str = "", container: str = "ctr1", ifname: str = "net1",
              **env: str) -> tuple[int, Any, str]:  # fmt: skip
    """Run the shim as a runtime would; (exit code, parsed stdout or None, stderr)."""
    full_env = {"CNI_COMMAND": command, "CNI_CONTAINERID": container, "CNI_NETNS": netns,
                "CNI_IFNAME": ifname, "CNI_PATH": CNI_PATH,
                "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAME=pod-a;K8S_POD_NAMESPACE=default", **env}  # fmt: skip
    full_env = {k: v for k, v in full_env.items() if v is not None}
    stdin = conf if isinstance(conf, bytes) else json.dumps(conf or {}).encode()
    done = await anyio.run_process([str(shim_path)], input=stdin, env=full_env, check=False,
                                   stderr=subprocess.PIPE)  # fmt: skip
    out = json.loads(done.stdout) if done.stdout.strip() else None
    return done.returncode, out, done.stderr.decode()


@pytest.fixture
def node(tmp_path: Path, lab: Lab) -> Node:
    devices = []
    for i in range(3):
        a, b = lab.veth(lab.name(f"cn{i}"), lab.name(f"co{i}"))
        ip("link", "set", a, "up")
        ip("link", "set", b, "up")
        devices.append(a)
    return Node(tmp_path, lab, devices)


def pod_link(netns: str, dev: str) -> dict[str, Any] | None:
    done = subprocess.run(
        ["ip", "-n", netns, "-j", "addr", "show", dev], capture_output=True, text=True, check=False
    )
    return json.loads(done.stdout)[0] if done.returncode == 0 else None


def host_has(dev: str) -> bool:
    return (
        subprocess.run(["ip", "link", "show", dev], capture_output=True, check=False).returncode
        == 0
    )


async def test_add_check_del_through_the_shim(node: Node) -> None:
    dev = node.devices[0]
    ns = node.lab.netns("cnpod")
    netns = f"/run/netns/{ns}"
    async with running(node):
        await node.allocate(dev)
        code, result, err = await node.cni("ADD", node.netconf(dev), netns=netns)
        assert code == 0, (result, err)
        (iface,) = result["interfaces"]
        assert (iface["name"], iface["sandbox"]) == (dev, netns)  # keeps its name
        (addr,) = result["ips"]
        assert addr["address"].startswith(f"{SUBNET}.") and addr["gateway"] == f"{SUBNET}.1"
        assert "version" not in addr  # 1.0 shape
        inside = pod_link(ns, dev)
        assert inside is not None and "UP" in inside["flags"]
        assert inside["address"] == iface["mac"]
        assert f"{addr['address'].split('/')[0]}" in [a["local"] for a in inside["addr_info"]]
        assert "default via 10.78.0.1" in ip("route", netns=ns)
        assert not host_has(dev)
        assert await node.states() == {
            dev: "allocated",
            node.devices[1]: "free",
            node.devices[2]: "free",
        }
        assert len(node.leases()) == 1

        check = node.netconf(dev, prevResult=result)
        code, out, err = await node.cni("CHECK", check, netns=netns)
        assert (code, out) == (0, None), err
        ip("addr", "flush", "dev", dev, netns=ns)
        code, out, _ = await node.cni("CHECK", check, netns=netns)
        assert code == 1 and out["code"] == 100 and "lacks address" in out["msg"]

        code, out, err = await node.cni("DEL", node.netconf(dev), netns=netns)
        assert (code, out) == (0, None), err
        assert host_has(dev) and pod_link(ns, dev) is None
        assert node.leases() == set()
        # Back and healthy, but still the pod's: the allocation is kubelet's to end,
        # so its UDS server keeps serving (a runtime may ADD the sandbox again).
        assert (await node.states())[dev] == "allocated"
        assert (node.paths.uds_dir / dev / "afxdp.sock").exists()
        code, out, err = await node.cni("DEL", node.netconf(dev), netns=netns)  # again
        assert (code, out) == (0, None), err


@pytest.mark.parametrize("version", ["0.3.0", "0.3.1", "0.4.0", "1.1.0"])
async def test_results_follow_the_requested_version(node: Node, version: str) -> None:
    dev = node.devices[0]
    ns = node.lab.netns("cnver")
    async with running(node):
        await node.allocate(dev)
        code, result, err = await node.cni(
            "ADD", node.netconf(dev, version), netns=f"/run/netns/{ns}"
        )
        assert code == 0, (result, err)
        assert result["cniVersion"] == version
        (addr,) = result["ips"]
        if version < "1.0.0":
            assert addr["version"] == "4"
        else:
            assert "version" not in addr  # host-local speaks at most 1.0.0: negotiated
        code, _, err = await node.cni("DEL", node.netconf(dev, version), netns=f"/run/netns/{ns}")
        assert code == 0, err


async def test_del_after_the_netns_is_gone(node: Node) -> None:
    dev = node.devices[0]
    ns = node.lab.netns("cngone")
    async with running(node):
        await node.allocate(dev)
        code, _, err = await node.cni("ADD", node.netconf(dev), netns=f"/run/netns/{ns}")
        assert code == 0, err
        ip("netns", "del", ns)  # destroys the veth with it
        code, out, err = await node.cni("DEL", node.netconf(dev), netns=f"/run/netns/{ns}")
        assert (code, out) == (0, None), err
        assert node.leases() == set()
        # The link really is gone (DEL answers before health is read again).
        with anyio.fail_after(10):
            while (await node.states())[dev] != "unhealthy":
                await anyio.sleep(0.02)


async def test_del_while_the_service_is_down_is_queued_and_replayed(node: Node) -> None:
    dev = node.devices[0]
    ns = node.lab.netns("cnq")
    async with running(node):
        await node.allocate(dev)
        code, _, err = await node.cni("ADD", node.netconf(dev), netns=f"/run/netns/{ns}")
        assert code == 0, err
    # afxdpd is down now; its shutdown gave the device's XDP back, not its netns.
    assert pod_link(ns, dev) is not None and len(node.leases()) == 1
    code, out, err = await node.cni("DEL", node.netconf(dev), netns=f"/run/netns/{ns}")
    assert (code, out) == (0, None), err
    queued = list((node.paths.run_dir / "del-queue").glob("*.del"))
    assert len(queued) == 1
    code, out, _ = await node.cni("ADD", node.netconf(dev), netns=f"/run/netns/{ns}")
    assert code == 1 and out["code"] == 11 and "cni.sock" in out["msg"]
    code, out, _ = await node.cni("STATUS", node.netconf(dev))
    assert code == 1 and out["code"] == 50
    code, out, _ = await node.cni("VERSION", {"cniVersion": "1.0.0"})
    assert code == 0 and "1.1.0" in out["supportedVersions"]
    async with running(node):
        assert not queued[0].exists()
        assert host_has(dev) and pod_link(ns, dev) is None
        assert node.leases() == set()


async def test_status_version_and_gc(node: Node) -> None:
    d0, d1, _ = node.devices
    ns0, ns1 = node.lab.netns("cngc0"), node.lab.netns("cngc1")
    async with running(node):
        code, out, _ = await node.cni("STATUS", node.netconf(d0, "1.1.0"))
        assert (code, out) == (0, None)
        code, out, _ = await node.cni("VERSION", {"cniVersion": "1.1.0"})
        assert out == {
            "cniVersion": "1.1.0",
            "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"],
        }
        for dev, ns, ctr in ((d0, ns0, "keep"), (d1, ns1, "stale")):
            await node.allocate(dev)
            code, _, err = await node.cni(
                "ADD", node.netconf(dev), netns=f"/run/netns/{ns}", container=ctr
            )
            assert code == 0, err
        assert len(node.leases()) == 2
        gc = node.netconf("", "1.1.0")
        gc.pop("deviceID")
        gc["cni.dev/valid-attachments"] = [{"containerID": "keep", "ifname": "net1"}]
        code, out, err = await node.cni("GC", gc, container="")
        assert (code, out) == (0, None), err
        assert pod_link(ns0, d0) is not None and pod_link(ns1, d1) is None and host_has(d1)
        assert len(node.leases()) == 1
        assert (await node.states())[d1] == "allocated"  # until kubelet ends it


async def test_bad_requests_get_spec_errors_and_change_nothing(node: Node) -> None:
    dev = node.devices[0]
    ns = node.lab.netns("cnbad")
    netns = f"/run/netns/{ns}"
    async with running(node):
        await node.allocate(dev)
        sock = node.paths.run_dir / "cni.sock"
        cases: list[tuple[dict[str, Any] | bytes, dict[str, str], int, str]] = [
            # The shim still finds the socket in a config that is not JSON.
            (b'{"daemonSocket": "%s", not json' % str(sock).encode(), {}, 6, "not valid JSON"),
            ({**node.netconf(dev), "cniVersion": "0.2.0"}, {}, 1, "incompatible CNI versions"),
            (
                {k: v for k, v in node.netconf(dev).items() if k != "deviceID"},
                {},
                7,
                "deviceID: is required",
            ),
            (node.netconf("bad/dev"), {}, 7, "deviceID: must be"),
            (node.netconf(dev, mode="fast"), {}, 7, "mode: must be primary or cdq"),
            (node.netconf(node.devices[1]), {}, 7, "is not allocated to a pod"),
            (node.netconf("nosuchdev"), {}, 7, "is not a device of any afxdp pool"),
            (
                node.netconf(dev, ipam={"type": "nosuch-ipam"}),
                {},
                7,
                "no IPAM plugin 'nosuch-ipam'",
            ),
            (node.netconf(dev), {"CNI_IFNAME": "bad/name"}, 4, "CNI_IFNAME"),
            (node.netconf(dev), {"CNI_ARGS": "novalue"}, 4, "CNI_ARGS"),
            (node.netconf(dev), {"CNI_CONTAINERID": "-bad"}, 4, "CNI_CONTAINERID"),
            (node.netconf(dev), {"CNI_NETNS": "/run/netns/none-such"}, 3, "does not exist"),
        ]
        for stdin, env, code_want, text in cases:
            code, out, _ = await node.cni("ADD", stdin, netns=env.pop("CNI_NETNS", netns), **env)
            assert (
                code == 1
                and out["code"] == code_want
                and text in out["msg"] + out.get("details", "")
            ), (text, out)
            assert "cniVersion" in out
        code, out, _ = await node.cni("FROB", node.netconf(dev), netns=netns)
        assert out["code"] == 4
        code, out, _ = await node.cni("ADD", node.netconf(dev), netns=netns, CNI_PATH=None)
        assert out["code"] == 4 and "CNI_PATH" in out["msg"]
        injections = ["-K -device- tx off; reboot", "$(reboot)", "`id`", "-K -device- tx off && id",
                      "-K -device- | nc", "-K -device- tx off > /etc/x", "-K\n-device-\ttx\\off", "", "-K 'x'"]  # fmt: skip
        for bad in injections:
            code, out, _ = await node.cni("ADD", node.netconf(dev, ethtoolCmds=[bad]), netns=netns)
            assert code == 1 and out["code"] == 7 and "ethtoolCmds[0]" in out["msg"], (bad, out)
        # Nothing of all that was done.
        assert host_has(dev) and node.leases() == set()


async def test_a_failure_after_ipam_rolls_everything_back(node: Node) -> None:
    dev = node.devices[0]
    ns = node.lab.netns("cnrb")
    async with running(node):
        await node.allocate(dev)
        # veth has no RSS indirection table: this ethtool command fails after IPAM ran.
        conf = node.netconf(dev, ethtoolCmds=["-K -device- tx off", "-X -device- equal 2"])
        code, out, _ = await node.cni("ADD", conf, netns=f"/run/netns/{ns}")
        assert code == 1 and out["code"] == 5 and "ethtool -X" in out["msg"], out
        assert host_has(dev) and pod_link(ns, dev) is None
        assert node.leases() == set()  # the IPAM lease was given back
        # IPAM itself failing: a one-address range, taken by the first ADD.
        other = node.devices[1]
        await node.allocate(other)
        one = [
            [{"subnet": f"{SUBNET}.0/30", "rangeStart": f"{SUBNET}.2", "rangeEnd": f"{SUBNET}.2"}]
        ]
        full = node.netconf(dev)
        full["ipam"]["ranges"] = one
        code, _, err = await node.cni("ADD", full, netns=f"/run/netns/{ns}", container="first")
        assert code == 0, err
        full = node.netconf(other)
        full["ipam"]["ranges"] = one
        code, out, _ = await node.cni("ADD", full, netns=f"/run/netns/{ns}", container="second")
        assert code == 1 and "IPAM host-local" in out["msg"], out
        assert host_has(other) and pod_link(ns, other) is None


async def test_ethtool_commands_run_on_the_device(node: Node) -> None:
    dev = node.devices[0]
    ns = node.lab.netns("cneth")
    async with running(node):
        await node.allocate(dev)
        conf = node.netconf(dev, ethtoolCmds=["-K -device- tx off"])
        code, _, err = await node.cni("ADD", conf, netns=f"/run/netns/{ns}")
        assert code == 0, err
        features = subprocess.run(["ip", "netns", "exec", ns, "ethtool", "-k", dev],
                                  capture_output=True, text=True, check=True).stdout  # fmt: skip
        assert "tx-checksumming: off" in features
        code, _, err = await node.cni("DEL", conf, netns=f"/run/netns/{ns}")
        assert code == 0, err


async def test_adds_for_different_devices_run_concurrently(node: Node) -> None:
    namespaces = [node.lab.netns(f"cc{i}") for i in range(3)]
    async with running(node):
        for dev in node.devices:
            await node.allocate(dev)
        results: dict[str, int] = {}

        async def add(dev: str, ns: str) -> None:
            code, _, _err = await node.cni(
                "ADD", node.netconf(dev), netns=f"/run/netns/{ns}", container=ns
            )
            results[dev] = code

        async with anyio.create_task_group() as tg:
            for dev, ns in zip(node.devices, namespaces, strict=True):
                tg.start_soon(add, dev, ns)
        assert results == dict.fromkeys(node.devices, 0)
        assert len(node.leases()) == 3
        for dev, ns in zip(node.devices, namespaces, strict=True):
            code, _, _ = await node.cni(
                "DEL", node.netconf(dev), netns=f"/run/netns/{ns}", container=ns
            )
            assert code == 0
    assert all(host_has(d) for d in node.devices)


async def test_del_with_skip_unload_bpf_leaves_program_and_allocation_until_reallocated(
    node: Node,
) -> None:
    dev = node.devices[0]
    ns = node.lab.netns("cnskip")
    async with running(node):
        await node.allocate(dev)
        first = libbpf.xdp_query_id(socket.if_nametoindex(dev))
        conf = node.netconf(dev, skipUnloadBpf=True)
        code, _, err = await node.cni("ADD", conf, netns=f"/run/netns/{ns}")
        assert code == 0, err
        code, _, err = await node.cni("DEL", conf, netns=f"/run/netns/{ns}")
        assert code == 0, err
        index = socket.if_nametoindex(dev)  # home again (the ifindex may change on a move)
        assert libbpf.xdp_query_id(index) == first  # left attached
        assert (await node.states())[dev] == "allocated"  # DEL does not end the allocation
        assert node.service is not None
        if node.service.layout == MAP_IN_MAP:
            await node.allocate(dev)  # the device's program for life: the same one
            assert libbpf.xdp_query_id(index) == first
        else:
            await node.allocate(dev)  # ours, so it is replaced, not refused
            assert libbpf.xdp_query_id(index) not in (0, first)
    assert libbpf.xdp_query_id(index) == 0


async def test_runtime_retry_and_a_foreign_del_leave_the_allocation_alone(
    node: Node, tmp_path: Path
) -> None:
    d0 = node.devices[0]
    ns = node.lab.netns("cnrt")
    netns = f"/run/netns/{ns}"
    fake = FakeIpam(tmp_path)
    path = f"{fake.bin}:{CNI_PATH}"
    conf = node.netconf(d0)
    conf["ipam"]["type"] = "fakeipam"
    async with running(node):
        await node.allocate(d0)
        fake.set("fail-ADD")  # the sandbox's first ADD fails; the runtime DELs, ADDs again
        code, out, _ = await node.cni("ADD", conf, netns=netns, CNI_PATH=path)
        assert code == 1 and out["code"] == 11, out
        code, out, err = await node.cni("DEL", conf, netns=netns, CNI_PATH=path)
        assert (code, out) == (0, None), err
        fake.set("fail-ADD", False)
        code, out, err = await node.cni("ADD", conf, netns=netns, CNI_PATH=path)
        assert code == 0, (out, err)
        # Another container's DEL naming d0 does not touch the holder's device or UDS server.
        code, out, err = await node.cni("DEL", conf, netns=netns, CNI_PATH=path, container="other")
        assert (code, out) == (0, None), err
        assert pod_link(ns, d0) is not None and len(node.leases()) == 1
        assert (node.paths.uds_dir / d0 / "afxdp.sock").exists()
        assert (await node.states())[d0] == "allocated"


async def test_an_add_whose_ipam_plugin_is_missing_leaves_nothing_for_del_to_need_it(
    node: Node,
) -> None:
    d0 = node.devices[0]
    ns = node.lab.netns("cnmi")
    netns = f"/run/netns/{ns}"
    missing = node.netconf(d0)
    missing["ipam"]["type"] = "nosuch-ipam"
    async with running(node):
        await node.allocate(d0)
        code, out, _ = await node.cni("ADD", missing, netns=netns)
        assert code == 1 and out["code"] == 7 and "no IPAM plugin 'nosuch-ipam'" in out["msg"]
        # The runtime's DEL with the same netconf, and a repeat, succeed: no step
        # of that ADD needs the plugin to be undone.
        for _ in range(2):
            code, out, err = await node.cni("DEL", missing, netns=netns)
            assert (code, out) == (0, None), err
        # A DEL for a container that never had an attachment, naming the missing plugin.
        code, out, err = await node.cni("DEL", missing, netns=netns, container="never")
        assert (code, out) == (0, None), err
        assert host_has(d0) and pod_link(ns, d0) is None
        # The sandbox's retry, with a plugin that is there, gets the device.
        code, out, err = await node.cni("ADD", node.netconf(d0), netns=netns)
        assert code == 0, (out, err)
        assert pod_link(ns, d0) is not None and len(node.leases()) == 1


def pod_prog_id(netns: str, dev: str) -> int | None:
    link = json.loads(ip("-j", "link", "show", dev, netns=netns))[0]
    prog: int | None = link.get("xdp", {}).get("prog", {}).get("id")
    return prog


async def test_pods_keep_their_device_and_program_across_an_afxdpd_restart(node: Node) -> None:
    d0, d1, _ = node.devices
    ns = node.lab.netns("cnrs")
    async with running(node):
        await node.allocate(d0)
        node.kubelet.hold("pod-0", "afxdp/pool1", d0)  # kubelet lists d0's pod
        code, _, err = await node.cni("ADD", node.netconf(d0), netns=f"/run/netns/{ns}")
        assert code == 0, err
        prog = pod_prog_id(ns, d0)
        assert prog
        await node.allocate(d1)  # no pod holds it (kubelet's word): undone at shutdown
    # afxdpd stopped: the pod still has its device and our program on it.
    assert pod_prog_id(ns, d0) == prog
    assert libbpf.xdp_query_id(socket.if_nametoindex(d1)) == 0
    # A crash would have left a program of ours on a free device: simulate it.
    leftover = XdpAttachment.attach(d1)
    leftover.abandon()
    async with running(node):
        states = await node.states()
        assert states[d0] == "allocated" and states[d1] == "free"
        await node.allocate(d1)  # the leftover program is ours: replaced, not refused
        assert libbpf.xdp_query_id(socket.if_nametoindex(d1)) not in (0, leftover.prog_id)
        code, _, err = await node.cni("DEL", node.netconf(d0), netns=f"/run/netns/{ns}")
        assert code == 0, err
        assert host_has(d0) and (await node.states())[d0] == "allocated"


def test_link_flags_and_mac_are_read_by_ioctl_in_the_callers_netns(lab: Lab) -> None:
    dev, peer = lab.veth(lab.name("lkf"), lab.name("lkg"), mac="02:00:00:ab:cd:ef")
    ip("link", "set", dev, "down")
    assert link.admin_up(dev) is False
    ip("link", "set", dev, "up")
    assert link.admin_up(dev) is True
    assert link.mac(dev) == "02:00:00:ab:cd:ef"
    assert link.mac(dev) == json.loads(ip("-j", "link", "show", dev))[0]["address"]
    # A cut name would be another link's: none; and no link is no link.
    assert link.admin_up(dev + "x" * 16) is None and link.admin_up("nosuchlinkq") is None
    assert link.admin_up(dev + "\0junk") is None  # the kernel would stop at the NUL
    with pytest.raises(LookupError):
        link.mac("nosuchlinkq")
    ns = lab.netns("lkn")
    ip("link", "set", peer, "netns", ns)
    assert link.admin_up(peer) is None  # not in this netns
    where = Path("/run/netns") / ns
    assert run_in(where, link.admin_up, peer) is False


def test_link_setup_applies_ipam_addresses_and_routes_and_answers_the_mac(lab: Lab) -> None:
    ns = lab.netns("lks")
    dev, _ = lab.veth(lab.name("lks"), lab.name("lkt"), netns=ns)
    ip("link", "set", dev, "up", netns=ns)
    ips = [{"address": "10.253.7.2/24", "gateway": "10.253.7.1"}]
    routes = [{"dst": "10.254.0.0/16"}]
    got = run_in(Path("/run/netns") / ns, link.setup, dev, ips, routes)
    assert got == json.loads(ip("-j", "link", "show", dev, netns=ns))[0]["address"]
    addrs = json.loads(ip("-j", "addr", "show", dev, netns=ns))[0]["addr_info"]
    assert [(a["local"], a["prefixlen"]) for a in addrs if a["family"] == "inet"] == [
        ("10.253.7.2", 24)
    ]
    shown = json.loads(ip("-j", "route", "show", "10.254.0.0/16", netns=ns))
    assert [(r["dst"], r.get("gateway")) for r in shown] == [("10.254.0.0/16", "10.253.7.1")]


async def test_a_move_whose_link_up_fails_is_undone_and_the_device_comes_home(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    dev = node.devices[0]
    ns = node.lab.netns("cnup")
    real_move = link.move

    def up_fails(name: str, netns: Path, up: bool = False) -> None:
        real_move(name, netns)  # the kernel moves first ...
        raise NetlinkError(errno.EIO, "the driver could not open it (FAKE)")  # ... then ndo_open

    async with running(node):
        await node.allocate(dev)
        monkeypatch.setattr(link, "move", up_fails)
        code, out, _ = await node.cni("ADD", node.netconf(dev), netns=f"/run/netns/{ns}")
        assert code == 1 and out["code"] == 5, out
        assert host_has(dev) and pod_link(ns, dev) is None  # home again, not left in the pod
        assert node.leases() == set()


def recreate(node: Node, i: int) -> tuple[str, int]:
    """``ip link del`` and ``ip link add`` of device ``i``'s veth pair under the
    same names, as a script or an operator may; (the peer, the new ifindex).
    The kernel takes the device's XDP program with the old link. Blocking, so
    the service sees the events only after it (at the test's next await)."""
    dev, peer = node.devices[i], node.lab.name(f"co{i}")
    old = socket.if_nametoindex(dev)
    ip("link", "del", dev)  # the peer with it
    node.lab.veth(dev, peer)
    new = socket.if_nametoindex(dev)
    assert new != old and libbpf.xdp_query_id(new) == 0
    return peer, new


async def status_of(node: Node, dev: str) -> tuple[Status, AllocationStatus, DeviceStatus]:
    status = await node.call(control.fetch_status, node.paths.run_dir)
    alloc = status.allocation(dev)
    assert alloc is not None
    (device,) = (d for p in status.pools for d in p.devices if d.id == dev)
    return status, alloc, device


@pytest.mark.parametrize("handing", ["uds", "pinned"])
async def test_a_device_re_created_under_its_name_before_add_gets_its_pods_program_back(
    node: Node, handing: str
) -> None:
    """Between Allocate and the ADD, the device's link is deleted and re-created
    under its name: the ADD moves the new link with the pod's own program on it
    (the same program, so the same map), the pod receives through the map it is
    given (handshake or pin), and status says so."""
    dev = node.devices[0]
    if handing == "pinned":
        node.config = pool_config(node.devices, udsServerDisable=True, bpfMapPinningEnable=True)
    pod_ns, peer_ns = node.lab.netns("cnrp"), node.lab.netns("cnrq")
    conf = node.netconf(dev)
    del conf["ipam"]  # the pod app's addresses instead, below
    async with running(node):
        await node.allocate(dev)
        node.kubelet.hold("pod-x", "afxdp/pool1", dev)
        prog = libbpf.xdp_query_id(socket.if_nametoindex(dev))
        peer, _ = recreate(node, 0)
        code, out, err = await node.cni("ADD", conf, netns=f"/run/netns/{pod_ns}")
        assert code == 0, (out, err)
        assert pod_prog_id(pod_ns, dev) == prog
        _, alloc, device = await status_of(node, dev)
        assert (alloc.xdp_prog_id, alloc.xdp_fault, device.state) == (prog, None, "allocated")
        addressing = await anyio.to_thread.run_sync(
            partial(plug, dev, peer, pod_ns, peer_ns, moved=True)
        )
        where = alloc.uds_socket or alloc.pinned_map
        assert where is not None
        app = PodApp(pod_ns, handing, where, "pod-x", dev, str(PORT), str(COUNT), *addressing)
        try:
            done = await run_pod(app, peer_ns)
        finally:
            app.close()
        assert done["xsk"] == COUNT and done["kernel"] == 0, done


async def test_a_re_created_link_gets_its_pods_program_back_as_soon_as_it_appears(
    node: Node,
) -> None:
    dev = node.devices[0]
    async with running(node):
        await node.allocate(dev)
        prog = libbpf.xdp_query_id(socket.if_nametoindex(dev))
        _, new = recreate(node, 0)
        # No ADD: the new link's appearance is enough, and status follows.
        with anyio.fail_after(10):
            while True:
                _, alloc, device = await status_of(node, dev)
                if libbpf.xdp_query_id(new) == prog and device.state == "allocated":
                    break
                await anyio.sleep(0.01)
        assert (alloc.xdp_prog_id, alloc.xdp_fault) == (prog, None)


async def test_an_add_refuses_a_re_created_link_carrying_another_program_and_status_says_so(
    node: Node,
) -> None:
    dev = node.devices[0]
    ns = node.lab.netns("cnrf")
    netns = f"/run/netns/{ns}"
    async with running(node):
        await node.allocate(dev)
        prog = libbpf.xdp_query_id(socket.if_nametoindex(dev))
        _, new = recreate(node, 0)
        foreign = foreign_xdp(dev)
        code, out, err = await node.cni("ADD", node.netconf(dev), netns=netns)
        assert code == 1 and out["code"] == 11, (out, err)
        assert out["msg"] == f"deviceID: {dev} lacks its pod's XDP program"
        assert f"another XDP program (id {foreign}) is attached" in out["details"]
        assert host_has(dev) and pod_link(ns, dev) is None and node.leases() == set()
        assert libbpf.xdp_query_id(new) == foreign  # never replaced
        status, alloc, device = await status_of(node, dev)
        assert alloc.xdp_prog_id == prog and f"(id {foreign})" in str(alloc.xdp_fault)
        assert device.state == "unhealthy"
        assert f"{prog}(detached)" in "\n".join(status_lines(status, wide=True))
        # Once the other program is gone, a retried ADD moves it with the pod's.
        ip("link", "set", "dev", dev, "xdpgeneric", "off")
        code, out, err = await node.cni("ADD", node.netconf(dev), netns=netns)
        assert code == 0, (out, err)
        assert pod_prog_id(ns, dev) == prog
        _, alloc, device = await status_of(node, dev)
        assert (alloc.xdp_fault, device.state) == (None, "allocated")


async def test_a_device_re_created_after_a_restart_gets_the_adopted_program_back(
    node: Node,
) -> None:
    dev = node.devices[0]
    ns = node.lab.netns("cnra")
    async with running(node):
        await node.allocate(dev)
        node.kubelet.hold("pod-0", "afxdp/pool1", dev)
        prog = libbpf.xdp_query_id(socket.if_nametoindex(dev))
    async with running(node):  # adopts the allocation: kubelet lists its pod
        recreate(node, 0)
        code, out, err = await node.cni("ADD", node.netconf(dev), netns=f"/run/netns/{ns}")
        assert code == 0, (out, err)
        assert pod_prog_id(ns, dev) == prog
        _, alloc, _d = await status_of(node, dev)
        assert (alloc.xdp_prog_id, alloc.xdp_fault) == (prog, None)
