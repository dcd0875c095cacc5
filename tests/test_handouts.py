"""What a handout sets up, how it ends, and how it is taken over (handouts.py),
on a FAKE datapath (no privileges needed): the kernel steps in order, the
paths the pod and the server are given, the durable record, the rollback of a
half-done handout (also when Allocate is cancelled), prepared programs and
their locks, and what each failure says."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import pytest

from afxdp import config as cfg
from afxdp import contracts
from afxdp.errors import DeviceError
from afxdp.handouts import Handouts, HostChecker
from afxdp.inventory import NetDev
from afxdp.pools import Pool, PoolDevice
from afxdp.state import Allocation, StateStore
from afxdp.uds.handshake import HostCheck
from afxdp.uds.server import ConnectionBudget
from afxdp.workers import Work, limiter
from tests.fakes import (
    FakeDatapath,
    FakeHandshake,
    FakeProgram,
    FakeSlotDatapath,
    FakeSubfunctions,
)

pytestmark = pytest.mark.anyio
LOGGER = "afxdp.handouts"
DEADLINE = 5.0


class StuckProgram(FakeProgram):
    """FAKE Program whose detach fails (the kernel refuses)."""

    def detach(self) -> None:
        raise DeviceError(f"{self.device}: detach refused (fake)")


class Handshake(FakeHandshake):
    """FAKE UDS server that also keeps whether its close kept the directory,
    and whether its serving task was still running when it was closed."""

    def __init__(self, netdev: str, path: Path, idle_timeout: float | None,
                 log: list[str], kept: dict[str, bool]) -> None:  # fmt: skip
        super().__init__(netdev, path, idle_timeout, log)
        self.kept = kept
        self.serving = False
        self.closed_while_serving = False

    async def serve(self) -> None:
        self.serving = True
        try:
            await super().serve()
        finally:
            self.serving = False

    def close(self, *, keep_dir: bool = False) -> None:
        self.kept[self.netdev] = keep_dir
        self.closed_while_serving |= self.serving
        super().close(keep_dir=keep_dir)


class Recorder(FakeDatapath):
    """FAKE Datapath that also keeps what each UDS server and pin was given;
    ``on_attach`` runs a device's hook in the worker thread before it attaches,
    ``fail_stale`` names devices whose detach_stale raises (in a pod's netns),
    ``fail_detach`` devices whose programs cannot be detached."""

    def __init__(self) -> None:
        super().__init__()
        self.servers: dict[str, dict[str, Any]] = {}
        self.pinned: list[tuple[object, Path, int]] = []
        self.on_attach: dict[str, Callable[[], None]] = {}
        self.fail_stale: set[str] = set()
        self.fail_detach: set[str] = set()
        self.kept_dir: dict[str, bool] = {}  # device -> keep_dir of its server's close
        self.handshakes: dict[str, Handshake] = {}  # device -> its latest server

    def uds_server(self, **kwargs: Any) -> FakeHandshake:
        self.servers[kwargs["netdev"]] = kwargs
        server = Handshake(kwargs["netdev"], kwargs["path"], kwargs["idle_timeout"], self.log,
                           self.kept_dir)  # fmt: skip
        self.handshakes[server.netdev] = server
        return server

    def pin(self, program: Any, path: Path, uid: int) -> None:
        self.pinned.append((program, path, uid))
        super().pin(program, path, uid)

    def attach(self, device: str) -> FakeProgram:
        hook = self.on_attach.pop(device, None)
        if hook is not None:
            hook()
        program = super().attach(device)
        if device in self.fail_detach:
            return StuckProgram(device, program.prog_id, self.log)
        return program

    def detach_stale(self, device: str) -> int | None:
        if device in self.fail_stale:
            raise DeviceError(f"{device}: no such device (fake)")
        return super().detach_stale(device)


class BrokenSubfunctions(FakeSubfunctions):
    """FAKE SecondaryDeviceProvider whose create and/or delete fail."""

    def __init__(self, *, fail_create: bool = False, fail_delete: bool = False) -> None:
        super().__init__()
        self.fail_create, self.fail_delete = fail_create, fail_delete

    def create(self, primary: NetDev, index: int) -> str:
        if self.fail_create:
            raise DeviceError(f"devlink: no room for {self.name(primary, index)} (fake)")
        return super().create(primary, index)

    def delete(self, name: str) -> None:
        if self.fail_delete:
            raise DeviceError(f"devlink: {name} is busy (fake)")
        super().delete(name)


def _pool(*ids: str, **extra: object) -> Pool:
    doc = {"pools": [{"name": "p", "mode": "primary", "devices": [{"name": i} for i in ids],
                      **extra}]}  # fmt: skip
    return Pool(cfg.load_config(json.dumps(doc)).config.pools[0], {i: PoolDevice(i) for i in ids})


def _cdq_pool(*ids: str) -> Pool:
    doc = {"pools": [{"name": "q", "mode": "cdq", "drivers": [{"name": "ice"}]}]}
    config = cfg.load_config(json.dumps(doc)).config.pools[0]
    return Pool(config, {i: PoolDevice(i, parent="ens", index=n) for n, i in enumerate(ids, 1)})


def _netdev(name: str) -> NetDev:
    return NetDev(name=name, ifindex=3, driver="ice", pci="0000:01:00.0")


async def _check(hostname: str, *, resource: str, device: str) -> HostCheck:
    return HostCheck.OK


class Node:
    """A Handouts on FAKE parts, and what a test needs to look at."""

    def __init__(
        self, handouts: Handouts, datapath: Recorder, tmp: Path, links: dict[str, NetDev]
    ) -> None:
        self.handouts, self.datapath, self.tmp = handouts, datapath, tmp
        self.links = links  # the host's netdevs, by name

    def record(self) -> dict[str, Allocation]:
        """The durable record as a restarted afxdpd would read it."""
        return StateStore(self.tmp / "state", self.tmp / "pins").load().allocations


@asynccontextmanager
async def node(
    tmp_path: Path,
    secondary: FakeSubfunctions | None = None,
    budget: ConnectionBudget | None = None,
    check_host: HostChecker = _check,
) -> AsyncIterator[Node]:
    datapath = Recorder()
    links = {"ens": _netdev("ens")}
    async with anyio.create_task_group() as tg:
        handouts = Handouts(task_group=tg, datapath=datapath, uds_dir=tmp_path / "uds",
                            pin_dir=tmp_path / "pins", check_host=check_host,
                            secondary=secondary or FakeSubfunctions(), netdev_of=links.get,
                            uds_budget=budget, store=StateStore(tmp_path / "state"))  # fmt: skip
        yield Node(handouts, datapath, tmp_path, links)
        tg.cancel_scope.cancel()


def _no_memory() -> None:
    """An attach hook: the kernel has no memory for the program."""
    raise OSError(12, "Cannot allocate memory")


def _messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


# -- what a handout sets up --------------------------------------------------


async def test_a_default_handout_serves_a_socket_in_the_directory_the_pod_mounts(
    tmp_path: Path,
) -> None:
    async with node(tmp_path) as n:
        (handout,) = await n.handouts.start(_pool("a", uid=2000, udsTimeout=45), ["a"])
        assert n.datapath.log == ["attach a", "listen a"]
        given = n.datapath.servers["a"]
        # The wire contract: the pod finds <POD_DIR>/<netdev>/<SOCKET_NAME>.
        host_dir = tmp_path / "uds" / "a"
        assert given["path"] == host_dir / contracts.SOCKET_NAME
        assert handout.mounts == [(str(host_dir), str(contracts.POD_DIR / "a"))]
        assert (given["uid"], given["idle_timeout"]) == (2000, 45)
        assert handout.xdp is not None and given["map_fd"] == handout.xdp.map_fd
        assert handout.uds is not None and handout.uds.path == given["path"]
        assert n.handouts.handouts == {"a": handout}


async def test_the_handshake_asks_about_the_pools_resource_and_this_device(
    tmp_path: Path,
) -> None:
    asked: list[tuple[str, str, str]] = []

    async def check(hostname: str, *, resource: str, device: str) -> HostCheck:
        asked.append((hostname, resource, device))
        return HostCheck.OK

    async with node(tmp_path, check_host=check) as n:
        await n.handouts.start(_pool("a", "b"), ["a", "b"])
        assert await n.datapath.servers["b"]["check_host"]("pod-1") is HostCheck.OK
        assert asked == [("pod-1", "afxdp/p", "b")]


async def test_every_server_shares_the_connection_budget_it_is_given(tmp_path: Path) -> None:
    budget = ConnectionBudget(limit=7)
    async with node(tmp_path, budget=budget) as n:
        await n.handouts.start(_pool("a", "b"), ["a", "b"])
        assert n.datapath.servers["a"]["budget"] is budget
        assert n.datapath.servers["b"]["budget"] is budget


async def test_without_a_budget_every_server_shares_one_default_budget(tmp_path: Path) -> None:
    async with node(tmp_path) as n:
        await n.handouts.start(_pool("a", "b"), ["a", "b"])
        budget = n.datapath.servers["a"]["budget"]
        assert isinstance(budget, ConnectionBudget)
        assert n.datapath.servers["b"]["budget"] is budget


async def test_each_uds_connections_outcome_is_told_to_the_services_counter(
    tmp_path: Path,
) -> None:
    outcomes: list[str] = []
    async with node(tmp_path) as n:
        await n.handouts.start(_pool("a"), ["a"])
        assert n.datapath.servers["a"]["count"] is None  # nobody counts yet
        n.handouts.count_uds = outcomes.append
        await n.handouts.start(_pool("b"), ["b"])
        n.datapath.servers["b"]["count"]("accepted")
        assert outcomes == ["accepted"]


async def test_a_pinned_handout_pins_its_own_programs_map_and_mounts_the_pin_directory(
    tmp_path: Path,
) -> None:
    pool = _pool("a", uid=1234, udsServerDisable=True, bpfMapPinningEnable=True)
    async with node(tmp_path) as n:
        (handout,) = await n.handouts.start(pool, ["a"])
        path = tmp_path / "pins" / "p" / "a" / contracts.MAP_NAME
        assert n.datapath.pinned == [(handout.xdp, path, 1234)]
        assert handout.pinned == path and handout.uds is None
        assert handout.mounts == [(str(path.parent), str(contracts.pod_device_dir("a")))]
        assert n.datapath.log == ["attach a", "pin a"] and n.datapath.servers == {}
        assert n.record()["a"].pinned == str(path)


async def test_a_handout_without_a_server_shows_no_connections_in_its_status(
    tmp_path: Path,
) -> None:
    pool = _pool("a", udsServerDisable=True, bpfMapPinningEnable=True)
    async with node(tmp_path) as n:
        (handout,) = await n.handouts.start(pool, ["a"])
        row = handout.status()
        assert (row.uds_connections, row.uds_active, row.uds_refused, row.uds_denied,
                row.uds_failed, row.uds_socket) == (0, 0, 0, 0, 0, None)  # fmt: skip


async def test_a_raw_pool_hands_out_the_netdev_with_nothing_loaded(tmp_path: Path) -> None:
    async with node(tmp_path) as n:
        n.datapath.stale["a"] = 9  # ours, left by a previous run: it goes all the same
        (handout,) = await n.handouts.start(_pool("a", udsServerDisable=True), ["a"])
        assert n.datapath.log == ["detach_stale a"]
        assert (handout.xdp, handout.uds, handout.pinned, handout.mounts) == (None, None, None, [])
        assert n.record()["a"].prog_id is None
        row = handout.status()
        assert (row.xdp_mode, row.xdp_prog_id, row.uds_socket, row.pinned_map) == (
            None, None, None, None)  # fmt: skip


async def test_a_stale_program_of_ours_is_replaced_by_the_fresh_one_in_one_change(
    tmp_path: Path,
) -> None:
    async with node(tmp_path) as n:
        n.datapath.stale["a"] = 5
        (handout,) = await n.handouts.start(_pool("a"), ["a"])
        assert n.datapath.log == ["replace a", "listen a"]  # no detach first
        assert handout.xdp is not None and handout.xdp.prog_id != 5


async def test_a_stale_program_replaced_is_logged_with_its_id(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    async with node(tmp_path) as n:
        n.datapath.stale["a"] = 77
        await n.handouts.start(_pool("a"), ["a"])
        assert _messages(caplog) == ["a: replaced program 77 with a fresh one"]


async def test_the_status_row_of_a_served_handout_shows_its_program_and_server(
    tmp_path: Path,
) -> None:
    async with node(tmp_path) as n:
        (handout,) = await n.handouts.start(_pool("a", udsTimeout=60), ["a"])
        assert handout.xdp is not None and handout.uds is not None
        uds = handout.uds
        uds.connections, uds.active, uds.refused, uds.denied, uds.failed = 6, 1, 2, 3, 4
        row = handout.status()
        assert (row.pool, row.device, row.xdp_mode, row.xdp_prog_id) == (
            "p", "a", "native", handout.xdp.prog_id)  # fmt: skip
        assert row.uds_socket == str(tmp_path / "uds" / "a" / contracts.SOCKET_NAME)
        assert (row.uds_connections, row.uds_active, row.uds_refused, row.uds_denied,
                row.uds_failed, row.uds_idle_timeout) == (6, 1, 2, 3, 4, 60)  # fmt: skip
        assert row.pinned_map is None


async def test_the_status_row_of_a_pinned_handout_shows_its_map(tmp_path: Path) -> None:
    pool = _pool("a", udsServerDisable=True, bpfMapPinningEnable=True)
    async with node(tmp_path) as n:
        (handout,) = await n.handouts.start(pool, ["a"])
        row = handout.status()
        assert row.pinned_map == str(tmp_path / "pins" / "p" / "a" / contracts.MAP_NAME)
        assert handout.xdp is not None
        assert (row.xdp_mode, row.xdp_prog_id) == ("native", handout.xdp.prog_id)
        assert (row.uds_socket, row.uds_idle_timeout) == (None, None)


async def test_the_record_keeps_each_handouts_program_pin_and_host_netdev(
    tmp_path: Path,
) -> None:
    async with node(tmp_path) as n:
        n.links["a"] = _netdev("a")
        (served,) = await n.handouts.start(_pool("a"), ["a"])
        pinned_pool = _pool("b", udsServerDisable=True, bpfMapPinningEnable=True)
        (pinned,) = await n.handouts.start(pinned_pool, ["b"])
        record = n.record()
        assert served.xdp is not None and pinned.xdp is not None
        a, b = record["a"], record["b"]
        assert (a.pool, a.device, a.prog_id, a.pinned, a.secondary) == (
            "p", "a", served.xdp.prog_id, None, False)  # fmt: skip
        assert a.netdev["name"] == "a" and a.netdev["pci"] == "0000:01:00.0"
        assert (b.prog_id, b.pinned) == (pinned.xdp.prog_id, str(pinned.pinned))
        assert b.netdev == {}  # the host did not see it: nothing to keep


# -- cdq secondaries -----------------------------------------------------------


async def test_a_cdq_handout_creates_its_secondary_first_and_deletes_it_last(
    tmp_path: Path,
) -> None:
    subfunctions = FakeSubfunctions()
    async with node(tmp_path, subfunctions) as n:
        (handout,) = await n.handouts.start(_cdq_pool("enssf1"), ["enssf1"])
        assert subfunctions.created == ["enssf1"] and handout.secondary_created
        assert n.record()["enssf1"].secondary is True
        assert await n.handouts.release("enssf1")
        assert subfunctions.deleted == ["enssf1"] and subfunctions.created == []
        assert n.datapath.log == ["attach enssf1", "listen enssf1", "close enssf1",
                                  "detach enssf1"]  # fmt: skip


async def test_a_cdq_handout_whose_primary_is_gone_fails_saying_so(tmp_path: Path) -> None:
    subfunctions = FakeSubfunctions()
    async with node(tmp_path, subfunctions) as n:
        del n.links["ens"]
        with pytest.raises(DeviceError) as err:
            await n.handouts.start(_cdq_pool("enssf1"), ["enssf1"])
        assert str(err.value) == "enssf1: primary ens is gone"
        assert subfunctions.created == [] and n.datapath.log == []
        assert n.handouts.handouts == {} and n.record() == {}


async def test_a_cdq_handout_whose_attach_fails_deletes_the_secondary_it_created(
    tmp_path: Path,
) -> None:
    subfunctions = FakeSubfunctions()
    async with node(tmp_path, subfunctions) as n:
        n.datapath.fail_attach.add("enssf2")
        with pytest.raises(DeviceError) as err:
            await n.handouts.start(_cdq_pool("enssf1", "enssf2"), ["enssf1", "enssf2"])
        assert str(err.value) == "enssf2: enssf2: attach failed (fake)"
        assert subfunctions.created == [] and subfunctions.deleted == ["enssf2", "enssf1"]
        assert n.datapath.log == ["attach enssf1", "listen enssf1", "close enssf1",
                                  "detach enssf1"]  # fmt: skip
        assert n.handouts.handouts == {} and n.record() == {}


async def test_a_secondary_that_cannot_be_created_fails_the_handout_saying_why(
    tmp_path: Path,
) -> None:
    async with node(tmp_path, BrokenSubfunctions(fail_create=True)) as n:
        with pytest.raises(DeviceError) as err:
            await n.handouts.start(_cdq_pool("enssf1"), ["enssf1"])
        assert str(err.value) == "enssf1: devlink: no room for enssf1 (fake)"
        assert n.datapath.log == [] and n.handouts.handouts == {}


async def test_a_secondary_that_cannot_be_deleted_is_logged_and_the_release_completes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with node(tmp_path, BrokenSubfunctions(fail_delete=True)) as n:
        await n.handouts.start(_cdq_pool("enssf1"), ["enssf1"])
        with caplog.at_level(logging.ERROR, logger=LOGGER):
            assert await n.handouts.release("enssf1")
        assert _messages(caplog) == [
            "enssf1: deleting the secondary device failed: devlink: enssf1 is busy (fake)"
        ]
        assert n.datapath.log[-2:] == ["close enssf1", "detach enssf1"]
        assert n.handouts.handouts == {} and n.record() == {}


# -- all or nothing --------------------------------------------------------------


async def test_a_failed_handout_undoes_the_devices_done_in_reverse_order(tmp_path: Path) -> None:
    async with node(tmp_path) as n:
        n.datapath.fail_attach.add("c")
        with pytest.raises(DeviceError) as err:
            await n.handouts.start(_pool("a", "b", "c"), ["a", "b", "c"])
        assert str(err.value) == "c: c: attach failed (fake)"
        assert n.datapath.log == ["attach a", "listen a", "attach b", "listen b",
                                  "close b", "detach b", "close a", "detach a"]  # fmt: skip
        assert n.handouts.handouts == {} and n.record() == {}


async def test_an_os_error_fails_the_handout_as_a_device_error_naming_the_device(
    tmp_path: Path,
) -> None:
    async with node(tmp_path) as n:
        n.datapath.on_attach["b"] = _no_memory
        with pytest.raises(DeviceError) as err:
            await n.handouts.start(_pool("a", "b"), ["a", "b"])
        assert str(err.value) == "b: [Errno 12] Cannot allocate memory"
        assert isinstance(err.value.__cause__, OSError)
        assert n.datapath.log[-2:] == ["close a", "detach a"]


async def test_a_bug_during_a_handout_is_undone_and_raised_as_it_is(tmp_path: Path) -> None:
    async with node(tmp_path) as n:

        def bug() -> None:
            raise RuntimeError("a bug")

        n.datapath.on_attach["b"] = bug
        with pytest.raises(RuntimeError) as err:
            await n.handouts.start(_pool("a", "b"), ["a", "b"])
        assert str(err.value) == "a bug"
        assert n.datapath.log == ["attach a", "listen a", "close a", "detach a"]
        assert n.handouts.handouts == {}


async def test_a_cancelled_handout_still_undoes_what_it_had_done(tmp_path: Path) -> None:
    async with node(tmp_path) as n:
        with anyio.CancelScope() as scope:
            # kubelet gives up on Allocate while the second of three devices is attached
            n.datapath.on_attach["b"] = lambda: anyio.from_thread.run_sync(scope.cancel)
            await n.handouts.start(_pool("a", "b", "c"), ["a", "b", "c"])
        assert scope.cancelled_caught
        assert n.datapath.log == ["attach a", "listen a", "attach b", "listen b",
                                  "close b", "detach b", "close a", "detach a"]  # fmt: skip
        assert n.handouts.handouts == {} and n.record() == {}


# -- how a handout ends ----------------------------------------------------------


async def test_a_cancelled_release_still_detaches_and_forgets_the_allocation(
    tmp_path: Path,
) -> None:
    async with node(tmp_path) as n:
        await n.handouts.start(_pool("a"), ["a"])
        with anyio.CancelScope() as scope:
            scope.cancel()  # e.g. the reconcile that found it was cancelled
            assert await n.handouts.release("a")
        assert n.datapath.log == ["attach a", "listen a", "close a", "detach a"]
        assert n.handouts.handouts == {} and n.record() == {}


async def test_release_says_whether_there_was_a_handout_and_logs_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    async with node(tmp_path) as n:
        (handout,) = await n.handouts.start(_pool("a"), ["a"])
        assert await n.handouts.release("b") is False
        assert await n.handouts.release("a") is True
        assert await n.handouts.release("a") is False  # taken back once only
        assert handout.uds_scope is not None and handout.uds_scope.cancel_called
        assert n.datapath.log == ["attach a", "listen a", "close a", "detach a"]
        assert n.datapath.kept_dir == {"a": False}  # its directory goes with it
        assert _messages(caplog) == ["a: released"]


async def test_a_detach_that_fails_is_logged_and_the_release_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    subfunctions = FakeSubfunctions()
    async with node(tmp_path, subfunctions) as n:
        n.datapath.fail_detach.add("enssf1")
        await n.handouts.start(_cdq_pool("enssf1"), ["enssf1"])
        with caplog.at_level(logging.ERROR, logger=LOGGER):
            assert await n.handouts.release("enssf1")
        assert _messages(caplog) == ["enssf1: detaching XDP failed: enssf1: detach refused (fake)"]
        assert subfunctions.deleted == ["enssf1"] and n.record() == {}


async def test_a_uds_server_is_closed_only_after_its_serving_task_ended(tmp_path: Path) -> None:
    # Closed under the task's wait, the listener's fd number goes to the next
    # socket while that wait still holds it. Released, rolled back, shut down:
    async with node(tmp_path) as n:
        servers = []
        for dev in ("a", "b"):
            (handout,) = await n.handouts.start(_pool(dev), [dev])
            assert isinstance(handout.uds, Handshake)
            servers.append(handout.uds)
        await anyio.sleep(0.01)  # both serving
        assert [s.serving for s in servers] == [True, True]
        assert await n.handouts.release("a")

        n.datapath.on_attach["d"] = _no_memory
        with pytest.raises(DeviceError):
            await n.handouts.start(_pool("c", "d"), ["c", "d"])
        servers.append(n.datapath.handshakes["c"])
        await n.handouts.shutdown()
        assert [s.netdev for s in servers if s.closed_while_serving] == []
        assert [s.serving for s in servers] == [False, False, False]


async def test_an_allocate_once_the_service_ended_is_undone_without_waiting_on_a_server_task(
    tmp_path: Path,
) -> None:
    datapath = Recorder()
    async with anyio.create_task_group() as ended:
        handouts = Handouts(task_group=ended, datapath=datapath, uds_dir=tmp_path / "uds",
                            pin_dir=tmp_path / "pins", check_host=_check,
                            secondary=FakeSubfunctions(), netdev_of=lambda _: None)  # fmt: skip
        await handouts.shutdown()  # as the service does before its task group ends
    with anyio.fail_after(5), pytest.raises(DeviceError) as info:
        await handouts.start(_pool("a"), ["a"])
    assert str(info.value) == "a: afxdpd is stopping"
    assert datapath.log == ["attach a", "detach a"]  # no server was made, no task started
    assert handouts.handouts == {}


async def test_background_work_that_fails_is_logged_and_the_service_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with node(tmp_path) as n:

        async def broken(pool: Pool, dev: PoolDevice, n: int) -> None:
            raise RuntimeError(f"a bug about {dev.id}")

        pool = _pool(*(f"d{i}" for i in range(1000)))
        with caplog.at_level(logging.ERROR, logger=LOGGER):
            n.handouts.spawn(broken, pool, pool.devices["d7"], 3)
            await anyio.sleep(0.01)
        (record,) = [r for r in caplog.records if r.name == LOGGER]
        # Named by the pool's and device's names, not their reprs (a thousand devices).
        assert record.getMessage().endswith(".broken('p', 'd7', 3) failed; the service goes on")
        assert record.exc_info is not None and str(record.exc_info[1]) == "a bug about d7"
        (handout,) = await n.handouts.start(_pool("a"), ["a"])  # its task group lives on
        await anyio.sleep(0.01)
        assert isinstance(handout.uds, Handshake) and handout.uds.serving


async def test_a_stray_cancellation_of_background_work_is_logged_and_the_service_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The soak saw a prefetch's own move_on_after deadline escape it under load;
    # a CancelledError raised by hand is that FAKE stray cancellation.
    went_on = False
    async with node(tmp_path) as n:  # a cancelled group would skip the rest quietly

        async def prefetch(device: str) -> None:
            raise anyio.get_cancelled_exc_class()(f"a stray cancellation about {device}")

        with caplog.at_level(logging.ERROR, logger=LOGGER):
            n.handouts.spawn(prefetch, "a")
            await anyio.sleep(0.01)
        (record,) = [r for r in caplog.records if r.name == LOGGER]
        assert record.getMessage().endswith(
            ".prefetch('a') was cancelled by no scope around it; the service goes on"
        )
        (handout,) = await n.handouts.start(_pool("a"), ["a"])  # its task group lives on
        await anyio.sleep(0.01)
        assert isinstance(handout.uds, Handshake) and handout.uds.serving
        went_on = True
    assert went_on


async def test_spawning_background_work_describes_it_only_when_there_is_something_to_log(
    tmp_path: Path,
) -> None:
    # At start a spawn per device (a thousand), each with the pool: describing
    # every one up front (a Pool's repr lists its devices) took seconds and
    # hundreds of MB.
    class Unshowable:
        def __repr__(self) -> str:
            raise AssertionError("described although nothing was logged")

    done = anyio.Event()

    async def fine(_arg: object) -> None:
        done.set()

    async with node(tmp_path) as n:
        n.handouts.spawn(fine, Unshowable())
        with anyio.fail_after(DEADLINE):
            await done.wait()


async def test_background_work_ends_quietly_when_the_service_stops(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ended = anyio.Event()

    async def forever() -> None:
        try:
            await anyio.sleep_forever()
        finally:
            ended.set()

    with caplog.at_level(logging.ERROR, logger=LOGGER), anyio.fail_after(5):
        async with node(tmp_path) as n:
            n.handouts.spawn(forever)
            await anyio.sleep(0.01)
        # node() cancelled its task group on the way out: the work went with it
    assert ended.is_set() and [r for r in caplog.records if r.name == LOGGER] == []


async def test_a_pinned_handout_is_unpinned_when_it_ends(tmp_path: Path) -> None:
    pool = _pool("a", udsServerDisable=True, bpfMapPinningEnable=True)
    async with node(tmp_path) as n:
        await n.handouts.start(pool, ["a"])
        assert await n.handouts.release("a")
        assert n.datapath.log == ["attach a", "pin a", "unpin a", "detach a"]


async def test_skip_unload_bpf_is_used_by_one_release_only(tmp_path: Path) -> None:
    async with node(tmp_path) as n:
        await n.handouts.start(_pool("a"), ["a"])
        n.handouts.keep_xdp.add("a")
        assert await n.handouts.release("a")
        assert n.datapath.log[-2:] == ["close a", "abandon a"]
        await n.handouts.start(_pool("a"), ["a"])
        assert await n.handouts.release("a")
        assert n.datapath.log[-2:] == ["close a", "detach a"]


# -- prepared programs -------------------------------------------------------------


async def test_allocate_hands_out_the_prepared_program_without_attaching(
    tmp_path: Path,
) -> None:
    async with node(tmp_path) as n:
        pool = _pool("a")
        assert await n.handouts.prepare(pool, pool.devices["a"]) is None
        prepared = n.handouts.prepared["a"]
        (handout,) = await n.handouts.start(pool, ["a"])
        assert handout.xdp is prepared and n.handouts.prepared == {}
        assert n.datapath.log == ["attach a", "listen a"]


async def test_nothing_is_prepared_for_raw_pools_cdq_secondaries_or_allocated_devices(
    tmp_path: Path,
) -> None:
    async with node(tmp_path) as n:
        raw = _pool("r", udsServerDisable=True)
        cdq = _cdq_pool("enssf1")
        taken = _pool("t")
        taken.devices["t"].allocated = True
        for pool, dev in ((raw, "r"), (cdq, "enssf1"), (taken, "t")):
            assert await n.handouts.prepare(pool, pool.devices[dev]) is None
        assert n.handouts.prepared == {} and n.datapath.log == []


async def test_a_device_is_prepared_once(tmp_path: Path) -> None:
    async with node(tmp_path) as n:
        pool = _pool("a")
        await n.handouts.prepare(pool, pool.devices["a"])
        await n.handouts.prepare(pool, pool.devices["a"])
        assert n.datapath.log == ["attach a"]


async def test_a_preparation_that_fails_says_why(tmp_path: Path) -> None:
    async with node(tmp_path) as n:
        pool = _pool("a", "b")
        n.datapath.fail_attach.add("a")
        assert await n.handouts.prepare(pool, pool.devices["a"]) == "a: attach failed (fake)"

        n.datapath.on_attach["b"] = _no_memory
        assert await n.handouts.prepare(pool, pool.devices["b"]) == (
            "[Errno 12] Cannot allocate memory")  # fmt: skip
        assert n.handouts.prepared == {}


async def test_preparing_goes_on_while_every_allocate_thread_is_busy(tmp_path: Path) -> None:
    devices_threads = limiter(Work.DEVICES)
    holders = [object() for _ in range(int(devices_threads.total_tokens))]
    for holder in holders:
        await devices_threads.acquire_on_behalf_of(holder)
    try:
        async with node(tmp_path) as n:
            pool = _pool("a")
            with anyio.fail_after(DEADLINE):
                assert await n.handouts.prepare(pool, pool.devices["a"]) is None
            assert "a" in n.handouts.prepared
    finally:
        for holder in holders:
            devices_threads.release_on_behalf_of(holder)


def _held_attach(n: Node, device: str) -> tuple[anyio.Event, anyio.Event]:
    """``device``'s next attach, held in its worker thread: (entered, go_on)."""
    entered, go_on = anyio.Event(), anyio.Event()

    def slow() -> None:
        anyio.from_thread.run_sync(entered.set)
        anyio.from_thread.run(go_on.wait)

    n.datapath.on_attach[device] = slow
    return entered, go_on


async def test_an_allocate_waits_for_the_devices_preparation_and_hands_out_its_program(
    tmp_path: Path,
) -> None:
    async with node(tmp_path) as n:
        pool = _pool("a")
        entered, go_on = _held_attach(n, "a")
        got: list[object] = []

        async def allocate() -> None:
            (handout,) = await n.handouts.start(pool, ["a"])
            got.append(handout.xdp)

        with anyio.fail_after(DEADLINE):
            async with anyio.create_task_group() as tg:
                tg.start_soon(n.handouts.prepare, pool, pool.devices["a"])
                await entered.wait()
                tg.start_soon(allocate)
                await anyio.wait_all_tasks_blocked()  # Allocate is waiting its turn
                go_on.set()
        assert n.datapath.log == ["attach a", "listen a"]  # one program, handed out
        assert len(got) == 1 and got[0] is not None and n.handouts.prepared == {}


async def test_shutdown_waits_for_a_preparation_under_way_and_detaches_its_program(
    tmp_path: Path,
) -> None:
    async with node(tmp_path) as n:
        pool = _pool("a")
        entered, go_on = _held_attach(n, "a")
        with anyio.fail_after(DEADLINE):
            async with anyio.create_task_group() as tg:
                tg.start_soon(n.handouts.prepare, pool, pool.devices["a"])
                await entered.wait()
                tg.start_soon(n.handouts.shutdown)
                await anyio.wait_all_tasks_blocked()  # shutdown waits for the device
                go_on.set()
        assert n.datapath.log == ["attach a", "detach a"]
        assert n.handouts.prepared == {} and n.handouts.closing


async def test_unprepare_detaches_the_prepared_program_once(tmp_path: Path) -> None:
    async with node(tmp_path) as n:
        pool = _pool("a")
        await n.handouts.prepare(pool, pool.devices["a"])
        await n.handouts.unprepare("a")
        await n.handouts.unprepare("a")  # nothing left: nothing to do
        assert n.datapath.log == ["attach a", "detach a"] and n.handouts.prepared == {}


async def test_a_prepared_program_that_cannot_be_detached_is_logged_and_forgotten(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with node(tmp_path) as n:
        pool = _pool("a")
        n.datapath.fail_detach.add("a")
        await n.handouts.prepare(pool, pool.devices["a"])
        with caplog.at_level(logging.ERROR, logger=LOGGER):
            await n.handouts.unprepare("a")
        assert _messages(caplog) == [
            "a: detaching the prepared program failed: a: detach refused (fake)"
        ]
        assert n.handouts.prepared == {}


async def test_spawned_work_runs_in_the_background_with_its_arguments(tmp_path: Path) -> None:
    done: list[tuple[str, int]] = []

    async def work(name: str, number: int) -> None:
        done.append((name, number))

    async with node(tmp_path) as n:
        n.handouts.spawn(work, "a", 1)
        with anyio.fail_after(DEADLINE):
            while not done:
                await anyio.sleep(0.001)
        assert done == [("a", 1)]


async def test_a_link_gone_takes_its_prepared_program_and_nothing_else(tmp_path: Path) -> None:
    async with node(tmp_path) as n:
        pool = _pool("a", "b")
        await n.handouts.prepare(pool, pool.devices["a"])
        n.handouts.forget_prepared("b")  # never prepared: nothing to forget
        n.handouts.forget_prepared("a")
        assert n.datapath.log == ["attach a", "abandon a"] and n.handouts.prepared == {}


# -- restart: taking over, forgetting, shutting down ---------------------------------


async def test_shutdown_leaves_allocations_in_place_and_detaches_prepared_programs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    async with node(tmp_path) as n:
        pool = _pool("a", "b", "c")
        served = await n.handouts.start(pool, ["c", "a"])
        await n.handouts.prepare(pool, pool.devices["b"])
        n.datapath.log.clear()
        await n.handouts.shutdown()
        assert sorted(n.datapath.log) == ["abandon a", "abandon c", "close a", "close c",
                                          "detach b"]  # fmt: skip
        # Stopped serving, but each pod's directory stays for the next start's socket.
        assert n.datapath.kept_dir == {"a": True, "c": True}
        assert all(h.uds_scope is not None and h.uds_scope.cancel_called for h in served)
        assert _messages(caplog) == ["left 2 allocation(s) in place for the next start: a, c"]
        assert n.handouts.handouts == {} and n.handouts.prepared == {}
        assert sorted(n.record()) == ["a", "c"]  # the next start takes them over
        assert await n.handouts.prepare(pool, pool.devices["b"]) is None
        assert n.handouts.prepared == {}  # closing: nothing more is prepared


async def test_an_adopted_allocation_serves_its_socket_again_and_ends_like_any_other(
    tmp_path: Path,
) -> None:
    subfunctions = FakeSubfunctions()
    subfunctions.created.append("enssf1")  # made by the previous run
    async with node(tmp_path, subfunctions) as n:
        pool = _cdq_pool("enssf1")
        alloc = Allocation(pool="q", device="enssf1", prog_id=41, secondary=True)
        await n.handouts.store.put([alloc])
        handout = await n.handouts.adopt(pool, alloc)
        assert n.datapath.log == ["adopt enssf1", "listen enssf1"]
        assert n.handouts.handouts == {"enssf1": handout}
        row = handout.status()
        assert (row.pool, row.device, row.xdp_prog_id) == ("q", "enssf1", 41)
        assert n.datapath.servers["enssf1"]["path"] == (
            tmp_path / "uds" / "enssf1" / contracts.SOCKET_NAME)  # fmt: skip
        assert handout.mounts == [(str(tmp_path / "uds" / "enssf1"), "/tmp/afxdp_dp/enssf1")]
        assert handout.since == float("-inf")  # old enough for kubelet to be asked now
        assert await n.handouts.release("enssf1")
        assert n.datapath.log[-2:] == ["close enssf1", "detach enssf1"]
        assert subfunctions.deleted == ["enssf1"] and n.record() == {}


async def test_an_adopted_pinned_allocation_mounts_its_pin_directory_and_serves_nothing(
    tmp_path: Path,
) -> None:
    pool = _pool("a", udsServerDisable=True, bpfMapPinningEnable=True)
    pin = tmp_path / "pins" / "p" / "a" / contracts.MAP_NAME
    async with node(tmp_path) as n:
        alloc = Allocation(pool="p", device="a", prog_id=3, pinned=str(pin))
        handout = await n.handouts.adopt(pool, alloc)
        assert handout.pinned == pin and handout.uds is None
        assert handout.mounts == [(str(pin.parent), "/tmp/afxdp_dp/a")]
        assert n.datapath.log == ["adopt a"]
        assert await n.handouts.release("a")
        assert n.datapath.log == ["adopt a", "unpin a", "detach a"]


async def test_an_adopted_raw_allocation_loads_and_serves_nothing(tmp_path: Path) -> None:
    pool = _pool("a", udsServerDisable=True)
    async with node(tmp_path) as n:
        handout = await n.handouts.adopt(pool, Allocation(pool="p", device="a"))
        assert (handout.xdp, handout.uds, handout.mounts) == (None, None, [])
        assert n.datapath.log == [] and "a" in n.handouts.handouts


async def test_adopting_an_allocation_whose_program_is_gone_fails_and_takes_nothing(
    tmp_path: Path,
) -> None:
    async with node(tmp_path) as n:
        n.datapath.gone.add(8)
        with pytest.raises(DeviceError, match="program 8 is gone"):
            await n.handouts.adopt(_pool("a"), Allocation(pool="p", device="a", prog_id=8))
        assert n.handouts.handouts == {} and n.datapath.servers == {}


async def test_forgetting_an_ended_allocation_cleans_up_but_keeps_the_socket_root(
    tmp_path: Path,
) -> None:
    async with node(tmp_path) as n:
        sock = tmp_path / "uds" / "a" / contracts.SOCKET_NAME
        sock.parent.mkdir(parents=True)
        sock.write_text("")
        (tmp_path / "uds" / "b").mkdir()
        alloc = Allocation(pool="p", device="a", prog_id=4)
        await n.handouts.store.put([alloc])
        n.datapath.stale["a"] = 4
        await n.handouts.forget(alloc)
        assert not sock.parent.exists() and (tmp_path / "uds" / "b").is_dir()
        assert n.datapath.log == ["detach_stale a"] and n.record() == {}


async def test_forgetting_a_device_in_a_pods_netns_says_there_was_nothing_to_detach(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    async with node(tmp_path) as n:
        alloc = Allocation(pool="p", device="a", prog_id=4)
        await n.handouts.store.put([alloc])
        n.datapath.fail_stale.add("a")
        await n.handouts.forget(alloc)
        assert _messages(caplog) == ["a: no program to detach: a: no such device (fake)"]
        assert n.record() == {}


async def test_forgetting_a_secondary_that_cannot_be_deleted_says_so_and_forgets_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with node(tmp_path, BrokenSubfunctions(fail_delete=True)) as n:
        pin = tmp_path / "pins" / "q" / "enssf1" / contracts.MAP_NAME
        alloc = Allocation(pool="q", device="enssf1", pinned=str(pin), secondary=True)
        await n.handouts.store.put([alloc])
        with caplog.at_level(logging.ERROR, logger=LOGGER):
            await n.handouts.forget(alloc)
        assert _messages(caplog) == [
            "enssf1: deleting the secondary device failed: devlink: enssf1 is busy (fake)"
        ]
        assert n.datapath.log == ["unpin enssf1"] and n.record() == {}


async def test_a_program_left_for_a_swap_that_never_came_is_detached_at_shutdown(
    tmp_path: Path,
) -> None:
    async with node(tmp_path) as n:
        await n.handouts.start(_pool("a", "b"), ["a", "b"])
        # Both allocations end; a's fresh program is swapped in, b's never is
        # (afxdpd stops first): b must not keep the pod's program for nobody.
        assert await n.handouts.release("a", swap=True)
        assert await n.handouts.release("b", swap=True)
        assert n.datapath.stale.keys() == {"a", "b"}  # left attached for their swaps
        await n.handouts.prepare(_pool("a", "b"), PoolDevice("a"))
        n.datapath.log.clear()
        await n.handouts.shutdown()
        assert n.datapath.log == ["detach a", "detach_stale b"]
        assert n.datapath.stale == {} and n.handouts.swap_pending == set()


async def test_a_release_while_stopping_detaches_at_once(tmp_path: Path) -> None:
    async with node(tmp_path) as n:
        await n.handouts.start(_pool("a"), ["a"])
        n.handouts.closing = True  # nothing will be prepared any more
        assert await n.handouts.release("a", swap=True)
        assert n.datapath.log[-2:] == ["close a", "detach a"]
        assert n.datapath.stale == {} and n.handouts.swap_pending == set()


async def test_a_stale_prepare_never_touches_a_device_a_pod_holds(tmp_path: Path) -> None:
    # A reload gives free devices new PoolDevice objects; a prepare queued with
    # the old one (never marked allocated) runs after an Allocate took the device.
    async with node(tmp_path) as n:
        pool = _pool("a")
        (handout,) = await n.handouts.start(pool, ["a"])
        n.datapath.log.clear()
        assert await n.handouts.prepare(pool, PoolDevice("a")) is None
        n.handouts.swap_pending.add("a")  # whatever the bookkeeping says
        await n.handouts.unprepare("a")
        assert n.datapath.log == [] and n.handouts.prepared == {}
        assert handout.xdp is not None and n.datapath.stale == {}


# -- the map-in-map layout: a pod's map in its device's slot ------------------


@asynccontextmanager
async def slot_node(tmp_path: Path) -> AsyncIterator[tuple[Handouts, FakeSlotDatapath]]:
    datapath = FakeSlotDatapath()
    async with anyio.create_task_group() as tg:
        handouts = Handouts(task_group=tg, datapath=datapath, uds_dir=tmp_path / "uds",
                            pin_dir=tmp_path / "pins", check_host=_check,
                            secondary=FakeSubfunctions(), netdev_of=lambda _: None,
                            store=StateStore(tmp_path / "state"))  # fmt: skip
        yield handouts, datapath
        tg.cancel_scope.cancel()


async def test_map_in_map_allocate_does_not_wait_for_the_slot_but_the_cni_add_does(
    tmp_path: Path,
) -> None:
    async with slot_node(tmp_path) as (handouts, datapath):
        gate = datapath.gates["a"] = threading.Event()  # the kernel's grace period, held
        with anyio.fail_after(DEADLINE):
            await handouts.start(_pool("a"), ["a"])  # returns while the slot is unchanged
        assert datapath.log == ["carry a", "give a", "listen a"]
        added = anyio.Event()

        async def add() -> None:
            await handouts.ensure_attached("a")  # the CNI ADD's step before the move
            added.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(add)
            await anyio.wait_all_tasks_blocked()
            assert not added.is_set()  # the ADD waits for the pod's map to be in the slot
            gate.set()
            with anyio.fail_after(DEADLINE):
                await added.wait()
        assert datapath.log[-1] == "install a"


async def test_map_in_map_release_empties_the_slot_in_order_and_keeps_the_program(
    tmp_path: Path,
) -> None:
    async with slot_node(tmp_path) as (handouts, datapath):
        gate = datapath.gates["a"] = threading.Event()
        pool = _pool("a")
        await handouts.start(pool, ["a"])
        with anyio.fail_after(DEADLINE):
            assert await handouts.release("a", swap=True)  # before the install is done
        gate.set()
        with anyio.fail_after(DEADLINE):
            await handouts.slot_settled("a")
        # The pod's map went in, then out; the device keeps its program, prepared.
        assert datapath.log == ["carry a", "give a", "listen a", "close a", "install a",
                                "take back a"]  # fmt: skip
        assert "a" in handouts.prepared and "a" not in handouts.swap_pending
        await handouts.start(pool, ["a"])  # the next pod: a fresh map, no program change
        await handouts.slot_settled("a")
        assert datapath.log[6:] == ["give a", "listen a", "install a"]


async def test_map_in_map_a_device_that_leaves_loses_its_program_after_its_slot_empties(
    tmp_path: Path,
) -> None:
    async with slot_node(tmp_path) as (handouts, datapath):
        gate = datapath.gates["a"] = threading.Event()
        await handouts.start(_pool("a"), ["a"])
        async with anyio.create_task_group() as tg:
            tg.start_soon(partial(handouts.release, "a", swap=False))
            await anyio.wait_all_tasks_blocked()
            assert "detach a" not in datapath.log  # not before the slot is emptied
            gate.set()
        assert datapath.log[-3:] == ["install a", "take back a", "detach a"]
        assert "a" not in handouts.prepared


async def test_map_in_map_a_slot_that_cannot_take_the_pods_map_fails_the_add_saying_why(
    tmp_path: Path,
) -> None:
    async with slot_node(tmp_path) as (handouts, datapath):
        datapath.fail_install.add("a")
        (handout,) = await handouts.start(_pool("a"), ["a"])
        with anyio.fail_after(DEADLINE), pytest.raises(DeviceError) as failed:
            await handouts.ensure_attached("a")
        assert "not in its device's slot" in str(failed.value)
        assert "refused the update (fake)" in str(failed.value)
        assert handout.status().xdp_fault == handout.slot_fault


async def test_a_pods_slot_left_by_a_map_in_map_run_is_swapped_out_by_a_per_pod_one(
    tmp_path: Path,
) -> None:
    async with slot_node(tmp_path) as (handouts, datapath):
        await handouts.start(_pool("a"), ["a"])
        await handouts.slot_settled("a")
        datapath.layout = "per-pod"  # what a restart forced to per-pod runs with
        assert await handouts.release("a", swap=True)
        await handouts.slot_settled("a")
        # Emptied, and the program left for the per-pod one to replace; never
        # handed out as a per-pod program (its map is a map of maps).
        assert datapath.log[-2:] == ["take back a", "abandon a"]
        assert "a" not in handouts.prepared and "a" in handouts.swap_pending
