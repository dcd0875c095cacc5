"""Device state as ``Devices`` keeps it, on a FAKE datapath (no privileges needed):
the durable record taken over at a restart, config reloads (pools added, changed,
removed and left to drain), health from links, listeners woken on change, and
the messages that say why.

Background work (preparing programs) is waited for with ``Node.settle``, never
with a sleep: the handouts count what they spawned that is still running.
"""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from grpclib import GRPCError, Status

from afxdp import config as cfg
from afxdp.bpf import pinning
from afxdp.deviceplugin.plugin import PoolPlugin
from afxdp.devices import AllocateFailed, Devices
from afxdp.errors import DeviceError
from afxdp.handouts import Handouts
from afxdp.inventory import NetDev
from afxdp.netwatch import Change, LinkEvent
from afxdp.pools import UNKNOWN_HOLDER, Pool, PoolDevice, assemble
from afxdp.sockfile import file_id
from afxdp.state import Allocation, Record, StateStore
from afxdp.uds.server import socket_path
from tests.fakes import FakeDatapath, FakeProgram, FakeSubfunctions
from tests.test_devices import Kubelet, _check, _pool, node

pytestmark = pytest.mark.anyio

LOGGER = "afxdp.devices"


def _named(name: str, *ids: str, **extra: object) -> Pool:
    """A primary pool called ``name`` with devices ``ids`` (``_pool`` makes "p")."""
    doc = {"pools": [{"name": name, "mode": "primary", "devices": [{"name": i} for i in ids],
                      **extra}]}  # fmt: skip
    config = cfg.load_config(json.dumps(doc)).config.pools[0]
    return Pool(config, {i: PoolDevice(i) for i in ids})


def _netdev(name: str, *, up: bool = True, driver: str = "veth", ifindex: int = 1) -> NetDev:
    return NetDev(name=name, ifindex=ifindex, driver=driver, oper_state="up" if up else "down",
                  admin_up=up)  # fmt: skip


class Links:
    """FAKE host links, by name: up, down (present, not usable) or absent (gone,
    or in a pod's netns). What ``read_link`` and ``scan`` see."""

    def __init__(self, *up: str) -> None:
        self.up: dict[str, bool] = dict.fromkeys(up, True)
        self.index: dict[str, int] = {}  # a link's ifindex, by name (1 when not said)

    def get(self, name: str) -> NetDev | None:
        state = self.up.get(name)
        return None if state is None else _netdev(name, up=state, ifindex=self.index.get(name, 1))

    async def read(self, name: str) -> NetDev | None:
        return self.get(name)

    async def scan(self) -> list[NetDev]:
        return [nd for n in self.up if (nd := self.get(n)) is not None]


class AskedKubelet(Kubelet):
    """FAKE kubelet that also records what it was asked (resource, devices), and
    fails on demand (``broken``)."""

    def __init__(self) -> None:
        super().__init__()
        self.questions: list[tuple[str, list[str]]] = []
        self.broken = False

    async def stale(self, resource: str, devices: Sequence[str]) -> list[str]:
        if self.broken:
            raise RuntimeError("kubelet answered garbage (fake)")
        self.questions.append((resource, list(devices)))
        return await super().stale(resource, devices)


class FakeHolders:
    """FAKE Holders (the PodResources cache): records prefetches, forgets and attaches."""

    def __init__(self) -> None:
        self.prefetched: list[tuple[str, str]] = []
        self.forgotten: list[str] = []
        self.attached_to: list[tuple[str, str, str]] = []

    async def prefetch(self, resource: str, device: str) -> None:
        self.prefetched.append((resource, device))

    def forget(self, device: str) -> None:
        self.forgotten.append(device)

    def attached(self, resource: str, device: str, pod: str) -> None:
        self.attached_to.append((resource, device, pod))


class CountingHandouts(Handouts):
    """Handouts that count the background work started with ``spawn`` (all of
    ``Devices``' own: preparing, unpreparing, prefetching holders), so a test can
    wait until it is done. Everything still runs as it does in the service."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.running = 0

    def spawn(self, fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> None:
        self.running += 1

        async def counted() -> None:
            try:
                await fn(*args)
            finally:
                self.running -= 1

        super().spawn(counted)


@dataclass
class Node:
    devices: Devices
    datapath: FakeDatapath
    kubelet: AskedKubelet
    links: Links
    holders: FakeHolders
    secondary: FakeSubfunctions
    handouts: CountingHandouts

    async def settle(self) -> None:
        """Wait, with a deadline, until the background work caused so far is done."""
        with anyio.fail_after(5):
            while self.handouts.running:
                await anyio.sleep(0.001)

    def version(self, pool: str) -> int:
        return self.devices.changes[pool].version


@asynccontextmanager
async def running(
    *pools: Pool,
    tmp_path: Path,
    links: Links | None = None,
    inventory: Sequence[NetDev] = (),
    netdevs: dict[str, NetDev] | None = None,
) -> AsyncIterator[Node]:
    """A node's devices on the FAKE datapath, with every FAKE collaborator at hand."""
    datapath, kubelet, holders = FakeDatapath(), AskedKubelet(), FakeHolders()
    links = links or Links(*(d.parent or d.id for p in pools for d in p.devices.values()))
    secondary = FakeSubfunctions()
    known = {nd.name: nd for nd in inventory}
    async with anyio.create_task_group() as tg:
        handouts = CountingHandouts(task_group=tg, datapath=datapath, uds_dir=tmp_path / "uds",
                                    pin_dir=tmp_path / "pins", check_host=_check,
                                    secondary=secondary, netdev_of=known.get,
                                    store=StateStore(tmp_path / "state"))  # fmt: skip
        devices = Devices(pools, handouts, find_stale=kubelet.stale, read_link=links.read,
                          scan=links.scan, netdevs=netdevs, holders=holders)  # fmt: skip
        yield Node(devices, datapath, kubelet, links, holders, secondary, handouts)
        await handouts.shutdown()
        tg.cancel_scope.cancel()


def _said(caplog: pytest.LogCaptureFixture, level: int = logging.INFO) -> list[str]:
    """What devices.py told the operator at ``level`` or above."""
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno >= level]


def _states(pool: Pool) -> dict[str, str]:
    return {d.id: d.state.value for d in pool.devices.values()}


# -- lookups and change notification -------------------------------------------------


async def test_a_new_node_is_not_ready_and_has_announced_no_change(tmp_path: Path) -> None:
    async with node(_pool("a"), tmp_path) as (devices, _, _k):
        assert devices.ready is False
        assert devices.changes["p"].version == 0


async def test_a_listener_waits_for_a_change_of_its_own_pool_only(tmp_path: Path) -> None:
    async with running(_named("p", "a"), _named("q", "c"), tmp_path=tmp_path) as n:
        changes = n.devices.changes["p"]
        version = changes.version
        with anyio.CancelScope() as scope:
            scope.cancel()
            await changes.wait_after(version)  # nothing changed: it must block
        assert scope.cancelled_caught
        woke = anyio.Event()

        async def listen() -> None:
            await changes.wait_after(version)
            woke.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(listen)
            n.devices.on_link(LinkEvent("a", Change.DOWN))
            with anyio.fail_after(5):
                await woke.wait()
        assert n.version("p") == version + 1 and n.version("q") == 0
        await changes.wait_after(version)  # an old version returns at once


