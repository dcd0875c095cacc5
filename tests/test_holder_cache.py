"""The pod's identity for a device is fetched after Allocate, or told by the
CNI ADD that moved the device into the pod, so a handshake usually needs no
live PodResources lookup; any other hostname is checked with kubelet, whose
word replaces what was cached; the cache never outlives the allocation (a
device handed to another pod refuses the previous one)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import pytest

from afxdp import podresources
from afxdp.podresources import FIRST_ASK, PodResourcesChecker
from afxdp.uds.client import HandshakeError, UdsClient
from afxdp.uds.handshake import HostCheck
from tests.kernel import Lab, ip
from tests.kubelet import FakeKubelet
from tests.node import NodeUnderTest, running
from tests.test_cni import Node

pytestmark = pytest.mark.anyio
RESOURCE = "afxdp/pool1"


def _shake(path: Path, pod: str, dev: str) -> None:
    with UdsClient(path) as c:
        c.connect(pod)
        c.fin()


@pytest.mark.privileged
async def test_a_handshake_after_the_prefetch_asks_kubelet_nothing_and_the_cache_ends_with_the_allocation(
    tmp_path: Path, lab: Lab
) -> None:
    dev, peer = lab.veth(lab.name("hc"), lab.name("hd"))
    ip("link", "set", dev, "up")
    ip("link", "set", peer, "up")
    node = NodeUnderTest(tmp_path, lab, [dev])
    async with running(node):
        assert node.service is not None and node.service.devices is not None
        checker = node.service.devices._holders
        assert isinstance(checker, PodResourcesChecker)
        node.kubelet.hold("pod-a", "afxdp/pool1", dev)
        await node.allocate(dev)
        with anyio.fail_after(10):  # the background prefetch learns pod-a
            while checker._holders.get(("afxdp/pool1", dev)) != frozenset({"pod-a"}):
                await anyio.sleep(0.01)
        sock = node.paths.uds_dir / dev / "afxdp.sock"
        before = checker.lookups
        await anyio.to_thread.run_sync(_shake, sock, "pod-a", dev)
        assert checker.lookups == before  # answered from the cache
        # The device goes to pod-b (kubelet reallocates it: a new Allocate reclaims).
        node.kubelet.pods.clear()
        await node.allocate(dev)
        node.kubelet.hold("pod-b", "afxdp/pool1", dev)
        with pytest.raises(HandshakeError):
            await anyio.to_thread.run_sync(_shake, sock, "pod-a", dev)
        await anyio.to_thread.run_sync(_shake, sock, "pod-b", dev)


async def test_prefetches_that_overlap_share_one_pod_resources_call(tmp_path: Path) -> None:
    kubelet = FakeKubelet(tmp_path / "kubelet")
    kubelet.start_pod_resources()
    try:
        checker = PodResourcesChecker(tmp_path / "kubelet" / "pod-resources" / "kubelet.sock")
        devices = [f"dev{i}" for i in range(20)]
        kubelet.hold("pod-a", "afxdp/p", "dev7")  # admitted; the other 19 never are
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                for dev in devices:  # 20 pods started at once, as a scaled-up Deployment
                    tg.start_soon(checker.prefetch, "afxdp/p", dev, 0.5)
        # Each wait (50, 100, 200 ms) asked kubelet about once for all 20, not 20 times.
        assert 2 <= kubelet.list_calls <= 8, kubelet.list_calls  # 60 without sharing
        assert checker._holders == {("afxdp/p", "dev7"): frozenset({"pod-a"})}
    finally:
        kubelet.stop()


async def test_a_burst_of_allocates_asks_kubelet_every_50_ms_not_once_per_pod(
    tmp_path: Path,
) -> None:
    kubelet = FakeKubelet(tmp_path / "kubelet")
    kubelet.start_pod_resources()
    try:
        checker = PodResourcesChecker(tmp_path / "kubelet" / "pod-resources" / "kubelet.sock")
        devices = [f"dev{i}" for i in range(40)]
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                began = anyio.current_time()
                for dev in devices:  # kubelet Allocates one pod after another, 5 ms apart
                    tg.start_soon(checker.prefetch, "afxdp/p", dev)
                    await anyio.sleep(0.005)
                    kubelet.hold(f"pod-{dev}", "afxdp/p", dev)  # ... and admits each
                burst = anyio.current_time() - began
        assert {d: checker._holders.get(("afxdp/p", d)) for d in devices} == {
            d: frozenset({f"pod-{d}"}) for d in devices
        }
        # About one List per 50 ms of the burst (200 ms, more on a busy machine),
        # not one per pod (40 before).
        lists = kubelet.list_calls
        assert lists <= burst / FIRST_ASK + 3 and lists < len(devices) / 2, (lists, burst)
        assert checker._waiting == {} and not checker._asking
    finally:
        kubelet.stop()


async def test_a_device_that_joins_a_long_wait_is_asked_about_at_once(tmp_path: Path) -> None:
    kubelet = FakeKubelet(tmp_path / "kubelet")
    kubelet.start_pod_resources()
    try:
        checker = PodResourcesChecker(tmp_path / "kubelet" / "pod-resources" / "kubelet.sock")
        async with anyio.create_task_group() as tg:
            tg.start_soon(checker.prefetch, "afxdp/p", "never", 5.0)  # its pod never comes
            await anyio.sleep(1.2)  # the task asks about every second from here on
            asked = kubelet.list_calls
            while kubelet.list_calls == asked:  # right after one of its asks
                await anyio.sleep(0.005)
            kubelet.hold("pod-b", "afxdp/p", "dev-b")
            began = anyio.current_time()
            await checker.prefetch("afxdp/p", "dev-b")  # joins the wait
            with anyio.fail_after(5):
                while ("afxdp/p", "dev-b") not in checker._holders:
                    await anyio.sleep(0.005)
            waited = anyio.current_time() - began
            tg.cancel_scope.cancel()
        assert waited < 0.5, waited  # about FIRST_ASK, not the second the wait had grown to
    finally:
        kubelet.stop()


@pytest.mark.privileged
async def test_the_first_handshake_after_its_add_asks_kubelet_nothing_and_any_other_name_asks_it(
    tmp_path: Path, lab: Lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The pod connects before the prefetch after Allocate has learnt its name
    # from kubelet (it would List in a minute): only the ADD has told it.
    monkeypatch.setattr(podresources, "FIRST_ASK", 60.0)
    monkeypatch.setattr(podresources, "SLOWEST_ASK", 60.0)
    dev, peer = lab.veth(lab.name("ha"), lab.name("hb"))
    ip("link", "set", dev, "up")
    ip("link", "set", peer, "up")
    node = Node(tmp_path, lab, [dev])
    async with running(node):
        node.kubelet.hold("pod-a", RESOURCE, dev)
        await node.allocate(dev)
        netns = f"/run/netns/{lab.netns('hcadd')}"
        code, out, err = await node.cni("ADD", node.netconf(dev), netns=netns)  # K8S_POD_NAME=pod-a
        assert code == 0, (out, err)
        sock = node.paths.uds_dir / dev / "afxdp.sock"
        asked = node.kubelet.list_calls
        await anyio.to_thread.run_sync(_shake, sock, "pod-a", dev)
        assert node.kubelet.list_calls == asked  # answered from what the ADD said
        # A wrong pod name is never let in on the cache: kubelet is asked, and refuses it.
        with pytest.raises(HandshakeError, match="/host_nak"):
            await anyio.to_thread.run_sync(_shake, sock, "pod-x", dev)
        assert node.kubelet.list_calls == asked + 1
        # pod-a replaced by pod-b since (kubelet lists pod-b): pod-b is let in on
        # kubelet's word, and from then on pod-a no longer is.
        node.kubelet.pods = []
        node.kubelet.hold("pod-b", RESOURCE, dev)
        await anyio.to_thread.run_sync(_shake, sock, "pod-b", dev)
        with pytest.raises(HandshakeError, match="/host_nak"):
            await anyio.to_thread.run_sync(_shake, sock, "pod-a", dev)
        assert node.kubelet.list_calls == asked + 3


@pytest.fixture
def kubelet(tmp_path: Path) -> Iterator[FakeKubelet]:
    double = FakeKubelet(tmp_path / "kubelet")
    double.start_pod_resources()
    yield double
    double.stop()


@pytest.fixture
def checker(kubelet: FakeKubelet) -> PodResourcesChecker:
    return PodResourcesChecker(kubelet.dir / "pod-resources" / "kubelet.sock")


async def _check(checker: PodResourcesChecker, host: str, dev: str) -> HostCheck:
    return await checker.check(host, resource=RESOURCE, device=dev)


async def _while_listing(
    kubelet: FakeKubelet, checker: PodResourcesChecker, meanwhile: Callable[[], None]
) -> None:
    """One List whose answer (kubelet as it is now) arrives only after ``meanwhile`` ran."""
    kubelet.listing.clear()
    kubelet.answer.clear()
    async with anyio.create_task_group() as tg:
        tg.start_soon(checker.held)
        assert await anyio.to_thread.run_sync(kubelet.listing.wait, 5)
        meanwhile()
        kubelet.answer.set()


async def test_a_list_answered_after_a_forget_or_an_add_does_not_undo_them(
    kubelet: FakeKubelet, checker: PodResourcesChecker
) -> None:
    kubelet.hold("pod-a", RESOURCE, "dev0")
    # The allocation of dev0 ends while a List is out: that List's answer
    # (pod-a holds dev0) is older than the end, and vouches for nobody.
    await _while_listing(kubelet, checker, lambda: checker.forget("dev0"))
    asked = kubelet.list_calls
    assert await _check(checker, "pod-a", "dev0") is HostCheck.OK  # kubelet says so, asked
    assert kubelet.list_calls == asked + 1
    # An ADD while a List is out: the answer, from before it, does not drop its pod.
    kubelet.pods = []
    await _while_listing(kubelet, checker, lambda: checker.attached(RESOURCE, "dev1", "pod-b"))
    asked = kubelet.list_calls
    assert await _check(checker, "pod-b", "dev1") is HostCheck.OK
    assert kubelet.list_calls == asked
    # A List begun after the ADD is kubelet's newer word: pod-b, which it
    # does not list, is asked about again, and refused.
    await checker.held()
    assert await _check(checker, "pod-b", "dev1") is HostCheck.REFUSED


async def test_an_add_naming_a_pod_kubelet_does_not_list_for_the_device_vouches_for_nobody(
    kubelet: FakeKubelet, checker: PodResourcesChecker
) -> None:
    kubelet.hold("pod-a", RESOURCE, "dev0")
    await checker.prefetch(RESOURCE, "dev0", 5.0)  # kubelet: pod-a holds dev0
    checker.attached(RESOURCE, "dev0", "pod-x")  # the ADD says pod-x
    asked = kubelet.list_calls
    assert await _check(checker, "pod-x", "dev0") is HostCheck.REFUSED  # kubelet's word
    assert kubelet.list_calls == asked + 1
    assert await _check(checker, "pod-a", "dev0") is HostCheck.OK


async def test_a_pod_its_add_placed_is_not_asked_about_by_the_prefetch(
    kubelet: FakeKubelet, checker: PodResourcesChecker
) -> None:
    # The List would land as the pod's first handshake comes, on the same event loop.
    kubelet.hold("pod-a", RESOURCE, "dev0")
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(checker.prefetch, RESOURCE, "dev0", 5.0)
            while (RESOURCE, "dev0") not in checker._waiting:  # the prefetch waits for it
                await anyio.lowlevel.checkpoint()
            checker.attached(RESOURCE, "dev0", "pod-a")
    assert kubelet.list_calls == 0
    assert await _check(checker, "pod-a", "dev0") is HostCheck.OK
    assert kubelet.list_calls == 0
