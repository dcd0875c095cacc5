"""afxdpd as its own process on veth "NICs", with the grpcio kubelet double.

The benchmarks measure afxdpd from the outside, as kubelet, the CNI runtime
and pods see it: a separate process (its own GIL and event loop, its RSS read
from /proc), never the service in the benchmark's own interpreter.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import AsyncExitStack, suppress
from pathlib import Path, PurePosixPath
from typing import Any

import anyio
from anyio.abc import Process
from tests.kubelet import FakeKubelet, PluginClient, WatchStream

from afxdp import control
from afxdp.deviceplugin.v1beta1 import api_pb2 as dp
from afxdp.uds.client import pod_socket_path
from afxdp.workers import Work, run_program, run_sync

START_TIMEOUT = 120.0  # 1,000 devices on 2 shared cores
STOP_TIMEOUT = 20.0
ALLOCATE_TIMEOUT = 120.0
STREAM_HOLD = 3600.0  # ListAndWatch's deadline: longer than any full run
POLL = 0.005  # status polling while waiting for an outcome (not a fixed wait)


class BenchError(Exception):
    """A benchmark could not measure what it set out to."""


async def ip_batch(lines: list[str], netns: str | None = None) -> None:
    where = ["-n", netns] if netns else []
    done = await run_program(["ip", *where, "-batch", "-"], stdin="\n".join(lines).encode(),
                             timeout=120, work=Work.NETLINK)  # fmt: skip
    if done.returncode != 0:
        raise BenchError(f"ip -batch: {done.stderr.decode().strip()}")


async def veths(stack: AsyncExitStack, devices: list[str], wire_ns: str) -> None:
    """One veth per device, up, its peer in ``wire_ns``; deleting that netns
    (on exit, failure or not) takes every pair with it in one batch."""
    await ip_batch([f"netns add {wire_ns}"])
    stack.push_async_callback(_remove_pairs, wire_ns, devices)
    lines = []
    for i, dev in enumerate(devices):
        lines.append(f"link add {dev} type veth peer name w{i} netns {wire_ns}")
        lines.append(f"link set {dev} up")
    await ip_batch(lines)
    await ip_batch([f"link set w{i} up" for i in range(len(devices))], wire_ns)


async def _remove_pairs(wire_ns: str, devices: list[str]) -> None:
    """Delete ``wire_ns`` and wait until the kernel has destroyed the pairs: it
    does so after the deletion returns, in a worker holding rtnl (seconds for
    a thousand), and the next figure must not be measured beside that."""
    await _quietly_del_netns(wire_ns)
    with anyio.move_on_after(STOP_TIMEOUT * 6):
        while set(devices) & set(os.listdir("/sys/class/net")):
            await anyio.sleep(0.05)


async def _quietly_del_netns(name: str) -> None:
    await run_program(["ip", "netns", "del", name], timeout=30, work=Work.NETLINK)


class BenchNode:
    """One afxdpd with pool ``bench`` over ``devices``, under ``work``."""

    POOL = "bench"
    RESOURCE = f"afxdp/{POOL}"

    def __init__(self, work: Path, devices: list[str]) -> None:
        self.work, self.devices = work, devices
        self.kubelet = FakeKubelet(work / "kubelet")
        self.proc: Process | None = None
        self.plugin: PluginClient | None = None
        self.stream: WatchStream | None = None
        self.updates = 0

    @property
    def run_dir(self) -> Path:
        return self.work / "run"

    async def start(self, stack: AsyncExitStack) -> float:
        """Start afxdpd; seconds from spawning it to ready (registered with
        kubelet, status says ready), with kubelet's ListAndWatch held open."""
        self.kubelet.start_registration()
        self.kubelet.start_pod_resources()
        stack.callback(self.kubelet.stop)
        config = self.work / "config.json"
        pool = {
            "name": self.POOL,
            "mode": "primary",
            "devices": [{"name": d} for d in self.devices],
        }
        config.write_text(json.dumps({"logLevel": "info", "pools": [pool]}))
        log = (self.work / "afxdpd.log").open("wb")
        stack.callback(log.close)
        # The console script, as the image runs it (it picks its allocator first).
        argv = [str(Path(sys.executable).with_name("afxdpd")), "--config", str(config),
                "--node-name", "bench-node", "--kubelet-dir", str(self.kubelet.dir),
                "--uds-dir", str(self.work / "uds"), "--pin-dir", str(self.work / "pins"),
                "--run-dir", str(self.run_dir), "--log-dir", str(self.work / "log"),
                "--state-dir", str(self.work / "state"), "--cdi-dir", str(self.work / "cdi"),
                "--metrics-address", ""]  # fmt: skip
        t0 = time.perf_counter()
        self.proc = await anyio.open_process(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
        )
        stack.push_async_callback(self.stop)
        with anyio.fail_after(START_TIMEOUT):
            await run_sync(Work.DEVICES, self.kubelet.wait_registrations, 1, START_TIMEOUT)
            while not (await self.status()).get("ready"):
                await anyio.sleep(POLL)
        seconds = time.perf_counter() - t0
        self.plugin = PluginClient(self.kubelet.plugin_dir / f"afxdp-{self.POOL}.sock")
        stack.callback(self.plugin.close)
        # Held for the whole run, as kubelet holds it: the small node's figures
        # together outlast the double's default deadline (meant for tests).
        self.stream = self.plugin.list_and_watch(read_timeout=0.5, deadline=STREAM_HOLD)
        stack.callback(self.stream.cancel)
        return seconds

    async def status(self) -> dict[str, Any]:
        if self.proc is not None and self.proc.returncode is not None:
            raise BenchError(f"afxdpd exited with {self.proc.returncode}:\n{self.log_tail()}")
        try:
            return await run_sync(Work.DISK, control.read_status, self.run_dir)
        except OSError:
            return {}  # not listening yet

    async def settle(self, timeout: float = 120.0) -> None:
        """Until every device is free and prepared (it carries a fresh program of
        ours): what afxdpd does to a free device in the background is done
        before Allocate is timed, as on a node that has been up for a while."""
        with anyio.fail_after(timeout):
            while True:
                pools = (await self.status()).get("pools", [])
                devices = [d for p in pools for d in p["devices"]]
                if all(d["state"] == "free" and d.get("prepared", True) for d in devices):
                    return
                await anyio.sleep(0.05)

    async def allocate(self, device: str, pod: str) -> dp.ContainerAllocateResponse:
        """Allocate ``device`` as kubelet does for ``pod``, which kubelet then
        lists in PodResources (it admits the pod right after Allocate): so the
        PodResources prefetch that follows each Allocate ends after one List,
        as on a node, instead of asking for ten seconds."""
        assert self.plugin is not None
        # kubelet's own Allocate deadline is minutes; the double's default is 5 s.
        req = dp.AllocateRequest(
            container_requests=[dp.ContainerAllocateRequest(devices_ids=[device])]
        )
        resp: dp.AllocateResponse = await run_sync(
            Work.DEVICES, self.plugin.call, "Allocate", req, ALLOCATE_TIMEOUT
        )
        (answer,) = resp.container_responses
        self.kubelet.hold(pod, self.RESOURCE, device)
        return answer

    def rss_mb(self) -> float:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise BenchError("no VmRSS")

    def forget(self, pod: str) -> None:
        # A new list, not an edit: the double's gRPC threads read it concurrently.
        self.kubelet.pods = [p for p in self.kubelet.pods if p.name != pod]

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = (self.work / "afxdpd.log").read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    async def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        with anyio.move_on_after(STOP_TIMEOUT):
            await self.proc.wait()
            return
        with suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        await self.proc.wait()


def host_socket(answer: dp.ContainerAllocateResponse, device: str) -> Path:
    """The host path of the pod's /tmp/afxdp_dp/<device>/afxdp.sock, from Allocate's mounts."""
    inside = PurePosixPath(pod_socket_path(device))
    for mount in answer.mounts:
        target = PurePosixPath(mount.container_path)
        if target == inside or target in inside.parents:
            return Path(mount.host_path) / inside.relative_to(target)
    raise BenchError(f"Allocate of {device} mounts nothing at {inside}")
