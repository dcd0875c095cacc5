"""Prepared ResourceClaims: the DRA way to hand out a pool's devices.

Kubelet calls NodePrepareResources with a claim's namespace, name and uid
only; what the scheduler allocated is in the ResourceClaim's
``status.allocation.devices.results``, read through a ``ClaimSource`` (the API
server). Rules, in order:

1. Only results of our driver (``DRIVER``) are ours; a claim with none is
   refused, and so is each of ours that names a pool of another node, a pool
   of this node that is not offered through DRA (a device-plugin pool's device
   is never a claim's: one allocator per device), a device the pool does not
   have, or one ``Devices.allocate`` refuses (unhealthy, already held).
2. A claim's devices are handed out exactly as the device plugin's Allocate
   does (``Devices.allocate``: the program, the UDS server or pinned map, the
   pod's directory), all of them or none; then one CDI spec per claim names
   them (the mounts and ``AFXDP_DEVICES_*`` env Allocate returns); then the
   claim is recorded, and only then answered.
3. Idempotent: kubelet retries a claim uid it has no answer for, and calls
   Unprepare for one it never saw prepared. A prepared uid gets its recorded
   answer again and nothing is set up twice; an unknown uid's Unprepare is
   done. One call per uid at a time.
4. The prepared claim is the truth for who holds a DRA pool's device, not
   PodResources: ``held`` gives its devices to a restart's takeover (so a
   restart, ``kill -9`` too, keeps them, and an Unprepare after it releases
   them), and ``pods_of`` to the UDS handshake's host check (the claim's
   ``reservedFor`` pods).

The record is a journal (``claims.json`` in the state dir, journal.py), as
state.py keeps allocations. A record that cannot be trusted is moved aside
and said so: its claims' devices are then cleaned up at start like any
allocation no one holds (kubelet's next Prepare of them sets them up again).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import anyio
import msgspec

from afxdp import cdi, contracts
from afxdp.devices import AllocateFailed, Devices, HeldFinder
from afxdp.errors import AfxdpError, DeviceError
from afxdp.journal import Journal, Unreadable
from afxdp.logsetup import about
from afxdp.netdev import name_problem
from afxdp.uds.handshake import HostCheck, hostname_matches
from afxdp.workers import Work, run_sync

log = logging.getLogger(__name__)

# The driver name: the DNS subdomain of our CDI vendor (cdi.VENDOR), which the
# project owns; ResourceSlices and DeviceClasses name it.
DRIVER = cdi.VENDOR
FILE_NAME = "claims.json"
# A claim uid goes into a file name and a CDI device name: what Kubernetes
# makes (a UUID) passes, nothing with a path or CDI separator does.
_UID_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}[A-Za-z0-9])?")


def dra_pool(node: str, pool: str) -> str:
    """The ResourceSlice pool (``spec.pool.name``) of config pool ``pool`` on
    ``node``: a path of DNS subdomains, the node's name first."""
    return f"{node}/{pool.lower()}"


class ClaimUnavailable(Exception):
    """The claim cannot be read: not found, another uid, not allocated, the
    API server not reachable. The message says which."""


class Result(msgspec.Struct, frozen=True):
    """One ``status.allocation.devices.results`` entry."""

    request: str
    driver: str
    pool: str
    device: str


class Allocated(msgspec.Struct, frozen=True):
    """What a ResourceClaim's status says of it, as far as we need it."""

    results: tuple[Result, ...]
    pods: tuple[str, ...] = ()  # ``status.reservedFor`` pods, "namespace/name"


class ClaimSource(Protocol):
    """Reads a ResourceClaim (the API server; a double in tests)."""

    async def get(self, namespace: str, name: str, uid: str) -> Allocated:
        """The claim's allocation; ClaimUnavailable when it cannot be had
        (its uid is not ``uid``: a claim deleted and made again)."""
        ...


class NoApiServer:
    """The ClaimSource of an afxdpd told of no API server: every claim refused, saying so."""

    async def get(self, namespace: str, name: str, uid: str) -> Allocated:
        raise ClaimUnavailable("afxdpd was given no API server to read it from (--kube-api)")


