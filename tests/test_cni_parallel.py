"""CNI ADD and DEL do side by side what does not depend on each other, on real
links (netns, veth, host-local behind a fake IPAM plugin that can wait for the
device to be seen where the other side of the work puts it).

- ADD runs IPAM while the device moves into the pod; DEL releases the lease
  while the device comes home. The fake IPAM waits until the device is where
  the move puts it: were the two one after the other, it would never see it.
- Any failure still rolls back all of it, whichever side failed.
- DEL answers before telling the device side that the device came home; the
  telling still completes, the record keeps ``home`` until then (so a crash
  in between loses nothing), and the device is not handed on before it.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import anyio
import pytest

from afxdp.cni.attachments import Attachment, AttachmentStore
from afxdp.cni.handler import CniHandler
from tests.kernel import Lab, ip
from tests.test_cni_handler import FakeDeviceSide, Setup, in_host, in_pod

pytestmark = [pytest.mark.anyio, pytest.mark.privileged]


class GatedDeviceSide(FakeDeviceSide):
    """FAKE DeviceSide whose ``came_home`` waits for ``gate``; it notes each
    ``device_allocated`` asked before the first telling finished."""

    def __init__(self, devices: list[str]) -> None:
        super().__init__(devices)
        self.gate = anyio.Event()
        self.asked_while_telling: list[str] = []

    def device_allocated(self, device: str) -> bool | None:
        if not self.came_home_calls:
            self.asked_while_telling.append(device)
        return super().device_allocated(device)

    async def came_home(self, device: str, keep_xdp: bool) -> None:
        await self.gate.wait()
        await super().came_home(device, keep_xdp)


@pytest.fixture
def par(tmp_path: Path, lab: Lab) -> Iterator[Setup]:
    devices = []
    for i in range(2):
        a, b = lab.veth(lab.name(f"pa{i}"), lab.name(f"pp{i}"))
        ip("link", "set", a, "up")
        ip("link", "set", b, "up")
        devices.append(a)
    s = Setup(tmp_path, lab, devices)
    try:
        yield s
    finally:
        s.ipam.release_all()


def records(s: Setup) -> list[dict[str, Any]]:
    """The attachment records as they are on disk."""
    return [asdict(a) for a in AttachmentStore(s.store_path).all()]


async def test_add_runs_ipam_while_the_device_moves_and_del_releases_while_it_comes_home(
    par: Setup,
) -> None:
    dev = par.devices[0]
    ns = par.lab.netns("pmv")
    par.ipam.see("ADD", f"{ns} {dev}")  # ADD's IPAM answers once dev is in the pod
    par.ipam.see("DEL", dev)  # DEL's IPAM answers once dev is home
    conf = par.netconf(dev)
    code, out = await par.call("ADD", conf, netns=f"/run/netns/{ns}")
    assert code == 0, out
    assert in_pod(ns, dev) and len(par.leases()) == 1
    shown = subprocess.run(["ip", "-n", ns, "addr", "show", dev], capture_output=True,
                           text=True, check=True).stdout  # fmt: skip
    assert out["ips"][0]["address"] in shown  # applied after the join
    code, out = await par.call("DEL", conf, netns=f"/run/netns/{ns}")
    assert (code, out) == (0, None)
    assert in_host(dev) and par.leases() == set() and records(par) == []
    assert par.ipam.calls() == ["ADD ctr1", "DEL ctr1"]


async def test_ipam_failing_while_the_device_moved_rolls_everything_back(par: Setup) -> None:
    dev = par.devices[0]
    ns = par.lab.netns("pif")
    par.ipam.see("ADD", f"{ns} {dev}")  # fails only once the move has happened
    par.ipam.set("fail-ADD")
    code, out = await par.call("ADD", par.netconf(dev), netns=f"/run/netns/{ns}")
    assert code == 1 and out["code"] == 11 and "everything was undone" in out["details"], out
    assert in_host(dev) and not in_pod(ns, dev)
    assert par.leases() == set() and records(par) == []
    assert par.side.came_home_calls == [(dev, False)]
    assert par.ipam.calls() == ["ADD ctr1", "DEL ctr1"]  # the lease released all the same


async def test_a_refused_move_while_ipam_ran_releases_the_lease_and_leaves_the_pod_alone(
    par: Setup,
) -> None:
    dev = par.devices[0]
    ns = par.lab.netns("pmf")
    # The pod has a link of the device's name: the kernel refuses the move (EEXIST).
    ip("link", "add", dev, "type", "veth", "peer", "name", "peer0", netns=ns)
    code, out = await par.call("ADD", par.netconf(dev), netns=f"/run/netns/{ns}")
    assert code == 1 and out["code"] == 5 and "everything was undone" in out["msg"], out
    assert par.ipam.calls() == ["ADD ctr1", "DEL ctr1"] and par.leases() == set()
    assert in_host(dev) and in_pod(ns, dev) and in_pod(ns, "peer0")  # the pod's own link stays
    assert records(par) == [] and par.side.came_home_calls == []  # it never left


async def test_del_answers_before_the_device_side_is_told_and_the_telling_completes(
    par: Setup,
) -> None:
    dev = par.devices[0]
    ns_a, ns_b = par.lab.netns("pda"), par.lab.netns("pdb")
    side = GatedDeviceSide(par.devices)
    conf = par.netconf(dev)
    async with anyio.create_task_group() as tg:
        try:
            par.handler = CniHandler(side, AttachmentStore(par.store_path), after=tg)
            code, out = await par.call("ADD", conf, netns=f"/run/netns/{ns_a}", container="a")
            assert code == 0, out
            side.asked_while_telling.clear()  # a's own ADD: no DEL before it
            replies: list[Any] = []

            async def del_a() -> None:  # a task: a DEL waiting for the telling must not hang
                replies.append(await par.call("DEL", conf, netns=f"/run/netns/{ns_a}",
                                              container="a"))  # fmt: skip

            tg.start_soon(del_a)
            with anyio.fail_after(10):
                while not replies:
                    await anyio.sleep(0.01)
            code, out = replies[0]
            assert (code, out) == (0, None)  # answered while came_home waits at its gate
            assert in_host(dev) and par.leases() == set()
            assert side.came_home_calls == []
            assert [r["home"] for r in records(par)] == [True]  # a crash now loses nothing

            added: list[Any] = []

            async def add_b() -> None:
                added.append(await par.call("ADD", conf, netns=f"/run/netns/{ns_b}", container="b"))

            tg.start_soon(add_b)
            with anyio.fail_after(10):
                await anyio.wait_all_tasks_blocked()
            assert side.asked_while_telling == []  # the device is not handed on before the telling
            side.gate.set()
            with anyio.fail_after(10):
                while not added:
                    await anyio.sleep(0.01)
        finally:
            side.gate.set()  # a failure must not leave the (shielded) telling waiting
    assert side.came_home_calls == [(dev, False)] and side.asked_while_telling == []
    assert added[0][0] == 0, added and in_pod(ns_b, dev)
    assert [r["container_id"] for r in records(par)] == ["b"]  # a's record is gone


async def test_a_telling_a_crash_cut_short_is_finished_at_the_next_start(par: Setup) -> None:
    dev = par.devices[0]
    side = GatedDeviceSide(par.devices)
    side.gate.set()
    # What a crash between DEL's reply and the telling leaves: undone, home noted.
    store = AttachmentStore(par.store_path)
    await store.put(Attachment("a", "net1", dev, "/run/netns/gone", "afxdp-net",
                               netconf=par.netconf(dev, skipUnloadBpf=True), complete=False,
                               home=True))  # fmt: skip
    async with anyio.create_task_group() as tg:
        CniHandler(side, AttachmentStore(par.store_path), after=tg)
    assert side.came_home_calls == [(dev, True)] and records(par) == []
