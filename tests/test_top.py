"""``afxdpctl top``: rates from two status reads (plain data), and the command
against a running afxdpd whose program counts real frames."""

from __future__ import annotations

import socket
from pathlib import Path

import anyio
import pytest

from afxdp.cli import top
from afxdp.datapath import PER_POD
from afxdp.status import DeviceStatus, PoolStatus, QueueFrames, Status
from tests.kernel import Lab
from tests.node import NodeUnderTest as Node
from tests.node import pool_config, running
from tests.test_afxdpctl import ctl, devices, registered

__all__ = ["devices"]  # the fixture, used here


def _doc(frames: dict[str, list[QueueFrames] | None], datapath: str = "map-in-map") -> Status:
    devs = [DeviceStatus(id=d, state="free", xdp_frames=f) for d, f in frames.items()]
    pool = PoolStatus(resource="afxdp/p", mode="primary", registered=True, devices=devs, name="p")
    return Status(node="n1", ready=True, pools=[pool], datapath=datapath)


def test_rates_are_per_second_by_queue_and_a_counter_that_went_back_counts_from_zero() -> None:
    before = _doc({"a": [QueueFrames(0, redirected=100, no_socket=4)],
                   "b": [QueueFrames(3, no_socket=50)]})  # fmt: skip
    now = _doc({"a": [QueueFrames(0, redirected=300, no_socket=4), QueueFrames(3, control=2)],
                "b": [QueueFrames(3, no_socket=10)]})  # its program was loaded again  # fmt: skip
    assert top.rates(before, now, 2.0) == [
        ("p", "a", 0, (100.0, 0.0, 0.0), (300, 4, 0)),
        ("p", "a", 3, (0.0, 0.0, 1.0), (0, 0, 2)),  # a queue seen the first time
        ("p", "b", 3, (0.0, 5.0, 0.0), (0, 10, 0)),
    ]
    out = top.lines(now, top.rates(before, now, 2.0), 2.0)
    assert out[0] == "n1: datapath map-in-map, every 2 s (Ctrl-C ends)"
    assert out[2].split() == ["POOL", "DEVICE", "QUEUE", "REDIRECTED/S", "NO-SOCKET/S",
                              "CONTROL/S", "TOTAL(R/N/C)"]  # fmt: skip
    assert out[3].split() == ["p", "a", "0", "100", "0", "0", "300/4/0"]


def test_top_says_why_there_is_nothing_to_show() -> None:
    per_pod = _doc({"a": None}, datapath="per-pod")
    assert "the per-pod datapath does not count" in top.lines(per_pod, [], 1.0)[1]
    idle = _doc({"a": []})
    assert top.lines(idle, top.rates(idle, idle, 1.0), 1.0)[1] == "no frames yet"


def _send_raw(link: str, count: int) -> None:
    """``count`` broadcast frames of an unused ethertype into ``link``'s peer."""
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as s:
        s.bind((link, 0))
        frame = b"\xff" * 6 + s.getsockname()[4] + b"\x88\xb5" + b"top-test".ljust(46, b"\0")
        for _ in range(count):
            s.send(frame)


@pytest.mark.privileged
@pytest.mark.anyio
async def test_top_shows_the_frames_a_free_device_passes_to_the_kernel(
    tmp_path: Path, lab: Lab, devices: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    d0, _ = devices
    peer = d0.replace("ct", "cu", 1)  # its veth peer (tests/test_afxdpctl.py's devices)
    node = Node(tmp_path, lab, devices, pool_config(devices))
    async with running(node):
        await registered(node)
        assert node.service is not None
        with anyio.fail_after(10):  # our program on the free device first
            while not all(d.prepared for p in node.service.status().pools for d in p.devices):
                await anyio.sleep(0.01)
        await anyio.to_thread.run_sync(_send_raw, peer, 25)
        code, out, err = await ctl(capsys, "top", "--run-dir", str(node.paths.run_dir),
                                   "--count", "1", "--interval", "0.05")  # fmt: skip
        layout = node.service.layout
    assert (code, err) == (0, "")
    if layout == PER_POD:  # AFXDP_DATAPATH=per-pod: nothing counts, and top says so
        assert "the per-pod datapath does not count" in out
        return
    row = next(line.split() for line in out.splitlines() if line.split()[:3] == ["pool1", d0, "0"])
    redirected, no_socket, control = map(int, row[-1].split("/"))
    # Every frame passed to the kernel: no socket (the slot is empty), never
    # redirected (its own IPv6 chatter may add to them).
    assert (redirected, control) == (0, 0) and no_socket >= 25