class ClaimDevice(msgspec.Struct, frozen=True):
    request: str
    dra_pool: str  # the ResourceSlice pool the result named
    pool: str  # the config pool that handed it out
    device: str  # the netdev (a DRA device name too)
    cdi_ids: tuple[str, ...] = ()


class PreparedClaim(msgspec.Struct, frozen=True, forbid_unknown_fields=False):
    uid: str
    namespace: str
    name: str
    devices: tuple[ClaimDevice, ...] = ()
    pods: tuple[str, ...] = ()


class ClaimRecord(msgspec.Struct, forbid_unknown_fields=False):
    claims: dict[str, PreparedClaim] = {}


class PrepareError(Exception):
    """A claim is refused; the message is the per-claim error kubelet gets."""


def _problem(claim: PreparedClaim) -> str | None:
    """Why a recorded claim names what is not ours to touch; None if it does not."""
    if not _UID_RE.fullmatch(claim.uid):
        return f"claim uid {claim.uid!r} is not a uid"
    for dev in claim.devices:
        if (problem := name_problem(dev.device)) is not None:
            return f"claim {claim.uid}: device {problem}"
    return None


def journal(state_dir: Path | None) -> Journal[str, PreparedClaim]:
    """The prepared claims' record in ``state_dir`` (in memory only without one)."""
    return Journal(
        state_dir / FILE_NAME if state_dir is not None else None,
        key=lambda c: c.uid,
        key_type=str,
        value_type=PreparedClaim,
        snapshot=lambda claims: ClaimRecord(claims={c.uid: c for c in claims}),
        from_snapshot=lambda line: msgspec.json.decode(line, type=ClaimRecord).claims.values(),
        check=_problem,
    )


