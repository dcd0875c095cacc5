"""``afxdpctl``: each subcommand's human and JSON output, derived from its inputs."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
import yaml

from afxdp import __version__, control
from afxdp.cli import afxdpctl
from afxdp.cni import shim
from afxdp.config import MAX_FILE_BYTES
from afxdp.datapath import MAP_IN_MAP
from afxdp.pools import UNKNOWN_HOLDER
from afxdp.status import (
    AllocationStatus,
    ClaimStatus,
    DeviceStatus,
    PodRef,
    PoolStatus,
    Status,
    pod_from_cni_args,
    pods_by_device,
)
from tests.kernel import Lab, ip
from tests.node import NodeUnderTest as Node
from tests.node import pool_config, running
from tests.test_cni import Node as CniNode

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}


def write(path: Path, doc: dict[str, Any]) -> Path:
    path.write_text(json.dumps(doc))
    return path


def test_config_validate_names_the_file_and_every_pool(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    names = ["alpha", "beta7", "gamma"]
    pools: list[dict[str, Any]] = [
        {"name": n, "mode": "primary", "drivers": [{"name": "veth"}]} for n in names
    ]
    pools[1]["udsTimout"] = 30  # a typo: valid, with a warning
    doc = {"pools": pools}
    cfg = write(tmp_path / "node.json", doc)
    assert afxdpctl.main(["config", "validate", str(cfg)]) == 0
    out, err = capsys.readouterr()
    assert out == f"{cfg}: valid; {len(names)} pool(s): {', '.join(names)}\n"
    (warning,) = err.splitlines()
    assert warning.startswith("warning: pools[1].udsTimout: ")
    assert "udsTimeout" in warning  # the suggestion


def test_config_validate_lists_every_error_with_its_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write(tmp_path / "bad.json", {"logLevel": "loud", "pools": [
        {"name": "a-b", "mode": "primary", "drivers": [{"name": "veth"}]}]})  # fmt: skip
    assert afxdpctl.main(["config", "validate", str(cfg)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        f"{cfg}: invalid, 2 error(s):",
        "  logLevel: must be one of debug, info, warning, error, got 'loud'",
        "  pools[0].name: must only contain letters and digits, got 'a-b'",
    ]


def test_config_validate_refuses_what_is_not_a_regular_file_or_too_large_without_waiting(
    tmp_path: Path,
) -> None:
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)  # nobody writes it: opening it to read would wait for ever
    large = tmp_path / "large.json"
    with large.open("wb") as f:
        f.truncate(MAX_FILE_BYTES + 1)  # sparse: no disk used
    cases = {fifo: "is a FIFO, not a regular file; refused",
             tmp_path: "is a directory, not a regular file; refused",
             Path("/dev/null"): "is a character device, not a regular file; refused",
             large: f"is larger than {MAX_FILE_BYTES} bytes; refused"}  # fmt: skip
    for path, why in cases.items():
        done = subprocess.run(
            [sys.executable, "-m", "afxdp.cli.afxdpctl", "config", "validate", str(path)],
            env=ENV, capture_output=True, text=True, timeout=20, check=False,
        )  # fmt: skip
        assert (done.returncode, done.stdout) == (1, ""), done
        assert done.stderr.splitlines() == [f"{path}: invalid, 1 error(s):", f"  {path}: {why}"]


def test_install_cni_copies_the_shim_and_says_where(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bin_dir = tmp_path / "opt" / "cni" / "bin"
    assert afxdpctl.main(["install-cni", str(bin_dir)]) == 0
    dest = bin_dir / "afxdp"
    assert dest.read_bytes() == shim.path().read_bytes()
    assert dest.stat().st_mode & 0o777 == 0o755
    out, _ = capsys.readouterr()
    assert out.startswith(f"installed the afxdp CNI plugin at {dest}")


def discover(netns: str, config: Path, *flags: str) -> str:
    """``afxdpctl discover`` inside ``netns`` (``ip netns exec`` remounts /sys to match)."""
    done = subprocess.run(
        ["ip", "netns", "exec", netns, sys.executable, "-m", "afxdp.cli.afxdpctl", "discover",
         "--config", str(config), "--node-name", "nodeX", *flags],
        capture_output=True, text=True, env=ENV, check=False, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.privileged
def test_discover_human_and_json_show_the_netns_links_and_pools(lab: Lab, tmp_path: Path) -> None:
    ns = lab.netns("afctl")
    lab.veth("ca0", "cb0", netns=ns, mac="02:cc:00:00:00:01")
    ip("addr", "add", "10.252.0.1/24", "dev", "ca0", netns=ns)
    for link in ("ca0", "cb0"):
        ip("link", "set", link, "up", netns=ns)
    cfg = write(tmp_path / "c.json", {"pools": [
        {"name": "mine", "mode": "primary", "devices": [{"name": "cb0"}]}]})  # fmt: skip

    report = json.loads(discover(ns, cfg, "--json"))
    assert report["node"] == "nodeX"
    assert {nd["name"] for nd in report["netdevs"]} == {"lo", "ca0", "cb0"}
    assert [
        (p["resource"], p["mode"], [d["id"] for d in p["devices"]]) for p in report["pools"]
    ] == [("afxdp/mine", "primary", ["cb0"])]

    # -o takes what status's does: json (--json too), yaml, table, wide.
    assert json.loads(discover(ns, cfg, "-o", "json")) == report
    assert yaml.safe_load(discover(ns, cfg, "-o", "yaml")) == report

    node, netdevs, pools = tables(discover(ns, cfg))
    assert node == [["NODE", "NETDEVS", "POOLS", "DEVICES"], ["nodeX", "3", "1", "1"]]
    by_name = {row[0]: dict(zip(netdevs[0], row, strict=True)) for row in netdevs[1:]}
    assert by_name.keys() == {"lo", "ca0", "cb0"}
    assert by_name["ca0"] == {"NETDEV": "ca0", "DRIVER": "veth", "PCI": "<none>",
                              "MAC": "02:cc:00:00:00:01", "STATE": "up",
                              "IPV4": "10.252.0.1/24"}  # fmt: skip
    assert pools == [["POOL", "RESOURCE", "MODE", "DEVICE", "STATE"],
                     ["mine", "afxdp/mine", "primary", "cb0", "free"]]  # fmt: skip

    _node, netdevs, pools = tables(discover(ns, cfg, "-o", "wide"))
    wide = {row[0]: dict(zip(netdevs[0], row, strict=True)) for row in netdevs[1:]}
    assert wide["ca0"].items() >= by_name["ca0"].items()
    assert (wide["ca0"]["KIND"], wide["ca0"]["VIRTUAL"]) == ("veth", "yes")
    assert pools[0][-2:] == ["NUMA", "PARENT"] and pools[1][:5] == ["mine", "afxdp/mine",
                                                                    "primary", "cb0", "free"]  # fmt: skip


@pytest.fixture
def devices(lab: Lab) -> Iterator[list[str]]:
    a, b = lab.veth(lab.name("ct"), lab.name("cu"))
    c, d = lab.veth(lab.name("cv"), lab.name("cw"))
    for link in (a, b, c, d):
        ip("link", "set", link, "up")
    yield [a, c]


async def ctl(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``afxdpctl ARGV`` in-process, off the event loop; (exit code, stdout, stderr)."""
    code = await anyio.to_thread.run_sync(afxdpctl.main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def rows(lines: list[str]) -> list[list[str]]:
    """A kubectl-like table's lines, split into cells (no cell here holds a space)."""
    return [line.split() for line in lines]


def tables(out: str) -> list[list[list[str]]]:
    """``afxdpctl status``'s tables (separated by blank lines), each split into cells."""
    return [rows(block.splitlines()) for block in out.strip().split("\n\n")]


async def registered(node: Node, timeout: float = 10.0) -> None:
    """Until afxdpd says every pool is registered (kubelet's Register returns a
    moment before afxdpd notes it)."""
    with anyio.fail_after(timeout):
        while (await node.call(control.fetch_status, node.paths.run_dir)).unready_reasons():
            await anyio.sleep(0.02)


@pytest.mark.privileged
@pytest.mark.anyio
async def test_status_every_output_describes_the_running_service(
    tmp_path: Path, lab: Lab, devices: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    d0, d1 = devices
    node = Node(tmp_path, lab, devices, pool_config(devices))
    run_dir = str(node.paths.run_dir)
    async with running(node):
        await registered(node)
        await node.allocate(d0)
        # Reads are compared below: d1's program is prepared in the background first.
        assert node.service is not None
        with anyio.fail_after(10):
            while not all(d.prepared for p in node.service.status().pools for d in p.devices
                          if d.state == "free"):  # fmt: skip
                await anyio.sleep(0.01)
        # What the kernel says is on the free d1: the program afxdpd prepared there.
        xdp = json.loads(ip("-j", "-d", "link", "show", d1))[0]["xdp"]
        on_d1 = [{1: "native", 2: "generic"}[xdp["mode"]], str(xdp["prog"]["id"])]
        outputs = {}
        for flags in (["-o", "json"], ["--json"], ["-o", "yaml"], [], ["-o", "wide"]):
            code, out, err = await ctl(capsys, "status", "--run-dir", run_dir, *flags)
            assert (code, err) == (0, ""), (flags, out)  # ready: 0, and nothing on stderr
            outputs[" ".join(flags)] = out

    doc = msgspec.json.decode(outputs["-o json"], type=Status)
    assert (doc.node, doc.ready, doc.unready_reasons()) == ("node1", True, [])
    (pool,) = doc.pools
    assert (pool.resource, pool.mode, pool.registered, pool.label) == (
        "afxdp/pool1", "primary", True, "pool1")  # fmt: skip
    assert {d.id: (d.state, d.health) for d in pool.devices} == {
        d0: ("allocated", "Healthy"),
        d1: ("free", "Healthy"),
    }
    (alloc,) = doc.allocations
    assert (alloc.device, alloc.pool, alloc.xdp_mode) == (d0, "pool1", "native")
    assert alloc.uds_socket == str(node.paths.uds_dir / d0 / "afxdp.sock")
    assert alloc.xdp_prog_id and alloc.uds_connections == 0
    assert doc.queued_dels == 0
    # Both devices carry a counting program in the map-in-map layout only.
    counting = doc.datapath == MAP_IN_MAP
    assert all((d.xdp_frames is not None) == counting for d in pool.devices)

    # --json is -o json; yaml is the same document (counters of the control
    # server itself, and of the XDP programs, move between two reads, so pools
    # without their frames and allocations are compared).
    def still(doc: Status) -> list[PoolStatus]:
        return [
            msgspec.structs.replace(
                p, devices=[msgspec.structs.replace(d, xdp_frames=None) for d in p.devices]
            )
            for p in doc.pools
        ]

    assert still(msgspec.json.decode(outputs["--json"], type=Status)) == still(doc)
    from_yaml = msgspec.yaml.decode(outputs["-o yaml"], type=Status)
    assert (still(from_yaml), from_yaml.allocations) == (still(doc), doc.allocations)

    node_t, pools_t, devices_t = tables(outputs[""])
    assert node_t == [["NODE", "READY", "POOLS", "DEVICES", "ALLOCATED", "QUEUED-DELS",
                       "DATAPATH"], ["node1", "yes", "1", "2", "1", "0", doc.datapath]]  # fmt: skip
    assert pools_t == [["POOL", "RESOURCE", "API", "MODE", "REGISTERED", "DEVICES", "FREE"],
                       ["pool1", "afxdp/pool1", "devicePlugin", "primary", "yes", "2", "1"]]  # fmt: skip
    assert devices_t == [
        ["POOL", "DEVICE", "STATE", "HEALTH", "POD"],
        ["pool1", d0, "allocated", "Healthy", "<none>"],  # no CNI ADD yet: no pod known
        ["pool1", d1, "free", "Healthy", "<none>"],
    ]
    *_, wide = tables(outputs["-o wide"])
    frames = [row.pop() for row in wide]  # read later than the JSON: compared by form
    assert wide == [
        ["POOL", "DEVICE", "STATE", "HEALTH", "POD", "NUMA", "PARENT", "XDP-MODE", "PROG-ID",
         "SOCKET", "CONNECTIONS", "ACTIVE"],
        ["pool1", d0, "allocated", "Healthy", "<none>", "<none>", "<none>", "native",
         str(alloc.xdp_prog_id), str(alloc.uds_socket), "0", "0"],
        ["pool1", d1, "free", "Healthy", "<none>", "<none>", "<none>", *on_d1,
         *["<none>"] * 3],
    ]  # fmt: skip
    cell = r"(0|q\d+=\d+/\d+/\d+(,q\d+=\d+/\d+/\d+)*)" if counting else "<none>"
    assert frames[0] == "FRAMES(R/N/C)" and all(re.fullmatch(cell, f) for f in frames[1:])


@pytest.mark.privileged
@pytest.mark.anyio
async def test_status_names_the_pod_from_the_cni_add(
    tmp_path: Path, lab: Lab, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = lab.veth(lab.name("cp"), lab.name("cq"))
    for link in (a, b):
        ip("link", "set", link, "up")
    node = CniNode(tmp_path, lab, [a])
    netns = f"/run/netns/{lab.netns('ctlpod')}"
    async with running(node):
        await registered(node)
        await node.allocate(a)
        code, result, err = await node.cni("ADD", node.netconf(a), netns=netns,
            CNI_ARGS="IgnoreUnknown=1;K8S_POD_NAMESPACE=team-a;K8S_POD_NAME=rx-0")  # fmt: skip
        assert code == 0, (result, err)
        _, out, _ = await ctl(capsys, "status", "--run-dir", str(node.paths.run_dir), "-o", "json")
        *_, table = tables((await ctl(capsys, "status", "--run-dir",
                                      str(node.paths.run_dir)))[1])  # fmt: skip
        code, _, err = await node.cni("DEL", node.netconf(a), netns=netns)
        assert code == 0, err
    (dev,) = msgspec.json.decode(out, type=Status).pools[0].devices
    assert dev.pod == PodRef(name="rx-0", namespace="team-a")
    assert table[1] == ["pool1", a, "allocated", "Healthy", "team-a/rx-0"]


@pytest.mark.privileged
@pytest.mark.anyio
async def test_status_of_a_service_kubelet_has_not_registered_exits_1_with_the_reason(
    tmp_path: Path, lab: Lab, devices: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    node = Node(tmp_path, lab, devices, pool_config(devices))
    run_dir = str(node.paths.run_dir)
    async with running(node, registration=False):
        code, out, err = await ctl(capsys, "status", "--run-dir", run_dir)
        json_code, json_out, _ = await ctl(capsys, "status", "--run-dir", run_dir, "-o", "json")
    assert code == json_code == 1
    assert err == "not ready: not registered with kubelet: afxdp/pool1\n"
    node_t, pools_t, _ = tables(out)  # the status is printed all the same
    assert node_t[1][:2] == ["node1", "no"]
    assert pools_t[1][:5] == ["pool1", "afxdp/pool1", "devicePlugin", "primary", "no"]
    doc = msgspec.json.decode(json_out, type=Status)
    assert doc.ready and not doc.pools[0].registered


def test_status_without_a_running_service_says_where_it_looked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert afxdpctl.main(["status", "--run-dir", str(tmp_path)]) == 3
    out, err = capsys.readouterr()
    assert out == ""
    assert (
        err
        == f"afxdpd is not answering on {tmp_path / 'control.sock'}: No such file or directory\n"
    )


def test_status_with_a_dead_socket_or_a_stranger_answering_exits_3(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "control.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(path))  # bound, never listening: what a killed afxdpd leaves
        assert afxdpctl.main(["status", "--run-dir", str(tmp_path)]) == 3
    _, err = capsys.readouterr()
    assert err == f"afxdpd is not answering on {path}: Connection refused\n"

    path.unlink()
    assert _status_from_a_stranger(tmp_path, b'{"hello": "world"}') == 3
    _, err = capsys.readouterr()
    assert err.startswith(f"what answered on {path} is not afxdpd's status: ")
    assert "node" in err  # names the missing field


def _status_from_a_stranger(run_dir: Path, answer: bytes) -> int:
    """``afxdpctl status``'s exit code when what listens on the control socket
    answers ``answer``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stranger:
        stranger.bind(str(run_dir / "control.sock"))
        stranger.listen()

        def serve() -> None:
            conn, _ = stranger.accept()
            with conn:
                conn.sendall(answer)

        thread = threading.Thread(target=serve)
        thread.start()
        try:
            return afxdpctl.main(["status", "--run-dir", str(run_dir)])
        finally:
            thread.join(timeout=10)


@pytest.mark.parametrize(
    ("answer", "why"),
    [
        # Deep enough for the decoder to meet the recursion limit (RecursionError).
        (b'{"node": "n", "ready": true, "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
         f"nests deeper than 64 levels (at x{'[0]' * 63}, byte {34 + 63})"),
        (b'{"node": "\xff", "ready": true}', "not UTF-8 (byte 10)"),
    ],
    ids=["too-deep", "not-utf8"],
)  # fmt: skip
def test_status_from_a_stranger_nested_too_deep_or_not_utf8_exits_3_saying_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], answer: bytes, why: str
) -> None:
    assert _status_from_a_stranger(tmp_path, answer) == 3
    _, err = capsys.readouterr()
    path = tmp_path / "control.sock"
    assert err == f"what answered on {path} is not afxdpd's status: {why}\n"


def test_status_document_of_an_older_afxdpd_decodes_and_unknown_fields_are_ignored() -> None:
    older = {  # what afxdpd wrote before status.py: no health, pod, name, queued_dels
        "node": "n", "ready": True, "fd_limit": {"soft": 1024, "hard": 4096},
        "workers": {"disk": {"limit": 4, "busy": 0}},
        "servers": {"control": {"served": 1, "refused": 0, "failed": 0, "accept_errors": 0,
                                "active": 1}},
        "uds_budget": None,
        "pools": [{"resource": "afxdp/p1", "mode": "primary", "registered": False,
                   "registrations": 0, "devices": [{"id": "e0", "state": "free", "numa": 0,
                                                    "parent": None, "fault": None}]}],
        "allocations": [],
        "from_the_future": {"x": 1},
    }  # fmt: skip
    doc = msgspec.json.decode(json.dumps(older), type=Status)
    assert doc.queued_dels is None and doc.pools[0].devices[0].pod is None
    assert doc.pools[0].label == "p1"
    assert doc.unready_reasons() == ["not registered with kubelet: afxdp/p1"]
    assert doc.pools[0].devices[0].health is None
    # a pool a reload removed drains unregistered without making the node unready
    doc.pools[0].draining = True
    assert doc.unready_reasons() == []


def test_status_says_which_devices_wait_for_kubelet_and_which_setup_is_unknown() -> None:
    doc = Status(
        node="n",
        ready=True,
        pools=[PoolStatus(resource="afxdp/p", mode="primary", registered=True, devices=[
            DeviceStatus(id="a", state="allocated", health="Healthy"),
            DeviceStatus(id="b", state="allocated", health="Healthy"),
            DeviceStatus(id="c", state="unknown", health="Unhealthy", fault=UNKNOWN_HOLDER),
        ])],
        allocations=[AllocationStatus(pool="p", device="a", xdp_prog_id=5),
                     AllocationStatus(pool="p", device="b", setup_unknown=True)],
    )  # fmt: skip
    for wide in (False, True):
        rows = [re.split(r"\s{2,}", line) for line in afxdpctl.status_lines(doc, wide=wide)]
        states = {row[1]: row[2] for row in rows if row[0] == "p" and row[1] in "abc"}
        assert states == {"a": "allocated", "b": "allocated, setup unknown", "c": "unknown"}


def test_status_shows_each_pools_api_and_each_prepared_claim() -> None:
    doc = Status(
        node="n",
        ready=True,
        pools=[PoolStatus(resource="afxdp/p", mode="primary", registered=True, api="dra",
                          devices=[DeviceStatus(id="a", state="allocated", health="Healthy",
                                                pod=PodRef("web-0", "ns"))])],
        claims=[ClaimStatus(uid="u1", namespace="ns", name="nic", devices=["p/a"],
                            pods=["ns/web-0"])],
    )  # fmt: skip
    _, pools, devices, claims = (
        [re.split(r"\s{2,}", line) for line in table.splitlines()]
        for table in "\n".join(afxdpctl.status_lines(doc)).split("\n\n")
    )
    assert pools[1][:4] == ["p", "afxdp/p", "dra", "primary"]
    assert devices[1] == ["p", "a", "allocated", "Healthy", "ns/web-0"]
    assert claims == [["CLAIM", "UID", "DEVICES", "PODS"], ["ns/nic", "u1", "p/a", "ns/web-0"]]
    doc.claims = []
    assert len("\n".join(afxdpctl.status_lines(doc)).split("\n\n")) == 3  # no claims table


def test_pod_comes_from_the_cni_args_kubernetes_adds() -> None:
    assert pod_from_cni_args("IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p") == PodRef(
        "p", "ns")  # fmt: skip
    assert str(pod_from_cni_args("K8S_POD_NAME=p;junk")) == "p"
    assert pod_from_cni_args("IgnoreUnknown=1;K8S_POD_NAMESPACE=ns") is None
    assert pods_by_device([("e0", {"CNI_ARGS": "K8S_POD_NAME=a"}), ("e1", {})]) == {
        "e0": PodRef("a")}  # fmt: skip


@pytest.mark.parametrize("command", ["afxdpctl", "afxdpd"])
def test_version_names_the_command_and_the_package_version(command: str) -> None:
    done = subprocess.run([sys.executable, "-m", f"afxdp.cli.{command}", "--version"],
                          capture_output=True, text=True, env=ENV, check=False, timeout=60)  # fmt: skip
    assert (done.returncode, done.stdout, done.stderr) == (0, f"{command} {__version__}\n", "")