async def test_device_allocated_is_none_for_a_device_no_pool_has(tmp_path: Path) -> None:
    async with running(_named("p", "a", "b"), tmp_path=tmp_path) as n:
        await n.devices.allocate("p", ["a"])
        assert n.devices.device_allocated("a") is True
        assert n.devices.device_allocated("b") is False
        assert n.devices.device_allocated("x") is None


async def test_describe_gives_the_hosts_view_of_a_device_and_nothing_for_others(
    tmp_path: Path,
) -> None:
    seen = _netdev("a")
    async with running(_named("p", "a"), tmp_path=tmp_path, netdevs={"a": seen}) as n:
        assert n.devices.describe("a") == msgspec.to_builtins(seen)
        assert n.devices.describe("a")["name"] == "a"
        assert n.devices.describe("b") == {}


async def test_rows_give_every_devices_state_and_health_for_metrics(tmp_path: Path) -> None:
    async with running(_named("p", "a", "b", "c"), _named("q", "d"), tmp_path=tmp_path) as n:
        await n.devices.allocate("p", ["b"])
        n.devices.pools["p"].devices["c"].healthy = False
        n.devices.pools["q"].devices["d"].fault = "cannot attach"
        assert n.devices.rows() == [
            ("p", "free", "Healthy"),
            ("p", "allocated", "Healthy"),
            ("p", "unhealthy", "Unhealthy"),
            ("q", "unhealthy", "Unhealthy"),
        ]


# -- allocation ------------------------------------------------------------------------


async def test_a_failed_allocate_has_its_devices_prepared_again(tmp_path: Path) -> None:
    pool = _named("p", "a", "b")
    async with running(pool, tmp_path=tmp_path) as n:
        n.devices.on_link(LinkEvent("a", Change.UP))  # a gets a program ahead of Allocate
        await n.settle()
        assert list(n.devices.handouts.prepared) == ["a"]
        n.datapath.fail_attach.add("b")
        with pytest.raises(AllocateFailed, match=r"^b: b: attach failed \(fake\)$"):
            await n.devices.allocate("p", ["a", "b"])
        await n.settle()
        # a's program went with the rollback; a gets a fresh one, b says why it has none.
        assert list(n.devices.handouts.prepared) == ["a"]
        assert n.datapath.log.count("attach a") == 2
        assert pool.devices["b"].fault == "b: attach failed (fake)"
        assert _states(pool) == {"a": "free", "b": "unhealthy"}


async def test_an_unexpected_failure_at_allocate_is_logged_with_its_traceback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    pool = _named("p", "a", "b")
    async with running(pool, tmp_path=tmp_path) as n:
        n.datapath.fail_attach.add("b")
        with pytest.raises(AllocateFailed):
            await n.devices.allocate("p", ["b"])  # a DeviceError: refused, no traceback
        await n.settle()

        def broken(device: str) -> FakeProgram:
            raise RuntimeError("boom")

        real, n.datapath.attach = n.datapath.attach, broken  # type: ignore[method-assign]
        with pytest.raises(AllocateFailed, match=r"^boom$"):
            await n.devices.allocate("p", ["a"])
        n.datapath.attach = real  # type: ignore[method-assign]  # before a's preparation runs
        await n.settle()
        [record] = [r for r in caplog.records if r.name == LOGGER and r.exc_info]
        assert record.getMessage() == "p: Allocate ['a'] failed unexpectedly"
        assert record.exc_info is not None and isinstance(record.exc_info[1], RuntimeError)
        assert _states(pool)["a"] == "free"


async def test_an_allocate_on_a_removed_pool_is_refused_saying_why(tmp_path: Path) -> None:
    async with running(_named("p", "a", "b"), tmp_path=tmp_path) as n:
        await n.devices.allocate("p", ["a"])
        n.kubelet.held.add("a")
        await n.devices.replace_pools([_named("q", "c")])
        with pytest.raises(DeviceError) as err:
            await n.devices.allocate("p", ["b"])
        assert str(err.value) == "pool p was removed from the config"


async def test_allocate_has_the_pods_holder_fetched_and_its_end_forgets_it(
    tmp_path: Path,
) -> None:
    async with running(_named("p", "a", "b"), tmp_path=tmp_path) as n:
        await n.devices.allocate("p", ["a", "b"])
        await n.settle()
        assert sorted(n.holders.prefetched) == [("afxdp/p", "a"), ("afxdp/p", "b")]
        assert n.holders.forgotten == []
        n.kubelet.held.add("b")
        assert await n.devices.reconcile(grace=0.0) == ["a"]
        assert n.holders.forgotten == ["a"]


async def test_the_pod_a_cni_add_names_is_told_to_the_holders_only_for_an_allocated_device(
    tmp_path: Path,
) -> None:
    async with running(_named("p", "a", "b"), tmp_path=tmp_path) as n:
        await n.devices.allocate("p", ["a"])
        n.devices.pod_attached("a", "pod-a")
        n.devices.pod_attached("b", "pod-b")  # free: no allocation for it to name a pod of
        n.devices.pod_attached("x", "pod-x")  # no pool's
        assert n.holders.attached_to == [("afxdp/p", "a", "pod-a")]


async def test_a_reclaim_at_allocate_asks_kubelet_about_the_pools_resource_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    async with running(_named("p", "a", "b"), tmp_path=tmp_path) as n:
        await n.devices.allocate("p", ["a"])
        assert n.kubelet.questions == []  # nothing allocated was asked for
        await n.devices.allocate("p", ["a", "b"])
        assert n.kubelet.questions == [("afxdp/p", ["a"])]
        assert _said(caplog, logging.WARNING) == ["p: a was never released; reclaiming it"]


async def test_release_ends_an_allocation_and_says_whether_there_was_one(tmp_path: Path) -> None:
    pool = _named("p", "a")
    async with running(pool, tmp_path=tmp_path) as n:
        assert await n.devices.release("x") is False  # no pool has it
        assert await n.devices.release("a") is False  # not allocated
        await n.devices.allocate("p", ["a"])
        n.datapath.log.clear()
        assert await n.devices.release("a") is True
        await n.settle()
        # A fresh one for the next pod, in place of the pod's: one change, no detach.
        assert n.datapath.log == ["close a", "abandon a", "replace a"]
        assert _states(pool) == {"a": "free"}
        assert n.holders.forgotten == ["a"]
        assert await n.devices.release("a") is False


async def test_release_with_skip_unload_bpf_leaves_the_program_attached(tmp_path: Path) -> None:
    async with running(_named("p", "a"), tmp_path=tmp_path) as n:
        await n.devices.allocate("p", ["a"])
        n.datapath.log.clear()
        assert await n.devices.release("a", keep_xdp=True) is True
        await n.settle()
        assert n.datapath.log == ["close a", "abandon a", "replace a"]


# -- health ------------------------------------------------------------------------------


