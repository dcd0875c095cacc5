"""The demo's steps: a node with two NICs, afxdpd, a stand-in kubelet, two pods.

Each step says what happens and why; ``afxdpctl status`` shows afxdpd's view
between them. Whatever step is reached, and however the run ends (an error,
Ctrl-C, SIGTERM), everything made is taken away again in reverse order and the
demo checks that nothing is left behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import anyio
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream

from afxdp import devnode
from afxdp.bpf import pinning
from afxdp.cni import shim
from afxdp.demo import wire
from afxdp.demo.lab import DemoLab, Nic, ip, link_info, wait_for
from afxdp.demo.podman import Podman
from afxdp.workers import Work, run_program, run_sync

POOL = "demo"
RESOURCE = f"afxdp/{POOL}"
NODE = "demo-node"
SUBNET = "10.99.0"
PORT = 9000
CNI_PATH = Path("/usr/lib/cni")
START_TIMEOUT = 20.0  # afxdpd up and registered
POD_TIMEOUT = 20.0  # a pod process answering
STOP_TIMEOUT = 15.0  # afxdpd gone after SIGTERM
SEND_LIMIT = 10.0  # seconds the wire may take to send
PODS = ("demo-a", "demo-b")
STEPS = 3 + 5 * len(PODS)


class DemoError(Exception):
    """A step failed; the message says which and why."""


def _python(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


@dataclass
class Story:
    tag: str
    work: Path
    frames: int
    out: TextIO = sys.stdout
    lab: DemoLab = field(init=False)
    kubelet: devnode.StandInKubelet = field(init=False)
    step_no: int = 0
    received: int = 0
    sent: int = 0
    pods_done: int = 0
    afxdpd: Process | None = None
    podman: Podman | None = None
    _readers: dict[int, BufferedByteReceiveStream] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.lab = DemoLab(self.tag)
        self.kubelet = devnode.StandInKubelet(self.work / "kubelet")

    # --- output -----------------------------------------------------------

    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def step(self, title: str, why: str) -> None:
        self.step_no += 1
        self.say(f"\n── step {self.step_no} of {STEPS}: {title}")
        for line in why.splitlines():
            self.say(f"   {line}")

    async def status(self) -> None:
        argv = _python("afxdp.cli.afxdpctl", "status", "--run-dir", str(self.run_dir))
        done = await run_program(argv, timeout=15, work=Work.DISK)
        self.say("   $ afxdpctl status")
        for line in (done.stdout or done.stderr).decode().splitlines():
            self.say(f"   │ {line}")

    # --- places -----------------------------------------------------------

    @property
    def run_dir(self) -> Path:
        return self.work / "run"

    @property
    def uds_dir(self) -> Path:
        return self.work / "uds"

    @property
    def pin_dir(self) -> Path:
        return self.work / "pins"

    @property
    def cni_bin(self) -> Path:
        return self.work / "cni-bin"

    # --- the story --------------------------------------------------------

    async def run(self, stack: AsyncExitStack) -> str:
        started = time.monotonic()
        nics = await self.make_nics(stack)
        await self.start_afxdpd(stack, [n.name for n in nics])
        for name in PODS:
            await self.pod_life(stack, name, nics)
        await self.stop_afxdpd(nics)
        seconds = time.monotonic() - started
        return (
            f"demo: OK: {self.pods_done} pods through Allocate, CNI ADD, handshake, AF_XDP, DEL; "
            f"{self.received:,}/{self.sent:,} frames received; {seconds:.1f} s"
        )

    async def make_nics(self, stack: AsyncExitStack) -> list[Nic]:
        self.step(
            'two veth "NICs" and a wire',
            "Each NIC is a veth pair: nicN stays on the host for afxdpd to pool; its peer wireN\n"
            f"is in netns {self.lab.wire_ns}, where this demo sends traffic from.",
        )
        stack.push_async_callback(self.lab.remove)
        await self.lab.netns("wire")
        nics = [await self.lab.nic(i) for i in range(len(PODS))]
        if self.podman is not None:
            stack.push_async_callback(self.podman.reset)
            await self.podman.setup(CNI_PATH)
            self.say(f"   podman: private storage and CNI config in {self.podman.work}, "
                     "a busybox image imported (no registry)")  # fmt: skip
        for nic in nics:
            # The wire's own address, the source of the traffic (one per port).
            await ip("addr", "add", f"{SUBNET}.254/32", "dev", nic.wire, netns=self.lab.wire_ns)
            self.say(f"   {nic.name} (host, pooled)  <->  {nic.wire} (wire)")
        return nics

    async def start_afxdpd(self, stack: AsyncExitStack, devices: list[str]) -> None:
        self.step(
            "afxdpd starts; a stand-in kubelet answers it",
            f"afxdpd runs as a process with its own dirs under {self.work}. afxdp.devnode\n"
            "plays kubelet: the Registration and PodResources servers, and kubelet's calls.",
        )
        config = self.work / "config.json"
        pool = {"name": POOL, "mode": "primary", "devices": [{"name": d} for d in devices]}
        config.write_text(json.dumps({"logLevel": "info", "pools": [pool]}, indent=2))
        await stack.enter_async_context(self.kubelet.serving())
        log = (self.work / "afxdpd.log").open("wb")
        stack.callback(log.close)
        argv = _python(
            "afxdp.cli.afxdpd", "--config", str(config), "--node-name", NODE,
            "--kubelet-dir", str(self.kubelet.kubelet_dir), "--uds-dir", str(self.uds_dir),
            "--pin-dir", str(self.pin_dir), "--run-dir", str(self.run_dir),
            "--state-dir", str(self.run_dir / "state"),
            "--log-dir", str(self.work / "log"),
        )  # fmt: skip
        # Its own session: a Ctrl-C at the terminal reaches the demo only, which
        # then stops afxdpd in order (after the pods are gone).
        self.afxdpd = await anyio.open_process(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
        )
        stack.push_async_callback(self._stop_afxdpd_quietly)
        self.say(f"   afxdpd pid {self.afxdpd.pid}, config {config}, log {log.name}")
        try:
            reg = await self.kubelet.wait_registered(RESOURCE, START_TIMEOUT)
            await wait_for("control socket", self._control_up, START_TIMEOUT)
        except TimeoutError:
            raise DemoError(f"afxdpd did not come up; its log:\n{self._log_tail()}") from None
        self.say(f"   kubelet: {reg.resource_name} registered at {reg.endpoint}")
        await self.status()

    async def _control_up(self) -> bool:
        return (self.run_dir / "control.sock").exists()

    async def pod_life(self, stack: AsyncExitStack, name: str, nics: list[Nic]) -> None:
        async with cleanup_stack() as pod_stack:
            # The demo's outer stack undoes what is left of this pod when interrupted.
            stack.push_async_callback(pod_stack.aclose)
            await self._pod_life(pod_stack, name, nics)

    async def _pod_life(self, stack: AsyncExitStack, name: str, nics: list[Nic]) -> None:
        self.step(
            f"pod {name}: kubelet admits it (Allocate)",
            "As kubelet does: ListAndWatch for healthy devices, GetPreferredAllocation, then\n"
            "Allocate. afxdpd attaches its XDP program and listens on the device's UDS socket.",
        )
        pod, answer = await devnode.admit_pod(self.kubelet, name, RESOURCE)
        stack.callback(self.kubelet.forget, pod)
        dev = pod.devices[0]
        nic = next(n for n in nics if n.name == dev)
        for key, value in answer.envs.items():
            self.say(f"   env   {key}={value}")
        for m in answer.mounts:
            self.say(f"   mount {m.host_path} -> {m.container_path}")

        if self.podman is None:
            app, pod_ip, mac = await self._netns_pod(stack, name, dev, answer)
        else:
            app, pod_ip, mac = await self._podman_pod(stack, name, dev, answer)
        await self.status()

        self.step(
            f"pod {name}: the handshake and an AF_XDP socket, inside the pod",
            f"The pod asks for the XSKMAP on /tmp/afxdp_dp/{dev}/afxdp.sock (afxdpd checks with\n"
            "kubelet that this pod holds the device), binds an AF_XDP socket to queue 0 of\n"
            "the device and puts it in the map at index 0.",
        )
        ready = await self._pod_says(app, "ready")
        self.say(f"   pod: handshake version {ready['version']}, socket bound on queue 0")

        self.step(
            f"pod {name}: frames from the wire reach the AF_XDP socket",
            "The ARP trap: queue 0 redirects EVERY frame to the socket, ARP too, so nobody\n"
            "could resolve the pod's address. The wire uses a static neighbour entry instead.",
        )
        await wire.route_to_pod(self.lab.wire_ns, nic.wire, pod_ip, mac)
        sent = await run_sync(
            Work.NETLINK, wire.send, self.lab.wire_ns, pod_ip, PORT, self.frames, SEND_LIMIT
        )
        assert app.stdin is not None
        await app.stdin.send(json.dumps({"sent": sent.frames}).encode() + b"\n")
        done = await self._pod_says(app, "done")
        self.sent += sent.frames
        self.received += int(done["received"])
        rate = sent.frames / sent.seconds / 1000 if sent.seconds else 0.0
        self.say(f"   wire sent {sent.frames:,} UDP frames to {pod_ip}:{PORT} in "
                 f"{sent.seconds:.2f} s ({rate:.0f}k frames/s, paced)")  # fmt: skip
        self.say(f"   pod's AF_XDP socket received {done['received']:,} "
                 f"(rx_dropped {done['stats']['rx_dropped']})")  # fmt: skip
        await self.status()
        await app.wait()
        if not done["received"]:
            raise DemoError(f"the pod's AF_XDP socket received none of {sent.frames} frames")

        who = "the container ends; podman runs" if self.podman else "the runtime runs"
        self.step(
            f"pod {name} is deleted: {who} CNI DEL, kubelet forgets it",
            "DEL brings the device home and frees the address. The allocation is kubelet's to\n"
            "end: PodResources stops listing the pod, and afxdpd takes the device back at its\n"
            "next reconcile or when kubelet allocates it again (or at shutdown).",
        )
        await stack.aclose()
        if await link_info(dev) is None:
            raise DemoError(f"{dev} did not come back to the host after the DEL")
        self.pods_done += 1
        self.say(f"   {dev} is back on the host; PodResources lists "
                 f"{len(self.kubelet.pods)} pod(s)")  # fmt: skip
        await self.status()

    async def _netns_pod(
        self, stack: AsyncExitStack, name: str, dev: str, answer: Any
    ) -> tuple[Process, str, str]:
        self.step(
            f"pod {name}: CNI ADD through the shim",
            "The runtime runs the static 'afxdp' shim; it forwards to afxdpd, which moves the\n"
            "device into the pod's netns with an address from host-local IPAM. Then the pod\n"
            "process starts with the pod's netns, hostname (its name) and kubelet's mounts.",
        )
        netns = await self.lab.netns(f"pod-{name[-1]}")
        stack.push_async_callback(self.lab.drop_netns, netns)  # the sandbox goes last
        conf = self._netconf(dev)
        result = await self._cni("ADD", conf, netns, name)
        stack.push_async_callback(self._cni_del_quietly, conf, netns, name)
        (iface,) = result["interfaces"]
        pod_ip = result["ips"][0]["address"].split("/")[0]
        self.say(f"   CNI result: {iface['name']} in {netns}: {pod_ip}, mac {iface['mac']}")
        app = await self._start_pod(stack, name, netns, answer)
        up = await self._pod_says(app, "up")
        self.say(f"   pod process: hostname {up['hostname']}, sees {up['netdev']} {up['ip']}")
        return app, pod_ip, str(iface["mac"])

    async def _podman_pod(
        self, stack: AsyncExitStack, name: str, dev: str, answer: Any
    ) -> tuple[Process, str, str]:
        assert self.podman is not None
        self.step(
            f"pod {name}: podman starts it as a container (CNI ADD through the shim)",
            "Its network's only plugin is the 'afxdp' shim, with deviceID set to the device\n"
            "kubelet allocated (what Multus injects). The container gets kubelet's env and\n"
            "mounts, seccomp=unconfined (bpf() on the map) and NET_RAW,BPF,IPC_LOCK.",
        )
        network = self.podman.network(name, self._netconf(dev))
        mounts = [(m.host_path, m.container_path) for m in answer.mounts]
        stack.push_async_callback(self.podman.remove, name)
        app = await self.podman.run(name, network, dict(answer.envs), mounts, PORT)
        stack.push_async_callback(_end_process, app, 10.0)
        up = await self._pod_says(app, "up")
        self.say(f"   container {self.podman.container(name)} on network {network}:")
        self.say(f"   {up['netdev']} {up['ip']}, mac {up['mac']}, hostname {up['hostname']}")
        return app, str(up["ip"]), str(up["mac"])

    def _netconf(self, dev: str) -> dict[str, Any]:
        return {
            "cniVersion": "1.0.0",
            "name": "afxdp-demo",
            "type": shim.NAME,
            "mode": "primary",
            "deviceID": dev,  # Multus injects it from the device plugin's answer
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": f"{SUBNET}.0/24", "gateway": f"{SUBNET}.1"}]],
                "dataDir": str(self.work / "ipam"),
            },
        }

    async def _cni(self, command: str, conf: dict[str, Any], netns: str, pod: str) -> Any:
        env = {
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": f"{pod}-{self.tag}",
            "CNI_NETNS": f"/run/netns/{netns}",
            "CNI_IFNAME": "net1",
            "CNI_PATH": f"{self.cni_bin}:{CNI_PATH}",
            "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={pod}",
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        }
        plugin = self.cni_bin / shim.NAME
        done = await run_program([str(plugin)], stdin=json.dumps(conf).encode(), env=env,
                                 timeout=30)  # fmt: skip
        if done.returncode != 0:
            raise DemoError(f"CNI {command} failed: {done.stdout.decode().strip()} "
                            f"{done.stderr.decode().strip()}")  # fmt: skip
        return json.loads(done.stdout) if done.stdout.strip() else None

    async def _cni_del_quietly(self, conf: dict[str, Any], netns: str, pod: str) -> None:
        try:
            await self._cni("DEL", conf, netns, pod)
        except (DemoError, OSError) as exc:
            self.say(f"   cleanup: {exc}")
        self.say(f"   CNI DEL {pod}: done")

    async def _start_pod(
        self, stack: AsyncExitStack, name: str, netns: str, answer: Any
    ) -> Process:
        mounts = [f"{m.host_path}={m.container_path}" for m in answer.mounts]
        argv = [
            "nsenter", f"--net=/run/netns/{netns}", "--",
            "unshare", "--mount", "--uts", "--propagation", "private", "--",
            *_python("afxdp.demo.pod", name, *answer.envs.keys(), str(PORT), *mounts),
        ]  # fmt: skip
        env = {**os.environ, **answer.envs}
        app = await anyio.open_process(
            argv,
            env=env,
            stderr=None,
            start_new_session=True,  # stderr: the terminal's
        )
        stack.push_async_callback(_end_process, app, 5.0)
        return app

    async def _pod_says(self, app: Process, event: str) -> dict[str, Any]:
        """The pod app's next message, which must be ``event``."""
        assert app.stdout is not None
        reader = self._readers.setdefault(app.pid, BufferedByteReceiveStream(app.stdout))
        try:
            with anyio.fail_after(POD_TIMEOUT):
                line = await reader.receive_until(b"\n", 1 << 16)
        except (anyio.IncompleteRead, anyio.EndOfStream):
            raise DemoError(f"the pod app ended before saying {event!r}") from None
        except TimeoutError:
            raise DemoError(f"the pod app did not say {event!r} within {POD_TIMEOUT:g} s") from None
        msg: dict[str, Any] = json.loads(line)
        if msg.get("event") != event:
            raise DemoError(f"the pod app said {msg}, expected {event!r}")
        return msg

    async def stop_afxdpd(self, nics: list[Nic]) -> None:
        self.step(
            "afxdpd stops (SIGTERM) and cleans up after itself",
            "It takes back every device it handed out: XDP programs off, sockets removed.",
        )
        assert self.afxdpd is not None
        self.afxdpd.send_signal(signal.SIGTERM)
        with anyio.move_on_after(STOP_TIMEOUT):
            code = await self.afxdpd.wait()
            self.say(f"   afxdpd exited with {code}")
        if self.afxdpd.returncode is None:
            raise DemoError(f"afxdpd did not stop within {STOP_TIMEOUT:g} s")
        if self.afxdpd.returncode != 0:
            raise DemoError(f"afxdpd exited with {self.afxdpd.returncode}:\n{self._log_tail()}")
        left = await self.afxdpd_leftovers(nics)
        if left:
            raise DemoError("afxdpd left behind: " + ", ".join(left))
        self.say("   no XDP program on the NICs; no socket in the kubelet, UDS or run dirs")

    async def afxdpd_leftovers(self, nics: list[Nic]) -> list[str]:
        left = []
        for nic in nics:
            info = await link_info(nic.name)
            if info is not None and "xdp" in info:
                left.append(f"XDP program on {nic.name}")
        # afxdpd's sockets (kubelet.sock is the stand-in's own, still serving).
        places = [(self.kubelet.plugin_dir, "afxdp-*"), (self.uds_dir, "*"), (self.run_dir, "*")]
        for d, pattern in places:
            if d.exists():
                left += [str(p) for p in d.rglob(pattern) if p.is_socket()]
        if self.pin_dir.exists() and pinning.fs_type(self.pin_dir) == "bpf":
            left.append(f"bpffs mounted at {self.pin_dir}")
        return left

    async def _stop_afxdpd_quietly(self) -> None:
        if self.afxdpd is not None and self.afxdpd.returncode is None:
            self.afxdpd.send_signal(signal.SIGTERM)
            await _end_process(self.afxdpd, STOP_TIMEOUT)
        if self.pin_dir.exists() and pinning.fs_type(self.pin_dir) == "bpf":
            await run_program(["umount", str(self.pin_dir)], timeout=10)

    def _log_tail(self, lines: int = 15) -> str:
        try:
            text = (self.work / "afxdpd.log").read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(f"   | {ln}" for ln in text.splitlines()[-lines:])


@asynccontextmanager
async def cleanup_stack() -> AsyncIterator[AsyncExitStack]:
    """An exit stack whose clean-up runs to the end even when the block was
    cancelled (Ctrl-C): each step bounds its own time instead."""
    stack = AsyncExitStack()
    try:
        yield stack
    finally:
        with anyio.CancelScope(shield=True):
            await stack.aclose()


async def _end_process(proc: Process, grace: float) -> None:
    """Wait ``grace`` seconds for ``proc`` to end, then kill its whole session."""
    with anyio.move_on_after(grace):
        await proc.wait()
        return
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    await proc.wait()
