"""The soak: many pod lifecycles through afxdpd, then nothing may be left (issue 8).

afxdpd runs as its own process (its fds, threads and RSS are read from
/proc/<pid>), with its own dirs under a temp dir. The grpcio kubelet double
(tests/kubelet.py) plays kubelet; the CNI goes through the real static shim
(installed as ``afxdpctl install-cni --allow-dir`` does) with host-local IPAM
from /usr/lib/cni. The pool has one veth "NIC" per worker; each NIC's peer sits
in a wire netns.

One lifecycle, on its worker's NIC: Allocate (which reclaims the NIC from the
previous, forgotten pod: allocations are kubelet's to end) -> PodResources lists
the pod -> the pod's netns -> shim ADD -> the UDS handshake as the pod (connect
with its name, version, xsk_map_fd, fin) -> shim DEL (the NIC is home again) ->
netns deleted -> kubelet forgets the pod. A failure names the lifecycle and step.

Lifecycles run in ten phases; between phases nothing is in flight and afxdpd's
fds, threads and RSS are sampled, so every sample sees the same state (each NIC
allocated to a forgotten pod). The last sample may exceed the first (after 10 %)
by at most the stated bounds. At the end afxdpd gets SIGTERM and must exit 0;
then no XDP program, pin, socket, stray netns or host-local lease may be left,
every NIC must be on the host and the CNI attachment record must be empty.

With ``--slowloris N`` (40 by default; 0 serves no metrics) afxdpd also serves
its metrics port, and N slow clients (tests/slowloris.py: a request line, then a
byte a second, back at once when cut off) keep taking every slot of it, and
/healthz and /readyz are probed as kubelet does, every half second with its 1 s
deadline, throughout (issue 19): one probe that is not a 200 in time fails the
soak. The clients leave for each sample (so afxdpd's fds are counted without
them) and afxdpd must have closed its side of every one of their connections
within 5 s; then they come back, all of them, before a probe is made again.

usage: python -m tests.soak [--lifecycles N] [--concurrency C] [--slowloris N];
prints a JSON summary.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import math
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, suppress
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Any

import anyio
from anyio.abc import Process, TaskGroup, TaskStatus

from afxdp import metrics
from afxdp.bpf import libbpf, pinning
from afxdp.cni import shim
from afxdp.cni.attachments import AttachmentStore
from afxdp.demo.lab import LabError, ip, wait_for
from afxdp.demo.story import cleanup_stack
from afxdp.deviceplugin.v1beta1 import api_pb2 as dp
from afxdp.uds.client import AsyncUdsClient, Request, pod_socket_path
from afxdp.workers import Work, run_program, run_sync
from tests.kubelet import FakeKubelet, PluginClient
from tests.slowloris import Prober, Slowloris

POOL = "soak"
RESOURCE = f"afxdp/{POOL}"
NETWORK = "afxdp-soak"  # the netconf's name: host-local keeps its leases under it
SUBNET = "10.97.0"
CNI_PATH = Path("/usr/lib/cni")
START_TIMEOUT = 30.0  # afxdpd registered and its sockets up (2 shared cores)
STOP_TIMEOUT = 20.0  # afxdpd gone after SIGTERM
CNI_TIMEOUT = 30.0  # one shim call (afxdpd's own IPAM limit is 60 s)
UDS_TIMEOUT = 10.0  # one handshake reply (afxdpd asks kubelet with a 5 s timeout)
PHASES = 10  # samples after every 10 % of the lifecycles
SLOWLORIS = metrics.MAX_CLIENTS + 8  # the clients of the report (issue 19)


class SoakError(Exception):
    """The soak found a failure, a leak or growth; the message says which."""


class StepFailed(SoakError):
    """One lifecycle failed at ``step``."""

    def __init__(self, number: int, pod: str, device: str, step: str, exc: BaseException):
        self.device = device
        detail = f"{type(exc).__name__}: {exc}".strip()
        super().__init__(
            f"lifecycle {number} (pod {pod}, device {device}): {step} failed: {detail}"
        )


@dataclass(frozen=True)
class Sample:
    """afxdpd's resources after ``after`` lifecycles, with none in flight."""

    after: int
    fds: int
    threads: int
    rss_kib: int


