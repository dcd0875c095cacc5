"""What an allocated device gets, and taking it back.

For each device of an Allocate: (cdq) its secondary netdev is created; unless
the pool disables it, our XDP program is attached with a fresh XSKMAP; then
either the map is pinned (pinned-map pools) or a UDS server starts listening
on the device's socket. All devices of a request succeed or none does: on any
failure everything already done for the request is undone, in reverse order.
Release (the allocation ended: kubelet no longer lists the pod) undoes the same.
The pod gets the device's DIRECTORY mounted, not the socket or map file: a bind
mount of a file pins its inode, so a socket that a restarted afxdpd re-creates
would be invisible to the pod; in a mounted directory it is seen. All kernel
work goes through a ``datapath.Datapath``.
"""

from __future__ import annotations

import logging
import math
import reprlib
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import anyio
import msgspec
from anyio.abc import TaskGroup

from afxdp import config, contracts
from afxdp.bpf import pinning
from afxdp.confine import confined
from afxdp.datapath import MAP_IN_MAP, Datapath, Handshake, Program
from afxdp.errors import AfxdpError, DeviceError
from afxdp.inventory import NetDev
from afxdp.logsetup import about
from afxdp.pools import Pool, PoolDevice
from afxdp.secondary import SecondaryDeviceProvider
from afxdp.sockfile import clear_stale
from afxdp.state import Allocation, StateStore
from afxdp.status import AllocationStatus
from afxdp.uds.handshake import HostCheck
from afxdp.uds.server import ConnectionBudget, socket_path
from afxdp.workers import Work, run_sync

log = logging.getLogger(__name__)

# A program of ours on a device (a pod's, or a free device's), as Devices names
# it: Devices reaches the datapath only through this module.
Carried = Program


@dataclass
class Handout:
    """One allocated device and what was set up for it."""

    pool: str
    device: str
    secondary_created: bool = False
    xdp: Program | None = None
    uds: Handshake | None = None
    uds_scope: anyio.CancelScope | None = None
    uds_done: anyio.Event | None = None  # set when the serving task has ended
    pinned: Path | None = None
    mounts: list[tuple[str, str]] = field(default_factory=list)  # (host, container)
    since: float = field(default_factory=anyio.current_time)
    setup_unknown: bool = False  # see state.Allocation.setup_unknown
    # Why ``xdp`` is not on the device's link now (its link was deleted, and
    # the program could not go on a link re-created under its name yet).
    xdp_fault: str | None = None
    # Map-in-map: why the pod's map is not in its device's slot (putting it
    # there failed; the CNI ADD fails saying so).
    slot_fault: str | None = None

    def status(self) -> AllocationStatus:
        uds = self.uds
        return AllocationStatus(
            pool=self.pool,
            device=self.device,
            xdp_mode=self.xdp.mode_name if self.xdp else None,
            xdp_prog_id=self.xdp.prog_id if self.xdp else None,
            uds_socket=str(uds.path) if uds else None,
            uds_connections=uds.connections if uds else 0,
            uds_active=uds.active if uds else 0,
            uds_refused=uds.refused if uds else 0,
            uds_denied=uds.denied if uds else 0,
            uds_failed=uds.failed if uds else 0,
            uds_idle_timeout=uds.idle_timeout if uds else None,
            pinned_map=str(self.pinned) if self.pinned else None,
            setup_unknown=self.setup_unknown,
            xdp_fault=self.xdp_fault or self.slot_fault,
        )


def loads_program(cfg: config.Pool) -> bool:
    """Whether the pool's handouts carry our program (all but raw-netdev pools)."""
    return not (cfg.uds_server_disable and not cfg.bpf_map_pinning_enable)


class HostChecker(Protocol):
    """Is ``hostname`` the pod holding ``device`` of ``resource``? (PodResources)"""

    def __call__(self, hostname: str, *, resource: str, device: str) -> Awaitable[HostCheck]: ...


