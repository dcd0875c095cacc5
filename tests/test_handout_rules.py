"""What a handout is made of and how it ends (handouts.py), on a FAKE datapath:
the server's arguments, the mounts, the durable record, the status row, the
release and the shutdown, and the clean-up of what a previous run left."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from afxdp import config as cfg
from afxdp import contracts
from afxdp.errors import DeviceError
from afxdp.handouts import Handouts
from afxdp.inventory import NetDev
from afxdp.pools import Pool, PoolDevice
from afxdp.state import Allocation, StateStore
from afxdp.uds.handshake import HostCheck
from afxdp.uds.server import socket_path
from tests.fakes import FakeDatapath, FakeHandshake, FakeProgram, FakeSubfunctions

pytestmark = pytest.mark.anyio
LOGGER = "afxdp.handouts"


class Recording(FakeDatapath):
    """FAKE Datapath that also keeps what each UDS server and pin was given,
    and whose programs' detach fails for the devices in ``fail_detach``."""

    def __init__(self) -> None:
        super().__init__()
        self.servers: dict[str, dict[str, Any]] = {}
        self.pins: list[tuple[Path, int]] = []
        self.fail_detach: set[str] = set()

    def uds_server(self, **kwargs: Any) -> FakeHandshake:
        self.servers[kwargs["netdev"]] = kwargs
        return super().uds_server(**kwargs)

    def pin(self, program: Any, path: Path, uid: int) -> None:
        self.pins.append((path, uid))
        super().pin(program, path, uid)

    def attach(self, device: str) -> FakeProgram:
        program = super().attach(device)
        if device in self.fail_detach:

            def refuse() -> None:
                raise DeviceError(f"{device}: detach refused (fake)")

            program.detach = refuse  # type: ignore[method-assign]
        return program


def _pool(*ids: str, **extra: object) -> Pool:
    doc = {"pools": [{"name": "p", "mode": "primary", "devices": [{"name": i} for i in ids],
                      **extra}]}  # fmt: skip
    return Pool(cfg.load_config(json.dumps(doc)).config.pools[0], {i: PoolDevice(i) for i in ids})


def NETDEV(name: str) -> NetDev:
    return NetDev(name=name, ifindex=7, driver="ice", pci="0000:01:00.0")


class Node:
    def __init__(self, handouts: Handouts, datapath: Recording, tmp: Path) -> None:
        self.handouts, self.datapath, self.tmp = handouts, datapath, tmp
        self.asked: list[tuple[str, str, str]] = []


@asynccontextmanager
async def node(tmp_path: Path, secondary: FakeSubfunctions | None = None) -> AsyncIterator[Node]:
    datapath = Recording()
    asked: list[tuple[str, str, str]] = []

    async def check(hostname: str, *, resource: str, device: str) -> HostCheck:
        asked.append((hostname, resource, device))
        return HostCheck.OK

    def netdev_of(name: str) -> NetDev | None:
        return NETDEV(name)

    async with anyio.create_task_group() as tg:
        handouts = Handouts(task_group=tg, datapath=datapath, uds_dir=tmp_path / "uds",
                            pin_dir=tmp_path / "pins", check_host=check,
                            secondary=secondary or FakeSubfunctions(), netdev_of=netdev_of,
                            store=StateStore(tmp_path / "state" / "state.json"))  # fmt: skip
        n = Node(handouts, datapath, tmp_path)
        n.asked = asked
        yield n
        tg.cancel_scope.cancel()