def sample(pid: int, after: int) -> Sample:
    status = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return Sample(
        after=after,
        fds=len(os.listdir(f"/proc/{pid}/fd")),
        threads=int(status["Threads"]),
        rss_kib=int(status["VmRSS"].split()[0]),
    )


def connections_on(pid: int, port: int) -> int:
    """How many of ``pid``'s fds are TCP connections on its local ``port`` (its
    listener not counted)."""
    sockets = set()
    for table in ("tcp", "tcp6"):
        lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        for fields in (line.split() for line in lines):
            local, state, inode = fields[1], fields[3], fields[9]
            if int(local.rsplit(":", 1)[1], 16) == port and state != "0A":  # 0A: LISTEN
                sockets.add(f"socket:[{inode}]")
    found = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with suppress(FileNotFoundError):  # closed since listed
            found += os.readlink(f"/proc/{pid}/fd/{fd}") in sockets
    return found


@dataclass(frozen=True)
class Bounds:
    """How much the last sample may exceed the one after the first 10 %.

    fds: the same allocations are live at every sample, so a lasting increase
    is a leak; the margin covers a gRPC or PodResources connection caught
    opening. threads: anyio's worker threads come and go with load (idle ones
    end after 10 s), within the fixed limits of afxdp.workers. RSS: the
    allocator's caches settle; the issue's bound for 1,000 lifecycles is 5 %.
    """

    fds: int = 4
    threads: int = 8
    rss_percent: float = 5.0


@dataclass
class Summary:
    lifecycles: int
    concurrency: int
    seconds: float
    rate_per_s: float
    bounds: dict[str, float]
    samples: list[Sample]
    watch_updates: int
    slowloris: int = 0  # clients on the metrics port during every phase
    slowloris_connections: int = 0
    probes: int = 0  # of /healthz and /readyz, each to be a 200 within 1 s
    probes_failed: list[str] = field(default_factory=list)  # the first 10
    probe_failures: int = 0
    slowest_probe_s: float = 0.0
    afxdpd_exit: int | None = None
    leaks: list[str] = field(default_factory=list)
    growth: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def growth(samples: Sequence[Sample], bounds: Bounds) -> list[str]:
    """What grew past ``bounds`` from the first sample to the last."""
    first, last = samples[0], samples[-1]
    found = []
    if last.fds > first.fds + bounds.fds:
        found.append(f"fds {first.fds} after {first.after} -> {last.fds} after {last.after}")
    if last.threads > first.threads + bounds.threads:
        found.append(
            f"threads {first.threads} after {first.after} -> {last.threads} after {last.after}"
        )
    if last.rss_kib > first.rss_kib * (1 + bounds.rss_percent / 100):
        pct = (last.rss_kib / first.rss_kib - 1) * 100
        found.append(f"RSS {first.rss_kib} KiB after {first.after} -> {last.rss_kib} KiB "
                     f"after {last.after} (+{pct:.1f} %, bound {bounds.rss_percent:g} %)")  # fmt: skip
    return found


def checkpoints(lifecycles: int) -> list[int]:
    """The lifecycle counts after which to sample: every 10 %, and the end."""
    return sorted({math.ceil(lifecycles * k / PHASES) for k in range(1, PHASES + 1)} - {0})


def host_socket(answer: dp.ContainerAllocateResponse, device: str) -> Path:
    """Where the pod's /tmp/afxdp_dp/<device>/afxdp.sock is on the host, from
    Allocate's mounts (a directory mount or the socket itself)."""
    inside = PurePosixPath(pod_socket_path(device))
    for mount in answer.mounts:
        target = PurePosixPath(mount.container_path)
        if target == inside or target in inside.parents:
            return Path(mount.host_path) / inside.relative_to(target)
    raise SoakError(f"Allocate of {device} mounts nothing at {inside}: {list(answer.mounts)}")


