"""cdq pools end to end: the real service hands out secondary devices that the
FAKE subfunction provider makes as real veth pairs (no devlink, no ``ice`` NIC
here), through kubelet's Allocate."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from afxdp import control
from tests.fakes import FakeSubfunctions, peer_of
from tests.kernel import Lab, ip
from tests.node import NodeUnderTest as Node
from tests.node import running

pytestmark = [pytest.mark.privileged, pytest.mark.anyio]


@pytest.fixture
def primary(lab: Lab) -> Iterator[str]:
    a, b = lab.veth(lab.name("cq"), lab.name("cr"))
    ip("link", "set", a, "up")
    ip("link", "set", b, "up")
    yield a


@pytest.fixture
def subfunctions(primary: str) -> Iterator[FakeSubfunctions]:
    provider = FakeSubfunctions(frozenset({"veth"}), capacity=2, links=True)
    yield provider
    for index in (1, 2):  # whatever a failing test left behind
        name = f"{primary}sf{index}"
        subprocess.run(["ip", "link", "del", name], capture_output=True, check=False)


@pytest.fixture
def node(tmp_path: Path, lab: Lab, primary: str) -> Node:
    config = {"pools": [{"name": "pool1", "mode": "cdq",
                         "devices": [{"name": primary, "secondary": 2}]}]}  # fmt: skip
    return Node(tmp_path, lab, [primary], config)


def link_exists(name: str) -> bool:
    return subprocess.run(["ip", "link", "show", name], capture_output=True).returncode == 0


def prog_on(name: str) -> int:
    link = json.loads(ip("-j", "link", "show", name))[0]
    prog_id: int = link.get("xdp", {}).get("prog", {}).get("id", 0)
    return prog_id


async def test_cdq_allocate_creates_the_secondary_and_shutdown_deletes_it(
    node: Node, primary: str, subfunctions: FakeSubfunctions
) -> None:
    sf1, sf2 = f"{primary}sf1", f"{primary}sf2"
    async with running(node, subfunctions):
        status = await node.call(control.read_status, node.paths.run_dir)
        devices = status["pools"][0]["devices"]
        assert [(d["id"], d["parent"], d["state"]) for d in devices] == [
            (sf1, primary, "free"),
            (sf2, primary, "free"),
        ]
        assert not link_exists(sf1)  # advertised, but made only when handed out

        resp = await node.allocate(sf1)
        assert dict(resp.container_responses[0].envs) == {"AFXDP_DEVICES_POOL1": sf1}
        assert subfunctions.created == [sf1]
        # The rest of the handout ran on the secondary itself, not its primary.
        assert link_exists(sf1) and prog_on(sf1) != 0
        assert (node.paths.uds_dir / sf1 / "afxdp.sock").is_socket()
        assert prog_on(primary) == 0
    # Shutdown ends every allocation of a device still on the host.
    assert subfunctions.deleted == [sf1] and subfunctions.created == []
    assert not link_exists(sf1) and not link_exists(peer_of(sf1))


async def test_cdq_reclaimed_secondary_is_deleted_and_handed_out_again(
    node: Node, primary: str, subfunctions: FakeSubfunctions
) -> None:
    sf1 = f"{primary}sf1"
    async with running(node, subfunctions):
        await node.allocate(sf1)
        # No pod holds it: kubelet's next Allocate of sf1 reclaims the missed
        # release (deleting the old secondary) and makes a fresh one.
        resp = await node.allocate(sf1)
        assert dict(resp.container_responses[0].envs) == {"AFXDP_DEVICES_POOL1": sf1}
        assert subfunctions.deleted == [sf1] and subfunctions.created == [sf1]
        assert link_exists(sf1) and prog_on(sf1) != 0


async def test_cdq_allocate_that_fails_deletes_the_secondaries_it_made(
    node: Node, primary: str, subfunctions: FakeSubfunctions
) -> None:
    sf1, sf2 = f"{primary}sf1", f"{primary}sf2"
    # Somebody else's link already has sf2's name, so making sf2 fails.
    ip("link", "add", sf2, "type", "veth", "peer", "name", peer_of(sf2))
    async with running(node, subfunctions):
        with pytest.raises(grpc.RpcError) as err:
            await node.allocate(sf1, sf2)
        assert err.value.code() is grpc.StatusCode.INTERNAL
        assert f"{sf2}: ip link add {sf2}" in err.value.details()
        # sf1 was made, then taken back; the foreign sf2 was not touched.
        assert subfunctions.deleted == [sf1] and subfunctions.created == []
        assert not link_exists(sf1) and not (node.paths.uds_dir / sf1).exists()
        assert link_exists(sf2)
        status = await node.call(control.read_status, node.paths.run_dir)
        states = {d["id"]: d["state"] for d in status["pools"][0]["devices"]}
        # Its netdev going away is not the device going away: sf1 is free again.
        assert states[sf1] == "free" and states[sf2] == "free"
        assert status["allocations"] == []