async def test_a_uds_handout_serves_the_devices_socket_with_the_pools_settings(
    tmp_path: Path,
) -> None:
    pool = _pool("a", uid=1500, udsTimeout=30)
    async with node(tmp_path) as n:
        (handout,) = await n.handouts.start(pool, ["a"])
        given = n.datapath.servers["a"]
        assert given["path"] == socket_path(tmp_path / "uds", "a")
        assert given["path"] == tmp_path / "uds" / "a" / "afxdp.sock"
        assert (given["uid"], given["idle_timeout"]) == (1500, 30)
        assert given["map_fd"] == handout.xdp.map_fd if handout.xdp else False
        assert given["budget"] is n.handouts.uds_budget
        assert await given["check_host"]("pod-x") is HostCheck.OK
        assert n.asked == [("pod-x", "afxdp/p", "a")]  # the pool's resource, this device
        # The pod mounts the device's directory (the socket is re-created in it
        # after a restart), at the path the handshake's clients know.
        assert handout.mounts == [(str(tmp_path / "uds" / "a"), "/tmp/afxdp_dp/a")]
        assert handout.mounts[0][1] == str(contracts.pod_device_dir("a"))
        assert n.datapath.log == ["attach a", "listen a"]


async def test_a_pinned_handout_pins_the_map_for_the_pools_uid_and_mounts_its_directory(
    tmp_path: Path,
) -> None:
    pool = _pool("a", uid=1500, udsServerDisable=True, bpfMapPinningEnable=True)
    async with node(tmp_path) as n:
        (handout,) = await n.handouts.start(pool, ["a"])
        path = tmp_path / "pins" / "p" / "a" / "xsks_map"
        assert n.datapath.pins == [(path, 1500)]
        assert handout.pinned == path and handout.uds is None and n.datapath.servers == {}
        assert handout.mounts == [(str(path.parent), "/tmp/afxdp_dp/a")]


async def test_a_raw_handout_loads_nothing_and_mounts_nothing(tmp_path: Path) -> None:
    pool = _pool("a", udsServerDisable=True)
    async with node(tmp_path) as n:
        (handout,) = await n.handouts.start(pool, ["a"])
        assert (handout.xdp, handout.uds, handout.pinned, handout.mounts) == (None, None, None, [])
        assert n.datapath.log == []
        row = handout.status()
        assert (row.xdp_mode, row.xdp_prog_id, row.uds_socket, row.pinned_map) == (
            None, None, None, None)  # fmt: skip
        assert (row.uds_connections, row.uds_idle_timeout) == (0, None)


async def test_the_status_row_of_a_handout_says_what_serves_it(tmp_path: Path) -> None:
    async with node(tmp_path) as n:
        (served,) = await n.handouts.start(_pool("a", udsTimeout=45), ["a"])
        assert served.uds is not None and served.xdp is not None
        uds = served.uds
        uds.connections, uds.active, uds.refused, uds.denied, uds.failed = 9, 2, 3, 4, 5
        row = served.status()
        assert (row.pool, row.device, row.xdp_mode, row.xdp_prog_id) == (
            "p", "a", "native", served.xdp.prog_id)  # fmt: skip
        assert row.uds_socket == str(tmp_path / "uds" / "a" / "afxdp.sock")
        assert (row.uds_connections, row.uds_active, row.uds_refused, row.uds_denied,
                row.uds_failed, row.uds_idle_timeout) == (9, 2, 3, 4, 5, 45)  # fmt: skip
        assert row.pinned_map is None
        pinned_pool = _pool("b", udsServerDisable=True, bpfMapPinningEnable=True)
        (pinned,) = await n.handouts.start(pinned_pool, ["b"])
        row = pinned.status()
        assert row.pinned_map == str(tmp_path / "pins" / "p" / "b" / "xsks_map")
        assert (row.uds_socket, row.uds_connections, row.uds_idle_timeout) == (None, 0, None)