class Soak:
    def __init__(self, work: Path, concurrency: int, slowloris: int = 0) -> None:
        self.work = work
        self.slowloris = slowloris
        self.metrics_port: int | None = None
        self.attack: Slowloris | None = None
        self.prober: Prober | None = None
        self._load: TaskGroup | None = None  # the slowloris load and the prober
        self._attack_scope = anyio.CancelScope()
        self._attack_ended = anyio.Event()
        self.tag = secrets.token_hex(3)
        # At most 15 characters (IFNAMSIZ - 1): "sk" + 6 + index.
        self.devices = [f"sk{self.tag}{i}" for i in range(concurrency)]
        self.wire_ns = f"afxdp-soak-{self.tag}-wire"
        self.kubelet = FakeKubelet(work / "kubelet")
        self.afxdpd: Process | None = None
        self.watch_updates = 0
        self._stopping = False
        self._plugin: PluginClient | None = None

    # --- places -----------------------------------------------------------

    def path(self, name: str) -> Path:
        return self.work / name

    @property
    def run_dir(self) -> Path:
        return self.path("run")

    def pod_ns(self, number: int) -> str:
        return f"afxdp-soak-{self.tag}-pod{number}"

    # --- the node ---------------------------------------------------------

    async def setup(self, stack: AsyncExitStack) -> None:
        stack.push_async_callback(self._remove_lab)
        await ip("netns", "add", self.wire_ns)
        for i, dev in enumerate(self.devices):
            await ip("link", "add", dev, "type", "veth", "peer", "name", f"sw{self.tag}{i}",
                     "netns", self.wire_ns)  # fmt: skip
            await ip("link", "set", dev, "up")
            await ip("link", "set", f"sw{self.tag}{i}", "up", netns=self.wire_ns)
        # Where the shim may reach afxdpd is the installer's choice, not the netconf's.
        shim.install(self.path("cni-bin"), [self.run_dir])
        self.kubelet.start_registration()
        self.kubelet.start_pod_resources()
        stack.callback(self.kubelet.stop)
        await self._start_afxdpd(stack)
        self._plugin = PluginClient(self.kubelet.plugin_dir / f"afxdp-{POOL}.sock")
        stack.callback(self._plugin.close)

    async def _start_afxdpd(self, stack: AsyncExitStack) -> None:
        config = self.path("config.json")
        pool = {"name": POOL, "mode": "primary", "devices": [{"name": d} for d in self.devices]}
        config.write_text(json.dumps({"logLevel": "info", "pools": [pool]}))
        log = self.path("afxdpd.log").open("wb")
        stack.callback(log.close)
        argv = [sys.executable, "-m", "afxdp.cli.afxdpd", "--config", str(config),
                "--node-name", "soak-node", "--kubelet-dir", str(self.kubelet.dir),
                "--uds-dir", str(self.path("uds")), "--pin-dir", str(self.path("pins")),
                "--run-dir", str(self.run_dir), "--log-dir", str(self.path("log")),
                "--metrics-address", "127.0.0.1:0" if self.slowloris else ""]  # fmt: skip
        self.afxdpd = await anyio.open_process(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
        )
        stack.push_async_callback(self._kill_afxdpd)
        try:
            await run_sync(Work.DEVICES, self._wait_registered)
            await wait_for("afxdpd's sockets", self._sockets_up, START_TIMEOUT)
            if self.slowloris:
                self.metrics_port = await wait_for("afxdpd's metrics port", self._metrics_port,
                                                   START_TIMEOUT)  # fmt: skip
        except TimeoutError as exc:
            raise SoakError(f"afxdpd did not come up: {exc}\n{self.log_tail()}") from None
        if self.metrics_port is not None:
            self.attack = Slowloris("127.0.0.1", self.metrics_port)
            self.prober = Prober("127.0.0.1", self.metrics_port)

    async def _start_attack(self) -> None:
        """The slowloris load, in the load group; back once every client is in."""
        assert self.attack is not None and self._load is not None
        attack, ended, before = self.attack, anyio.Event(), self.attack.connections

        async def attacking(task_status: TaskStatus[anyio.CancelScope]) -> None:
            try:
                with anyio.CancelScope() as scope:
                    task_status.started(scope)
                    await attack.run(self.slowloris)
            finally:
                ended.set()

        self._attack_scope = await self._load.start(attacking)
        self._attack_ended = ended

        async def connected() -> bool:
            return attack.connections >= before + self.slowloris

        try:
            await wait_for("the slowloris clients' connects", connected, START_TIMEOUT)
        except TimeoutError as exc:
            raise SoakError(str(exc)) from None

    async def _sample(self, after: int) -> Sample:
        """afxdpd's resources; the slowloris load leaves for it (its connections,
        always coming and going, are not what is measured) and comes back."""
        assert self.afxdpd is not None
        pid = self.afxdpd.pid
        if self.prober is None or self.metrics_port is None:
            return await run_sync(Work.DISK, sample, pid, after)
        port = self.metrics_port
        # No probe meanwhile: one among the attack's first connects may be the
        # oldest to await its request (kubelet's comes at once; this one, from
        # this loop, only once those connects are done).
        async with self.prober.lock:
            self._attack_scope.cancel()
            await self._attack_ended.wait()

            async def closed() -> bool:
                return await run_sync(Work.DISK, connections_on, pid, port) == 0

            try:
                await wait_for("afxdpd closing its side", closed, 5.0)
            except TimeoutError:
                held = await run_sync(Work.DISK, connections_on, pid, port)
                raise SoakError(f"afxdpd still holds {held} connections on its metrics port "
                                "5 s after their clients left") from None  # fmt: skip
            found = await run_sync(Work.DISK, sample, pid, after)
            await self._start_attack()
        return found

    async def _metrics_port(self) -> int | None:
        """The port afxdpd bound for "127.0.0.1:0", from its log line saying so."""
        text = self.path("afxdpd.log").read_text(errors="replace")
        found = re.search(r"metrics and health on http://127\.0\.0\.1:(\d+)/", text)
        return int(found[1]) if found else None

    def _wait_registered(self) -> None:
        if not self.kubelet.wait_registrations(1, timeout=START_TIMEOUT):
            raise TimeoutError(f"no registration within {START_TIMEOUT:g} s")

    async def _sockets_up(self) -> bool:
        if self.afxdpd is not None and self.afxdpd.returncode is not None:
            raise SoakError(f"afxdpd exited with {self.afxdpd.returncode}:\n{self.log_tail()}")
        return all((self.run_dir / s).exists() for s in ("control.sock", "cni.sock"))

    def log_tail(self, lines: int = 20, naming: str = "") -> str:
        """The last ``lines`` lines of afxdpd's log (those naming ``naming``)."""
        try:
            text = self.path("afxdpd.log").read_text(errors="replace")
        except OSError:
            return "(no afxdpd log)"
        found = [ln for ln in text.splitlines() if naming in ln]
        return "\n".join(f"  | {ln}" for ln in found[-lines:])

    # --- kubelet's ListAndWatch stream, held open as kubelet holds it -------

    async def watch(self) -> None:
        assert self._plugin is not None
        while not self._stopping:
            stream = self._plugin.list_and_watch(read_timeout=0.5)
            try:
                while not self._stopping:
                    try:
                        await run_sync(Work.NETLINK, next, stream)
                    except TimeoutError:
                        continue
                    except StopIteration:
                        break
                    self.watch_updates += 1
            except Exception as exc:  # grpc.RpcError: the stream's deadline; reopen
                if not self._stopping:
                    code = getattr(exc, "code", lambda: None)()
                    if code is None or code.name != "DEADLINE_EXCEEDED":
                        raise SoakError(f"ListAndWatch ended: {exc}") from exc
            finally:
                stream.cancel()

    # --- one pod ----------------------------------------------------------

    async def lifecycle(self, number: int, device: str) -> None:
        pod = f"soak-{self.tag}-{number}"
        step = "Allocate"
        async with cleanup_stack() as undo:  # what a failed lifecycle leaves is undone
            try:
                assert self._plugin is not None
                response = await run_sync(Work.DEVICES, self._plugin.allocate, [device])
                (answer,) = response.container_responses
                sock = host_socket(answer, device)
                self.kubelet.hold(pod, RESOURCE, device)  # as kubelet: listed once allocated
                undo.callback(self._forget, pod)

                step = "netns add"
                netns = self.pod_ns(number)
                undo.push_async_callback(self._quietly, ip, "netns", "del", netns)
                await ip("netns", "add", netns)

                step = "CNI ADD"
                conf = self.netconf(device)
                undo.push_async_callback(self._quietly, self.cni, "DEL", conf, netns, pod)
                result = await self.cni("ADD", conf, netns, pod)
                iface = result["interfaces"][0]
                if (iface["name"], iface["sandbox"]) != (device, f"/run/netns/{netns}"):
                    raise SoakError(f"ADD gave {iface}")

                step = "UDS handshake"
                await self.handshake(sock, pod, device)

                step = "CNI DEL"
                await self.cni("DEL", conf, netns, pod)
                try:
                    socket.if_nametoindex(device)
                except OSError:
                    raise SoakError(f"{device} is not back on the host") from None

                step = "netns del"
                await ip("netns", "del", netns)

                step = "kubelet forgets the pod"
                self._forget(pod)
            except Exception as exc:
                raise StepFailed(number, pod, device, step, exc) from exc
            undo.pop_all()  # all done in order: nothing to undo

    def netconf(self, device: str) -> dict[str, Any]:
        return {
            "cniVersion": "1.0.0",
            "name": NETWORK,
            "type": shim.NAME,
            "mode": "primary",
            "deviceID": device,  # Multus injects it from the device plugin's answer
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": f"{SUBNET}.0/24", "gateway": f"{SUBNET}.1"}]],
                "dataDir": str(self.path("ipam")),
            },
        }

    async def cni(self, command: str, conf: dict[str, Any], netns: str, pod: str) -> Any:
        env = {
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": pod,
            "CNI_NETNS": f"/run/netns/{netns}",
            "CNI_IFNAME": "net1",
            "CNI_PATH": f"{self.path('cni-bin')}:{CNI_PATH}",
            "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={pod}",
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        }
        done = await run_program([str(self.path("cni-bin") / shim.NAME)],
                                 stdin=json.dumps(conf).encode(), env=env, timeout=CNI_TIMEOUT)  # fmt: skip
        if done.returncode != 0:
            raise SoakError(f"shim exited {done.returncode}: {done.stdout.decode().strip()} "
                            f"{done.stderr.decode().strip()}")  # fmt: skip
        return json.loads(done.stdout) if done.stdout.strip() else None

    async def handshake(self, sock: Path, pod: str, device: str) -> None:
        """What DPDK's AF_XDP PMD does per queue, as the pod named ``pod``."""
        request = Request.connect(pod)
        try:
            async with await AsyncUdsClient.open(sock, UDS_TIMEOUT) as client:
                await client.call(request)
                await client.call(request := Request.version())
                map_fd = await client.call(request := Request.xsk_map_fd(device))
                assert map_fd is not None
                try:
                    info = libbpf.map_info(map_fd)
                    if info.type != libbpf.BPF_MAP_TYPE_XSKMAP:
                        raise SoakError(f"the fd afxdpd sent is a map of type {info.type}")
                finally:
                    os.close(map_fd)
                await client.call(request := Request.fin())
        except TimeoutError:
            raise SoakError(f"no reply to {request.text!r} within {UDS_TIMEOUT:g} s") from None

    def _forget(self, pod: str) -> None:
        # A new list, not an edit: the double's gRPC threads read it concurrently.
        self.kubelet.pods = [p for p in self.kubelet.pods if p.name != pod]

    @staticmethod
    async def _quietly(fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """A clean-up step whose failure must not hide the failure being cleaned up."""
        with suppress(SoakError, LabError, OSError):
            await fn(*args)

    # --- the run ----------------------------------------------------------

    async def run(self, lifecycles: int) -> list[Sample]:
        """All lifecycles, in phases, with ListAndWatch held open; a sample per phase."""
        samples: list[Sample] = []
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self.watch)
                async with anyio.create_task_group() as load:  # until the phases are done
                    self._load = load
                    if self.prober is not None:
                        await self._start_attack()  # probed once every client is in
                        load.start_soon(self.prober.run)
                    try:
                        await self._phases(lifecycles, samples)
                    finally:
                        self._stopping = True
                        load.cancel_scope.cancel()
        except* SoakError as group:
            raise _first(group) from None
        return samples

    async def _phases(self, lifecycles: int, samples: list[Sample]) -> None:
        assert self.afxdpd is not None
        done = 0
        for end in checkpoints(lifecycles):
            numbers = iter(range(done, end))

            async def worker(device: str, numbers: Any = numbers) -> None:
                for number in numbers:
                    await self.lifecycle(number, device)

            async with anyio.create_task_group() as tg:
                for device in self.devices:
                    tg.start_soon(worker, device)
            done = end
            samples.append(await self._sample(done))

    async def stop_afxdpd(self) -> int | None:
        """SIGTERM, as the kubelet's pod deletion does; its exit code (None: hung)."""
        assert self.afxdpd is not None
        self.afxdpd.send_signal(signal.SIGTERM)
        with anyio.move_on_after(STOP_TIMEOUT):
            await self.afxdpd.wait()
        return self.afxdpd.returncode

    async def leaks(self) -> list[str]:
        """What afxdpd and the lifecycles left behind."""
        found = []
        for dev in self.devices:
            try:
                index = socket.if_nametoindex(dev)
            except OSError:
                found.append(f"{dev} is not in the host netns")
                continue
            prog = await run_sync(Work.NETLINK, libbpf.xdp_query_id, index)
            if prog:
                found.append(f"XDP program {prog} on {dev}")
        for name in ("pins", "uds"):
            if self.path(name).exists():
                found += [f"{p} under the {name} dir" for p in self.path(name).rglob("*")]
        if self.path("pins").exists() and pinning.fs_type(self.path("pins")) == "bpf":
            found.append(f"bpffs still mounted at {self.path('pins')}")
        found += [f"socket {p}" for p in self.kubelet.plugin_dir.glob("afxdp-*")]
        found += [f"socket {p}" for p in self.run_dir.glob("*.sock")]
        listed = (await ip("netns", "list")).split()
        found += [f"netns {ns}" for ns in listed if ns.startswith(f"afxdp-soak-{self.tag}-pod")]
        leases = self.path("ipam") / NETWORK
        if leases.exists():
            found += [f"host-local lease {p.name}" for p in leases.iterdir() if _is_ip(p.name)]
        record = AttachmentStore(self.run_dir / "cni-attachments.json").all()
        found += [f"attachment {a.key} of {a.device}" for a in record]
        return found

    async def _kill_afxdpd(self) -> None:
        """Only when the soak failed before stopping it: end its whole session."""
        if self.afxdpd is None or self.afxdpd.returncode is not None:
            return
        self.afxdpd.send_signal(signal.SIGTERM)
        with anyio.move_on_after(STOP_TIMEOUT):
            await self.afxdpd.wait()
            return
        with suppress(ProcessLookupError):
            os.killpg(self.afxdpd.pid, signal.SIGKILL)
        await self.afxdpd.wait()

    async def _remove_lab(self) -> None:
        pins = self.path("pins")
        if pins.exists() and pinning.fs_type(pins) == "bpf":
            await run_program(["umount", str(pins)], timeout=10, work=Work.NETLINK)
        for dev in self.devices:
            await self._quietly(ip, "link", "del", dev)  # the peer goes with it
        listed = (await ip("netns", "list")).split()
        for ns in listed:
            if ns.startswith(f"afxdp-soak-{self.tag}-"):
                await self._quietly(ip, "netns", "del", ns)


