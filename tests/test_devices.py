"""The device rules of devices.py, on a FAKE datapath (no privileges needed):
all-or-nothing Allocate, reclaim, reconcile with kubelet, health, shutdown."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest

from afxdp import config as cfg
from afxdp.devices import AllocateFailed, Devices
from afxdp.errors import DeviceError
from afxdp.handouts import Handouts
from afxdp.inventory import NetDev
from afxdp.netwatch import Change, LinkEvent
from afxdp.pools import Pool, PoolDevice
from afxdp.state import Allocation, StateStore
from afxdp.uds.handshake import HostCheck
from tests.fakes import FakeDatapath, FakeProgram, FakeSubfunctions

pytestmark = pytest.mark.anyio


class Kubelet:
    """FAKE kubelet answers: which allocated devices no pod holds."""

    def __init__(self) -> None:
        self.held: set[str] = set()
        self.reachable = True
        self.asked = 0

    async def stale(self, resource: str, devices: Sequence[str]) -> list[str]:
        self.asked += 1
        return [d for d in devices if d not in self.held] if self.reachable else []


def _pool(*ids: str, **extra: object) -> Pool:
    doc = {"pools": [{"name": "p", "mode": "primary", "devices": [{"name": i} for i in ids],
                      **extra}]}  # fmt: skip
    config = cfg.load_config(json.dumps(doc)).config.pools[0]
    return Pool(config, {i: PoolDevice(i) for i in ids})


async def _link(name: str) -> NetDev | None:
    return NetDev(name=name, ifindex=1, driver="veth", oper_state="up", admin_up=True)


async def _scan() -> list[NetDev]:
    return []


async def _check(hostname: str, *, resource: str, device: str) -> HostCheck:
    return HostCheck.OK


@asynccontextmanager
async def node(pool: Pool, tmp_path: Path) -> AsyncIterator[tuple[Devices, FakeDatapath, Kubelet]]:
    datapath, kubelet = FakeDatapath(), Kubelet()
    async with anyio.create_task_group() as tg:
        handouts = Handouts(task_group=tg, datapath=datapath, uds_dir=tmp_path / "uds",
                            pin_dir=tmp_path / "pins", check_host=_check,
                            secondary=FakeSubfunctions(), netdev_of=lambda _: None)  # fmt: skip
        devices = Devices([pool], handouts, find_stale=kubelet.stale, read_link=_link, scan=_scan)
        yield devices, datapath, kubelet
        await handouts.shutdown()
        tg.cancel_scope.cancel()


async def test_an_allocate_that_fails_half_way_undoes_everything(tmp_path: Path) -> None:
    pool = _pool("a", "b")
    async with node(pool, tmp_path) as (devices, datapath, _):
        datapath.fail_attach.add("b")
        with pytest.raises(AllocateFailed, match="b: attach failed"):
            await devices.allocate("p", ["a", "b"])
        assert datapath.log == ["attach a", "listen a", "close a", "detach a"]
        assert [d.state.value for d in pool.devices.values()] == ["free", "free"]
        assert devices.handouts.handouts == {}


async def test_refused_devices_are_each_named_and_nothing_is_set_up(tmp_path: Path) -> None:
    pool = _pool("a", "b", "c")
    async with node(pool, tmp_path) as (devices, datapath, kubelet):
        await devices.allocate("p", ["a"])
        kubelet.held.add("a")
        pool.devices["b"].healthy = False
        with pytest.raises(DeviceError) as err:
            await devices.allocate("p", ["a", "b", "x"])
        assert str(err.value) == "a: allocated; b: unhealthy; x: unknown device in pool p"
        assert datapath.log == ["attach a", "listen a"]


async def test_a_device_kubelet_no_longer_lists_is_reclaimed_at_allocate(tmp_path: Path) -> None:
    pool = _pool("a")
    async with node(pool, tmp_path) as (devices, datapath, kubelet):
        first = await devices.allocate("p", ["a"])
        second = await devices.allocate("p", ["a"])  # kubelet holds nothing: a was left over
        assert first[0] is not second[0]
        # The old pod's program is left for the fresh one to take its place: one
        # kernel change (one RCU grace period), not a detach and an attach.
        assert datapath.log == ["attach a", "listen a", "close a", "abandon a", "replace a",
                                "listen a"]  # fmt: skip
        assert first[0].xdp is not None and second[0].xdp is not None
        assert second[0].xdp.replaced == first[0].xdp.prog_id
        kubelet.held.add("a")
        with pytest.raises(DeviceError, match="a: allocated"):
            await devices.allocate("p", ["a"])


async def test_reconcile_ends_only_old_allocations_no_pod_holds(tmp_path: Path) -> None:
    pool = _pool("a", "b")
    async with node(pool, tmp_path) as (devices, _datapath, kubelet):
        await devices.allocate("p", ["a", "b"])
        assert await devices.reconcile() == []  # younger than the grace period
        assert kubelet.asked == 0
        kubelet.held.add("b")
        assert await devices.reconcile(grace=0.0) == ["a"]
        assert pool.devices["a"].state.value == "free"
        assert pool.devices["b"].state.value == "allocated"
        kubelet.reachable = False
        kubelet.held.clear()
        assert await devices.reconcile(grace=0.0) == []  # kubelet cannot say: keep it


async def test_a_dra_pools_allocation_is_its_claims_whatever_podresources_says(
    tmp_path: Path,
) -> None:
    """Kubelet's PodResources lists no device-plugin pod for a claim's device:
    neither reconcile, nor shutdown, nor another allocate of it ends the claim's."""
    pool = _pool("a", api="dra")
    async with node(pool, tmp_path) as (devices, _datapath, kubelet):
        await devices.allocate("p", ["a"])
        assert await devices.reconcile(grace=0.0) == []
        with pytest.raises(DeviceError, match="a: allocated"):
            await devices.allocate("p", ["a"])
        assert kubelet.asked == 0
        assert pool.devices["a"].state.value == "allocated"
        assert await devices.release("a")  # its Unprepare
        assert pool.devices["a"].state.value == "free"


