"""The pod's identity for a device is fetched after Allocate, so a handshake
usually needs no live PodResources lookup; the cache never outlives the
allocation (a device handed to another pod refuses the previous one)."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from afxdp.podresources import FIRST_ASK, PodResourcesChecker
from afxdp.uds.client import HandshakeError, UdsClient
from tests.kernel import Lab, ip
from tests.kubelet import FakeKubelet
from tests.node import NodeUnderTest, running

pytestmark = pytest.mark.anyio


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
