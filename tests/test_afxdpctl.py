"""``afxdpctl``: each subcommand's human and JSON output, derived from its inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from afxdp.cli import afxdpctl
from afxdp.cni import shim
from tests.kernel import Lab, ip
from tests.node import NodeUnderTest as Node
from tests.node import pool_config, running

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

    lines = discover(ns, cfg).splitlines()
    assert lines[0] == "node nodeX: 3 netdev(s)"
    ca0 = next(ln for ln in lines if ln.strip().startswith("ca0 "))
    assert "driver=veth" in ca0 and "mac=02:cc:00:00:00:01" in ca0
    assert "state=up" in ca0 and "ipv4=10.252.0.1/24" in ca0
    assert "pool afxdp/mine [primary]: cb0(free)" in lines


@pytest.fixture
def devices(lab: Lab) -> Iterator[list[str]]:
    a, b = lab.veth(lab.name("ct"), lab.name("cu"))
    c, d = lab.veth(lab.name("cv"), lab.name("cw"))
    for link in (a, b, c, d):
        ip("link", "set", link, "up")
    yield [a, c]


@pytest.mark.privileged
@pytest.mark.anyio
async def test_status_human_and_json_describe_the_running_service(
    tmp_path: Path, lab: Lab, devices: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    d0, d1 = devices
    node = Node(tmp_path, lab, devices, pool_config(devices))
    run_dir = str(node.paths.run_dir)
    async with running(node):
        await node.allocate(d0)
        assert (
            await anyio.to_thread.run_sync(
                afxdpctl.main, ["status", "--run-dir", run_dir, "--json"]
            )
            == 0
        )
        doc = json.loads(capsys.readouterr().out)
        assert await anyio.to_thread.run_sync(afxdpctl.main, ["status", "--run-dir", run_dir]) == 0
        human = capsys.readouterr().out.splitlines()
    assert (doc["node"], doc["ready"]) == ("node1", True)
    (pool,) = doc["pools"]
    assert (pool["resource"], pool["mode"], pool["registered"]) == ("afxdp/pool1", "primary", True)
    assert {d["id"]: d["state"] for d in pool["devices"]} == {d0: "allocated", d1: "free"}
    (alloc,) = doc["allocations"]
    assert (alloc["device"], alloc["pool"], alloc["xdp_mode"]) == (d0, "pool1", "native")
    assert alloc["uds_socket"] == str(node.paths.uds_dir / d0 / "afxdp.sock")

    assert human[0] == "node node1: ready"
    assert human[1].startswith("pool afxdp/pool1 [primary] registered")
    assert human[2].split() == [d0, "allocated", "numa=-"]
    assert human[3].split() == [d1, "free", "numa=-"]
    assert human[4] == (
        f"allocated {d0} (pool1): xdp=native prog={alloc['xdp_prog_id']} "
        f"{alloc['uds_socket']} connections=0"
    )


def test_status_without_a_running_service_says_where_it_looked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert afxdpctl.main(["status", "--run-dir", str(tmp_path)]) == 3
    _, err = capsys.readouterr()
    assert err.startswith(f"afxdpd is not answering on {tmp_path / 'control.sock'}: ")