async def test_an_ended_allocation_takes_the_health_its_link_has_now(tmp_path: Path) -> None:
    pool = _named("p", "a", "b", "c")
    links = Links("a", "b", "c")
    async with running(pool, tmp_path=tmp_path, links=links) as n:
        await n.devices.allocate("p", ["a", "b", "c"])
        pool.devices["a"].healthy = False  # e.g. a DOWN while it moved back
        links.up["b"] = False  # present, but down
        del links.up["c"]  # gone with its pod
        version = n.version("p")
        assert await n.devices.reconcile(grace=0.0) == ["a", "b", "c"]
        assert _states(pool) == {"a": "free", "b": "unhealthy", "c": "unhealthy"}
        assert n.version("p") > version


async def test_a_device_that_came_home_is_as_healthy_as_its_link(tmp_path: Path) -> None:
    pool = _named("p", "a", "b")
    links = Links("a", "b")
    async with running(pool, tmp_path=tmp_path, links=links) as n:
        await n.devices.allocate("p", ["a", "b"])
        pool.devices["a"].healthy = False  # its link was in the pod
        links.up["b"] = False
        await n.devices.came_home("a", keep_xdp=False)
        await n.devices.came_home("b", keep_xdp=False)
        await n.devices.came_home("x", keep_xdp=False)  # no pool has it: nothing to do
        assert _states(pool) == {"a": "allocated", "b": "unhealthy"}


def _cdq_pool(secondary: FakeSubfunctions) -> tuple[Pool, NetDev]:
    primary = _netdev("ens1", driver="ice")
    doc = {"pools": [{"name": "p", "mode": "cdq", "devices": [{"name": "ens1", "secondary": 2}]}]}
    config = cfg.load_config(json.dumps(doc)).config
    [pool] = assemble(config, [primary], "node1", unprivileged_bpf_disabled=0,
                      secondary=secondary).pools  # fmt: skip
    return pool, primary


async def test_a_cdq_secondarys_health_is_its_primarys(tmp_path: Path) -> None:
    pool, primary = _cdq_pool(FakeSubfunctions())
    assert list(pool.devices) == ["ens1sf1", "ens1sf2"]
    links = Links("ens1")  # a secondary's own netdev exists only while handed out
    async with running(pool, tmp_path=tmp_path, links=links, inventory=[primary]) as n:
        n.devices.prepare_all()
        await n.settle()
        assert n.devices.handouts.prepared == {}  # nothing to attach to before Allocate
        await n.devices.allocate("p", ["ens1sf1"])
        assert n.secondary.created == ["ens1sf1"]
        pool.devices["ens1sf1"].healthy = False
        await n.devices.came_home("ens1sf1", keep_xdp=False)
        assert _states(pool) == {"ens1sf1": "allocated", "ens1sf2": "free"}
        # The secondary's own link comes and goes with its handout: not its health.
        version = n.version("p")
        n.devices.on_link(LinkEvent("ens1sf2", Change.DOWN))
        n.devices.on_link(LinkEvent("ens1sf1", Change.REMOVED))
        assert _states(pool) == {"ens1sf1": "allocated", "ens1sf2": "free"}
        assert n.version("p") == version
        assert await n.devices.reconcile(grace=0.0) == ["ens1sf1"]
        assert n.secondary.deleted == ["ens1sf1"]
        assert _states(pool) == {"ens1sf1": "free", "ens1sf2": "free"}
        n.devices.on_link(LinkEvent("ens1", Change.DOWN))  # the primary's health is theirs
        assert _states(pool) == {"ens1sf1": "unhealthy", "ens1sf2": "unhealthy"}
        links.up["ens1"] = True
        await n.devices.resync()
        assert _states(pool) == {"ens1sf1": "free", "ens1sf2": "free"}


async def test_a_link_event_reaches_the_pool_that_has_the_device_and_is_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    p, q = _named("p", "a"), _named("q", "c")
    async with running(p, q, tmp_path=tmp_path) as n:
        n.devices.on_link(LinkEvent("c", Change.DOWN))
        assert _states(q) == {"c": "unhealthy"} and _states(p) == {"a": "free"}
        assert (n.version("p"), n.version("q")) == (0, 1)
        assert _said(caplog) == ["q: c -> down"]


async def test_link_events_of_a_netdev_no_pool_has_change_nothing(tmp_path: Path) -> None:
    pool = _named("p", "a")
    async with running(pool, tmp_path=tmp_path) as n:
        for change in Change:
            n.devices.on_link(LinkEvent("eth9", change))
        await n.settle()
        assert _states(pool) == {"a": "free"} and n.version("p") == 0
        assert n.datapath.log == []


async def test_a_recreated_link_is_healthy_again_with_a_fresh_program(tmp_path: Path) -> None:
    pool = _named("p", "a")
    async with running(pool, tmp_path=tmp_path) as n:
        n.devices.prepare_all()
        await n.settle()
        first = n.devices.handouts.prepared["a"]
        n.devices.on_link(LinkEvent("a", Change.REMOVED))
        assert _states(pool) == {"a": "unhealthy"} and n.devices.handouts.prepared == {}
        del n.datapath.stale["a"]  # the FAKE's view: the program went with its link
        n.devices.on_link(LinkEvent("a", Change.UP))
        await n.settle()
        assert _states(pool) == {"a": "free"}
        assert n.devices.handouts.prepared["a"] is not first
        assert n.datapath.log == ["attach a", "abandon a", "attach a"]


async def test_a_rename_a_resync_finds_withdraws_the_device_and_takes_its_program_off(
    tmp_path: Path,
) -> None:
    """Issue 19 review, attack 8, when the rename's event was lost (a socket
    overflow): the re-read finds the device's ifindex under another name."""
    pool = _named("p", "a")
    links = Links("a")
    links.index["a"] = 7
    start = {"a": links.get("a")}
    async with running(pool, tmp_path=tmp_path, links=links,
                       netdevs={k: v for k, v in start.items() if v}) as n:  # fmt: skip
        n.devices.prepare_all()
        await n.settle()
        prog = n.handouts.prepared["a"].prog_id
        del links.up["a"]
        links.up["a2"], links.index["a2"] = True, 7
        await n.devices.resync()
        await n.settle()
        assert _states(pool) == {"a": "unhealthy"} and n.handouts.prepared == {}
        assert pool.devices["a"].problem == "its link was renamed to a2"
        assert f"detach_at 7 {prog}" in n.datapath.log
        links.up["a"], links.index["a"] = True, 8  # a new link of the name
        n.devices.on_link(LinkEvent("a", Change.UP, 8))
        await n.settle()
        assert _states(pool) == {"a": "free"} and pool.devices["a"].problem is None


async def test_a_free_device_whose_link_is_down_gets_no_program_until_it_is_up(
    tmp_path: Path,
) -> None:
    pool = _named("p", "a", "b")
    async with running(pool, tmp_path=tmp_path) as n:
        await n.devices.allocate("p", ["a"])
        pool.devices["b"].healthy = False
        n.datapath.log.clear()
        n.devices.prepare_all()
        await n.settle()
        assert n.devices.handouts.prepared == {} and n.datapath.log == []
        n.devices.on_link(LinkEvent("b", Change.UP))
        await n.settle()
        assert list(n.devices.handouts.prepared) == ["b"]