async def test_the_durable_record_says_how_to_take_each_handout_over(tmp_path: Path) -> None:
    async with node(tmp_path) as n:
        (served,) = await n.handouts.start(_pool("a"), ["a"])
        pinned_pool = _pool("b", udsServerDisable=True, bpfMapPinningEnable=True)
        await n.handouts.start(pinned_pool, ["b"])
        on_disk = StateStore(tmp_path / "state" / "state.json").load()
        assert served.xdp is not None
        a = on_disk.allocations["a"]
        assert (a.pool, a.device, a.prog_id, a.pinned, a.secondary) == (
            "p", "a", served.xdp.prog_id, None, False)  # fmt: skip
        # The host's view of the device, for a restart that finds it in the pod.
        assert msgspec.convert(a.netdev, NetDev) == NETDEV("a")
        assert on_disk.allocations["b"].pinned == str(tmp_path / "pins" / "p" / "b" / "xsks_map")
        assert on_disk.allocations["b"].prog_id is not None
        assert await n.handouts.release("a")
        assert list(StateStore(tmp_path / "state" / "state.json").load().allocations) == ["b"]


async def test_a_cdq_handout_creates_its_secondary_records_it_and_deletes_it_at_the_end(
    tmp_path: Path,
) -> None:
    subfunctions = FakeSubfunctions()
    doc = {"pools": [{"name": "p", "mode": "cdq", "drivers": [{"name": "ice"}]}]}
    config = cfg.load_config(json.dumps(doc)).config.pools[0]
    pool = Pool(config, {"enssf1": PoolDevice("enssf1", parent="ens", index=1)})
    async with node(tmp_path, subfunctions) as n:
        (handout,) = await n.handouts.start(pool, ["enssf1"])
        assert subfunctions.created == ["enssf1"] and handout.secondary_created
        on_disk = StateStore(tmp_path / "state" / "state.json").load()
        assert on_disk.allocations["enssf1"].secondary is True
        assert await n.handouts.release("enssf1")
        assert subfunctions.deleted == ["enssf1"]


async def test_release_stops_serving_detaches_and_forgets_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    async with node(tmp_path) as n:
        (handout,) = await n.handouts.start(_pool("a"), ["a"])
        assert handout.uds_scope is not None
        assert await n.handouts.release("a") is True
        assert n.datapath.log == ["attach a", "listen a", "close a", "detach a"]
        assert handout.uds_scope.cancel_called and n.handouts.handouts == {}
        assert "a: released" in [r.getMessage() for r in caplog.records]
        assert await n.handouts.release("a") is False  # nothing to take back twice
        assert n.datapath.log[-1] == "detach a"


async def test_a_release_after_skip_unload_bpf_leaves_the_program_attached(
    tmp_path: Path,
) -> None:
    async with node(tmp_path) as n:
        await n.handouts.start(_pool("a", "b"), ["a", "b"])
        n.handouts.keep_xdp.add("a")  # the pod's DEL said skipUnloadBpf
        await n.handouts.release("a")
        await n.handouts.release("b", keep_xdp=True)
        assert n.datapath.log[-4:] == ["close a", "abandon a", "close b", "abandon b"]
        assert n.handouts.keep_xdp == set()  # used once


async def test_a_failing_detach_is_logged_and_the_rest_of_the_release_still_runs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    subfunctions = FakeSubfunctions()
    doc = {"pools": [{"name": "p", "mode": "cdq", "drivers": [{"name": "ice"}]}]}
    config = cfg.load_config(json.dumps(doc)).config.pools[0]
    pool = Pool(config, {"enssf1": PoolDevice("enssf1", parent="ens", index=1)})
    async with node(tmp_path, subfunctions) as n:
        n.datapath.fail_detach.add("enssf1")
        await n.handouts.start(pool, ["enssf1"])
        with caplog.at_level(logging.ERROR, logger=LOGGER):
            assert await n.handouts.release("enssf1")
        assert "enssf1: detaching XDP failed: enssf1: detach refused (fake)" in [
            r.getMessage() for r in caplog.records
        ]
        assert subfunctions.deleted == ["enssf1"]  # still deleted
        assert StateStore(tmp_path / "state" / "state.json").load().allocations == {}