def _first(group: BaseExceptionGroup[SoakError]) -> SoakError:
    """The first failure in a (nested) exception group of task groups."""
    found = group.exceptions[0]
    return found if isinstance(found, SoakError) else _first(found)


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


async def soak(
    lifecycles: int,
    concurrency: int,
    work: Path,
    bounds: Bounds = Bounds(),
    time_limit: float | None = None,
    *,
    slowloris: int = 0,
) -> Summary:
    """Run the soak in ``work`` (which the caller removes); raise SoakError on
    a failed lifecycle, a leak, growth past ``bounds``, or (with ``slowloris``
    clients on the metrics port) a probe not answered."""
    if lifecycles < 1 or concurrency < 1 or slowloris < 0:
        raise ValueError("lifecycles and concurrency must be at least 1, slowloris at least 0")
    limit = time_limit if time_limit is not None else 60 + 2.0 * lifecycles
    node = Soak(work, concurrency, slowloris)
    with anyio.fail_after(limit):
        async with cleanup_stack() as stack:
            await node.setup(stack)
            started = time.monotonic()
            try:
                samples = await node.run(lifecycles)
            except StepFailed as exc:
                raise SoakError(f"{exc}\nafxdpd's log about {exc.device}:\n"
                                f"{node.log_tail(naming=exc.device)}") from None  # fmt: skip
            seconds = time.monotonic() - started
            summary = Summary(
                lifecycles=lifecycles,
                concurrency=concurrency,
                seconds=round(seconds, 2),
                rate_per_s=round(lifecycles / seconds, 2),
                bounds=asdict(bounds),
                samples=samples,
                watch_updates=node.watch_updates,
                slowloris=slowloris,
            )
            if node.attack is not None and node.prober is not None:
                summary.slowloris_connections = node.attack.connections
                summary.probes = node.prober.probes
                summary.probe_failures = node.prober.failures
                summary.probes_failed = node.prober.first_failures
                summary.slowest_probe_s = round(node.prober.slowest, 3)
            summary.afxdpd_exit = await node.stop_afxdpd()
            summary.leaks = await node.leaks()
            summary.growth = growth(samples, bounds)
    problems = list(summary.leaks) + summary.growth + probing(summary)
    if summary.afxdpd_exit != 0:
        problems.insert(0, f"afxdpd exited with {summary.afxdpd_exit} after SIGTERM")
    if problems:
        raise SoakError("soak failed:\n  " + "\n  ".join(problems) + "\n" + summary.to_json())
    return summary


