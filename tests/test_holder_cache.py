"""The pod's identity for a device is fetched after Allocate, so a handshake
usually needs no live PodResources lookup; the cache never outlives the
allocation (a device handed to another pod refuses the previous one)."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from afxdp.podresources import PodResourcesChecker
from afxdp.uds.client import HandshakeError, UdsClient
from tests.kernel import Lab, ip
from tests.node import NodeUnderTest, running

pytestmark = [pytest.mark.privileged, pytest.mark.anyio]


def _shake(path: Path, pod: str, dev: str) -> None:
    with UdsClient(path) as c:
        c.connect(pod)
        c.fin()


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