async def test_shutdown_stops_serving_but_leaves_every_allocation_in_place(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    closed: list[tuple[str, bool]] = []
    async with node(tmp_path) as n:
        pool = _pool("a", "b", "c")
        await n.handouts.start(pool, ["b", "a"])
        assert await n.handouts.prepare(pool, pool.devices["c"]) is None
        for handout in n.handouts.handouts.values():
            assert handout.uds is not None

            def close(*, keep_dir: bool = False, device: str = handout.device) -> None:
                closed.append((device, keep_dir))

            handout.uds.close = close  # type: ignore[method-assign]
        await n.handouts.shutdown()
        assert sorted(closed) == [("a", True), ("b", True)]  # the pods' directories stay
        assert sorted(n.datapath.log[-3:]) == ["abandon a", "abandon b", "detach c"]
        assert n.handouts.closing and n.handouts.handouts == {} and n.handouts.prepared == {}
        assert "left 2 allocation(s) in place for the next start: a, b" in [
            r.getMessage() for r in caplog.records
        ]
        # And the record still says how to take them over.
        assert sorted(StateStore(tmp_path / "state" / "state.json").load().allocations) == [
            "a", "b"]  # fmt: skip
        assert await n.handouts.prepare(pool, pool.devices["c"]) is None  # closing: nothing
        assert "c" not in n.handouts.prepared


async def test_forget_undoes_what_a_previous_run_left_for_an_ended_allocation(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    subfunctions = FakeSubfunctions()
    subfunctions.created.append("gone")
    async with node(tmp_path, subfunctions) as n:
        sock = socket_path(tmp_path / "uds", "a")
        sock.parent.mkdir(parents=True)
        sock.write_text("")
        pin = tmp_path / "pins" / "p" / "b" / "xsks_map"
        store = n.handouts.store
        await store.put([Allocation(pool="p", device="a", prog_id=4),
                         Allocation(pool="p", device="b", prog_id=5, pinned=str(pin)),
                         Allocation(pool="p", device="gone", secondary=True)])  # fmt: skip
        n.datapath.stale["a"] = 4
        await n.handouts.forget(store.record.allocations["a"])
        assert not sock.exists() and not sock.parent.exists()
        assert n.datapath.log == ["detach_stale a"]
        await n.handouts.forget(store.record.allocations["b"])
        assert n.datapath.log[-1] == "unpin b"
        await n.handouts.forget(store.record.allocations["gone"])
        assert subfunctions.deleted == ["gone"]
        assert StateStore(tmp_path / "state" / "state.json").load().allocations == {}


async def test_a_prepared_program_that_cannot_be_detached_is_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with node(tmp_path) as n:
        pool = _pool("a")
        n.datapath.fail_detach.add("a")
        assert await n.handouts.prepare(pool, pool.devices["a"]) is None
        with caplog.at_level(logging.ERROR, logger=LOGGER):
            await n.handouts.unprepare("a")
        assert "a: detaching the prepared program failed: a: detach refused (fake)" in [
            r.getMessage() for r in caplog.records
        ]
        assert n.handouts.prepared == {}
        await n.handouts.prepare(pool, pool.devices["a"])
        n.handouts.forget_prepared("a")  # its link went, and the program with it
        assert n.datapath.log[-1] == "abandon a" and n.handouts.prepared == {}


async def test_a_program_of_ours_left_on_a_free_device_is_replaced_saying_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    async with node(tmp_path) as n:
        pool = _pool("a")
        n.datapath.stale["a"] = 77
        assert await n.handouts.prepare(pool, pool.devices["a"]) is None
        assert n.datapath.log == ["detach_stale a", "attach a"]
        assert "a: detached program 77 left over" in [r.getMessage() for r in caplog.records]
        n.datapath.fail_attach.add("b")
        pool_b = _pool("b")
        assert await n.handouts.prepare(pool_b, pool_b.devices["b"]) == "b: attach failed (fake)"