async def test_resync_applies_the_links_as_they_are_now(tmp_path: Path) -> None:
    pool = _named("p", "a", "b", "c", "d")
    links = Links("a", "b", "d")
    async with running(pool, tmp_path=tmp_path, links=links) as n:
        await n.devices.allocate("p", ["c"])  # its link is in its pod's netns
        pool.devices["a"].healthy = False  # a lost event said so
        links.up["b"] = False
        del links.up["d"]
        version = n.version("p")
        await n.devices.resync()
        assert _states(pool) == {"a": "free", "b": "unhealthy", "c": "allocated",
                                 "d": "unhealthy"}  # fmt: skip
        assert n.version("p") > version
        assert sorted(n.devices.netdevs) == ["a", "b"]
        assert n.devices.describe("b")["oper_state"] == "down"


async def test_a_device_that_cannot_be_prepared_says_why_once_and_recovers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    pool = _named("p", "a")
    async with running(pool, tmp_path=tmp_path) as n:
        n.datapath.fail_attach.add("a")
        n.devices.prepare_all()
        await n.settle()
        assert pool.devices["a"].summary() == {"id": "a", "state": "unhealthy", "numa": None,
                                               "parent": None, "fault": "a: attach failed (fake)"}  # fmt: skip
        assert n.version("p") == 1
        n.devices.prepare_all()  # the same fault again: no news
        await n.settle()
        assert n.version("p") == 1
        assert _said(caplog, logging.ERROR) == [
            "p: cannot prepare a for Allocate: a: attach failed (fake)"
        ]
        n.datapath.fail_attach.clear()
        n.devices.prepare_all()
        await n.settle()
        assert pool.devices["a"].fault is None and n.version("p") == 2


# -- reconcile and shutdown --------------------------------------------------------------