def probing(summary: Summary) -> list[str]:
    """What went wrong with the probes under the slowloris load, if it ran."""
    if not summary.slowloris:
        return []
    if summary.probes == 0 or summary.slowloris_connections < summary.slowloris:
        return [f"the probes or the slowloris load did not run: {summary.probes} probes, "
                f"{summary.slowloris_connections} of {summary.slowloris} clients connected"]  # fmt: skip
    if summary.probe_failures:
        return [f"{summary.probe_failures} of {summary.probes} probes failed under "
                f"{summary.slowloris} slowloris clients: " + "; ".join(summary.probes_failed)]  # fmt: skip
    return []


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.soak", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--lifecycles", type=int, default=1000, help="pod lifecycles (%(default)s)")
    ap.add_argument("--concurrency", type=int, default=8,
                    help="pods at once, and NICs in the pool (%(default)s)")  # fmt: skip
    ap.add_argument("--rss-percent", type=float, default=Bounds.rss_percent,
                    help="RSS growth allowed from 10 %% to the end (%(default)s)")  # fmt: skip
    ap.add_argument("--slowloris", type=int, default=SLOWLORIS,
                    help="slow clients on afxdpd's metrics port while /healthz and /readyz "
                         "are probed; 0: no metrics port (%(default)s)")  # fmt: skip
    ap.add_argument("--time-limit", type=float, default=None,
                    help="seconds before the soak gives up (default: 60 + 2 per lifecycle)")  # fmt: skip
    ap.add_argument("--keep", action="store_true",
                    help="keep the work dir (afxdpd's log, records) when the soak fails")  # fmt: skip
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="afxdp-soak-"))
    failed = True
    try:
        summary = anyio.run(
            partial(soak, slowloris=args.slowloris),
            args.lifecycles,
            args.concurrency,
            work,
            Bounds(rss_percent=args.rss_percent),
            args.time_limit,
            backend_options={"use_uvloop": True},
        )
    except (SoakError, TimeoutError) as exc:
        print(f"soak: FAILED: {exc or 'time limit reached'}", file=sys.stderr)
        return 1
    else:
        failed = False
    finally:
        if failed and args.keep:
            print(f"soak: work dir kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(summary.to_json())
    return 0


if __name__ == "__main__":
    sys.exit(main())
