"""The node's pools and devices: the one owner of device state.

Allocate, release, health and describe all go through ``Devices``; it owns the
change notification that ListAndWatch waits on, and it is what the CNI side
sees (``cni.handler.DeviceSide``). The device-plugin servers only translate
between gRPC and this class; ``service.py`` only wires it up. Everything that
touches the kernel or kubelet comes in as a callable or through ``Handouts``
(and its datapath), so the rules here are tested without privileges.

Rules, in order:
1. An allocation is kubelet's. It starts at Allocate (all of a request's
   devices set up, or none) and ends when kubelet's PodResources no longer
   lists a pod holding the device: found by ``reconcile`` (allocations older
   than a grace period) or at an Allocate naming a device we still count as
   allocated. Never at a CNI DEL: that only brings the device home; nor by
   the config a reload or a restart brings (rule 6). In a pool offered
   through DRA (``config.Pool.dra``) an allocation is a prepared claim's
   (``dra/claims.py``): it ends at NodeUnprepareResources, never because
   PodResources does not list it.
2. One Allocate per pool at a time (kubelet admits pods one by one; this keeps
   two kubelets, or two pools' calls on a shared device, from interleaving).
3. An allocated device's link belongs to its pod: link events for it are
   ignored except its destruction; its health is read again when it comes home
   or its allocation ends. A cdq secondary's health is its primary's: its own
   netdev is created at Allocate and deleted when the allocation ends.
4. A durable record that could not be trusted says nothing, not "nothing is
   allocated": every device is unknown (``distrust``) until kubelet's
   PodResources answers (``settle``), meanwhile never handed out, prepared or
   released. Then the devices pods hold are allocated (taken over), the rest free.
5. A link re-created under an allocated device's name (before the CNI ADD)
   gets the pod's program back, the same one, so the map the pod was or will
   be given: as soon as the link appears, and at the latest before the ADD
   moves it (``ensure_program``), which fails when it cannot be done.
6. A device is allocated in one pool at a time, whatever the config says
   now: an allocation of a pool the config no longer has keeps that pool
   (draining); of a device its pool no longer takes, keeps it there (leaving),
   and a pool the config moved it to waits (``held_by``, Unhealthy to
   kubelet) until that allocation ends. The same at a restart, from the
   record and from kubelet's word (what kubelet lists is never free).
7. A device's link renamed (a link event of its ifindex under another name)
   is no longer the device: Unhealthy, status saying so, until a link is
   named the device's name again (a new link, prepared as any). What we put
   on the renamed link is taken off it by its ifindex: a free device's
   program at once, a pod's when its allocation ends.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, Protocol

import anyio
import msgspec

from afxdp import config, contracts
from afxdp.errors import DeviceError
from afxdp.handouts import Carried, Handout, Handouts, loads_program
from afxdp.inventory import NetDev
from afxdp.logsetup import about
from afxdp.netdev import name_problem
from afxdp.netwatch import Change, LinkEvent
from afxdp.pools import UNKNOWN_HOLDER, DeviceState, Pool, PoolDevice, is_prohibited
from afxdp.state import Allocation, Record

log = logging.getLogger(__name__)

# Given a resource and device IDs we count as allocated, those no pod holds
# (kubelet's word); none when kubelet cannot be asked.
StaleFinder = Callable[[str, Sequence[str]], Awaitable[list[str]]]
LinkReader = Callable[[str], Awaitable[NetDev | None]]
# Device IDs that pods hold, by resource; None when kubelet cannot be asked.
HeldFinder = Callable[[], Awaitable[dict[str, set[str]] | None]]
Scanner = Callable[[], Awaitable[Sequence[NetDev]]]

RECONCILE_GRACE = 30.0
SETTLE_RETRY = 1.0  # s between two questions to kubelet while devices are unknown


class Holders(Protocol):
    """Who holds which device, cached from PodResources (podresources.py)."""

    async def prefetch(self, resource: str, device: str) -> None: ...

    def forget(self, device: str) -> None: ...

    def attached(self, resource: str, device: str, pod: str) -> None: ...


class AllocateFailed(Exception):
    """Setting up an allocation failed; everything it did was undone."""


class Changes:
    """A version number and a way to wait for the next one (ListAndWatch)."""

    def __init__(self) -> None:
        self.version = 0
        self._event = anyio.Event()

    def bump(self) -> None:
        self.version += 1
        self._event.set()
        self._event = anyio.Event()

    async def wait_after(self, version: int) -> None:
        while self.version == version:
            await self._event.wait()


class Devices:
    """Every pool of this node, its devices, and what is handed out."""

    def __init__(
        self,
        pools: Sequence[Pool],
        handouts: Handouts,
        *,
        find_stale: StaleFinder,
        read_link: LinkReader,
        scan: Scanner,
        netdevs: dict[str, NetDev] | None = None,
        holders: Holders | None = None,
    ) -> None:
        self.pools = {p.name: p for p in pools}
        self.changes = {p.name: Changes() for p in pools}
        self.handouts = handouts
        self._find_stale = find_stale
        self._read_link = read_link
        self._scan = scan
        self.netdevs = netdevs or {}
        self._seen = dict(self.netdevs)  # the start's scan: a fallback for what moved away
        # The name of each link of our netns by ifindex, from the start's scan
        # and every link event since: a link event of a known ifindex under
        # another name is a rename (``_renamed``).
        self._names = {nd.ifindex: nd.name for nd in self.netdevs.values() if nd.ifindex}
        self._holders = holders
        self._allocating = {p.name: anyio.Lock() for p in pools}
        # Pools a reload removed that still have allocations: not advertised,
        # not allocatable, forgotten when the last allocation ends.
        self.draining: set[str] = set()
        # Devices, by pool, that a reload dropped while they were allocated: kept
        # until their allocation ends, then they leave the pool.
        self.leaving: dict[str, set[str]] = {}
        self.ready = False  # serving (set by the service once every part is up)
        # The durable record could not be trusted and kubelet has not answered
        # yet: every device is unknown, those a reload brings too.
        self.distrusted = False

    # -- lookups --------------------------------------------------------------

    def find(self, device: str) -> tuple[Pool, PoolDevice] | None:
        """The pool ``device`` is allocated in, else the one that has it free.
        A device is in two pools only when a reload moved it while a pod held
        it: the one it is allocated in holds it (``held_by`` in the other)."""
        found = None
        for pool in self.pools.values():
            dev = pool.devices.get(device)
            if dev is not None and dev.allocated:
                return pool, dev
            if dev is not None and found is None:
                found = pool, dev
        return found

    def device_allocated(self, device: str) -> bool | None:
        """Whether ``device`` is allocated; None when no pool has it. DeviceError
        when that is not known yet (rule 4: kubelet has not said who holds it)."""
        found = self.find(device)
        if found is not None and found[1].unknown:
            raise DeviceError(f"who holds it is not known yet: {UNKNOWN_HOLDER}")
        return found[1].allocated if found else None

    def describe(self, device: str) -> dict[str, Any]:
        """What the host knows of ``device`` (kept with a CNI attachment)."""
        nd = self.netdevs.get(device)
        return msgspec.to_builtins(nd) if nd is not None else {}

    def counting(self) -> list[tuple[str, str, Carried]]:
        """(pool, device, program) of every device that carries a program of
        ours: a pod's (in the pool that holds it), or a free device's."""
        out = []
        for name, pool in self.pools.items():
            for dev in pool.devices.values():
                handout = self.handouts.handouts.get(dev.id)
                if handout is not None:
                    if handout.pool == name and handout.xdp is not None:
                        out.append((name, dev.id, handout.xdp))
                elif dev.held_by is None and dev.id in self.handouts.prepared:
                    out.append((name, dev.id, self.handouts.prepared[dev.id]))
        return out

    def rows(self) -> list[tuple[str, str, str]]:
        """(pool, state, health) of every device, for metrics."""
        return [
            (name, d.state.value, "Healthy" if d.usable else "Unhealthy")
            for name, p in self.pools.items()
            for d in p.devices.values()
        ]

    # -- allocation -----------------------------------------------------------

    async def allocate(self, pool_name: str, ids: Sequence[str]) -> list[Handout]:
        """Hand out ``ids`` of the pool: all of them, or raise having undone everything.

        DeviceError: refused (unknown, unhealthy, already allocated: each named).
        AllocateFailed: setting up failed and was rolled back.
        """
        async with self._allocating[pool_name]:
            # Looked up under the lock a reload applies under (``replace_pools``):
            # the pool object read before it could be one a reload has since
            # replaced, and a device marked there would be free in the new one.
            pool = self.pools.get(pool_name)
            if pool is None or pool_name in self.draining:
                raise DeviceError(f"pool {pool_name} was removed from the config")
            await self._reclaim_stale(pool, ids)
            pool.allocate(ids)
            try:
                handouts = await self.handouts.start(pool, ids)
            except BaseException as exc:  # a bug or a cancel too: not left marked
                pool.release(ids)
                for dev_id in ids:  # a prepared program it used was taken back with it
                    if dev_id in pool.devices:
                        self.handouts.spawn(self._prepare, pool, pool.devices[dev_id])
                if not isinstance(exc, Exception):
                    raise  # cancelled: undone all the same
                if not isinstance(exc, DeviceError):
                    log.exception("%s: Allocate %s failed unexpectedly", pool_name, list(ids),
                                  extra=about(pool=pool_name, device=",".join(ids)))  # fmt: skip
                raise AllocateFailed(str(exc)) from exc
        self.changes[pool_name].bump()
        # So the pod's handshake need not wait on kubelet (a claim names its pods itself).
        if self._holders is not None and not pool.config.dra:
            for dev_id in ids:
                self.handouts.spawn(self._holders.prefetch, pool.config.resource_name, dev_id)
        return handouts

    async def _reclaim_stale(self, pool: Pool, ids: Sequence[str]) -> None:
        """Release devices we still count as allocated although no pod holds them.
        Not in a DRA pool: there its prepared claim holds it (rule 1)."""
        if pool.config.dra:
            return
        busy = [
            d for d in ids if d in pool.devices and pool.devices[d].state is DeviceState.ALLOCATED
        ]
        if not busy:
            return
        for dev_id in await self._find_stale(pool.config.resource_name, busy):
            log.warning("%s: %s was never released; reclaiming it", pool.name, dev_id,
                        extra=about(pool=pool.name, device=dev_id))  # fmt: skip
            await self._end(pool, dev_id)

    async def release(self, device: str, keep_xdp: bool = False) -> bool:
        """The allocation of ``device`` ended: give it back to its pool, as it is now.

        ``keep_xdp`` (the NAD's skipUnloadBpf) leaves the program attached.
        """
        found = self.find(device)
        if found is None or not found[1].allocated:
            return False
        await self._end(found[0], device, keep_xdp)
        return True

    async def _end(self, pool: Pool, device: str, keep_xdp: bool = False) -> None:
        if self._holders is not None:
            self._holders.forget(device)
        leaving = device in self.leaving.get(pool.name, ())  # the config no longer takes it
        stays = not leaving and pool.name not in self.draining
        # Whether a fresh program will take the place of the pod's (a cdq
        # secondary's goes with its netdev).
        swap = stays and loads_program(pool.config) and pool.devices[device].parent is None
        await self.handouts.release(device, keep_xdp, swap=swap)
        pool.release([device])
        if leaving:
            self.leaving[pool.name].discard(device)
            del pool.devices[device]
            self.changes[pool.name].bump()
            await self._hand_over(device, pool.name)
            return
        if pool.name in self.draining:
            await self._hand_over(device, pool.name)
        dev = pool.devices[device]
        await self._read_health(pool, dev.parent or dev.id)
        self.changes[pool.name].bump()
        if stays:
            # A fresh program and map for the next pod, swapped in for the pod's:
            # never the map this pod had (an Allocate that comes first swaps
            # inline, under the device's lock).
            self.handouts.spawn(self._prepare, pool, dev)

    async def _hand_over(self, device: str, holder: str) -> None:
        """The allocation pool ``holder`` kept of ``device`` after a reload moved
        it to another pool has ended: that pool may hand it out now."""
        for pool in list(self.pools.values()):
            dev = pool.devices.get(device)
            if dev is None or dev.held_by != holder:
                continue
            dev.held_by = None
            log.info("%s: %s joins the pool now that its pod of pool %s is gone",
                     pool.name, device, holder,
                     extra=about(pool=pool.name, device=device))  # fmt: skip
            await self._read_health(pool, dev.parent or dev.id)
            self.changes[pool.name].bump()
            self.handouts.spawn(self._prepare, pool, dev)

    async def _prepare(self, pool: Pool, dev: PoolDevice) -> None:
        """Attach a program to a free device ahead of Allocate; one that cannot
        get one is Unhealthy, with the reason in status, until it can. None for
        a pod's device, nor for one of a draining pool (nobody allocates it)."""
        if dev.unknown or dev.held_by is not None or dev.allocated:  # a pod's
            return
        if pool.name in self.draining:
            return
        fault = await self.handouts.prepare(pool, dev)
        if fault != dev.fault:
            if fault:
                log.error("%s: cannot prepare %s for Allocate: %s", pool.name, dev.id, fault,
                          extra=about(pool=pool.name, device=dev.id))  # fmt: skip
            dev.fault = fault
            self.changes[pool.name].bump()

    def prepare_all(self) -> None:
        """Prepare every free device (at start, after a reload), in the background;
        detach what a device no longer needs: a prepared program, or the last
        pod's left for a swap, of a device no pool takes or whose pool is
        draining or hands out raw netdevs now."""
        loading = set()
        for pool in self.pools.values():
            if pool.name in self.draining:
                continue
            for dev in pool.devices.values():
                if loads_program(pool.config):
                    loading.add(dev.id)
                if not dev.allocated and dev.healthy and dev.held_by is None:
                    self.handouts.spawn(self._prepare, pool, dev)
        ours = set(self.handouts.prepared) | self.handouts.swap_pending
        for device in sorted(ours - loading):
            self.handouts.spawn(self.handouts.unprepare, device)

    def pod_attached(self, device: str, pod: str) -> None:
        """The CNI ADD moved ``device`` into pod ``pod``: who holds it is known
        before the pod's first handshake, which then need not wait for kubelet."""
        found = self.find(device)
        if self._holders is not None and found is not None and found[1].allocated:
            self._holders.attached(found[0].config.resource_name, device, pod)

    async def came_home(self, device: str, keep_xdp: bool) -> None:
        """A CNI DEL brought ``device`` back to the host netns; it stays allocated
        (kubelet's to end), but its health is read again now that it is ours to
        see, and skipUnloadBpf is remembered for when the allocation ends."""
        if keep_xdp:
            self.handouts.keep_xdp.add(device)
        found = self.find(device)
        if found is not None:
            await self._read_health(found[0], found[1].parent or found[1].id)
        if found is not None and found[1].allocated:
            return
        # Its allocation ended while it was in its pod, out of reach: the pod's
        # program came home on it. A pool that loads one replaces it (prepare,
        # on the link's event); with none to, it is taken off here.
        if device in self.handouts.swap_pending and (
            found is None
            or found[0].name in self.draining
            or not loads_program(found[0].config)
            or found[1].held_by is not None
        ):
            self.handouts.spawn(self.handouts.unprepare, device)

    async def reconcile(self, grace: float = RECONCILE_GRACE) -> list[str]:
        """Release allocated devices that no pod holds (kubelet's word); returns them.

        Nothing happens when kubelet cannot be asked. Allocations younger than
        ``grace`` are left alone (kubelet lists a pod right after Allocate; the
        margin covers a slow one).
        """
        released = []
        for name in list(self.pools):
            # Under the pool's Allocate lock: an Allocate that is reclaiming a
            # device has it marked allocated before kubelet can list its new pod,
            # and must not have that fresh allocation ended under it.
            async with self._allocating[name]:
                pool = self.pools.get(name)  # as it is now: a reload may have replaced it
                if pool is None or pool.config.dra:  # a claim's ends at Unprepare (rule 1)
                    continue
                now = anyio.current_time()
                candidates = []
                for dev in pool.devices.values():
                    handout = self.handouts.handouts.get(dev.id)
                    if dev.allocated and (handout is None or now - handout.since >= grace):
                        candidates.append(dev.id)
                if not candidates:
                    continue
                resource = pool.config.resource_name
                for dev_id in await self._find_stale(resource, candidates):
                    log.info("%s: no pod holds %s any more (kubelet); released", resource,
                             dev_id, extra=about(pool=pool.name, device=dev_id))  # fmt: skip
                    await self._end(pool, dev_id)
                    released.append(dev_id)
        self.prune()
        return released

    # -- config reload -------------------------------------------------------

    async def replace_pools(self, new: Sequence[Pool]) -> tuple[list[str], list[str]]:
        """Take a reloaded config's pools; returns (added, removed) pool names.

        Allocated devices are never disturbed: a changed pool keeps each
        allocated device as it is (also one the new config no longer takes,
        until its allocation ends), and a removed pool stays (draining, no
        longer advertised) until its last allocation ends. New allocations use
        the new pool config; existing handouts keep what they were set up with.

        Applied under every pool's Allocate lock, so between Allocates (and
        reconciles), never during one: an Allocate that read its pool, then
        waited (for kubelet, for the kernel), must mark its devices in the pool
        that counts, or the reload would free a device a pod holds. A reload
        waits for at most the Allocate under way (the file is read before).
        """
        async with self._every_pool_locked():
            return self._replace_pools(new)

    @asynccontextmanager
    async def _every_pool_locked(self) -> AsyncIterator[None]:
        """Every pool's Allocate lock: no Allocate or reconcile runs meanwhile,
        and no pool object is swapped under one that read it."""
        async with AsyncExitStack() as stack:
            for name in sorted(self._allocating):  # one order: no two waiters deadlock
                await stack.enter_async_context(self._allocating[name])
            yield

    def _replace_pools(self, new: Sequence[Pool]) -> tuple[list[str], list[str]]:
        new_by_name = {p.name: p for p in new}
        # Who holds what, across pools: a device a pod of one pool holds is
        # never free in another, whatever pool the new config puts it in.
        holders = {d.id: name for name, p in self.pools.items()
                   for d in p.devices.values() if d.allocated}  # fmt: skip
        for pool in new:
            old = self.pools.get(pool.name)
            self.leaving.pop(pool.name, None)
            for dev in pool.devices.values():
                if self.distrusted:  # kubelet has still not said who holds what
                    dev.unknown = True
                holder = holders.get(dev.id)
                if holder is not None and holder != pool.name:
                    dev.held_by = holder
            if old is None:
                continue
            for dev_id, dev in old.devices.items():
                if dev.allocated:
                    if dev_id not in pool.devices:
                        self.leaving.setdefault(pool.name, set()).add(dev_id)
                    pool.devices[dev_id] = dev
                elif dev_id in pool.devices:  # keep the health we know
                    pool.devices[dev_id].healthy = dev.healthy
                    pool.devices[dev_id].renamed = dev.renamed
        # A pool back in the config before it drained is served again too.
        added = [n for n in new_by_name if n not in self.pools or n in self.draining]
        removed = [n for n in self.pools if n not in new_by_name and n not in self.draining]
        for name in removed:
            self.draining.add(name)
        for name, pool in new_by_name.items():
            self.draining.discard(name)
            self._admit(pool)
            self.changes[name].bump()
        self.prune()
        self.prepare_all()
        return added, removed

    def _admit(self, pool: Pool) -> None:
        """Count ``pool`` among ours (in place of one of its name): its change
        notification and Allocate lock stay, for listeners and callers waiting."""
        self.pools[pool.name] = pool
        self.changes.setdefault(pool.name, Changes())
        self._allocating.setdefault(pool.name, anyio.Lock())

    def prune(self) -> list[str]:
        """Forget draining pools whose last allocation ended; their names."""
        gone = [n for n in self.draining
                if not any(d.allocated for d in self.pools[n].devices.values())]  # fmt: skip
        for name in gone:
            self.draining.discard(name)
            self.leaving.pop(name, None)
            del self.pools[name]
        return gone

    # -- restart and shutdown ---------------------------------------------------

    async def start(self, record: Record, *, unreadable: bool, ask: HeldFinder,
                    torn: bool = False) -> list[str]:  # fmt: skip
        """At start, take over what the last run handed out: from its durable
        ``record`` with kubelet's word (``restore``), or, when the record could
        not be trusted (``unreadable``), from kubelet's word alone, every device
        unknown until kubelet answers (rule 4: asked again in the background
        while it does not). A record whose last change was cut short (``torn``)
        is trusted for what it holds; while kubelet cannot say, every other
        device is unknown too (the lost change may be an allocation). Returns
        the devices kept."""
        if unreadable:
            self.distrust()
            held = await ask()
            if held is None:
                self.handouts.spawn(self.settle_forever, ask)
            return await self.settle(held)
        held = await ask()
        kept = await self.restore(record, held)
        if torn and held is None:
            self.distrust(keep_allocated=True)
            self.handouts.spawn(self.settle_forever, ask)
        return kept

    async def restore(self, record: Record, held: dict[str, set[str]] | None) -> list[str]:
        """Take over what a previous run handed out (its durable ``record``),
        with kubelet's word (``held``: device IDs pods hold, by resource; None
        when kubelet cannot be asked: then the record's view is kept and the
        periodic reconcile settles it once kubelet answers). Returns the devices
        kept; the others are cleaned up.

        Only kubelet's word ends an allocation (rule 1), not the config this
        start read: one of a pool the config no longer has is kept in that pool,
        draining; one of a device the config moved elsewhere stays in its pool,
        leaving, and the new pool waits for it (``held_by``); one whose program
        is gone (a pod's program, or the link with it) is kept with its setup
        unknown, as a device taken over from kubelet's word alone."""
        kept = []
        for alloc in list(record.allocations.values()):
            resource = contracts.resource_name(alloc.pool)
            if held is not None and alloc.device not in held.get(resource, set()):
                log.info("%s: handed out before this start, but no pod holds it (kubelet); "
                         "cleaned up", alloc.device,
                         extra=about(pool=alloc.pool, device=alloc.device))  # fmt: skip
                await self.handouts.forget(alloc)
                continue
            pool, dev = self._holding(alloc.pool, alloc.device, alloc)
            _, gone = await self.handouts.adopt_or_unknown(pool, alloc)
            if gone is not None:
                log.warning("%s: its program %s is gone (%s); kept allocated, setup unknown",
                            alloc.device, alloc.prog_id, gone,
                            extra=about(pool=alloc.pool, device=alloc.device))  # fmt: skip
            dev.allocated, dev.healthy = True, True  # its link is its pod's to see
            kept.append(alloc.device)
            why = "held by a pod" if held is not None else "kubelet not reachable yet"
            log.info("%s: kept from before this start (%s)", alloc.device, why,
                     extra=about(pool=alloc.pool, device=alloc.device))  # fmt: skip
        # What kubelet lists that the record lacks (a record cut short) is a
        # pod's all the same: never free.
        kept += await self._take_over_held(held or {}, "the state record does not have it")
        return kept

    def _holding(self, name: str, device: str, alloc: Allocation | None = None
                 ) -> tuple[Pool, PoolDevice]:  # fmt: skip
        """The pool and device an allocation that goes on counts in (kubelet's
        word, a kept record): its own pool, made draining when the config has
        it no more, the device added as leaving when the pool no longer takes
        it; any other pool that takes it waits for it (``held_by``). A draining
        pool made here serves as the record says (default settings else)."""
        pool = self.pools.get(name)
        if pool is None:
            pool = Pool(config.Pool(
                name=name,
                mode="primary",
                uds_server_disable=alloc is not None
                and (alloc.prog_id is None or alloc.pinned is not None),
                bpf_map_pinning_enable=alloc is not None and alloc.pinned is not None,
            ))  # fmt: skip
            self._admit(pool)
            self.draining.add(name)
            log.warning("%s: pool %s is no longer in the config; kept draining until kubelet "
                        "says no pod holds it", device, name,
                        extra=about(pool=name, device=device))  # fmt: skip
        dev = pool.devices.get(device)
        if dev is None:
            dev = pool.devices[device] = PoolDevice(device)
            if name not in self.draining:
                self.leaving.setdefault(name, set()).add(device)
        for other in self.pools.values():
            # Callers never hold one device in two pools (_take_over_held skips
            # a device allocated anywhere); were one, it would keep its pool.
            odev = other.devices.get(device) if other is not pool else None
            if odev is not None and not odev.allocated:
                odev.held_by = name
        return pool, dev

    def distrust(self, *, keep_allocated: bool = False) -> None:
        """The durable record could not be trusted: every device is unknown
        until ``settle`` (rule 4); with ``keep_allocated``, those it did hold
        stay allocated (a record whose last change was cut short)."""
        self.distrusted = True
        for pool in self.pools.values():
            for dev in pool.devices.values():
                dev.unknown = not (keep_allocated and dev.allocated)
            self.changes[pool.name].bump()

    async def settle(self, held: dict[str, set[str]] | None) -> list[str]:
        """Kubelet's answer (``held``: device IDs pods hold, by resource) for the
        unknown devices: those a pod holds are allocated and taken over, the
        others free (not prepared here: ``prepare_all``). Returns the devices
        taken over; nothing changes when kubelet could not say (None)."""
        if held is None or not self.distrusted:
            return []
        taken = []
        # Under every pool's lock at once, not one after another: a reload in
        # between would otherwise bring fresh, known devices in place of unknown
        # ones not settled yet, and free one a pod holds.
        async with self._every_pool_locked():
            self.distrusted = False  # what a reload brings from now on is known
            for pool in self.pools.values():
                for dev in pool.devices.values():
                    dev.unknown = False
            taken = await self._take_over_held(held, "the state record was lost")
        return taken

    async def _take_over_held(self, held: dict[str, set[str]], why: str) -> list[str]:
        """Every device kubelet says a pod holds (``held``, by resource) that is
        not allocated here yet: allocated in its pool (``_holding``) and taken
        over. Returns them."""
        taken = []
        claims = sorted(
            ((resource, contracts.pool_of(resource), dev_id)
             for resource, ids in held.items() for dev_id in ids),
            # Kubelet listing two pods on one device (it can, after it left a pod out of an
            # answer): the pool the config gives the device to now comes first.
            key=lambda c: (not self._configured(c[1], c[2]), c[0], c[2]),
        )  # fmt: skip
        for resource, name, dev_id in claims:
            if name is None or name_problem(dev_id) or is_prohibited(dev_id):
                continue  # not ours to hold: no pool could ever have it
            found = self.find(dev_id)
            if found is not None and found[1].allocated:  # one pool holds it at a time
                if found[0].name != name:
                    log.warning("%s: kubelet says pods of %s and %s hold it; kept as "
                                "%s's", dev_id, found[0].config.resource_name, resource,
                                found[0].name, extra=about(pool=name, device=dev_id))  # fmt: skip
                continue
            pool, dev = self._holding(name, dev_id)
            if not dev.allocated:
                taken.append(dev.id)
                await self._take_over(pool, dev, why)
        for name in self.pools:
            self.changes[name].bump()
        return taken

    def _configured(self, pool: str | None, device: str) -> bool:
        """Whether the config (not a restart's draining stand-in) gives ``device`` to ``pool``."""
        found = self.pools.get(pool or "")
        return found is not None and pool not in self.draining and device in found.devices

    async def _take_over(self, pool: Pool, dev: PoolDevice, why: str) -> None:
        """Count ``dev`` allocated on kubelet's word alone (a pod holds it and
        no record says how it was set up), and take over what is on it."""
        dev.allocated, dev.healthy = True, True  # its link is its pod's to see
        try:
            handout = await self.handouts.take_over(pool, dev)
        except Exception:  # allocated all the same: it is the pod's
            log.exception("%s: taking over its allocation failed", dev.id,
                          extra=about(pool=pool.name, device=dev.id))  # fmt: skip
            return
        if handout.setup_unknown:
            how = "no program of ours on it here (in its pod's netns?): setup unknown"
        else:
            how = "its program adopted" if handout.xdp else "nothing to adopt"
        log.warning("%s: a pod holds it (kubelet), %s; kept allocated, %s", dev.id, why, how,
                    extra=about(pool=pool.name, device=dev.id))  # fmt: skip

    async def settle_forever(self, ask: HeldFinder, retry: float = SETTLE_RETRY) -> None:
        """Ask kubelet every ``retry`` seconds until it answers, then ``settle``
        and prepare the free devices (kubelet was not reachable at start)."""
        while self.distrusted:
            await anyio.sleep(retry)
            await self.ask_again(ask)

    async def ask_again(self, ask: HeldFinder) -> None:
        """One more question to kubelet for the unknown devices: ``settle`` and
        prepare the free ones when it answers."""
        held = await ask()
        if held is not None:
            await self.settle(held)
            self.prepare_all()

    async def shutdown(self) -> None:
        """Stop: end the allocations kubelet says no pod holds (so nothing is left
        behind for nobody), leave the others in place for the next start."""
        self.handouts.closing = True  # what this ends is detached, not prepared again
        try:
            await self.reconcile(grace=0.0)
        except Exception:
            log.exception("the last reconcile with kubelet failed")
        await self.handouts.shutdown()

    # -- health -----------------------------------------------------------------

    def on_link(self, event: LinkEvent) -> None:
        """Apply a link event to every pool's health; wake the lists that changed.

        An allocated device's link belongs to its pod: the CNI takes it down
        and moves it into the pod's netns, which must not make it Unhealthy.
        Only its destruction counts (and its re-creation: rule 4), or its
        rename (rule 7); its real state is read again later.
        """
        if event.index:
            if event.change in (Change.REMOVED, Change.MOVED_OUT):
                self._names.pop(event.index, None)
            else:
                was = self._names.get(event.index)
                self._names[event.index] = event.name
                if was is not None and was != event.name:
                    self._renamed(was, event.name, event.index)
        for pool in self.pools.values():
            dev = pool.devices.get(event.name)
            if dev is not None and dev.parent is not None:
                continue  # a secondary's own link comes and goes with its handout
            if dev is not None and event.change in (Change.UP, Change.DOWN):
                self._named_again(pool, dev, event.index)
            if dev is not None and dev.allocated and not self._destroyed(dev, event):
                continue
            if pool.set_link(event.name, event.change is Change.UP):
                log.info("%s: %s -> %s", pool.name, event.name, event.change.value,
                         extra=about(pool=pool.name, device=event.name))  # fmt: skip
                self.changes[pool.name].bump()
            if dev is None or dev.allocated or dev.held_by is not None:
                continue
            if event.change is Change.REMOVED:  # its program went with the link
                self.handouts.forget_prepared(dev.id)
            elif event.change is Change.UP:  # back (or new): give it one
                self.handouts.spawn(self._prepare, pool, dev)

    def _renamed(self, old: str, new: str, index: int) -> None:
        """The link ``index`` named ``old`` is named ``new`` now: for a device
        named ``old`` (rule 7), its link is gone as if destroyed (Unhealthy,
        status saying why), and what we put on it is taken off that link, by
        its index: a free device's program now, an allocated one's when its
        allocation ends (``Handouts.link_renamed``)."""
        for pool in self.pools.values():
            dev = pool.devices.get(old)
            if dev is None or dev.parent is not None:
                continue  # a secondary's link is made and deleted by its handout
            dev.renamed = new
            pool.set_link(old, False)
            log.warning("%s: %s: its link was renamed to %s; no longer the device", pool.name,
                        old, new, extra=about(pool=pool.name, device=old))  # fmt: skip
            self.changes[pool.name].bump()
        if self.find(old) is not None:
            self.handouts.link_renamed(old, index)

    def _named_again(self, pool: Pool, dev: PoolDevice, index: int) -> None:
        """A link is named ``dev``'s name (a new one, or the one renamed away
        coming back): the rename is over."""
        if dev.renamed is not None:
            dev.renamed = None
            self.changes[pool.name].bump()
        self.handouts.link_back(dev.id, index)

    def _destroyed(self, dev: PoolDevice, event: LinkEvent) -> bool:
        """Whether a link event of an allocated device is its link's destruction
        (not an old link of its name: its pod's program is on another one). A
        link of its name that appears after its link (with the pod's program)
        was destroyed is its re-creation: the pod's program goes on it."""
        if event.change is Change.REMOVED:
            return self.handouts.link_gone(dev.id, event.index)
        if event.change is not Change.MOVED_OUT and self.handouts.lost(dev.id):
            self.handouts.spawn(self._relink, dev.id)
        return False

    async def _relink(self, device: str) -> None:
        try:
            await self._program_back(device, lost_only=True)
        except DeviceError as exc:  # said in status; the CNI ADD tries again
            log.error("%s", exc, extra=about(device=device))

    async def ensure_program(self, device: str) -> None:
        """Before the CNI moves ``device`` into its pod: its link here carries
        the program its pod was handed, put back when the link lost it (deleted
        and re-created under the same name). DeviceError when it cannot be."""
        await self._program_back(device)

    async def _program_back(self, device: str, *, lost_only: bool = False) -> None:
        try:
            again = await self.handouts.ensure_attached(device, lost_only=lost_only)
        except DeviceError:
            self._carries_program(device, False)  # its pod cannot use it as it is
            raise
        if again:  # its link is back, with its pod's program
            self._carries_program(device, True)

    def _carries_program(self, device: str, healthy: bool) -> None:
        """An allocated device's health, from whether its link carries its pod's program."""
        for pool in self.pools.values():
            dev = pool.devices.get(device)
            if dev is not None and dev.allocated and pool.set_link(device, healthy):
                now = "back (re-created)" if healthy else "without its pod's program"
                log.info("%s: %s -> %s", pool.name, device, now,
                         extra=about(pool=pool.name, device=device))  # fmt: skip
                self.changes[pool.name].bump()

    async def inventory(self) -> list[NetDev]:
        """The node's netdevs now, for a reload's pools: those in our netns (read
        again: links come and go), and the allocated ones in their pods' netns as
        the durable record (else the last scan) describes them, which a config
        naming them still takes; without them a reload would see the config
        drop every device a pod has (and the pool lose it when its pod ends)."""
        await self._rescan()
        elsewhere = []
        for pool in self.pools.values():
            for dev in pool.devices.values():
                if dev.allocated and dev.id not in self.netdevs:
                    alloc = self.handouts.store.record.allocations.get(dev.id)
                    described = alloc.netdev if alloc is not None else None
                    nd = msgspec.convert(described, NetDev) if described else self._seen.get(dev.id)
                    if nd is not None:
                        elsewhere.append(nd)
        return [*self.netdevs.values(), *elsewhere]

    async def resync(self) -> None:
        """Re-read every link and apply what is true now (after lost events)."""
        await self._rescan()
        for pool in self.pools.values():
            for dev in pool.devices.values():
                if not dev.allocated:  # an allocated one's link is in its pod's netns
                    name = dev.parent or dev.id
                    self._apply_link(pool, name, self.netdevs.get(name))

    async def _rescan(self) -> None:
        """Read every link in our netns again, a rename among them (a link known
        by its ifindex under another name)."""
        self.netdevs = {nd.name: nd for nd in await self._scan()}
        names, self._names = self._names, {}
        for nd in self.netdevs.values():
            if nd.ifindex:
                self._names[nd.ifindex] = nd.name
                was = names.get(nd.ifindex)
                if was is not None and was != nd.name:
                    self._renamed(was, nd.name, nd.ifindex)

    async def _read_health(self, pool: Pool, name: str) -> None:
        self._apply_link(pool, name, await self._read_link(name))

    def _apply_link(self, pool: Pool, name: str, link: NetDev | None) -> None:
        """Set the health of the devices on link ``name`` from what it is now."""
        if pool.set_link(name, link is not None and link.link_up):
            self.changes[pool.name].bump()