async def test_reconcile_asks_kubelet_about_each_pools_resource_and_logs_each_release(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    p, q = _named("p", "a"), _named("q", "c", "d")
    async with running(p, q, tmp_path=tmp_path) as n:
        await n.devices.allocate("q", ["c", "d"])
        n.kubelet.held.add("d")
        assert await n.devices.reconcile(grace=0.0) == ["c"]  # p has nothing to ask about
        assert n.kubelet.questions == [("afxdp/q", ["c", "d"])]
        assert "afxdp/q: no pod holds c any more (kubelet); released" in _said(caplog)
        assert _states(q) == {"c": "free", "d": "allocated"}


async def test_shutdown_stops_serving_even_when_the_last_reconcile_fails(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    async with running(_named("p", "a"), tmp_path=tmp_path) as n:
        await n.devices.allocate("p", ["a"])
        n.kubelet.broken = True
        n.datapath.log.clear()
        await n.devices.shutdown()
        assert n.datapath.log == ["close a", "abandon a"]  # left in place for the next start
        assert n.devices.handouts.handouts == {}
        assert _said(caplog, logging.ERROR) == ["the last reconcile with kubelet failed"]
    assert sorted(StateStore(tmp_path / "state").load().allocations) == ["a"]


# -- config reload -------------------------------------------------------------------------


async def test_a_reload_adds_changes_and_removes_pools_and_wakes_their_listeners(
    tmp_path: Path,
) -> None:
    async with running(_named("p", "a", "b"), _named("q", "c"), tmp_path=tmp_path) as n:
        await n.devices.allocate("p", ["b"])
        n.kubelet.held.add("b")
        old_b = n.devices.pools["p"].devices["b"]
        n.devices.on_link(LinkEvent("a", Change.DOWN))
        version = n.version("p")
        # r is new (listed first); p no longer takes b (allocated) and now takes d;
        # q, with nothing allocated, is gone at once.
        added, removed = await n.devices.replace_pools([_named("r", "e"), _named("p", "a", "d")])
        assert (added, removed) == (["r"], ["q"])
        assert list(n.devices.pools) == ["p", "r"] and n.devices.draining == set()
        p = n.devices.pools["p"]
        assert p.devices["b"] is old_b  # untouched while allocated
        assert _states(p) == {"a": "unhealthy", "d": "free", "b": "allocated"}
        assert n.version("p") > version and n.version("r") == 1
        [handout] = await n.devices.allocate("r", ["e"])  # a new pool takes Allocates
        assert handout.pool == "r"
        await n.settle()
        assert sorted(n.devices.handouts.prepared) == ["d"]  # its free healthy device


async def test_a_reload_keeps_prepared_programs_of_devices_still_pooled(tmp_path: Path) -> None:
    async with running(_named("p", "a", "b"), tmp_path=tmp_path) as n:
        n.devices.prepare_all()
        await n.settle()
        kept = n.devices.handouts.prepared["a"]
        await n.devices.replace_pools([_named("p", "a")])
        await n.settle()
        assert n.devices.handouts.prepared == {"a": kept}
        assert sorted(n.datapath.log) == ["attach a", "attach b", "detach b"]


async def test_a_removed_pool_drains_until_its_last_allocation_ends(tmp_path: Path) -> None:
    async with running(_named("p", "a", "b"), tmp_path=tmp_path) as n:
        n.devices.prepare_all()
        await n.settle()
        await n.devices.allocate("p", ["a"])
        n.kubelet.held.add("a")
        assert await n.devices.replace_pools([_named("q", "c")]) == (["q"], ["p"])
        await n.settle()
        assert list(n.devices.pools) == ["p", "q"] and n.devices.draining == {"p"}
        # The draining pool's free device loses its program; the new pool's gets one.
        assert sorted(n.devices.handouts.prepared) == ["c"]
        assert "detach b" in n.datapath.log
        assert await n.devices.replace_pools([_named("q", "c")]) == ([], [])  # said once
        assert await n.devices.reconcile(grace=0.0) == []
        assert n.devices.draining == {"p"}
        n.kubelet.held.clear()
        n.datapath.log.clear()
        assert await n.devices.reconcile(grace=0.0) == ["a"]
        await n.settle()
        assert list(n.devices.pools) == ["q"] and n.devices.draining == set()
        # The last of a removed pool: its program is detached, nothing prepared.
        assert n.datapath.log == ["close a", "detach a"]
        assert sorted(n.devices.handouts.prepared) == ["c"]
        assert await n.devices.reconcile(grace=0.0) == []


async def test_a_pool_back_in_the_config_before_it_drained_takes_allocates_again(
    tmp_path: Path,
) -> None:
    async with running(_named("p", "a", "b"), tmp_path=tmp_path) as n:
        await n.devices.allocate("p", ["a"])
        n.kubelet.held.add("a")
        await n.devices.replace_pools([])
        assert n.devices.draining == {"p"}
        # Added: its server, stopped when it was dropped, is to be served again.
        assert await n.devices.replace_pools([_named("p", "a", "b")]) == (["p"], [])
        assert n.devices.draining == set()
        await n.devices.allocate("p", ["b"])
        assert _states(n.devices.pools["p"]) == {"a": "allocated", "b": "allocated"}


async def test_a_removed_pool_without_allocations_is_forgotten_at_once(tmp_path: Path) -> None:
    async with running(_named("p", "a"), tmp_path=tmp_path) as n:
        assert await n.devices.replace_pools([]) == ([], ["p"])
        assert n.devices.pools == {} and n.devices.draining == set()
        assert n.devices.prune() == []


async def test_a_device_the_reloaded_config_dropped_leaves_when_its_allocation_ends(
    tmp_path: Path,
) -> None:
    async with running(_named("p", "a", "b"), tmp_path=tmp_path) as n:
        await n.devices.allocate("p", ["b"])
        n.kubelet.held.add("b")
        await n.devices.replace_pools([_named("p", "a")])
        n.kubelet.held.clear()
        await n.settle()  # a's program, prepared after the reload
        n.datapath.log.clear()
        assert await n.devices.reconcile(grace=0.0) == ["b"]
        await n.settle()
        assert list(n.devices.pools["p"].devices) == ["a"]
        # No fresh program will take its place: the pod's is detached, none prepared.
        assert n.datapath.log == ["close b", "detach b"]
        assert "b" not in n.devices.handouts.prepared and "b" not in n.datapath.stale


async def test_an_allocation_ending_in_a_pool_reloaded_as_raw_detaches_its_program(
    tmp_path: Path,
) -> None:
    async with running(_named("p", "a"), tmp_path=tmp_path) as n:
        await n.devices.allocate("p", ["a"])
        # hands out raw now
        await n.devices.replace_pools([_named("p", "a", udsServerDisable=True)])
        await n.settle()
        n.datapath.log.clear()
        assert await n.devices.reconcile(grace=0.0) == ["a"]
        await n.settle()
        # No program of ours will take its place: none is left on the free device.
        assert n.datapath.log == ["close a", "detach a"] and n.datapath.stale == {}
        assert n.devices.handouts.prepared == {}


async def test_a_swap_still_pending_when_the_pool_turns_raw_detaches_the_last_pods_program(
    tmp_path: Path,
) -> None:
    async with running(_named("p", "a"), tmp_path=tmp_path) as n:
        await n.devices.allocate("p", ["a"])
        n.datapath.fail_attach.add("a")  # the fresh program cannot be made: no swap yet
        assert await n.devices.reconcile(grace=0.0) == ["a"]
        await n.settle()
        assert n.datapath.stale.keys() == {"a"} and n.devices.handouts.swap_pending == {"a"}
        await n.devices.replace_pools([_named("p", "a", udsServerDisable=True)])
        await n.settle()
        # No swap will ever come for a raw pool: the last pod's program goes.
        assert n.datapath.stale == {} and n.devices.handouts.swap_pending == set()
        assert "detach_stale a" in n.datapath.log


async def test_a_program_prepared_before_the_pool_turned_raw_is_not_handed_out(
    tmp_path: Path,
) -> None:
    async with running(_named("p", "a"), tmp_path=tmp_path) as n:
        n.devices.prepare_all()
        await n.settle()
        assert "a" in n.devices.handouts.prepared
        n.datapath.log.clear()
        await n.devices.replace_pools([_named("p", "a", udsServerDisable=True)])
        [handout] = await n.devices.allocate("p", ["a"])  # before anything settled
        await n.settle()
        assert handout.xdp is None and handout.uds is None
        assert n.devices.handouts.prepared == {} and n.datapath.log == ["detach a"]


async def test_a_dropped_device_the_config_takes_back_before_its_allocation_ends_stays(
    tmp_path: Path,
) -> None:
    async with running(_named("p", "a", "b"), tmp_path=tmp_path) as n:
        await n.devices.allocate("p", ["b"])
        await n.devices.replace_pools([_named("p", "a")])
        await n.devices.replace_pools([_named("p", "a", "b")])
        assert await n.devices.reconcile(grace=0.0) == ["b"]  # no pod holds it
        await n.settle()
        assert {d: v.state.value for d, v in n.devices.pools["p"].devices.items()} == {
            "a": "free",
            "b": "free",
        }


# -- restart: the durable record -------------------------------------------------------------


async def _recorded(n: Node, *allocations: Allocation) -> Record:
    store = n.devices.handouts.store
    await store.put(list(allocations))
    return store.record


async def test_a_restart_keeps_what_the_config_moved_or_dropped_until_kubelet_says_it_ended(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 19 (state machine): only kubelet's word ends an allocation, not the
    config a restart reads. Kept: one of a pool the config has no more (drained)
    and one of a device its pool no longer takes (leaving); the pool the config
    put the device in waits for it, then takes it free."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    p = _named("p", "a")
    async with running(p, _named("q", "c"), tmp_path=tmp_path) as n:
        record = await _recorded(
            n,
            Allocation(pool="old", device="a", prog_id=5),  # a is in pool p now
            Allocation(pool="p", device="zz", prog_id=6),  # p no longer takes zz
        )
        n.datapath.stale.update({"a": 5, "zz": 6})
        assert await n.devices.restore(record, None) == ["a", "zz"]
        assert n.datapath.log == ["adopt a", "listen a", "adopt zz", "listen zz"]
        assert n.devices.draining == {"old"} and n.devices.leaving == {"p": {"zz"}}
        assert n.devices.find("a") == (n.devices.pools["old"], n.devices.pools["old"].devices["a"])
        assert _states(n.devices.pools["old"]) == {"a": "allocated"}
        assert _states(p) == {"a": "unhealthy", "zz": "allocated"}
        assert p.devices["a"].summary()["fault"] == "a pod of pool old holds it"
        with pytest.raises(DeviceError, match="a: a pod of pool old holds it"):
            await n.devices.allocate("p", ["a"])
        # Kubelet says no pod holds them: a joins p (free, prepared), zz leaves p.
        assert sorted(await n.devices.reconcile(grace=0.0)) == ["a", "zz"]
        await n.settle()
        assert "old" not in n.devices.pools and not n.devices.draining
        assert _states(p) == {"a": "free"}
        assert "a" in n.devices.handouts.prepared
        assert "pool old is no longer in the config; kept draining" in caplog.text
    assert StateStore(tmp_path / "state").load().allocations == {}


async def test_a_restart_cleaning_up_leaves_a_socket_someone_answers_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with running(_named("p", "a"), tmp_path=tmp_path) as n:
        record = await _recorded(
            n,
            Allocation(pool="p", device="yy", prog_id=5),  # no pool has yy, nor zz
            Allocation(pool="p", device="zz", prog_id=6),
        )
        stale, live = (socket_path(tmp_path / "uds", d) for d in ("yy", "zz"))
        for path in (stale, live):
            path.parent.mkdir(parents=True)
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as last_run:
            last_run.bind(str(stale))
        # Another afxdpd sharing the UDS dir serves a device named zz now.
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as other:
            other.bind(str(live))
            other.listen(1)
            theirs = file_id(live)
            assert await n.devices.restore(record, {}) == []  # kubelet: no pod holds them
            assert file_id(live) == theirs
        assert not stale.parent.exists(), "the last run's socket and directory are gone"
        assert (
            f"zz: socket left in place: [Errno 98] another server answers on this socket: '{live}'"
            in caplog.text
        )


async def test_a_restart_keeps_only_what_kubelet_says_a_pod_holds(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    pool = _named("p", "a", "b")
    async with running(pool, tmp_path=tmp_path) as n:
        record = await _recorded(
            n, Allocation(pool="p", device="a", prog_id=5), Allocation(pool="p", device="b")
        )
        pool.devices["a"].healthy = False  # its link is in its pod's netns
        assert await n.devices.restore(record, {"afxdp/p": {"a"}, "other/x": {"b"}}) == ["a"]
        assert _said(caplog) == [
            "a: kept from before this start (held by a pod)",
            "b: handed out before this start, but no pod holds it (kubelet); cleaned up",
        ]
        assert _states(pool) == {"a": "allocated", "b": "free"}
        assert n.datapath.log == ["adopt a", "listen a"]
        # kubelet answering for no resource of ours: nothing is held.
        caplog.clear()
        record = await _recorded(n, Allocation(pool="p", device="b", prog_id=7))
        assert await n.devices.restore(Record(allocations={"b": record.allocations["b"]}), {}) == []
        assert _said(caplog)[-1] == (
            "b: handed out before this start, but no pod holds it (kubelet); cleaned up"
        )
    assert sorted(StateStore(tmp_path / "state").load().allocations) == ["a"]


async def test_a_restart_without_kubelet_keeps_the_records_view_saying_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Also an allocation whose program is gone (issue 19, state machine): only
    kubelet's word ends it; it is kept, its setup unknown, until kubelet answers."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    pool = _named("p", "a", "b", udsServerDisable=True, bpfMapPinningEnable=True)
    pinned = pinning.map_path(tmp_path / "pins", "p", "a")
    async with running(pool, tmp_path=tmp_path) as n:
        record = await _recorded(
            n,
            Allocation(pool="p", device="a", prog_id=5, pinned=str(pinned)),
            Allocation(
                pool="p",
                device="b",
                prog_id=6,
                pinned=str(pinning.map_path(tmp_path / "pins", "p", "b")),
            ),
        )
        n.datapath.gone.add(6)
        assert await n.devices.restore(record, None) == ["a", "b"]
        assert _said(caplog) == [
            "a: kept from before this start (kubelet not reachable yet)",
            "b: its program 6 is gone (program 6 is gone (fake)); kept allocated, setup unknown",
            "b: kept from before this start (kubelet not reachable yet)",
        ]
        assert n.devices.handouts.handouts["a"].mounts == [(str(pinned.parent), "/tmp/afxdp_dp/a")]
        b = n.devices.handouts.handouts["b"]
        assert (b.xdp, b.setup_unknown) == (None, True)
        assert n.datapath.log == ["adopt a"]  # a pinned map: no socket to serve
        assert _states(pool) == {"a": "allocated", "b": "allocated"}
        assert (
            StateStore(tmp_path / "state", tmp_path / "pins").load().allocations["b"].setup_unknown
        )
        # The periodic reconcile settles it once kubelet answers.
        assert await n.devices.reconcile() == ["a", "b"]


async def test_a_restart_takes_over_what_kubelet_lists_and_the_record_lacks(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A record cut short (its last lines lost) is readable: kubelet's word still
    counts for what it lacks, so a device a pod holds is never free (state machine)."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    pool = _named("p", "a", "b")
    async with running(pool, tmp_path=tmp_path) as n:
        n.datapath.stale.update({"a": 7})  # the pod's program, on its link here
        assert await n.devices.start(Record(), unreadable=False, ask=_answer({"afxdp/p": {"a"}}))
        assert _states(pool) == {"a": "allocated", "b": "free"}
        assert n.devices.handouts.handouts["a"].xdp is not None
        assert n.datapath.log == ["adopt a", "listen a"]
        assert "a: a pod holds it (kubelet), the state record does not have it" in caplog.text


async def test_a_record_cut_inside_its_last_change_leaves_the_rest_unknown_while_kubelet_is_down(
    tmp_path: Path,
) -> None:
    """Issue 19 review (attack 5): a kill -9 mid-write cuts the record's last
    change short; what the record holds is kept, and, until kubelet can say,
    every other device is unknown (the lost change may be a pod's Allocate):
    never free, never prepared."""
    pool = _named("p", "a", "b", "c")
    async with running(pool, tmp_path=tmp_path) as n:
        await n.devices.allocate("p", ["a"])
        await n.devices.allocate("p", ["b"])
    path = tmp_path / "state" / "state.json"
    whole = path.read_bytes()
    path.write_bytes(whole[: whole.rindex(b"\n", 0, len(whole) - 1) + 10])  # b's line, cut
    store = StateStore(tmp_path / "state", tmp_path / "pins")
    record = store.load()
    assert store.torn and not store.unreadable and sorted(record.allocations) == ["a"]
    fresh = _named("p", "a", "b", "c")
    async with running(fresh, tmp_path=tmp_path) as n:
        n.datapath.stale.update({"a": 1, "b": 2})
        asked: list[dict[str, set[str]] | None] = [None]

        async def kubelet() -> dict[str, set[str]] | None:
            return asked.pop(0) if asked else {"afxdp/p": {"a", "b"}}

        assert await n.devices.start(record, unreadable=False, torn=True, ask=kubelet) == ["a"]
        assert _states(fresh) == {"a": "allocated", "b": "unknown", "c": "unknown"}
        with pytest.raises(DeviceError, match=f"b: {UNKNOWN_HOLDER}"):
            await n.devices.allocate("p", ["b"])
        await n.devices.ask_again(kubelet)  # kubelet answers: b is a pod's, c free
        await n.settle()
        assert _states(fresh) == {"a": "allocated", "b": "allocated", "c": "free"}


async def test_an_add_of_a_device_taken_over_without_its_pods_program_fails_saying_why(
    tmp_path: Path,
) -> None:
    """Issue 19 review (attack 10): taken over from kubelet's word alone, here
    with no program of ours on it (its link re-created while afxdpd was down),
    the device cannot reach its pod with the pod's map: the CNI ADD (which asks
    ensure_program first) fails saying so, and status says it too."""
    pool = _named("p", "a")
    async with running(pool, tmp_path=tmp_path) as n:
        n.devices.distrust()
        assert await n.devices.settle({"afxdp/p": {"a"}}) == ["a"]
        handout = n.handouts.handouts["a"]
        assert handout.setup_unknown and handout.xdp is None
        with pytest.raises(DeviceError, match="a: its pod's program is not known"):
            await n.devices.ensure_program("a")
        assert handout.status().xdp_fault == (
            "its pod's program is not known (the state record was lost)"
        )


async def test_a_program_left_in_a_pod_by_an_allocation_that_ended_there_goes_when_it_comes_home(
    tmp_path: Path,
) -> None:
    """Issue 19 (state machine, finding 6): an allocation that ends while its
    device is in its pod's netns cannot detach the pod's program (out of
    reach); when the DEL brings the device home to no pool, it is taken off."""
    async with running(_named("p", "a"), tmp_path=tmp_path) as n:
        [handout] = await n.devices.allocate("p", ["a"])
        assert handout.xdp is not None
        n.kubelet.held.add("a")
        n.datapath.in_pods.add("a")  # the CNI ADD moved it into its pod
        await n.devices.replace_pools([])  # the config drops its pool: it drains
        n.kubelet.held.clear()  # the pod ends, its device still in its netns
        assert await n.devices.reconcile(grace=0.0) == ["a"]
        await n.settle()
        assert "p" not in n.devices.pools and "a" in n.handouts.swap_pending
        n.datapath.in_pods.discard("a")  # its DEL brings it home, the program on it
        n.datapath.stale["a"] = handout.xdp.prog_id
        n.datapath.log.clear()
        await n.devices.came_home("a", False)
        await n.settle()
        assert n.datapath.log == ["detach_stale a"] and not n.handouts.swap_pending


def _answer(
    held: dict[str, set[str]] | None,
) -> Callable[[], Awaitable[dict[str, set[str]] | None]]:
    async def ask() -> dict[str, set[str]] | None:
        return held

    return ask


# -- a reload never changes who holds a device (issue 19, attack 1) ------------------------


class SlowKubelet(AskedKubelet):
    """FAKE kubelet whose answer waits until ``answer`` is set: an Allocate that
    reclaims a device sits in that wait, as it does behind a slow PodResources."""

    def __init__(self) -> None:
        super().__init__()
        self.asking, self.answer = anyio.Event(), anyio.Event()

    async def stale(self, resource: str, devices: Sequence[str]) -> list[str]:
        self.asking.set()
        await self.answer.wait()
        return await super().stale(resource, devices)


async def test_a_reload_during_an_allocate_never_frees_what_it_hands_out(tmp_path: Path) -> None:
    """SIGHUPs flipping a pool's udsTimeout while kubelet's pods come and go: an
    Allocate that reclaims a device (its last pod ended) waits for kubelet; a
    reload applied in that wait used to swap the pool under it, so the device
    was marked in the old pool and free in the new one: a second pod got it."""
    async with running(_named("p", "a"), tmp_path=tmp_path) as n:
        slow = SlowKubelet()
        n.devices._find_stale = slow.stale
        await n.devices.allocate("p", ["a"])  # the first pod, since ended (kubelet holds nothing)
        async with anyio.create_task_group() as tg:
            tg.start_soon(n.devices.allocate, "p", ["a"])  # the next pod: reclaims a
            await slow.asking.wait()
            reload = anyio.Event()

            async def reload_now() -> None:
                await n.devices.replace_pools([_named("p", "a", udsTimeout=60)])
                reload.set()

            tg.start_soon(reload_now)
            await anyio.wait_all_tasks_blocked()
            waited = not reload.is_set()
            slow.answer.set()
        slow.held.add("a")  # kubelet lists the second pod
        assert _states(n.devices.pools["p"]) == {"a": "allocated"}
        assert n.devices.pools["p"].config.uds_timeout == 60  # the reload did apply
        with pytest.raises(DeviceError, match="a: allocated"):
            await n.devices.allocate("p", ["a"])
        assert sorted(n.devices.handouts.handouts) == ["a"]
        assert waited  # the reload applied after the Allocate under way, not in its wait


async def test_a_device_a_reload_moves_to_another_pool_while_held_is_not_free_there(
    tmp_path: Path,
) -> None:
    """Issue 19 (state machine, finding 3): a reload that puts an allocated
    device in another pool must not offer it free there (kubelet would hand it
    to a second pod); that pool takes it when its pod's allocation ends."""
    async with running(_named("p", "a", "b"), _named("q", "c"), tmp_path=tmp_path) as n:
        [first] = await n.devices.allocate("p", ["a"])
        n.kubelet.held.add("a")
        await n.devices.replace_pools([_named("p", "b"), _named("q", "a", "c")])
        await n.settle()
        p, q = n.devices.pools["p"], n.devices.pools["q"]
        assert _states(p) == {"a": "allocated", "b": "free"}
        assert _states(q) == {"a": "unhealthy", "c": "free"}  # kubelet: not allocatable
        assert n.devices.device_allocated("a") is True
        with pytest.raises(DeviceError, match="a: a pod of pool p holds it"):
            await n.devices.allocate("q", ["a"])
        assert n.devices.handouts.handouts["a"] is first
        # Its pod ends: it leaves p and q may hand it out.
        n.kubelet.held.clear()
        assert await n.devices.reconcile(grace=0.0) == ["a"]
        await n.settle()
        assert _states(p) == {"b": "free"}
        assert _states(q) == {"a": "free", "c": "free"}
        [second] = await n.devices.allocate("q", ["a"])
        assert second.pool == "q"


async def test_a_draining_pools_free_device_gets_no_program_when_its_link_comes_up(
    tmp_path: Path,
) -> None:
    """Issue 19 review (attack 11): a pool the config dropped only drains; a link
    event of a free device of it prepares nothing (detaching its program fired one)."""
    async with running(_named("p", "a", "b"), tmp_path=tmp_path) as n:
        await n.devices.allocate("p", ["a"])
        n.kubelet.held.add("a")
        await n.devices.replace_pools([])
        await n.settle()
        assert n.devices.draining == {"p"} and "b" not in n.handouts.prepared
        n.datapath.log.clear()
        n.devices.on_link(LinkEvent("b", Change.UP))
        await n.settle()
        assert n.datapath.log == [] and "b" not in n.handouts.prepared


async def test_kubelet_naming_a_device_no_pool_may_have_makes_no_pool_hold_it(
    tmp_path: Path,
) -> None:
    """Issue 19 review: kubelet's word is not enough for afxdpd to hold a netdev
    no pool could ever take (lo, eth0, ...): no draining stand-in pool for it."""
    async with running(_named("p", "a"), tmp_path=tmp_path) as n:
        kept = await n.devices.start(Record(), unreadable=False,
                                     ask=_answer({"afxdp/zz": {"lo", "eth0"}}))  # fmt: skip
        assert kept == [] and list(n.devices.pools) == ["p"]


async def test_a_call_on_a_server_whose_pool_a_reload_removed_is_refused_saying_so(
    tmp_path: Path,
) -> None:
    """Issue 19 review (attack 13): a call that reaches a pool's server as a
    reload removes the pool gets FAILED_PRECONDITION, not grpclib's
    "Application error" from a KeyError."""
    async with running(_named("p", "a"), tmp_path=tmp_path) as n:
        plugin = PoolPlugin(n.devices, "p")
        await n.devices.replace_pools([])  # nothing allocated: forgotten at once
        with pytest.raises(GRPCError) as raised:
            plugin.device_list()
        assert raised.value.status is Status.FAILED_PRECONDITION
        assert raised.value.message == "pool p was removed from the config"


async def test_handouts_refuse_to_start_a_device_already_handed_out(tmp_path: Path) -> None:
    """Defence in depth under Devices: Handouts never replaces a live handout."""
    pool = _named("p", "a")
    async with running(pool, tmp_path=tmp_path) as n:
        [first] = await n.devices.allocate("p", ["a"])
        with pytest.raises(DeviceError, match="a: already handed out"):
            await n.devices.handouts.start(pool, ["a"])
        assert n.devices.handouts.handouts["a"] is first


async def test_an_allocate_queued_behind_another_marks_the_pool_a_reload_left(
    tmp_path: Path,
) -> None:
    """An Allocate waiting for its pool's lock (another one is asking kubelet) used
    to hold the pool object it read before the wait; a reload applied meanwhile
    replaced it, and the device was marked in the old pool, free in the new."""
    async with running(_named("p", "a", "b"), tmp_path=tmp_path) as n:
        slow = SlowKubelet()
        n.devices._find_stale = slow.stale
        await n.devices.allocate("p", ["a"])  # its pod ended: the next Allocate reclaims it
        async with anyio.create_task_group() as tg:
            tg.start_soon(n.devices.allocate, "p", ["a"])  # holds p's lock, asking kubelet
            await slow.asking.wait()
            tg.start_soon(n.devices.allocate, "p", ["b"])  # queued behind it
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(n.devices.replace_pools, [_named("p", "a", "b", udsTimeout=-1)])
            await anyio.wait_all_tasks_blocked()
            slow.answer.set()
        slow.held.update({"a", "b"})
        pool = n.devices.pools["p"]
        assert pool.config.uds_timeout is None  # the reload applied
        assert _states(pool) == {"a": "allocated", "b": "allocated"}
        with pytest.raises(DeviceError, match="a: allocated; b: allocated"):
            await n.devices.allocate("p", ["a", "b"])


async def test_a_record_naming_paths_outside_afxdpds_dirs_is_not_trusted_and_they_stay(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A forged record: a device name that climbs out of the socket dir, and a
    # pinned map outside the pin dir. Cleaning up after either would unlink
    # files (and remove a directory) that are not afxdpd's.
    victim = tmp_path / "victim" / "afxdp.sock"
    outside = tmp_path / "outside" / "xsks_map"
    for path in (victim, outside):
        path.parent.mkdir()
        path.write_text("not afxdpd's")
    (tmp_path / "state").mkdir()
    forged = Record(allocations={
        "../victim": Allocation(pool="p", device="../victim", prog_id=5),
        "a": Allocation(pool="p", device="a", prog_id=6, pinned=str(outside)),
    })  # fmt: skip
    (tmp_path / "state" / "state.json").write_bytes(msgspec.json.encode(forged) + b"\n")
    async with running(_named("p", "a"), tmp_path=tmp_path) as n:
        n.datapath.stale["a"] = 6
        with caplog.at_level(logging.ERROR, logger="afxdp.state"):
            record = n.handouts.store.load()
        await n.devices.restore(record, {})  # kubelet: no pod holds anything
        assert not any(step.startswith(("unpin", "detach_stale")) for step in n.datapath.log)
    assert victim.read_text() == outside.read_text() == "not afxdpd's"
    assert "allocation of '../victim': the device '../victim' is" in caplog.text
    assert f"allocation of 'a': the pinned map {str(outside)!r} is not" in caplog.text
    assert (tmp_path / "state" / "state.json.unreadable").exists()


# -- an untrusted record: kubelet's word alone ----------------------------------------------


async def test_an_untrusted_record_leaves_every_device_unknown_until_kubelet_says_who_holds_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    pool = _named("p", "a", "b", "c")
    async with running(pool, tmp_path=tmp_path) as n:
        n.datapath.stale["a"] = 5  # a pod's program: its device not yet moved into the pod
        n.datapath.in_pods.add("b")  # in its pod's netns: nothing of it is seen
        n.devices.distrust()
        assert _states(pool) == dict.fromkeys("abc", "unknown")
        with pytest.raises(DeviceError, match=f"who holds it is not known yet: {UNKNOWN_HOLDER}"):
            n.devices.device_allocated("a")  # a CNI ADD: code 11, try again
        assert {d.usable for d in pool.devices.values()} == {False}  # kubelet: Unhealthy
        for ids in (["c"], ["a", "c"]):
            with pytest.raises(DeviceError, match=f"c: {UNKNOWN_HOLDER}"):
                await n.devices.allocate("p", ids)
        n.devices.prepare_all()
        n.devices.on_link(LinkEvent("c", Change.UP))
        await n.settle()
        assert await n.devices.reconcile(grace=0.0) == []
        assert await n.devices.settle(None) == []  # kubelet cannot say yet
        assert n.datapath.log == [] and n.handouts.prepared == {}  # no program touched
        assert _states(pool) == dict.fromkeys("abc", "unknown")

        assert await n.devices.settle({"afxdp/p": {"a", "b"}, "other/q": {"c"}}) == ["a", "b"]
        assert _states(pool) == {"a": "allocated", "b": "allocated", "c": "free"}
        # a: the pod's program adopted, its socket served again; b: kept as it is.
        assert n.datapath.log == ["adopt a", "listen a"]
        a, b = n.handouts.handouts["a"], n.handouts.handouts["b"]
        assert a.xdp is not None and a.xdp.prog_id == 5 and not a.status().setup_unknown
        assert b.xdp is None and b.status().setup_unknown
        assert _said(caplog, logging.WARNING) == [
            "a: a pod holds it (kubelet), the state record was lost; kept allocated, "
            "its program adopted",
            "b: a pod holds it (kubelet), the state record was lost; kept allocated, "
            "no program of ours on it here (in its pod's netns?): setup unknown",
        ]
        n.devices.prepare_all()
        await n.settle()
        assert n.datapath.log[2:] == ["attach c"] and list(n.handouts.prepared) == ["c"]
        n.kubelet.held.update({"a", "b"})
        with pytest.raises(DeviceError, match="a: allocated; b: allocated"):
            await n.devices.allocate("p", ["a", "b"])
        # Recorded as any allocation: a restart with this record keeps them.
        record = StateStore(tmp_path / "state", tmp_path / "pins").load().allocations
        assert sorted(record) == ["a", "b"] and record["a"].prog_id == 5
        assert record["b"].setup_unknown and not record["a"].setup_unknown
        # And it ends as any once kubelet lists the pod no more: home, with the
        # pod's program, which a fresh one takes the place of.
        n.datapath.in_pods.discard("b")
        n.datapath.stale["b"] = 9
        n.kubelet.held.discard("b")
        assert await n.devices.reconcile(grace=0.0) == ["b"]
        await n.settle()
        assert _states(pool)["b"] == "free" and n.datapath.log[-1] == "replace b"


async def test_kubelet_down_at_start_then_up_settles_the_unknown_devices(tmp_path: Path) -> None:
    pool = _named("p", "a", "b")
    async with running(pool, tmp_path=tmp_path) as n:
        n.datapath.stale["a"] = 5
        answer: dict[str, set[str]] | None = None
        asked_in_vain = anyio.Event()

        async def ask() -> dict[str, set[str]] | None:
            if answer is None:
                asked_in_vain.set()
            return answer

        n.devices.distrust()
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(n.devices.settle_forever, ask, 0.001)
                await asked_in_vain.wait()
                assert _states(pool) == dict.fromkeys("ab", "unknown")
                with pytest.raises(DeviceError, match=UNKNOWN_HOLDER):
                    await n.devices.allocate("p", ["b"])
                answer = {"afxdp/p": {"a"}}  # kubelet is back; settle_forever returns
        await n.settle()
        assert _states(pool) == {"a": "allocated", "b": "free"}
        assert n.datapath.log == ["adopt a", "listen a", "attach b"]  # b prepared now
        assert not n.devices.distrusted


async def test_a_reload_before_kubelet_answers_keeps_every_device_unknown(tmp_path: Path) -> None:
    async with running(_named("p", "a", "b"), tmp_path=tmp_path) as n:
        n.devices.distrust()
        await n.devices.replace_pools([_named("p", "a", "b", "c"), _named("q", "d")])
        await n.settle()
        for name in ("p", "q"):
            assert set(_states(n.devices.pools[name]).values()) == {"unknown"}
        with pytest.raises(DeviceError, match=UNKNOWN_HOLDER):
            await n.devices.allocate("q", ["d"])
        assert n.datapath.log == []
        assert await n.devices.settle({}) == []
        n.devices.prepare_all()
        await n.settle()
        assert sorted(n.handouts.prepared) == ["a", "b", "c", "d"]