async def test_skip_unload_bpf_from_a_del_keeps_the_program_when_the_allocation_ends(
    tmp_path: Path,
) -> None:
    pool = _pool("a", "b")
    async with node(pool, tmp_path) as (devices, datapath, _):
        await devices.allocate("p", ["a", "b"])
        await devices.came_home("a", keep_xdp=True)
        await devices.came_home("b", keep_xdp=False)
        assert await devices.reconcile(grace=0.0) == ["a", "b"]
        assert "abandon a" in datapath.log and "detach a" not in datapath.log
        # b's goes too, but only as a fresh program takes its place (prepare).
        await until(lambda: {"a", "b"} <= set(devices.handouts.prepared))
        assert "detach b" not in datapath.log and "replace b" in datapath.log


async def test_a_del_brings_the_device_home_but_not_the_allocation_to_an_end(
    tmp_path: Path,
) -> None:
    pool = _pool("a")
    async with node(pool, tmp_path) as (devices, datapath, _):
        await devices.allocate("p", ["a"])
        pool.devices["a"].healthy = False  # its link was in the pod
        await devices.came_home("a", keep_xdp=False)
        assert pool.devices["a"].state.value == "allocated"  # healthy again, still allocated
        assert "close a" not in datapath.log


async def test_link_events_of_an_allocated_device_count_only_when_it_is_destroyed(
    tmp_path: Path,
) -> None:
    pool = _pool("a", "b")
    async with node(pool, tmp_path) as (devices, _, _k):
        await devices.allocate("p", ["a"])
        version = devices.changes["p"].version
        devices.on_link(LinkEvent("a", Change.DOWN))  # the CNI moving it into its pod
        assert pool.devices["a"].healthy and devices.changes["p"].version == version
        devices.on_link(LinkEvent("b", Change.DOWN))
        assert not pool.devices["b"].healthy and devices.changes["p"].version == version + 1
        devices.on_link(LinkEvent("a", Change.REMOVED))
        assert not pool.devices["a"].healthy


async def test_shutdown_keeps_what_kubelet_lists_and_ends_the_rest(tmp_path: Path) -> None:
    pool = _pool("a", "b")
    async with node(pool, tmp_path) as (devices, datapath, kubelet):
        await devices.allocate("p", ["a", "b"])
        kubelet.held.add("a")
        datapath.log.clear()
        await devices.shutdown()
    # a keeps its program (the pod keeps receiving); b's allocation is over.
    assert sorted(datapath.log) == ["abandon a", "close a", "close b", "detach b"]
    assert devices.handouts.handouts == {}