class Claims:
    """The claims prepared on this node, and the way to prepare more."""

    def __init__(
        self,
        devices: Devices,
        source: ClaimSource,
        node: str,
        *,
        state_dir: Path | None,
        cdi_dir: Path | None,
    ) -> None:
        self.devices = devices
        self.source = source
        self.node = node
        self.cdi_dir = cdi_dir
        self._journal = journal(state_dir)
        self.prepared: dict[str, PreparedClaim] = self._journal.entries
        self._locks: dict[str, tuple[anyio.Lock, int]] = {}  # by uid: (lock, users)

    # -- start ----------------------------------------------------------------

    def load(self) -> None:
        """Read the record (before ``Devices.start``: ``held`` feeds it)."""
        try:
            self._journal.load()
        except Unreadable as exc:
            log.error("%s; the claims it held are cleaned up and prepared again when "
                      "kubelet asks", exc)  # fmt: skip

    def held(self) -> dict[str, set[str]]:
        """Device IDs prepared claims hold, by resource (``afxdp/<pool>``), as
        PodResources says for the device plugin's pods (rule 4)."""
        out: dict[str, set[str]] = {}
        for claim in self.prepared.values():
            for dev in claim.devices:
                out.setdefault(contracts.resource_name(dev.pool), set()).add(dev.device)
        return out

    def held_too(self, ask: HeldFinder) -> HeldFinder:
        """``ask`` (kubelet's PodResources), with what prepared claims hold added."""

        async def held() -> dict[str, set[str]] | None:
            answer = await ask()
            if answer is None:
                return None  # kubelet cannot say: the records' view is kept meanwhile
            for resource, ids in self.held().items():
                answer.setdefault(resource, set()).update(ids)
            return answer

        return held

    async def clean_specs(self) -> None:
        """Remove claim specs no prepared claim has (its Unprepare came while
        afxdpd was down, or the record was lost)."""
        if self.cdi_dir is None:
            return
        try:
            found = await run_sync(Work.DISK, cdi.written_claims, self.cdi_dir)
            for uid in sorted(found - set(self.prepared)):
                await run_sync(Work.DISK, _unlink, cdi.claim_spec_path(self.cdi_dir, uid))
                log.info("CDI: removed the spec of claim %s (not prepared)", uid)
        except OSError as exc:
            log.error("CDI: cannot clean the claim specs in %s: %s", self.cdi_dir, exc)

    # -- lookups --------------------------------------------------------------

    def claim_of(self, device: str) -> PreparedClaim | None:
        return next(
            (c for c in self.prepared.values() if any(d.device == device for d in c.devices)),
            None,
        )

    def pods_of(self, device: str) -> tuple[str, ...] | None:
        """The pods ("namespace/name") the claim holding ``device`` is reserved
        for; None when no claim holds it."""
        claim = self.claim_of(device)
        return claim.pods if claim is not None else None

    async def host_check(self, hostname: str, device: str) -> HostCheck | None:
        """Whether ``hostname`` is a pod the claim holding ``device`` is
        reserved for; None when no claim holds it (ask PodResources)."""
        pods = self.pods_of(device)
        if pods is None:
            return None
        if any(hostname_matches(hostname, p.partition("/")[2]) for p in pods):
            return HostCheck.OK
        log.info("refused %r: no pod the claim holding %s is reserved for (%s)", hostname,
                 device, ", ".join(pods) or "none", extra=about(device=device))  # fmt: skip
        return HostCheck.REFUSED

    # -- prepare / unprepare --------------------------------------------------

    async def prepare(self, namespace: str, name: str, uid: str) -> PreparedClaim:
        """Prepare claim ``uid`` (rules 1-3); PrepareError says why not."""
        if not _UID_RE.fullmatch(uid):
            raise PrepareError(f"claim uid {uid!r} is not a uid")
        async with self._lock(uid):
            done = self.prepared.get(uid)
            if done is not None:
                return done  # kubelet's retry: the same answer, nothing set up again
            return await self._prepare(namespace, name, uid)

    async def _prepare(self, namespace: str, name: str, uid: str) -> PreparedClaim:
        what = f"claim {namespace}/{name} ({uid})"
        try:
            allocated = await self.source.get(namespace, name, uid)
        except ClaimUnavailable as exc:
            raise PrepareError(f"{what}: {exc}") from None
        by_pool = self._ours(what, allocated.results)
        done: list[tuple[str, str]] = []  # (pool, device) handed out so far
        try:
            mounts: dict[str, list[tuple[str, str]]] = {}
            for pool_name, results in by_pool.items():
                ids = [r.device for r in results]
                try:
                    handouts = await self.devices.allocate(pool_name, ids)
                except (DeviceError, AllocateFailed) as exc:
                    raise PrepareError(f"{what}: pool {pool_name}: {exc}") from None
                done += [(pool_name, d) for d in ids]
                mounts.update({h.device: h.mounts for h in handouts})
            claim = PreparedClaim(
                uid=uid,
                namespace=namespace,
                name=name,
                devices=await self._write_spec(uid, by_pool, mounts),
                pods=allocated.pods,
            )
            await self._journal.put([claim])
        except BaseException:
            with anyio.CancelScope(shield=True):  # kubelet gave up: undone all the same
                for _, device in done:
                    await self.devices.release(device)
                await self._remove_spec(uid)
            raise
        log.info("prepared %s: %s", what, ", ".join(f"{p}/{d}" for p, d in done),
                 extra=about(device=",".join(d for _, d in done)))  # fmt: skip
        return claim

    def _ours(self, what: str, results: Sequence[Result]) -> dict[str, list[Result]]:
        """Our results by config pool (rule 1); PrepareError naming each refusal."""
        mine = [r for r in results if r.driver == DRIVER]
        if not mine:
            others = ", ".join(sorted({r.driver for r in results}))
            raise PrepareError(f"{what}: no device of driver {DRIVER} is allocated to it"
                               + (f" (only of {others})" if others else ""))  # fmt: skip
        pools = {dra_pool(self.node, p.name): p for p in self.devices.pools.values()
                 if p.name not in self.devices.draining}  # fmt: skip
        problems, by_pool = [], dict[str, list[Result]]()
        for r in mine:
            pool = pools.get(r.pool)
            if pool is None:
                if not r.pool.startswith(f"{self.node}/"):
                    problems.append(f"{r.device}: pool {r.pool} is not of this node ({self.node})")
                else:
                    problems.append(f"{r.device}: pool {r.pool} is not one of this node's")
            elif not pool.config.dra:
                problems.append(f"{r.device}: pool {pool.name} is offered through the device "
                                "plugin, not DRA")  # fmt: skip
            elif r.device not in pool.devices:
                problems.append(f"{r.device}: not a device of pool {pool.name}")
            else:
                by_pool.setdefault(pool.name, []).append(r)
        if problems:
            raise PrepareError(f"{what}: " + "; ".join(problems))
        return by_pool

    async def _write_spec(
        self, uid: str, by_pool: dict[str, list[Result]], mounts: dict[str, list[tuple[str, str]]]
    ) -> tuple[ClaimDevice, ...]:
        """The claim's CDI spec on disk (rule 2); its devices, each with its CDI ID."""
        listed = [(self.devices.pools[p].config, r) for p, rs in by_pool.items() for r in rs]
        if self.cdi_dir is not None:
            spec = cdi.claim_spec(uid, [(cfg, r.device, mounts[r.device]) for cfg, r in listed])
            try:
                await run_sync(Work.DISK, cdi.write_spec_file,
                               cdi.claim_spec_path(self.cdi_dir, uid), spec)  # fmt: skip
            except OSError as exc:
                raise PrepareError(f"claim {uid}: cannot write its CDI spec: {exc}") from None
        return tuple(
            ClaimDevice(
                request=r.request,
                dra_pool=r.pool,
                pool=cfg.name,
                device=r.device,
                cdi_ids=(cdi.claim_device_name(uid, r.device),) if self.cdi_dir else (),
            )
            for cfg, r in listed
        )

    async def unprepare(self, uid: str) -> bool:
        """Release what claim ``uid`` holds; False when it held nothing (done all
        the same: kubelet unprepares what it may never have seen prepared)."""
        async with self._lock(uid):
            claim = self.prepared.get(uid)
            if claim is None:
                return False
            with anyio.CancelScope(shield=True):  # half a release helps nobody
                for dev in claim.devices:
                    try:
                        await self.devices.release(dev.device)
                    except (AfxdpError, OSError) as exc:  # released as far as it goes
                        log.error("claim %s: releasing %s: %s", uid, dev.device, exc,
                                  extra=about(pool=dev.pool, device=dev.device))  # fmt: skip
                await self._remove_spec(uid)
                await self._journal.remove(uid)
            log.info("unprepared claim %s/%s (%s): %s", claim.namespace, claim.name, uid,
                     ", ".join(d.device for d in claim.devices))  # fmt: skip
            return True

    async def _remove_spec(self, uid: str) -> None:
        if self.cdi_dir is None:
            return
        try:
            await run_sync(Work.DISK, _unlink, cdi.claim_spec_path(self.cdi_dir, uid))
        except OSError as exc:
            log.error("CDI: cannot remove the spec of claim %s: %s", uid, exc)

    def _lock(self, uid: str) -> _UidLock:
        return _UidLock(self._locks, uid)


class _UidLock:
    """One call per claim uid at a time; a uid's lock goes with its last user."""

    def __init__(self, locks: dict[str, tuple[anyio.Lock, int]], uid: str) -> None:
        self.locks, self.uid = locks, uid

    async def __aenter__(self) -> None:
        lock, users = self.locks.get(self.uid) or (anyio.Lock(), 0)
        self.locks[self.uid] = (lock, users + 1)
        try:
            await lock.acquire()
        except BaseException:
            self._leave()
            raise

    async def __aexit__(self, *exc: object) -> None:
        self.locks[self.uid][0].release()
        self._leave()

    def _leave(self) -> None:
        lock, users = self.locks[self.uid]
        if users == 1:
            del self.locks[self.uid]
        else:
            self.locks[self.uid] = (lock, users - 1)


def _unlink(path: Path) -> None:
    path.unlink(missing_ok=True)
