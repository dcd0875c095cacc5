"""DRA: claims prepared and unprepared (dra/claims.py), the kubelet plugin
(dra/plugin.py, dra/registration.py) and the claim reader (dra/apiserver.py).

Against independent stand-ins, named as such: the FAKE kubelet of
tests/kubelet_dra.py (grpcio), the FAKE API server of tests/apiserver.py (the
stdlib's HTTP server, every claim checked against the official
resource.k8s.io/v1 schema), and here a FAKE datapath (tests/fakes.py); the
privileged tests at the end use real veths, sockets and processes.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import pytest

from afxdp import config as cfg
from afxdp.devices import Devices
from afxdp.dra import claims as cl
from afxdp.dra.apiserver import ApiServerClaims, HttpError, parse_response
from afxdp.dra.registration import DraRegistration
from afxdp.handouts import Handouts
from afxdp.inventory import NetDev
from afxdp.pools import Pool, PoolDevice
from afxdp.uds.handshake import HostCheck
from tests.apiserver import FakeApiServer, resource_claim, result
from tests.fakes import FakeDatapath, FakeSubfunctions
from tests.kubelet_dra import FakeDraKubelet

pytestmark = pytest.mark.anyio
NODE = "node1"
UID = "6f2c9a1e-0d1b-4a57-9a3e-3c1f0f6b2a10"


def uid(n: int) -> str:
    return f"00000000-0000-4000-8000-{n:012d}"


def _pools(**pools: tuple[list[str], str]) -> list[Pool]:
    """Config pools by name: (devices, api)."""
    doc = {"pools": [{"name": name, "mode": "primary", "api": api,
                      "devices": [{"name": d} for d in ids]}
                     for name, (ids, api) in pools.items()]}  # fmt: skip
    return [Pool(c, {d: PoolDevice(d) for d in pools[c.name][0]})
            for c in cfg.load_config(json.dumps(doc)).config.pools]  # fmt: skip


async def _link(name: str) -> NetDev | None:
    return NetDev(name=name, ifindex=1, driver="veth", oper_state="up", admin_up=True)


async def _scan() -> list[NetDev]:
    return []


async def _no_stale(resource: str, devices: Any) -> list[str]:
    raise AssertionError("a DRA pool's allocation never asks PodResources")


async def _ok(hostname: str, *, resource: str, device: str) -> HostCheck:
    return HostCheck.OK


class Side:
    """Devices and Claims on a FAKE datapath, claims read from the FAKE API server."""

    def __init__(self, devices: Devices, claims: cl.Claims, datapath: FakeDatapath,
                 api: FakeApiServer, tmp: Path) -> None:  # fmt: skip
        self.devices, self.claims, self.datapath, self.api, self.tmp = (
            devices, claims, datapath, api, tmp)  # fmt: skip

    def put(
        self, name: str, claim_uid: str, *results: dict[str, str], pods: tuple[str, ...] = ("pod1",)
    ) -> None:
        self.api.put(resource_claim("ns", name, claim_uid, list(results), pods=pods))

    def spec(self, claim_uid: str) -> dict[str, Any]:
        loaded: dict[str, Any] = json.loads(
            (self.tmp / "cdi" / f"afxdp.dev_claim-{claim_uid}.json").read_text()
        )
        return loaded


@pytest.fixture
def api() -> Iterator[FakeApiServer]:
    server = FakeApiServer()
    yield server
    server.stop()


@asynccontextmanager
async def side(
    tmp: Path, api: FakeApiServer, pools: list[Pool] | None = None
) -> AsyncIterator[Side]:
    datapath = FakeDatapath()
    pools = pools or _pools(p=(["a", "b", "c"], "dra"), q=(["x"], "devicePlugin"))
    async with anyio.create_task_group() as tg:
        handouts = Handouts(task_group=tg, datapath=datapath, uds_dir=tmp / "uds",
                            pin_dir=tmp / "pins", check_host=_ok, secondary=FakeSubfunctions(),
                            netdev_of=lambda _: None)  # fmt: skip
        devices = Devices(pools, handouts, find_stale=_no_stale, read_link=_link, scan=_scan)
        claims = cl.Claims(devices, ApiServerClaims(api.url), NODE, state_dir=tmp / "state",
                           cdi_dir=tmp / "cdi")  # fmt: skip
        claims.load()
        yield Side(devices, claims, datapath, api, tmp)
        await handouts.shutdown()
        tg.cancel_scope.cancel()


P = f"{NODE}/p"  # pool p's ResourceSlice pool


async def test_prepare_hands_out_each_device_as_allocate_does_and_names_its_cdi_devices(
    tmp_path: Path, api: FakeApiServer
) -> None:
    async with side(tmp_path, api) as s:
        s.put("c1", UID, result("a", P), result("b", P, request="other"))
        done = await s.claims.prepare("ns", "c1", UID)
        assert [(d.request, d.dra_pool, d.pool, d.device, d.cdi_ids) for d in done.devices] == [
            ("nic", P, "p", "a", (f"afxdp.dev/claim={UID}-a",)),
            ("other", P, "p", "b", (f"afxdp.dev/claim={UID}-b",)),
        ]
        assert done.pods == ("ns/pod1",)
        # Allocate's path: a program and a UDS server per device.
        assert s.datapath.log == ["attach a", "listen a", "attach b", "listen b"]
        assert {d: s.devices.device_allocated(d) for d in "abc"} == {
            "a": True,
            "b": True,
            "c": False,
        }
        # The CDI spec gives a container what Allocate's response gives it.
        spec = s.spec(UID)
        assert (spec["cdiVersion"], spec["kind"]) == ("0.3.0", "afxdp.dev/claim")
        a = next(d for d in spec["devices"] if d["name"] == f"{UID}-a")
        assert a["containerEdits"] == {
            "env": ["AFXDP_DEVICES_P=a b", "AFXDP_DEVICE_P_A=a"],
            "mounts": [{"hostPath": str(tmp_path / "uds" / "a"), "containerPath": "/tmp/afxdp_dp/a",
                        "options": ["rbind", "rw"]}],
        }  # fmt: skip
        assert s.devices.handouts.handouts["a"].mounts == [
            (str(tmp_path / "uds" / "a"), "/tmp/afxdp_dp/a")
        ]


async def test_kubelets_retry_gets_the_same_answer_and_nothing_is_set_up_twice(
    tmp_path: Path, api: FakeApiServer
) -> None:
    async with side(tmp_path, api) as s:
        s.put("c1", UID, result("a", P))
        answers: list[cl.PreparedClaim] = []

        async def prepare() -> None:
            answers.append(await s.claims.prepare("ns", "c1", UID))

        async with anyio.create_task_group() as tg:  # two at once, as a retry can overlap
            tg.start_soon(prepare)
            tg.start_soon(prepare)
        await prepare()  # and one after
        assert answers[0] == answers[1] == answers[2]
        assert s.datapath.log == ["attach a", "listen a"]
        assert api.gets == 1


async def test_every_refusal_is_that_claims_own_and_sets_nothing_up(
    tmp_path: Path, api: FakeApiServer
) -> None:
    async with side(tmp_path, api) as s:
        s.devices.pools["p"].devices["c"].healthy = False
        cases = {
            uid(1): ([result("a", P, driver="gpu.example.com")],
                     "no device of driver afxdp.dev is allocated to it (only of gpu.example.com)"),
            uid(2): ([result("a", "node2/p")], "a: pool node2/p is not of this node (node1)"),
            uid(3): ([result("x", f"{NODE}/q")],
                     "x: pool q is offered through the device plugin, not DRA"),
            uid(4): ([result("zz", P)], "zz: not a device of pool p"),
            uid(5): ([result("a", P), result("c", P)], "pool p: c: unhealthy"),
            uid(6): ([result("a", f"{NODE}/gone")], "a: pool node1/gone is not one of this node's"),
        }  # fmt: skip
        for claim_uid, (results, _) in cases.items():
            s.put(f"c{claim_uid[-1]}", claim_uid, *results)
        api.put(resource_claim("ns", "pending", uid(7)))  # not allocated yet
        for claim_uid, (_, why) in cases.items():
            with pytest.raises(cl.PrepareError) as err:
                await s.claims.prepare("ns", f"c{claim_uid[-1]}", claim_uid)
            assert str(err.value) == f"claim ns/c{claim_uid[-1]} ({claim_uid}): {why}"
        with pytest.raises(cl.PrepareError, match=r"\(.*7\): not allocated$"):
            await s.claims.prepare("ns", "pending", uid(7))
        with pytest.raises(cl.PrepareError, match="no such ResourceClaim"):
            await s.claims.prepare("ns", "nosuch", uid(8))
        with pytest.raises(cl.PrepareError, match=f"its uid is {uid(1)}, not {uid(9)}"):
            await s.claims.prepare("ns", "c1", uid(9))  # deleted and made again
        with pytest.raises(cl.PrepareError, match="is not a uid"):
            await s.claims.prepare("ns", "c1", "../../etc")
        assert s.datapath.log == []
        assert s.claims.prepared == {} and not (tmp_path / "cdi").exists()
        assert not any(s.devices.device_allocated(d) for d in "abc")


async def test_a_claim_across_two_pools_is_prepared_whole_or_not_at_all(
    tmp_path: Path, api: FakeApiServer
) -> None:
    pools = _pools(p=(["a"], "dra"), r=(["b", "e"], "dra"))
    async with side(tmp_path, api, pools) as s:
        s.datapath.fail_attach.add("b")
        s.put("c1", UID, result("a", P), result("b", f"{NODE}/r"))
        with pytest.raises(cl.PrepareError, match=r"pool r: .*b: attach failed"):
            await s.claims.prepare("ns", "c1", UID)
        assert not s.devices.device_allocated("a") and s.claims.prepared == {}
        s.put("c2", uid(2), result("a", P), result("e", f"{NODE}/r"))
        done = await s.claims.prepare("ns", "c2", uid(2))
        assert {d.pool for d in done.devices} == {"p", "r"}
        env = {e for d in s.spec(uid(2))["devices"] for e in d["containerEdits"]["env"]}
        assert env == {"AFXDP_DEVICES_P=a", "AFXDP_DEVICE_P_A=a", "AFXDP_DEVICES_R=e",
                       "AFXDP_DEVICE_R_E=e"}  # fmt: skip


async def test_unprepare_releases_all_and_a_claim_never_prepared_is_done(
    tmp_path: Path, api: FakeApiServer
) -> None:
    async with side(tmp_path, api) as s:
        s.put("c1", UID, result("a", P), result("b", P))
        await s.claims.prepare("ns", "c1", UID)
        assert await s.claims.unprepare(UID)
        assert not s.devices.device_allocated("a") and not s.devices.device_allocated("b")
        assert s.devices.handouts.handouts == {}
        assert os.listdir(tmp_path / "cdi") == []
        assert s.claims.prepared == {}
        assert not await s.claims.unprepare(UID)  # kubelet's retry: done already
        assert not await s.claims.unprepare(uid(3))  # one it never saw prepared


async def test_prepared_claims_are_read_back_and_hold_their_devices_after_a_restart(
    tmp_path: Path, api: FakeApiServer
) -> None:
    async with side(tmp_path, api) as s:
        s.put("c1", UID, result("a", P))
        before = await s.claims.prepare("ns", "c1", UID)
    async with side(tmp_path, api) as s:  # a new afxdpd on the same state dir
        assert s.claims.prepared == {UID: before}
        assert s.claims.held() == {"afxdp/p": {"a"}}

        async def kubelet_lists() -> dict[str, set[str]] | None:
            return {"afxdp/q": {"x"}}

        async def kubelet_down() -> dict[str, set[str]] | None:
            return None

        assert await s.claims.held_too(kubelet_lists)() == {"afxdp/q": {"x"}, "afxdp/p": {"a"}}
        assert await s.claims.held_too(kubelet_down)() is None
        # Another claim's spec left behind (its Unprepare came while afxdpd was down) goes.
        (tmp_path / "cdi" / f"afxdp.dev_claim-{uid(5)}.json").write_text("{}")
        await s.claims.clean_specs()
        assert os.listdir(tmp_path / "cdi") == [f"afxdp.dev_claim-{UID}.json"]


async def test_a_claims_record_naming_what_is_not_ours_is_set_aside_never_acted_on(
    tmp_path: Path, api: FakeApiServer
) -> None:
    """A forged record could make a restart remove a file (the claim's CDI spec
    is named by its uid) or release a device by a path-like name."""
    (tmp_path / "state").mkdir()
    for forged in (
        {"uid": "../../etc/x", "namespace": "ns", "name": "c", "devices": []},
        {"uid": UID, "namespace": "ns", "name": "c",
         "devices": [{"request": "r", "dra_pool": P, "pool": "p", "device": "../a"}]},
    ):  # fmt: skip
        (tmp_path / "state" / "claims.json").write_text(
            json.dumps({"claims": {forged["uid"]: forged}}) + "\n"
        )
        async with side(tmp_path, api) as s:
            assert s.claims.prepared == {} and s.claims.held() == {}
        assert not (tmp_path / "state" / "claims.json").exists()
        assert (tmp_path / "state" / "claims.json.unreadable").exists()


async def test_the_handshake_accepts_only_the_pods_the_claim_is_reserved_for(
    tmp_path: Path, api: FakeApiServer
) -> None:
    async with side(tmp_path, api) as s:
        s.put("c1", UID, result("a", P), pods=("web-0",))
        await s.claims.prepare("ns", "c1", UID)
        assert await s.claims.host_check("web-0", "a") is HostCheck.OK
        assert await s.claims.host_check("web-1", "a") is HostCheck.REFUSED
        assert await s.claims.host_check("web-0", "b") is None  # no claim: PodResources says


async def test_the_claim_reader_says_why_it_cannot_read(tmp_path: Path, api: FakeApiServer) -> None:
    reader = ApiServerClaims(api.url)
    api.down = True
    with pytest.raises(cl.ClaimUnavailable, match="answered HTTP 503"):
        await reader.get("ns", "c1", UID)
    api.stop()
    with pytest.raises(cl.ClaimUnavailable, match=f"the API server at {api.url}: "):
        await reader.get("ns", "c1", UID)
    with pytest.raises(ValueError, match="want http://HOST:PORT or unix:///PATH"):
        ApiServerClaims("https://10.0.0.1:6443")


def test_http_answers_are_read_by_length_or_chunks_and_a_cut_one_is_an_error() -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
    assert parse_response(head + b"Content-Length: 2\r\n\r\n{}") == (200, b"{}")
    chunked = (
        head + b'Transfer-Encoding: chunked\r\n\r\n3\r\n{"a\r\n4;x=y\r\n": 1\r\n1\r\n}\r\n0\r\n\r\n'
    )
    assert parse_response(chunked) == (200, b'{"a": 1}')
    for cut, why in [
        (head + b"Content-Length: 9\r\n\r\n{}", "cut short"),
        (head + b"Transfer-Encoding: chunked\r\n\r\n9\r\n{}", "chunked body cut short"),
        (head + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n", "not a chunk size"),
        (head, "ended inside its header"),
        (b"SSH-2.0-x\r\n\r\n", "not an HTTP/1.x status line"),
    ]:
        with pytest.raises(HttpError, match=why):
            parse_response(cut)


# -- the kubelet plugin, with the FAKE kubelet (grpcio) ------------------------


@asynccontextmanager
async def plugin(
    tmp: Path, api: FakeApiServer, **kw: Any
) -> AsyncIterator[tuple[Side, DraRegistration, FakeDraKubelet]]:
    kubelet = FakeDraKubelet(tmp / "kubelet")
    async with side(tmp, api, **kw) as s, anyio.create_task_group() as tg:
        reg = DraRegistration(s.claims, tmp / "kubelet")
        await tg.start(reg.run)
        kubelet.start()
        try:
            yield s, reg, kubelet
        finally:
            kubelet.stop()
            tg.cancel_scope.cancel()


async def test_kubelet_registers_the_driver_and_prepares_through_v1_and_v1beta1(
    tmp_path: Path, api: FakeApiServer
) -> None:
    async with plugin(tmp_path, api) as (s, reg, kubelet):
        [info] = await anyio.to_thread.run_sync(kubelet.wait_registrations, 1)
        assert (info.type, info.name, info.endpoint, list(info.supported_versions)) == (
            "DRAPlugin", "afxdp.dev", str(tmp_path / "kubelet/plugins/afxdp.dev/dra.sock"),
            ["v1.DRAPlugin", "v1beta1.DRAPlugin"])  # fmt: skip
        assert (tmp_path / "kubelet/plugins_registry/afxdp.dev-reg.sock").is_socket()
        assert reg.registered and reg.registrations == 1
        s.put("c1", uid(1), result("a", P))
        s.put("c2", uid(2), result("b", P))
        s.put("c3", uid(3), result("a", f"{NODE}/q"))
        for version, n in (("v1", 1), ("v1beta1", 2)):
            prepare = partial(kubelet.prepare, ("ns", f"c{n}", uid(n)), ("ns", "c3", uid(3)),
                              version=version)  # fmt: skip
            resp = await anyio.to_thread.run_sync(prepare)
            [dev] = resp.claims[uid(n)].devices
            assert (resp.claims[uid(n)].error, list(dev.request_names), dev.pool_name,
                    dev.device_name, list(dev.cdi_device_ids)) == (
                "", ["nic"], P, "ab"[n - 1], [f"afxdp.dev/claim={uid(n)}-{'ab'[n - 1]}"])  # fmt: skip
            assert resp.claims[uid(3)].error == (
                f"claim ns/c3 ({uid(3)}): a: pool q is offered through the device plugin, not DRA"
            )
            unprepare = partial(kubelet.unprepare, ("ns", f"c{n}", uid(n)), version=version)
            resp = await anyio.to_thread.run_sync(unprepare)
            assert resp.claims[uid(n)].error == ""
        assert s.claims.prepared == {} and s.devices.handouts.handouts == {}


async def test_twenty_claims_in_one_call_each_get_their_answer(
    tmp_path: Path, api: FakeApiServer
) -> None:
    names = [f"d{i}" for i in range(20)]
    async with plugin(tmp_path, api, pools=_pools(p=(names, "dra"))) as (s, _, kubelet):
        await anyio.to_thread.run_sync(kubelet.wait_registrations, 1)
        refs = [("ns", f"c{i}", uid(i)) for i in range(20)]
        for i, dev in enumerate(names):
            s.put(f"c{i}", uid(i), result(dev, P))
        resp = await anyio.to_thread.run_sync(lambda: kubelet.prepare(*refs))
        assert {u: (a.error, a.devices[0].device_name) for u, a in resp.claims.items()} == {
            uid(i): ("", dev) for i, dev in enumerate(names)}  # fmt: skip
        assert all(s.devices.device_allocated(d) for d in names)
        resp = await anyio.to_thread.run_sync(lambda: kubelet.unprepare(*refs))
        assert {u: a.error for u, a in resp.claims.items()} == {uid(i): "" for i in range(20)}
        assert s.devices.handouts.handouts == {} and s.claims.prepared == {}


async def test_a_kubelet_restart_deleting_the_sockets_gets_the_driver_served_and_registered_again(
    tmp_path: Path, api: FakeApiServer
) -> None:
    async with plugin(tmp_path, api) as (s, reg, kubelet):
        await anyio.to_thread.run_sync(kubelet.wait_registrations, 1)
        s.put("c1", uid(1), result("a", P))
        await anyio.to_thread.run_sync(lambda: kubelet.prepare(("ns", "c1", uid(1))))
        kubelet.restart()
        infos = await anyio.to_thread.run_sync(kubelet.wait_registrations, 2)
        assert len(infos) == 2 and reg.registrations == 2 and reg.served == 2
        # The claim prepared before is still prepared; Unprepare through the new socket releases.
        resp = await anyio.to_thread.run_sync(lambda: kubelet.unprepare(("ns", "c1", uid(1))))
        assert resp.claims[uid(1)].error == "" and not s.devices.device_allocated("a")


async def test_a_registration_kubelet_refuses_is_said_and_not_counted(
    tmp_path: Path, api: FakeApiServer
) -> None:
    kubelet_dir = tmp_path / "kubelet"
    async with side(tmp_path, api) as s, anyio.create_task_group() as tg:
        reg = DraRegistration(s.claims, kubelet_dir)
        await tg.start(reg.run)
        kubelet = FakeDraKubelet(kubelet_dir)
        kubelet.refuse = "DRA is disabled (feature gate)"
        kubelet.start()
        try:
            with anyio.fail_after(10):
                while reg.error != kubelet.refuse:
                    await anyio.sleep(0.02)
            assert not reg.registered and reg.registrations == 0
        finally:
            kubelet.stop()
            tg.cancel_scope.cancel()
