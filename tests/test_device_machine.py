"""A hypothesis state machine over the real ``Devices`` and ``Handouts``: never
two pods on one device.

The real ``Devices``, ``Handouts``, ``StateStore`` (its journal on a real
temporary directory: a restart reads the file an earlier run wrote, intact,
truncated at a byte or replaced by garbage), ``load_config`` and ``assemble``
run on a FAKE kernel (tests/fakes.py ``FakeKernel``: which program is on which
link, which link is in a pod's netns or gone, pins, listening sockets; it
outlives a restart as the kernel does) and a FAKE kubelet that is the model's
truth about which pod holds which device. The kubelet can answer truthfully,
be down (``find_stale`` finds nothing, ``held`` is None), be slow (event-loop
turns before it answers) or lie by leaving pods out of its answers. Kubelet is
trusted for "which pod holds which device" (SECURITY.md): a lie afxdpd was
told about a pod legitimately ends that pod's allocation, so the invariants
exempt a pod from the moment a lie about it was told; so too a pod afxdpd
could not know of (a restart with its record lost and kubelet down).

The steps interleave: Allocate as kubelet does it (a device free in kubelet's
books for that resource and advertised Healthy; the reclaim path when its last
pod ended and afxdpd has not reconciled yet), an Allocate kubelet should not
make (a second kubelet: a device a listed pod holds), CNI ADD and DEL at the
``DeviceSide`` level (the link moves into the pod's netns and back), a pod
ending (DEL, then kubelet forgets it), reconcile, reloads with random valid and
invalid configs, link events, resync, time passing, restarts, and a step that
runs two or three of these at once in one task group, with the kernel and
kubelet slow by chosen numbers of turns.

Blocking work is not sent to worker threads here: ``run_sync`` is replaced by
one that runs the call on the loop after one turn (plus the kernel's chosen
delay), so every interleaving is decided by the steps alone and hypothesis
can replay and shrink it. The loop is anyio's blocking portal (asyncio):
Handouts' task group lives across steps, as the service's does.

Invariants after every step (background work settled first):
1. No device is handed out to two pods at once: at most one pod holds a
   device (kubelet's truth, less the exempt pods) and at most one UDS server
   listens per device.
2. A device a holding pod has is never free in afxdpd: its pool counts it
   allocated, no other pool advertises it free, and the handout is that pod's
   (its program, not another's). afxdpd's own books agree: every handout's
   device is allocated in its (current) pool.
3. The kernel has no program, pin or socket of ours that no allocation or
   free-device preparation accounts for (or that a pod's skipUnloadBpf left),
   and no holding pod's program was ever replaced or detached.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar
from unittest.mock import patch

import anyio
import anyio.abc
import msgspec
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from afxdp import contracts, handouts, journal
from afxdp.config import Config, load_config
from afxdp.devices import RECONCILE_GRACE, AllocateFailed, Devices
from afxdp.errors import AfxdpError, ConfigError, DeviceError
from afxdp.inventory import NetDev
from afxdp.netwatch import Change, LinkEvent
from afxdp.pools import assemble
from afxdp.state import FILE_NAME, StateStore
from afxdp.workers import Work
from tests.fakes import FakeKernel, FakeSubfunctions
from tests.test_device_state import CountingHandouts
from tests.test_devices import _check

T = TypeVar("T")

NODE = "node1"
DEVICES = ("a", "b", "c")
POOLS = ("p", "q")
INITIAL = {"p": {"devices": ["a", "b"]}, "q": {"devices": ["c"]}}
SETTLE_TURNS = 10_000

# -- configs -------------------------------------------------------------------------------

KINDS: dict[str, dict[str, Any]] = {
    "uds": {},
    "uds-no-timeout": {"udsTimeout": -1},
    "uds-short-timeout": {"udsTimeout": 3},
    "pinned": {"bpfMapPinningEnable": True, "udsServerDisable": True},
    "raw": {"udsServerDisable": True},
}


def _doc(spec: dict[str, dict[str, Any]]) -> str:
    pools = [
        {"name": name, "mode": "primary", "devices": [{"name": d} for d in s["devices"]],
         **KINDS[s.get("kind", "uds")]}
        for name, s in spec.items()
        if s["devices"]
    ]  # fmt: skip
    return json.dumps({"pools": pools})


_pool_spec = st.fixed_dictionaries(
    {
        "devices": st.lists(st.sampled_from(DEVICES), unique=True, max_size=3),
        "kind": st.sampled_from(sorted(KINDS)),
    }
)
# Drawn as the spec (so a failing example shows it), turned into JSON by _doc.
VALID_CONFIGS = st.fixed_dictionaries({}, optional={"p": _pool_spec, "q": _pool_spec})
INVALID_CONFIGS = st.sampled_from(
    [
        "{",
        b"\xff\xfe",
        '{"pools": [{"name": "p!", "mode": "primary", "devices": [{"name": "a"}]}]}',
        '{"pools": [{"name": "p", "mode": "bogus", "devices": [{"name": "a"}]}]}',
        '{"pools": [{"name": "p", "mode": "primary", "devices": []}]}',
        '{"pools": [{"name": "p", "mode": "primary", "devices": [{"name": "a"}]},'
        ' {"name": "P", "mode": "primary", "devices": [{"name": "b"}]}]}',
        '{"pools": [{"name": "q", "mode": "primary", "devices": [{"name": "c"}],'
        ' "udsTimeout": "soon"}]}',
    ]
)


def _netdev(name: str, up: bool) -> NetDev:
    return NetDev(name=name, ifindex=1 + DEVICES.index(name), driver="veth",
                  oper_state="up" if up else "down", admin_up=up)  # fmt: skip


# -- the model ------------------------------------------------------------------------------


@dataclass
class Pod:
    """A pod as kubelet knows it (kubelet's truth), and what it was handed."""

    name: str
    pool: str
    device: str
    prog: int | None  # the program its Allocate attached (None in a raw pool)
    alive: bool = True
    added: bool = False  # CNI ADD done (once, at the pod's start)
    in_netns: bool = False  # its device is in its netns (ADD done, no DEL yet)
    # afxdpd was told a lie about it (kubelet left it out of an answer): its
    # allocation may end by kubelet's word.
    lied_about: bool = False
    # A restart lost its record while kubelet was down: afxdpd cannot know of it.
    unknowable: bool = False

    @property
    def resource(self) -> str:
        return f"{contracts.RESOURCE_PREFIX}{self.pool}"

    @property
    def holds(self) -> bool:
        """Whether afxdpd must count its device as this pod's."""
        return self.alive and not self.lied_about and not self.unknowable


class FakeKubelet:
    """FAKE kubelet: PodResources answers from the model's pods. ``down``: no
    answer (find_stale finds nothing, held is None); ``hidden``: pods it leaves
    out of its answers (a lie, each marked when told); ``turns``: how slow."""

    def __init__(self) -> None:
        self.pods: dict[str, Pod] = {}
        self.down = False
        self.hidden: set[str] = set()
        self.turns = 0

    def alive(self) -> list[Pod]:
        return [p for p in self.pods.values() if p.alive]

    def busy(self, resource: str, device: str) -> bool:
        """Kubelet's own books: a device of a resource that a live pod has."""
        return any(p.resource == resource and p.device == device for p in self.alive())

    def _listed(self) -> list[Pod]:
        return [p for p in self.alive() if p.name not in self.hidden]

    async def stale(self, resource: str, devices: Sequence[str]) -> list[str]:
        await _turns(self.turns)
        if self.down:
            return []
        listed = {p.device for p in self._listed() if p.resource == resource}
        found = [d for d in devices if d not in listed]
        for p in self.alive():
            if p.name in self.hidden and p.resource == resource and p.device in found:
                p.lied_about = True
        return found

    async def held(self) -> dict[str, set[str]] | None:
        await _turns(self.turns)
        if self.down:
            return None
        for p in self.alive():
            if p.name in self.hidden:
                p.lied_about = True
        out: dict[str, set[str]] = {}
        for p in self._listed():
            out.setdefault(p.resource, set()).add(p.device)
        return out


async def _turns(n: int) -> None:
    for _ in range(n):
        await anyio.sleep(0)


class MachineHandouts(CountingHandouts):
    """Handouts whose background work is all the machine's to settle: kubelet
    asked again each second while devices are unknown (``settle_forever``) is
    the ``kubelet_asked_again`` step instead, so hypothesis decides when."""

    def spawn(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        if getattr(fn, "__name__", "") != "settle_forever":
            super().spawn(fn, *args)  # type: ignore[arg-type]


@dataclass
class Run:
    """One afxdpd process: its task group, devices and handouts."""

    tg: anyio.abc.TaskGroup
    done: Any  # the future of the task that holds the task group
    devices: Devices
    handouts: MachineHandouts


# -- the machine -----------------------------------------------------------------------------


class DeviceMachine(RuleBasedStateMachine):
    configs: st.SearchStrategy[dict[str, dict[str, Any]]] = VALID_CONFIGS
    files: Sequence[str] = ("intact", "truncated", "garbage")
    together: Sequence[str] = ("allocate", "reload", "reconcile", "link", "del", "resync")

    def __init__(self) -> None:
        super().__init__()
        self._stack = ExitStack()
        self.tmp = Path(self._stack.enter_context(tempfile.TemporaryDirectory()))
        for module in (handouts, journal):
            self._stack.enter_context(patch.object(module, "run_sync", self._run_sync))
        self.portal: BlockingPortal = self._stack.enter_context(start_blocking_portal("asyncio"))
        self.links: dict[str, str] = dict.fromkeys(DEVICES, "up")
        self.kernel = FakeKernel(self.links)
        self.kernel.on_remove = self._removed
        self.kubelet = FakeKubelet()
        self.kept_progs: set[int] = set()  # pods' programs a skipUnloadBpf DEL leaves
        # Programs and pins of allocations whose record a damaged state file lost:
        # afxdpd cannot know they are its own.
        self.lost: set[int | str] = set()
        self.recorded: dict[str, Any] = {}  # the record the last run left
        self.violations: list[str] = []
        self.config: Config = load_config(_doc(INITIAL)).config
        self.pod_count = 0
        self.run: Run | None = None
        self._boot()

    def teardown(self) -> None:
        try:
            if self.run is not None:
                self._stop()
        finally:
            self._stack.close()

    # -- plumbing ---------------------------------------------------------------------------

    async def _run_sync(self, work: Work, fn: Callable[..., T], *args: Any) -> T:
        """On the loop, after a turn (as a worker thread's answer comes after
        one), plus the kernel's delay for this call; not cancelled half-way
        (a worker thread is not either)."""
        with anyio.CancelScope(shield=True):
            await _turns(1 + self.kernel.delay.get(getattr(fn, "__name__", ""), 0))
        return fn(*args)

    def _call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        return self.portal.call(fn, *args)

    @property
    def devices(self) -> Devices:
        assert self.run is not None
        return self.run.devices

    async def _settle(self) -> None:
        assert self.run is not None
        for _ in range(SETTLE_TURNS):
            if not self.run.handouts.running:
                return
            await anyio.sleep(0)
        raise AssertionError("background work did not end")

    def _settled(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        async def go() -> Any:
            try:
                return await fn(*args)
            finally:
                await self._settle()

        return self._call(go)

    def _removed(self, device: str, prog: int, how: str) -> None:
        """The kernel was told to take ``prog`` off ``device`` (by afxdpd)."""
        for p in self.kubelet.pods.values():
            if p.holds and p.device == device and p.prog == prog:
                self.violations.append(
                    f"{p.name}'s program {prog} on {device} was taken off ({how}) while "
                    "the pod holds the device"
                )

    def _host_netdevs(self) -> dict[str, NetDev]:
        return {n: _netdev(n, s == "up") for n, s in self.links.items() if s in ("up", "down")}

    async def _read_link(self, name: str) -> NetDev | None:
        return self._host_netdevs().get(name)

    async def _scan(self) -> list[NetDev]:
        return list(self._host_netdevs().values())

    async def _host(self, *, task_status: anyio.abc.TaskStatus[anyio.abc.TaskGroup]) -> None:
        async with anyio.create_task_group() as tg:
            task_status.started(tg)
            await anyio.sleep_forever()

    def _boot(self) -> None:
        """Start an afxdpd, as service.py does: the record, the inventory (with
        the record's devices that are in pods), the pools, restore, prepare."""
        done, tg = self.portal.start_task(self._host)

        async def boot() -> Run:
            store = StateStore(self.tmp / "state", self.tmp / "pins")
            record = store.load()
            for device, left in self.recorded.items():
                if record.allocations.get(device) != left:
                    self.lost.update(x for x in (left.prog_id, left.pinned) if x is not None)
            # afxdpd cannot know of a pod whose record a truncation lost silently
            # (an unreadable one says so: every device waits for kubelet's word)
            # (a cut exactly at a line's end is not seen; one inside a line is: torn)
            if self.kubelet.down and not store.unreadable and not store.torn:
                for p in self.kubelet.alive():
                    kept = record.allocations.get(p.device)
                    if kept is None or kept.pool != p.pool or kept.prog_id != p.prog:
                        p.unknowable = True
            netdevs = self._host_netdevs()
            # As service.py: the record's devices in pods, or without one, those
            # the CNI attachments (here: the links in pods) describe.
            in_pods = [
                msgspec.convert(a.netdev, NetDev)
                for a in record.allocations.values()
                if a.netdev and a.device not in netdevs
            ] if not store.unreadable else [
                _netdev(d, True) for d, where in self.links.items() if where == "pod"
            ]  # fmt: skip
            assembly = assemble(self.config, [*netdevs.values(), *in_pods], NODE,
                                unprivileged_bpf_disabled=0,
                                secondary=FakeSubfunctions())  # fmt: skip
            hs = MachineHandouts(task_group=tg, datapath=self.kernel, uds_dir=self.tmp / "uds",
                                  pin_dir=self.tmp / "pins", check_host=_check,
                                  secondary=FakeSubfunctions(), netdev_of=netdevs.get,
                                  store=store)  # fmt: skip
            devices = Devices(assembly.pools, hs, find_stale=self.kubelet.stale,
                              read_link=self._read_link, scan=self._scan,
                              netdevs=netdevs)  # fmt: skip
            self.run = Run(tg, done, devices, hs)
            await devices.start(record, unreadable=store.unreadable, torn=store.torn,
                                ask=self.kubelet.held)  # fmt: skip
            devices.prepare_all()
            await self._settle()
            return self.run

        self._call(boot)

    def _stop(self) -> None:
        run = self.run
        assert run is not None

        async def stop() -> None:
            await run.devices.shutdown()
            await self._settle()
            run.tg.cancel_scope.cancel()

        self._call(stop)
        run.done.result()
        self.recorded = dict(run.handouts.store.record.allocations)
        self.run = None

    # -- what kubelet would do -------------------------------------------------------------

    def _kubelet_choices(self, taken: Sequence[tuple[str, str]] = ()) -> list[tuple[str, str]]:
        """(pool, device) kubelet may allocate: advertised Healthy by a pool
        afxdpd serves, and free in kubelet's own books for that resource."""
        out = []
        for name, pool in sorted(self.devices.pools.items()):
            if name in self.devices.draining:
                continue
            for dev in pool.devices.values():
                if dev.usable and not self.kubelet.busy(pool.config.resource_name, dev.id):
                    out.append((name, dev.id))
        return [c for c in out if c not in taken]

    def _new_pod_name(self) -> str:
        self.pod_count += 1
        return f"pod{self.pod_count}"

    async def _allocate(self, pool: str, device: str) -> None:
        """Kubelet's Allocate; the pod is listed once it succeeded."""
        name = self._new_pod_name()
        try:
            [handout] = await self.devices.allocate(pool, [device])
        except (DeviceError, AllocateFailed):
            return
        for p in self.kubelet.alive():
            if p.holds and p.device == device:
                self.violations.append(
                    f"Allocate handed {device} (pool {pool}) to {name} while {p.name} "
                    f"(pool {p.pool}) holds it"
                )
        prog = handout.xdp.prog_id if handout.xdp is not None else None
        self.kubelet.pods[name] = Pod(name, pool, device, prog)

    async def _add(self, pod: Pod) -> None:
        """CNI ADD at the DeviceSide level: refused unless afxdpd counts the
        device allocated; else the link moves into the pod's netns."""
        pod.added = True
        try:
            if self.devices.device_allocated(pod.device) is not True:
                return
        except DeviceError:  # not known yet (kubelet not asked): code 11
            return
        if self.links[pod.device] not in ("up", "down"):
            return  # no such link here: the CNI fails
        try:  # as the CNI handler: the pod's program on the link, or no ADD
            await self.devices.ensure_program(pod.device)
        except AfxdpError:
            return
        self.links[pod.device] = "pod"
        pod.in_netns = True
        self.devices.on_link(LinkEvent(pod.device, Change.MOVED_OUT))

    async def _del(self, pod: Pod, keep_xdp: bool) -> None:
        """CNI DEL at the DeviceSide level: the link comes home, up; afxdpd is told."""
        pod.in_netns = False
        self.links[pod.device] = "up"
        if keep_xdp and pod.prog is not None:
            self.kept_progs.add(pod.prog)
        self.devices.on_link(LinkEvent(pod.device, Change.UP))
        await self.devices.came_home(pod.device, keep_xdp)

    async def _reload(self, doc: str | bytes) -> None:
        """service.reload: an invalid config changes nothing."""
        try:
            loaded = load_config(doc)
        except ConfigError:
            return
        assembly = assemble(loaded.config, await self.devices.inventory(), NODE,
                            unprivileged_bpf_disabled=0,
                            secondary=FakeSubfunctions())  # fmt: skip
        self.config = loaded.config
        await self.devices.replace_pools(assembly.pools)

    async def _link(self, device: str, change: Change) -> None:
        if change is Change.REMOVED:
            self.links[device] = "gone"
            self.kernel.attached.pop(device, None)  # the program goes with the link
        else:
            if self.links[device] == "gone":  # a new link under the name
                self.kernel.recreate(device)
            self.links[device] = "up" if change is Change.UP else "down"
        self.devices.on_link(LinkEvent(device, change, self.kernel.ifindexes[device]))

    def _age(self) -> None:
        """Time passes: every allocation made so far is older than the grace."""
        for h in self.devices.handouts.handouts.values():
            h.since -= RECONCILE_GRACE + 1

    def _draw_pod(self, data: st.DataObject, pods: Sequence[Pod]) -> Pod:
        return self.kubelet.pods[data.draw(st.sampled_from([p.name for p in pods]), label="pod")]

    # -- rules --------------------------------------------------------------------------------

    @rule(data=st.data())
    def allocate(self, data: st.DataObject) -> None:
        choices = self._kubelet_choices()
        if choices:
            self._settled(self._allocate, *data.draw(st.sampled_from(choices)))

    @rule(data=st.data())
    def allocate_a_held_device(self, data: st.DataObject) -> None:
        """A second kubelet asks for a device a live pod holds: afxdpd asks
        kubelet, which lists the holder (unless it lies): refused."""
        choices = sorted(
            (name, p.device)
            for p in self.kubelet.alive()
            for name, pool in self.devices.pools.items()
            if p.device in pool.devices and name not in self.devices.draining
        )
        if choices:
            self._settled(self._allocate, *data.draw(st.sampled_from(choices)))

    @rule(data=st.data())
    def cni_add(self, data: st.DataObject) -> None:
        pods = [p for p in self.kubelet.alive() if not p.added]
        if pods:
            self._settled(self._add, self._draw_pod(data, pods))

    @rule(data=st.data(), keep_xdp=st.booleans())
    def cni_del(self, data: st.DataObject, keep_xdp: bool) -> None:
        pods = [p for p in self.kubelet.pods.values() if p.in_netns]
        if pods:
            self._settled(self._del, self._draw_pod(data, pods), keep_xdp)

    @rule(data=st.data(), keep_xdp=st.booleans(), del_first=st.booleans())
    def pod_ends(self, data: st.DataObject, keep_xdp: bool, del_first: bool) -> None:
        """Kubelet forgets the pod; the runtime's DEL (if the pod had its
        device) comes before, or later (``cni_del``): either order happens."""
        pods = self.kubelet.alive()
        if not pods:
            return
        pod = self._draw_pod(data, pods)
        if pod.in_netns and del_first:
            self._settled(self._del, pod, keep_xdp)
        pod.alive = False

    @rule(data=st.data(), mode=st.sampled_from(["truthful", "down", "lying"]),
          turns=st.integers(0, 3))  # fmt: skip
    def kubelet_changes(self, data: st.DataObject, mode: str, turns: int) -> None:
        self.kubelet.down = mode == "down"
        self.kubelet.turns = turns
        self.kubelet.hidden = set()
        if mode == "lying":
            names = sorted(p.name for p in self.kubelet.alive())
            self.kubelet.hidden = (
                set(data.draw(st.sets(st.sampled_from(names)))) if names else set()
            )

    @rule()
    def kubelet_asked_again(self) -> None:
        """What ``settle_forever`` does each second while devices are unknown."""
        if self.devices.distrusted:
            self._settled(self.devices.ask_again, self.kubelet.held)

    @rule()
    def reconcile(self) -> None:
        self._settled(self.devices.reconcile, 0.0)

    @rule()
    def time_passes(self) -> None:
        self._age()

    @rule(data=st.data())
    def reload(self, data: st.DataObject) -> None:
        spec = data.draw(st.one_of(self.configs, INVALID_CONFIGS), label="config")
        self._settled(self._reload, _doc(spec) if isinstance(spec, dict) else spec)

    @rule(data=st.data())
    def link_event(self, data: st.DataObject) -> None:
        choices = sorted(
            [(d, c) for d, s in self.links.items() if s in ("up", "down")
             for c in (Change.UP, Change.DOWN, Change.REMOVED)]
            + [(d, Change.UP) for d, s in self.links.items() if s == "gone"],
            key=lambda dc: (dc[0], dc[1].value),
        )  # fmt: skip
        if choices:
            self._settled(self._link, *data.draw(st.sampled_from(choices)))

    @rule()
    def resync(self) -> None:
        self._settled(self.devices.resync)

    @rule(
        data=st.data(),
        cut=st.floats(0, 1, exclude_max=True),
        garbage=st.binary(min_size=1, max_size=40),
        kubelet_up=st.booleans(),
    )
    def restart(self, data: st.DataObject, cut: float, garbage: bytes, kubelet_up: bool) -> None:
        """afxdpd stops and starts again; the kernel keeps what it has."""
        file = data.draw(st.sampled_from(self.files), label="state file")
        self._stop()
        path = self.tmp / "state" / FILE_NAME
        if path.exists() and file == "truncated":
            whole = path.read_bytes()
            path.write_bytes(whole[: int(len(whole) * cut)])
        elif file == "garbage":
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(garbage)
        self.kubelet.down = not kubelet_up
        self._boot()

    @rule(data=st.data(), attach=st.integers(0, 3), detach=st.integers(0, 3),
          kubelet=st.integers(0, 3))  # fmt: skip
    def concurrently(self, data: st.DataObject, attach: int, detach: int, kubelet: int) -> None:
        """Two or three steps at once, each starting after a chosen number of
        turns, with the kernel's attach/detach and kubelet slow."""
        self._age()  # what was there before is old; what these steps make is not
        ops: list[Callable[[], Awaitable[None]]] = []
        chosen: list[tuple[str, str]] = []
        for _ in range(data.draw(st.integers(2, 3), label="steps")):
            kind = data.draw(
                st.sampled_from(self.together),
                label="kind",
            )
            op = self._op(data, kind, chosen)
            if op is not None:
                ops.append(op)
        delays = [data.draw(st.integers(0, 4), label="turns before") for _ in ops]
        self.kernel.delay = {"attach": attach, "detach_stale": detach, "detach": detach}
        turns, self.kubelet.turns = self.kubelet.turns, kubelet

        async def after(n: int, op: Callable[[], Awaitable[None]]) -> None:
            await _turns(n)
            await op()

        async def together() -> None:
            async with anyio.create_task_group() as tg:
                for n, op in zip(delays, ops, strict=True):
                    tg.start_soon(after, n, op)

        try:
            self._settled(together)
        finally:
            self.kernel.delay = {}
            self.kubelet.turns = turns

    def _op(self, data: st.DataObject, kind: str,
            chosen: list[tuple[str, str]]) -> Callable[[], Awaitable[None]] | None:  # fmt: skip
        if kind == "allocate":  # kubelet's books have the device taken from the call on
            choices = self._kubelet_choices(chosen)
            if not choices:
                return None
            pick = data.draw(st.sampled_from(choices), label="allocate")
            chosen.append(pick)
            return partial(self._allocate, *pick)
        if kind == "reload":
            return partial(self._reload, _doc(data.draw(self.configs, label="config")))
        if kind == "reconcile":
            return self._reconcile_with_grace
        if kind == "link":
            host = sorted(d for d, s in self.links.items() if s in ("up", "down"))
            if not host:
                return None
            device = data.draw(st.sampled_from(host), label="link")
            change = data.draw(st.sampled_from([Change.UP, Change.DOWN]), label="change")
            return partial(self._link, device, change)
        if kind == "del":
            pods = [p for p in self.kubelet.pods.values() if p.in_netns]
            if not pods:
                return None
            return partial(self._del, self._draw_pod(data, pods), False)
        return self._resync

    async def _reconcile_with_grace(self) -> None:
        await self.devices.reconcile()  # fresh allocations are kubelet's to list yet

    async def _resync(self) -> None:
        await self.devices.resync()

    def _unknown(self, device: str) -> bool:
        found = self.devices.find(device)
        return found is not None and found[1].unknown

    # -- invariants ---------------------------------------------------------------------------

    @invariant()
    def no_device_is_handed_out_to_two_pods(self) -> None:
        assert not self.violations, self.violations
        for device in DEVICES:
            holders = [p.name for p in self.kubelet.pods.values()
                       if p.holds and p.device == device]  # fmt: skip
            assert len(holders) <= 1, f"{device} is held by {holders}"
            listening = self.kernel.listening.get(device, 0)
            assert listening <= 1, f"{listening} UDS servers listen for {device}"

    @invariant()
    def a_device_a_pod_holds_is_never_free(self) -> None:
        if self.run is None:
            return
        devices = self.devices
        for p in self.kubelet.pods.values():
            if not p.holds:
                continue
            found = devices.find(p.device)
            if devices.distrusted and (found is None or found[1].unknown):  # not said yet
                assert not any(
                    o.devices[p.device].usable
                    for o in devices.pools.values()
                    if p.device in o.devices
                ), f"{p.device} is unknown but usable"
                continue
            rivals = {r.pool for r in self.kubelet.alive() if r is not p and r.device == p.device}
            if rivals and not self.kubelet.down:
                # Kubelet lists another pod on it too (one it once left out of an
                # answer, so its allocation here ended): afxdpd cannot tell which
                # is right, but the device is one of theirs, never free.
                assert found is not None and found[1].allocated, f"{p.device} is free"
                assert found[0].name in rivals | {p.pool}, f"{p.device} is {found[0].name}'s"
                continue
            pool = devices.pools.get(p.pool)
            dev = pool.devices.get(p.device) if pool is not None else None
            assert dev is not None and dev.allocated, (
                f"{p.device}, which {p.name} holds, is "
                f"{'free' if dev is not None else 'not in'} pool {p.pool}"
            )
            for name, other in devices.pools.items():
                odev = other.devices.get(p.device)
                free = odev is not None and not odev.allocated and odev.usable
                assert name in devices.draining or not free, (
                    f"{p.device}, which {p.name} holds (pool {p.pool}), is advertised free "
                    f"in pool {name}"
                )
            h = devices.handouts.handouts.get(p.device)
            assert h is not None and h.pool == p.pool, (
                f"{p.device}, which {p.name} holds (pool {p.pool}), has no handout of its pool"
            )
            got = h.xdp.prog_id if h.xdp is not None else None
            # Taken over from kubelet's word alone while in its pod: what it
            # carries is not known (status says so), and nothing replaces it.
            assert got == p.prog or (h.setup_unknown and got is None), (
                f"{p.device}'s handout has program {got}, not {p.name}'s {p.prog}"
            )
        for device, h in devices.handouts.handouts.items():
            pool = devices.pools.get(h.pool)
            dev = pool.devices.get(device) if pool is not None else None
            assert dev is not None and dev.allocated, (
                f"{device} is handed out (pool {h.pool}) but that pool counts it "
                f"{'free' if dev is not None else 'absent'}"
            )

    @invariant()
    def the_kernel_holds_nothing_unaccounted_for(self) -> None:
        if self.run is None:
            return
        hs = self.devices.handouts
        # A pod's own program, whatever afxdpd knows of it; or one afxdpd could
        # not know of (its record lost while kubelet was down), even after it ended.
        pods_progs = {
            p.prog
            for p in self.kubelet.pods.values()
            if p.prog is not None and (p.alive or p.unknowable)
        }
        for device, prog in sorted(self.kernel.attached.items()):
            h = hs.handouts.get(device)
            ok = (
                (h is not None and h.xdp is not None and h.xdp.prog_id == prog)
                # taken over out of sight: whatever its pod has on it
                or (h is not None and h.setup_unknown and h.xdp is None)
                or (device in hs.prepared and hs.prepared[device].prog_id == prog)
                or device in hs.swap_pending
                or prog in self.kept_progs
                or prog in pods_progs
                or self.links[device] == "pod"  # out of our reach until its DEL
                or prog in self.lost
                or self._unknown(device)  # nothing touched until kubelet answers
            )
            assert ok, f"program {prog} on {device} is no allocation's nor preparation's"
        pinned = {str(h.pinned) for h in hs.handouts.values() if h.pinned is not None}
        for path, prog in sorted(self.kernel.pins.items()):
            assert path in pinned or prog in pods_progs or path in self.lost, (
                f"{path} is pinned for nothing"
            )
        serving = {d for d, h in hs.handouts.items() if h.uds is not None}
        for device, n in sorted(self.kernel.listening.items()):
            assert not n or device in serving, f"a UDS server listens for {device}, unhanded"


TestDeviceMachine = DeviceMachine.TestCase
TestDeviceMachine.settings = settings(
    max_examples=100, stateful_step_count=30, deadline=None, report_multiple_bugs=False
)