class Handouts:
    """The node's handed-out devices (all pools), each with what was set up for it."""

    def __init__(
        self,
        *,
        task_group: TaskGroup,
        datapath: Datapath,
        uds_dir: Path,
        pin_dir: Path,
        check_host: HostChecker,
        secondary: SecondaryDeviceProvider,
        netdev_of: Callable[[str], NetDev | None],
        uds_budget: ConnectionBudget | None = None,
        store: StateStore | None = None,
    ) -> None:
        self._tg = task_group
        self.datapath = datapath
        self.uds_dir = uds_dir
        self.pin_dir = pin_dir
        self._check_host = check_host
        self._secondary = secondary
        self._netdev_of = netdev_of
        # One budget for every device's UDS connections (fds are the process's).
        self.uds_budget = uds_budget if uds_budget is not None else ConnectionBudget()
        self.handouts: dict[str, Handout] = {}
        self.store = store or StateStore(None)
        # Free devices' programs, attached ahead of Allocate (device -> program).
        self.prepared: dict[str, Program] = {}
        self._locks: dict[str, anyio.Lock] = {}
        self.closing = False  # set at shutdown: nothing more is prepared
        self._preparing = anyio.Semaphore(Work.PREPARE.value)
        # Told each UDS connection's outcome (the service counts them in metrics).
        self.count_uds: Callable[[str], None] | None = None
        # Devices whose pod's DEL said skipUnloadBpf: their program stays when
        # the allocation ends (it is replaced at the next Allocate).
        self.keep_xdp: set[str] = set()
        # Free devices whose last pod's program was left attached for a fresh
        # one to take its place (``release`` with ``swap``), not replaced yet.
        self.swap_pending: set[str] = set()
        # Devices an Allocate is setting up (not in ``handouts`` yet): like
        # handed-out ones, never prepared nor unprepared under it.
        self._starting: set[str] = set()
        # Map-in-map: each device's last slot change in the background (set
        # when it is done); each waits for the one before (``_slot_change``).
        self._slot_changes: dict[str, anyio.Event] = {}
        # Handed-out devices whose link was renamed away from the device's
        # name (device -> the link's ifindex): the pod's program is taken off
        # that link by its index when the allocation ends (``link_renamed``).
        self.renamed: dict[str, int] = {}

    async def start(self, pool: Pool, ids: Sequence[str]) -> list[Handout]:
        """Hand out ``ids`` of ``pool``; all of them, or raise having undone everything."""
        done: list[Handout] = []
        taken = [d for d in ids if self._taken(d)]
        if taken:  # Devices never asks this; a bug there must not hand one out twice
            raise DeviceError(f"{', '.join(taken)}: already handed out")
        self._starting.update(ids)
        try:
            for dev_id in ids:
                handout = Handout(pool.name, dev_id)
                done.append(handout)
                await self._set_up(pool, pool.devices[dev_id], handout)
            # Recorded before they count: a cancel (kubelet gave up) or a disk
            # failure while recording undoes them like any failed step.
            await self.store.put([self._record(h) for h in done])
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                for handout in reversed(done):
                    await self._tear_down(handout, keep_carrier=True)
                for handout in done:
                    with suppress(OSError):
                        await self.store.remove(handout.device)
            if isinstance(exc, AfxdpError | OSError):
                raise DeviceError(f"{done[-1].device}: {exc}") from exc
            raise
        finally:
            self._starting.difference_update(ids)
        for handout in done:
            self.handouts[handout.device] = handout
        return done

    def spawn(self, fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> None:
        """Run background work of an allocation (it ends with the service). It
        runs in the service's task group: a failure is logged, and the service
        (every other device, every pod's socket) goes on."""
        self._tg.start_soon(confined, log, partial(_background, fn, args), "the service", fn, *args)

    def _record(self, h: Handout) -> Allocation:
        netdev = self._netdev_of(h.device)
        return Allocation(
            pool=h.pool,
            device=h.device,
            prog_id=h.xdp.prog_id if h.xdp else None,
            pinned=str(h.pinned) if h.pinned else None,
            secondary=h.secondary_created,
            netdev=msgspec.to_builtins(netdev) if netdev else {},
        )

    async def adopt(self, pool: Pool, alloc: Allocation) -> Handout:
        """Take over an allocation a previous run made (from the durable record):
        its program stays attached and its map pinned; the UDS server listens
        again (the pod has the device's directory mounted, so it sees the new
        socket). Raises AfxdpError when the program is gone (e.g. after a reboot)."""
        handout = Handout(pool.name, alloc.device, secondary_created=alloc.secondary,
                          setup_unknown=alloc.setup_unknown)  # fmt: skip
        handout.since = -math.inf  # kubelet may be asked about it right away
        if alloc.prog_id is not None:
            handout.xdp = await run_sync(
                Work.DEVICES, self.datapath.adopt, alloc.device, alloc.prog_id
            )
        pod_dir = str(contracts.pod_device_dir(alloc.device))
        if alloc.pinned is not None:
            handout.pinned = Path(alloc.pinned)
            handout.mounts.append((str(handout.pinned.parent), pod_dir))
        elif handout.xdp is not None:
            await self._serve_uds(pool, alloc.device, handout)
        self.handouts[alloc.device] = handout
        return handout

    async def take_over(self, pool: Pool, dev: PoolDevice) -> Handout:
        """Take over an allocation kubelet lists that no record describes (the
        record could not be trusted), and record it: our program found on the
        device is adopted (its socket is served again), a pinned-map pool's
        pin is where afxdpd pins it. A device not in our netns (in its pod's)
        keeps whatever it carries, unknown to us (``setup_unknown``); a
        program of ours on it is replaced when the allocation ends, as any."""
        cfg = pool.config
        # Whatever the pool's config says now: the pod was handed the device
        # under the config of its Allocate, which may have loaded a program.
        prog_id = await run_sync(Work.DEVICES, self.datapath.ours, dev.id)
        in_host = await run_sync(Work.DEVICES, self.datapath.in_host, dev.id)
        netdev = self._netdev_of(dev.id)
        alloc = Allocation(
            pool=pool.name,
            device=dev.id,
            prog_id=prog_id,
            pinned=str(pinning.map_path(self.pin_dir, pool.name, dev.id))
            if cfg.bpf_map_pinning_enable
            else None,
            secondary=dev.parent is not None,  # Allocate made it (kubelet lists no failed one)
            netdev=msgspec.to_builtins(netdev) if netdev else {},
            # No program of ours where the pool loads one (its link was re-created,
            # or it is in its pod's netns, out of our sight), or out of our sight:
            # what the pod has on it is not known.
            setup_unknown=prog_id is None and (loads_program(cfg) or not in_host),
        )
        handout, gone = await self.adopt_or_unknown(pool, alloc)
        if gone is not None:  # gone since it was seen
            log.warning("%s: taking over program %s failed: %s", dev.id, prog_id, gone,
                        extra=about(pool=pool.name, device=dev.id))  # fmt: skip
        else:
            await self.store.put([alloc])
        return handout

    async def adopt_or_unknown(
        self, pool: Pool, alloc: Allocation
    ) -> tuple[Handout, AfxdpError | OSError | None]:
        """``adopt``; when its program is gone, the allocation is kept all the
        same, its setup unknown, and recorded so. Also returns why it was gone
        (None: adopted as recorded), for the caller to say."""
        try:
            return await self.adopt(pool, alloc), None
        except (AfxdpError, OSError) as exc:
            lost = msgspec.structs.replace(alloc, prog_id=None, setup_unknown=True)
            handout = await self.adopt(pool, lost)
            await self.store.put([lost])
            return handout, exc

    async def forget(self, alloc: Allocation) -> None:
        """Undo what a previous run left for an allocation that is over."""
        sock = socket_path(self.uds_dir, alloc.device)
        try:
            clear_stale(sock)  # the last run's; one someone answers on is not ours
        except OSError as exc:
            log.warning("%s: socket left in place: %s", alloc.device, exc,
                        extra=about(pool=alloc.pool, device=alloc.device))  # fmt: skip
        with suppress(OSError):
            sock.parent.rmdir()
        if alloc.pinned is not None:
            self.datapath.unpin(Path(alloc.pinned))
        try:
            await run_sync(Work.DEVICES, self.datapath.detach_stale, alloc.device)
        except AfxdpError as exc:  # not in our netns (gone with its pod's): nothing to do
            log.info("%s: no program to detach: %s", alloc.device, exc,
                     extra=about(pool=alloc.pool, device=alloc.device))  # fmt: skip
        if alloc.secondary:
            try:
                await run_sync(Work.DEVICES, self._secondary.delete, alloc.device)
            except AfxdpError as exc:
                log.error("%s: deleting the secondary device failed: %s", alloc.device, exc,
                          extra=about(pool=alloc.pool, device=alloc.device))  # fmt: skip
        await self.store.remove(alloc.device)

    async def _set_up(self, pool: Pool, dev: PoolDevice, handout: Handout) -> None:
        cfg = pool.config
        if dev.parent is not None and dev.index is not None:
            parent = self._netdev_of(dev.parent)
            if parent is None:
                raise DeviceError(f"primary {dev.parent} is gone")
            await run_sync(Work.DEVICES, self._secondary.create, parent, dev.index)
            handout.secondary_created = True
        async with self._device_lock(dev.id):
            # A program attached ahead of time (``prepare``) is the one to hand out:
            # Allocate then does not wait for the kernel's RCU grace periods.
            program = self.prepared.pop(dev.id, None)
            if program is not None and not loads_program(cfg):
                await run_sync(Work.DEVICES, program.detach)  # prepared before a reload made it raw
                program = None
            if program is not None:
                self.swap_pending.discard(dev.id)  # it took the last pod's place
            program = program or await self._fresh(cfg, dev.id)
            if program is not None and self.datapath.layout == MAP_IN_MAP:
                given = await self._give(dev.id, program, cfg)
                self._slot_change(handout, given.install, "putting the pod's map in the slot")
                program = given
            handout.xdp = program
        if handout.xdp is None:
            return  # the pool hands out raw netdevs: nothing is loaded
        pod_dir = str(contracts.pod_device_dir(dev.id))
        if cfg.bpf_map_pinning_enable:
            path = pinning.map_path(self.pin_dir, pool.name, dev.id)
            await run_sync(Work.DEVICES, self.datapath.pin, handout.xdp, path, cfg.uid)
            handout.pinned = path
            handout.mounts.append((str(path.parent), pod_dir))
            return
        await self._serve_uds(pool, dev.id, handout)

    async def _give(self, device: str, carrier: Program, cfg: config.Pool) -> Program:
        """Map-in-map: a fresh XSKMAP for the slot of the device's program, as
        the pod's handout (no program change). When it fails, the device keeps
        its program, slot empty: prepared again. On the event loop, as the
        pin's unlink and the UDS server's bind: a map creation (about 10 us;
        no I/O, no lock another process holds) costs less than a worker
        thread's turn (0.3-0.5 ms here), and Allocate waits on it."""
        try:
            return carrier.give(cfg.control_frames_to_kernel)
        except BaseException:
            self.prepared[device] = carrier
            raise

    def _slot_change(self, handout: Handout, change: Callable[[], object], what: str) -> None:
        """Run a change of the device's slot in the background, after every
        earlier one of the device, in order. Every update of a map of maps
        waits an RCU grace period in the kernel (8-16 ms here): Allocate and
        release do not wait for it. Nothing depends on it being done before
        the device moves into its pod: the pod's map receives nothing before
        its pod binds a socket, and ``ensure_attached`` (the CNI ADD) waits
        for it all the same, so that a failure is the ADD's."""
        before = self._slot_changes.get(handout.device)
        done = self._slot_changes[handout.device] = anyio.Event()
        self._tg.start_soon(self._change_slot, handout, before, change, what, done)

    async def _change_slot(self, handout: Handout, before: anyio.Event | None,
                           change: Callable[[], object], what: str,
                           done: anyio.Event) -> None:  # fmt: skip
        device = handout.device
        try:
            with anyio.CancelScope(shield=True):  # a stop waits for it (``shutdown``)
                if before is not None:
                    await before.wait()
                await run_sync(Work.DEVICES, change)
        except (AfxdpError, OSError) as exc:
            handout.slot_fault = f"{what} failed: {exc}"
            log.error("%s: %s", device, handout.slot_fault)
        finally:
            done.set()
            if self._slot_changes.get(device) is done:
                del self._slot_changes[device]

    async def slot_settled(self, device: str) -> None:
        """Until the slot changes of ``device`` made so far are done."""
        last = self._slot_changes.get(device)
        if last is not None:
            await last.wait()

    async def _fresh(
        self, cfg: config.Pool, device: str, work: Work = Work.DEVICES
    ) -> Program | None:
        """A fresh program and map on a free ``device`` (none for a raw pool), in
        place of a program of ours found on it, in one kernel change: the
        previous pod's (``release`` leaves it for this swap), or one left over by
        skipUnloadBpf, a crash, or a device that came home while we were down.
        Never one a pod of an allocation has a map fd for (those are handed out).
        Map-in-map: the device's program with an empty slot (``carry``), one of
        ours of that kind found on it taken as it is."""
        program = None
        if not loads_program(cfg):
            stale = await run_sync(work, self.datapath.detach_stale, device)
            if stale is not None:
                log.info("%s: detached program %d left over", device, stale,
                         extra=about(pool=cfg.name, device=device))  # fmt: skip
        elif self.datapath.layout == MAP_IN_MAP:
            program = await run_sync(work, self.datapath.carry, device)
            if program.replaced is not None:
                log.info("%s: replaced program %d with our program for the device",
                         device, program.replaced,
                         extra=about(pool=cfg.name, device=device))  # fmt: skip
        else:
            program = await run_sync(work, self.datapath.attach, device)
            if program.replaced is not None:
                log.info("%s: replaced program %d with a fresh one", device, program.replaced,
                         extra=about(pool=cfg.name, device=device))  # fmt: skip
        self.swap_pending.discard(device)  # whatever the last pod left is gone
        return program

    async def prepare(self, pool: Pool, dev: PoolDevice) -> str | None:
        """Attach a fresh program to a free device ahead of Allocate; the reason
        when it cannot be done (the device is then not to be handed out)."""
        if not loads_program(pool.config) or dev.parent is not None:
            return None  # nothing to load, or a cdq secondary that does not exist yet
        # Its own threads, and a turn taken BEFORE the device's lock: a thousand
        # devices waiting to be prepared must neither hold up Allocate's threads
        # nor sit on the locks of devices Allocate wants.
        async with self._preparing, self._device_lock(dev.id):
            # ``dev`` may be a reload's stale copy (never marked allocated): what
            # is handed out is asked here, so a pod's program is never replaced.
            if self.closing or dev.allocated or self._taken(dev.id) or dev.id in self.prepared:
                return None
            try:
                program = await self._fresh(pool.config, dev.id, Work.PREPARE)
            except (AfxdpError, OSError) as exc:
                return str(exc)
            if program is not None:
                self.prepared[dev.id] = program
        return None

    async def unprepare(self, device: str) -> None:
        """Detach a prepared program (its device left the pool, or we stop), or
        the last pod's, left for a swap that will now not come."""
        async with self._device_lock(device):
            if self._taken(device):
                return  # a pod's now: its program is not ours to detach
            program = self.prepared.pop(device, None)
            try:
                if program is not None:
                    await run_sync(Work.DEVICES, program.detach)
                elif device in self.swap_pending:
                    await run_sync(Work.DEVICES, self.datapath.detach_stale, device)
            except AfxdpError as exc:
                if not await run_sync(Work.DEVICES, self.datapath.in_host, device):
                    # In a pod's netns still: taken off when it comes home (came_home).
                    log.info("%s: its last pod's program goes when it comes home", device,
                             extra=about(device=device))  # fmt: skip
                    return
                log.error("%s: detaching the prepared program failed: %s", device, exc,
                          extra=about(device=device))  # fmt: skip
            self.swap_pending.discard(device)

    def link_renamed(self, device: str, ifindex: int) -> None:
        """The link of ``device`` (``ifindex``) was renamed: it lives on under
        another name, with what we put on it, and is no longer the device
        (a link named ``device`` later is a new one, prepared as any). A free
        device's program (prepared, or its last pod's left for a swap) is
        taken off that link now, by its index: never handed out on a link
        that is not the device's. A handed-out device's (or one an Allocate
        is setting up) is taken off when its allocation ends (``release``)."""
        if self._taken(device):
            self.renamed[device] = ifindex
            return
        program = self.prepared.pop(device, None)
        pending = device in self.swap_pending
        self.swap_pending.discard(device)
        if program is not None or pending:
            self.spawn(self._free_off_renamed, device, ifindex, program)

    def link_back(self, device: str, ifindex: int) -> None:
        """A link is named ``device`` again (``ifindex``): when it is the one
        renamed away while handed out, its pod's program is on its link again."""
        if self.renamed.get(device) == ifindex:
            del self.renamed[device]

    async def _free_off_renamed(self, device: str, ifindex: int, program: Program | None
                                ) -> None:  # fmt: skip
        """A free device's ``program`` (None: its last pod's, any of ours) off
        its link renamed since (``ifindex``); our handles of it go."""
        try:
            await self._off_renamed(device, ifindex, program.prog_id if program else None)
        finally:
            if program is not None:
                program.abandon()  # only our handles: it is off, or on no link of the device

    async def _off_renamed(self, device: str, ifindex: int, prog_id: int | None) -> None:
        """Take program ``prog_id`` (None: any of ours) off the link
        ``ifindex``, once ``device``'s, renamed since. A failure is logged:
        the device goes on without that link either way."""
        try:
            gone = await run_sync(Work.DEVICES, self.datapath.detach_at, ifindex, prog_id)
        except (AfxdpError, OSError) as exc:
            log.error("%s: taking our program off its renamed link (ifindex %d) failed: %s",
                      device, ifindex, exc, extra=about(device=device))  # fmt: skip
            return
        if gone is not None:
            log.info("%s: program %d taken off its link renamed away (ifindex %d)", device,
                     gone, ifindex, extra=about(device=device))  # fmt: skip

    def forget_prepared(self, device: str) -> None:
        """The device's link is gone, and the prepared program with it."""
        self.swap_pending.discard(device)
        program = self.prepared.pop(device, None)
        if program is not None:
            program.abandon()

    async def ensure_attached(self, device: str, *, lost_only: bool = False) -> bool:
        """Make sure the link named ``device`` here carries the program its pod
        was handed: the same program (so the XSKMAP the pod has, or will get
        over the handshake or the pin), attached again when the link lost it,
        deleted and re-created under the same name. True when it was attached
        again; ``lost_only``: only when its link is known to have gone
        (``link_gone``). Raises DeviceError saying why it cannot (another
        program is on the link, ...); status shows the reason until it can."""
        await self.slot_settled(device)
        async with self._device_lock(device):
            handout = self.handouts.get(device)
            if handout is not None and handout.xdp is None and handout.setup_unknown:
                # Taken over from kubelet's word alone, here with no program of
                # ours (its link re-created, or the program gone): the pod could
                # reach no map through it. Said, never moved as if it worked.
                handout.xdp_fault = "its pod's program is not known (the state record was lost)"
                raise DeviceError(f"{device}: {handout.xdp_fault}; it cannot reach its pod "
                                  "with the pod's map")  # fmt: skip
            if handout is None or handout.xdp is None:
                return False  # a raw netdev (or not handed out): nothing of ours on it
            if handout.slot_fault is not None:
                raise DeviceError(f"{device}: the pod's map is not in its device's slot: "
                                  f"{handout.slot_fault}")  # fmt: skip
            lost = handout.xdp_fault is not None
            if lost_only and not lost:
                return False
            try:
                again = await run_sync(Work.DEVICES, partial(handout.xdp.ensure_attached, ask=lost))
            except (AfxdpError, OSError) as exc:
                handout.xdp_fault = f"not on its link: {exc}"
                raise DeviceError(f"{device}: the pod's XDP program is not on its link "
                                  f"and cannot go back on it: {exc}") from exc  # fmt: skip
            handout.xdp_fault = None
            if again:
                log.warning("%s: its link was re-created; the pod's program %d is on it again",
                            device, handout.xdp.prog_id,
                            extra=about(pool=handout.pool, device=device))  # fmt: skip
            return again

    def link_gone(self, device: str, ifindex: int) -> bool:
        """A link named ``device`` was deleted (``ifindex``; 0: not known):
        whether it may have been the handed-out device's; False when its pod's
        program is known to be on another link (this was an old one of that
        name). When the program was on it, it went with it: status says so
        until it goes on a link re-created under the name (``ensure_attached``)."""
        handout = self.handouts.get(device)
        program = handout.xdp if handout is not None else None
        if handout is None or program is None or not program.ifindex or not ifindex:
            return True
        if program.ifindex != ifindex:
            return False
        handout.xdp_fault = "its link was deleted"
        return True

    def lost(self, device: str) -> bool:
        """Whether ``device``'s pod's program is known to be off its link."""
        handout = self.handouts.get(device)
        return handout is not None and handout.xdp_fault is not None

    def _taken(self, device: str) -> bool:
        """Whether ``device`` is handed out, or an Allocate is setting it up."""
        return device in self.handouts or device in self._starting

    def _device_lock(self, device: str) -> anyio.Lock:
        return self._locks.setdefault(device, anyio.Lock())

    async def _serve_uds(self, pool: Pool, device: str, handout: Handout) -> None:
        if self.closing:
            # The service shuts handouts down before its task group ends: no
            # server task may be started in it now (the Allocate is undone).
            raise DeviceError("afxdpd is stopping")
        cfg = pool.config
        assert handout.xdp is not None
        server = self.datapath.uds_server(
            netdev=device,
            map_fd=handout.xdp.map_fd,
            path=socket_path(self.uds_dir, device),
            check_host=partial(self._check_host, resource=cfg.resource_name, device=device),
            uid=cfg.uid,
            idle_timeout=cfg.uds_timeout,
            budget=self.uds_budget,
            count=self.count_uds,
        )
        # Listening before Allocate returns: the container mounts the socket next.
        server.listen()
        handout.uds = server
        # Not tg.start: waiting for the task to run costs Allocate a loop turn, and
        # the socket already accepts (a connection waits in the backlog).
        scope, done = anyio.CancelScope(), anyio.Event()
        self._tg.start_soon(_serve, server, scope, done)
        # Only a task that exists is waited for at tear-down.
        handout.uds_scope, handout.uds_done = scope, done
        handout.mounts.append((str(server.path.parent), str(contracts.pod_device_dir(device))))

    async def _tear_down(
        self, handout: Handout, keep_xdp: bool = False, *, keep_carrier: bool = False
    ) -> None:
        """Undo a handout; every step runs even when an earlier one fails.
        ``keep_xdp`` leaves the program attached (its handles closed).
        Map-in-map: the pod's slot is emptied; ``keep_carrier`` keeps the
        device's program, prepared for the next pod, else it goes as a
        per-pod program would."""
        await _stop_serving(handout)
        if handout.pinned is not None:
            self.datapath.unpin(handout.pinned)
        carrier = handout.xdp.carrier if handout.xdp is not None else None
        if handout.xdp is not None and carrier is not None:
            await self._take_back(handout, handout.xdp, carrier, keep_xdp, keep_carrier)
        elif handout.xdp is not None and keep_xdp:
            handout.xdp.abandon()  # replaced at the device's next allocation
        elif handout.xdp is not None:
            await self._detach(handout, handout.xdp)
        elif handout.setup_unknown and not keep_xdp:  # whatever of ours it came home with
            try:
                await run_sync(Work.DEVICES, self.datapath.detach_stale, handout.device)
            except AfxdpError as exc:  # still in a pod's netns (gone with it)
                log.info("%s: no program to detach: %s", handout.device, exc,
                         extra=about(pool=handout.pool, device=handout.device))  # fmt: skip
        if handout.secondary_created:
            try:
                await run_sync(Work.DEVICES, self._secondary.delete, handout.device)
            except AfxdpError as exc:
                log.error("%s: deleting the secondary device failed: %s", handout.device, exc,
                          extra=about(pool=handout.pool, device=handout.device))  # fmt: skip

    async def _take_back(
        self, handout: Handout, given: Program, carrier: Program, keep_xdp: bool,
        keep_carrier: bool,
    ) -> None:  # fmt: skip
        """Map-in-map: empty the pod's slot and drop its map (frames go to the
        kernel; no earlier pod's map can feed a later pod), then keep the
        device's program for the next pod, leave it (``keep_xdp``), or detach
        it. Under the device's lock: ``prepare`` must not take the program a
        second time meanwhile. The slot is emptied in the background, in
        order with the device's other slot changes (``_slot_change``)."""
        device = handout.device
        async with self._device_lock(device):
            self._slot_change(handout, given.detach, "emptying the slot")
            if keep_carrier:
                self.prepared[device] = carrier
                return
        await self.slot_settled(device)  # the pod's map out before the program goes
        async with self._device_lock(device):
            if keep_xdp:
                carrier.abandon()
                return
            await self._detach(handout, carrier)

    async def _detach(self, handout: Handout, program: Program) -> None:
        """Detach ``program`` from the handout's device. Out of reach in its
        pod's netns, the program stays on it and comes home with it (a DEL):
        taken off then (``Devices.came_home``), or replaced by a fresh one, as a
        swap that did not come."""
        try:
            await run_sync(Work.DEVICES, program.detach)
        except AfxdpError as exc:
            log.error("%s: detaching XDP failed: %s", handout.device, exc,
                      extra=about(pool=handout.pool, device=handout.device))  # fmt: skip
        if not await run_sync(Work.DEVICES, self.datapath.in_host, handout.device):
            self.swap_pending.add(handout.device)

    async def release(self, device: str, keep_xdp: bool = False, *, swap: bool = False) -> bool:
        """Take ``device``'s handout back; False when it had none.

        ``swap``: the device stays pooled and gets a fresh program next
        (``prepare``, or an Allocate), which takes the place of the pod's in
        one kernel change; so the pod's stays attached until then, unless we
        are stopping (nothing is prepared then). Without it the pod's program
        is detached now."""
        if device in self.keep_xdp:
            self.keep_xdp.discard(device)
            keep_xdp = True
        handout = self.handouts.pop(device, None)
        if handout is None:
            return False
        swap = swap and not self.closing
        renamed = self.renamed.pop(device, None)
        if renamed is not None and handout.xdp is not None:
            # Its link was renamed away while the pod held it: the pod's
            # program is on a link that is no longer the device (by its index:
            # the name is another's, or nobody's). Never kept for the next pod.
            await self._off_renamed(device, renamed, handout.xdp.prog_id)
        # Map-in-map: the device keeps its program, the slot emptied: it is
        # prepared again at once, and no swap is needed. (A pod's slot of a run
        # before this per-pod one is swapped as a per-pod program would be.)
        keep = swap and self.datapath.layout == MAP_IN_MAP and handout.xdp is not None \
            and handout.xdp.carrier is not None and renamed is None  # fmt: skip
        if swap and not keep:
            self.swap_pending.add(device)
        with anyio.CancelScope(shield=True):
            await self._tear_down(handout, keep_xdp or (swap and not keep), keep_carrier=keep)
            await self.store.remove(device)
        log.info("%s: released", device, extra=about(pool=handout.pool, device=device))
        return True

    async def shutdown(self) -> None:
        """Stop serving, and touch nothing else: every allocation keeps its
        program, map and pin, and the durable record says how to take it over,
        so pods keep receiving while afxdpd restarts (only new handshakes wait).
        Free devices' prepared programs are detached (nobody uses them), and
        so are ended pods' programs still waiting for their swap."""
        self.closing = True
        for device in list(self._slot_changes):  # slot changes under way end first
            await self.slot_settled(device)
        # Each device's lock: a preparation under way finishes first, then goes.
        for device in [*self._locks, *sorted(self.swap_pending - self._locks.keys())]:
            await self.unprepare(device)
        for handout in self.handouts.values():
            await _stop_serving(handout, keep_dir=True)
            if handout.xdp is not None:
                handout.xdp.abandon()
        if self.handouts:
            log.info("left %d allocation(s) in place for the next start: %s",
                     len(self.handouts), ", ".join(sorted(self.handouts)))  # fmt: skip
        self.handouts.clear()


def _background(fn: Callable[..., Any], args: tuple[Any, ...]) -> str:
    """How a log names background work: its function and arguments, each a
    pool or device by its name (a Pool's repr lists every device: a thousand)."""
    shown = [
        repr(a.name) if isinstance(a, Pool) else repr(a.id) if isinstance(a, PoolDevice)
        else reprlib.repr(a)
        for a in args
    ]  # fmt: skip
    return f"background work {getattr(fn, '__qualname__', fn)}({', '.join(shown)})"


async def _serve(server: Handshake, scope: anyio.CancelScope, done: anyio.Event) -> None:
    try:
        with scope:  # cancelled before it got here: it ends at once
            # serve() never raises; if it did, this device alone stops
            await confined(log, lambda: f"{server.path}: the UDS server", "the service",
                           server.serve)  # fmt: skip
    finally:
        done.set()


async def _stop_serving(handout: Handout, *, keep_dir: bool = False) -> None:
    """Stop a handout's UDS server: its task first, then its socket. The task
    waits on the listener, a wait that the event loop (and anyio, which refuses
    a second wait on a busy fd) keys by fd number: closed under that wait, the
    number is free for the next socket (often the device's next pod's
    listener) while the old wait still holds it."""
    if handout.uds_scope is not None and handout.uds_done is not None:
        handout.uds_scope.cancel()
        with anyio.CancelScope(shield=True):  # not closed under a waiting task
            await handout.uds_done.wait()
    if handout.uds is not None:
        handout.uds.close(keep_dir=keep_dir)