async def test_a_restart_takes_over_what_kubelet_lists_and_cleans_up_the_rest(
    tmp_path: Path,
) -> None:
    pool = _pool("a", "b", "c")
    async with node(pool, tmp_path) as (devices, datapath, kubelet):
        devices.handouts.store = StateStore(tmp_path / "state")
        await devices.allocate("p", ["a", "b", "c"])
        kubelet.held.update({"a", "b"})
        kubelet.reachable = False  # a crash: nothing is reconciled on the way out
        await devices.handouts.shutdown()
    record = StateStore(tmp_path / "state").load()
    assert sorted(record.allocations) == ["a", "b", "c"]
    prog_b = record.allocations["b"].prog_id
    assert prog_b is not None

    fresh = _pool("a", "b", "c")
    async with node(fresh, tmp_path) as (devices, datapath, _):
        store = devices.handouts.store = StateStore(tmp_path / "state")
        record = store.load()
        datapath.gone.add(prog_b)  # b's program did not survive (say, a reboot)
        datapath.stale.update({"b": prog_b, "c": 3})
        kept = await devices.restore(record, {"afxdp/p": {"a", "b"}})
        assert kept == ["a", "b"]
        assert [d.state.value for d in fresh.devices.values()] == [
            "allocated", "allocated", "free"
        ]  # fmt: skip
        # a: its program adopted and its socket served again; b: a pod holds it
        # (kubelet), its program gone: kept, its setup unknown; c cleaned up.
        assert datapath.log == ["adopt a", "listen a", "detach_stale c"]
        assert devices.handouts.handouts["b"].setup_unknown
        assert sorted(StateStore(tmp_path / "state").load().allocations) == ["a", "b"]
    # kubelet not reachable at start: the record's view is kept.
    again = _pool("a", "b", "c")
    async with node(again, tmp_path) as (devices, datapath, _):
        store = devices.handouts.store = StateStore(tmp_path / "state")
        kept = await devices.restore(store.load(), None)
        assert kept == ["a", "b"] and again.devices["a"].allocated
        assert datapath.log == ["adopt a", "listen a"]


async def test_a_stale_program_of_ours_is_replaced_at_allocate(tmp_path: Path) -> None:
    pool = _pool("a")
    async with node(pool, tmp_path) as (devices, datapath, _):
        datapath.stale["a"] = 7
        [handout] = await devices.allocate("p", ["a"])
        assert datapath.log[:2] == ["replace a", "listen a"]
        assert handout.xdp is not None and handout.xdp.replaced == 7


async def test_pinned_pools_mount_the_device_directory_and_serve_no_socket(tmp_path: Path) -> None:
    pool = _pool("a", udsServerDisable=True, bpfMapPinningEnable=True)
    async with node(pool, tmp_path) as (devices, datapath, _):
        [handout] = await devices.allocate("p", ["a"])
        assert handout.mounts == [(str(tmp_path / "pins" / "p" / "a"), "/tmp/afxdp_dp/a")]
        assert datapath.log == ["attach a", "pin a"]


async def test_reconcile_never_ends_an_allocation_an_allocate_is_making(tmp_path: Path) -> None:
    pool = _pool("a")
    async with node(pool, tmp_path) as (devices, datapath, kubelet):
        await devices.allocate("p", ["a"])  # an old pod's, which kubelet forgot
        entered, go_on = anyio.Event(), anyio.Event()
        real_attach = datapath.attach

        def slow_attach(device: str) -> FakeProgram:
            anyio.from_thread.run_sync(entered.set)
            anyio.from_thread.run(go_on.wait)
            return real_attach(device)

        datapath.attach = slow_attach  # type: ignore[method-assign]  # a fake, slowed
        async with anyio.create_task_group() as tg:
            tg.start_soon(devices.allocate, "p", ["a"])  # reclaims a, then sets it up
            await entered.wait()
            tg.start_soon(devices.reconcile)  # kubelet does not list the new pod yet
            await anyio.sleep(0.05)
            go_on.set()
        kubelet.held.add("a")  # kubelet lists the new pod once Allocate answered
        assert pool.devices["a"].state.value == "allocated"
        assert "a" in devices.handouts.handouts


async def until(cond: Callable[[], object], deadline: float = 5.0) -> None:
    """Wait, with a deadline, for background work (preparing devices) to show."""
    with anyio.fail_after(deadline):
        while not cond():
            await anyio.sleep(0.005)


async def test_free_devices_carry_a_prepared_program_that_allocate_hands_out(
    tmp_path: Path,
) -> None:
    pool = _pool("a", "b")
    async with node(pool, tmp_path) as (devices, datapath, _kubelet):
        devices.prepare_all()
        await until(lambda: sorted(devices.handouts.prepared) == ["a", "b"])
        prepared = devices.handouts.prepared["a"]
        datapath.log.clear()
        [handout] = await devices.allocate("p", ["a"])
        assert handout.xdp is prepared
        assert datapath.log == ["listen a"]  # no attach on Allocate's path
        # The allocation ends: the next pod gets a fresh program, never this map.
        assert await devices.reconcile(grace=0.0) == ["a"]
        await until(lambda: "a" in devices.handouts.prepared)
        fresh = devices.handouts.prepared["a"]
        assert fresh is not prepared and fresh.prog_id != prepared.prog_id
        assert fresh.replaced == prepared.prog_id  # swapped in for the pod's


async def test_a_device_whose_program_cannot_be_prepared_is_unhealthy_until_it_can(
    tmp_path: Path,
) -> None:
    pool = _pool("a")
    async with node(pool, tmp_path) as (devices, datapath, _):
        datapath.fail_attach.add("a")
        devices.prepare_all()
        dev = pool.devices["a"]
        await until(lambda: dev.fault is not None)
        assert dev.state.value == "unhealthy" and "attach failed" in str(dev.fault)
        with pytest.raises(DeviceError, match="a: unhealthy"):
            await devices.allocate("p", ["a"])
        datapath.fail_attach.clear()
        devices.on_link(LinkEvent("a", Change.UP))  # e.g. the link comes back
        await until(lambda: dev.fault is None)
        assert dev.fault is None and dev.state.value == "free"


async def test_a_removed_link_takes_its_prepared_program_with_it(tmp_path: Path) -> None:
    pool = _pool("a")
    async with node(pool, tmp_path) as (devices, datapath, _):
        devices.prepare_all()
        await until(lambda: "a" in devices.handouts.prepared)
        devices.on_link(LinkEvent("a", Change.REMOVED))
        assert "a" not in devices.handouts.prepared
        assert "abandon a" in datapath.log


async def test_a_link_re_created_under_an_allocated_devices_name_gets_the_pods_program_back(
    tmp_path: Path,
) -> None:
    pool = _pool("a")
    async with node(pool, tmp_path) as (devices, datapath, _):
        (handout,) = await devices.allocate("p", ["a"])
        program = handout.xdp
        assert isinstance(program, FakeProgram)
        program.ifindex = 5
        devices.on_link(LinkEvent("a", Change.REMOVED, 4))  # an old link of that name
        assert pool.devices["a"].healthy and handout.xdp_fault is None
        program.off = True
        devices.on_link(LinkEvent("a", Change.REMOVED, 5))  # its own: the program went with it
        assert not pool.devices["a"].healthy
        assert handout.status().xdp_fault == "its link was deleted"
        version = devices.changes["p"].version
        devices.on_link(LinkEvent("a", Change.DOWN, 6))  # a new link of its name
        await until(lambda: handout.xdp_fault is None)
        assert "again a" in datapath.log
        assert pool.devices["a"].state.value == "allocated"
        assert devices.changes["p"].version > version  # kubelet hears it is healthy again


async def test_a_re_created_link_that_cannot_get_the_pods_program_stays_unhealthy_saying_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pool = _pool("a")
    async with node(pool, tmp_path) as (devices, _datapath, _):
        (handout,) = await devices.allocate("p", ["a"])
        program = handout.xdp
        assert isinstance(program, FakeProgram)
        program.ifindex, program.refused = 5, "another XDP program (id 7) is attached"
        program.off = True
        devices.on_link(LinkEvent("a", Change.REMOVED, 5))
        devices.on_link(LinkEvent("a", Change.UP, 6))
        await until(lambda: "id 7" in str(handout.xdp_fault))
        assert not pool.devices["a"].healthy
        assert "a: the pod's XDP program is not on its link" in caplog.text
        with pytest.raises(DeviceError, match=r"cannot go back on it: a: another XDP program"):
            await devices.ensure_program("a")  # what the CNI ADD asks before the move
        program.refused = None
        await devices.ensure_program("a")
        assert handout.xdp_fault is None and pool.devices["a"].state.value == "allocated"


class StuckDisk(StateStore):
    """FAKE StateStore whose first write never finishes (a hung disk), until the
    test lets writes through."""

    def __init__(self) -> None:
        super().__init__(None)
        self.entered = anyio.Event()

    async def put(self, allocations: list[Allocation]) -> None:
        if not self.entered.is_set():
            self.entered.set()
            await anyio.sleep_forever()
        await super().put(allocations)


async def test_an_allocate_cancelled_while_it_is_recorded_leaves_nothing_handed_out(
    tmp_path: Path,
) -> None:
    pool = _pool("a", "b")
    async with node(pool, tmp_path) as (devices, datapath, _):
        disk = devices.handouts.store = StuckDisk()

        async def kubelet_gives_up() -> None:
            await disk.entered.wait()
            scope.cancel()

        with anyio.fail_after(5), anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(kubelet_gives_up)
                await devices.allocate("p", ["a", "b"])
        assert scope.cancelled_caught
        assert datapath.log == ["attach a", "listen a", "attach b", "listen b",
                                "close b", "detach b", "close a", "detach a"]  # fmt: skip
        assert devices.handouts.handouts == {} and disk.record.allocations == {}
        assert [d.state.value for d in pool.devices.values()] == ["free", "free"]
