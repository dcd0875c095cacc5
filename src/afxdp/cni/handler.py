"""The CNI verbs: ADD, DEL, CHECK, GC, STATUS, VERSION (CNI spec 1.1).

ADD: the device must be one of our pools' and allocated to a pod, in the host
netns, carrying its pod's program (the device side puts it back on a link
re-created under the name, or the ADD fails with code 11); IPAM in the host
netns, ethtool filters (primary mode), move into the pod's netns keeping the
name, link up, addresses and routes; then the device side is told the pod's
name (K8S_POD_NAME), so the pod's first handshake need not wait for kubelet.
Record first, then act: the attachment record (attachments.py) names each step
before it is taken, so a failed ADD, and a DEL after a crash mid-ADD, undo
exactly what may have been done. A repeated ADD returns the earlier answer, for
a completed record only.

What does not depend on each other runs side by side, because the netns
moves are the kernel's slow part (RCU waits, about 15 ms in, 20 ms back):
ADD runs the IPAM plugin while the device moves (ethtool, which runs on the
host side before the move, goes first on the move's side; only commands that
use ``-ip-`` make the move wait for IPAM), and applies the addresses after
both. The undo (DEL, a failed ADD, GC) releases the lease while the device
comes home. Telling the device side the device came home (a health re-read
the pod cannot observe) happens after DEL's reply when the handler is given a
task group; the record keeps ``home`` until then, and the device is not
touched by another request of ours before it is done.

DEL undoes what its own ADD did, and nothing else: a DEL for a (container,
ifname) that holds no attachment of that device touches nothing. The
allocation is kubelet's and outlives the DEL (the runtime's sandbox retry is
ADD, DEL, ADD), so the device side is only told that the device came home.
DEL finishes every step even when one fails, then reports what failed; what
failed stays in the record for the runtime's retry. One failure is not retried:
an IPAM plugin that ran at ADD and is no longer on CNI_PATH. Nothing but that
plugin can release its lease, so the lease is logged as leaked and the DEL
succeeds (see ``_leaked``). The record names IPAM only once the plugin may have
run: a missing plugin fails ADD before any step, and one that could not be
started is un-noted, so its DEL never needs it.

Requests for the same container, or the same device, are serialized; others
run concurrently. Blocking work runs in the CNI limiter (workers.Work.CNI), so
CNI requests cannot starve the device side.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

import anyio
from anyio.abc import TaskGroup
from pyroute2 import NetlinkError

from afxdp.cni import ethtool, ipam, link
from afxdp.cni import result as results
from afxdp.cni.attachments import Attachment, AttachmentStore
from afxdp.cni.errors import (
    CHECK_MISMATCH,
    INCOMPATIBLE_VERSION,
    INVALID_CONFIG,
    INVALID_ENV,
    IO_FAILURE,
    NOT_READY,
    TRY_AGAIN_LATER,
    UNKNOWN_CONTAINER,
    CniError,
)
from afxdp.cni.frame import Request
from afxdp.cni.netconf import (
    SUPPORTED_VERSIONS,
    Env,
    NetConf,
    parse_env,
    parse_netconf,
    peek_version,
    version_tuple,
)
from afxdp.errors import AfxdpError
from afxdp.logsetup import about
from afxdp.netns import run_in
from afxdp.workers import Work, run_sync

log = logging.getLogger(__name__)

# What the kernel or a program may raise in a step: a failure of that step.
_STEP_ERRORS = (NetlinkError, LookupError, OSError)


class DeviceSide(Protocol):
    """What the CNI needs of the device-plugin side."""

    @property
    def ready(self) -> bool: ...

    def device_allocated(self, device: str) -> bool | None:
        """Whether ``device`` is allocated; None when no pool has it. AfxdpError
        saying why when that is not known yet (afxdpd waits for kubelet's word)."""
        ...

    async def came_home(self, device: str, keep_xdp: bool) -> None:
        """The device is back in the host netns (or gone): re-read its health;
        remember skipUnloadBpf (``keep_xdp``) for when its allocation ends."""
        ...

    def describe(self, device: str) -> dict[str, Any]:
        """What the host knows of ``device`` (kept with the attachment)."""
        ...

    async def ensure_program(self, device: str) -> None:
        """Before the move: the device's link here carries the program its pod
        was handed, put back when the link lost it (deleted and re-created
        under the same name); AfxdpError saying why when it cannot be."""
        ...

    def pod_attached(self, device: str, pod: str) -> None:
        """ADD moved ``device`` into pod ``pod`` (K8S_POD_NAME of CNI_ARGS): its
        holder, before the pod's first handshake."""
        ...


async def _in(netns: str | Path | None, fn: Callable[..., Any], *args: Any) -> Any:
    """A blocking netlink call in a CNI worker thread, inside ``netns`` when given."""
    where = Path(netns) if netns else None
    return await run_sync(Work.CNI, run_in, where, fn, *args)


def _ethtool_cmds(conf: NetConf) -> tuple[str, ...]:
    """The ethtool commands ADD runs (primary mode only)."""
    return conf.ethtool_cmds if conf.mode == "primary" else ()


def _first_ipv4(ipam_result: dict[str, Any] | None) -> str | None:
    for ip in (ipam_result or {}).get("ips", []):
        if ":" not in ip["address"]:
            return str(ip["address"]).split("/")[0]
    return None


def _is_own_netns(netns: str) -> bool:
    """Whether ``netns`` names afxdpd's own network namespace (the host's)."""
    try:
        theirs, ours = os.stat(netns), os.stat(link.HOST_NETNS)
    except OSError:
        return False
    return (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino)


def _as_cni(exc: Exception, what: str) -> CniError:
    """A step's failure as the runtime is told it (code 5 unless it has one)."""
    return exc if isinstance(exc, CniError) else CniError(IO_FAILURE, what, str(exc) or repr(exc))


async def _together(*steps: Callable[[], Awaitable[None]]) -> None:
    """Run ``steps`` side by side, each to its end even when another fails (what
    ran is then undone as a whole); raise the failure of the first step, in the
    order given, that failed."""
    errors: list[Exception | None] = [None] * len(steps)

    async def one(i: int, step: Callable[[], Awaitable[None]]) -> None:
        try:
            await step()
        except Exception as exc:
            errors[i] = exc

    async with anyio.create_task_group() as tg:
        for i, step in enumerate(steps):
            tg.start_soon(one, i, step)
    failed = [e for e in errors if e is not None]
    for other in failed[1:]:
        log.warning("a step beside the failing one failed too: %s", other)
    if failed:
        raise failed[0]


def _leaked(record: Attachment, missing: CniError) -> None:
    """Say, once and loudly, that ``record``'s IPAM lease cannot be released.

    Its ADD ran the IPAM plugin, which is no longer on CNI_PATH: only that
    plugin can release what it allocated. The undo goes on without it, and the
    DEL succeeds: failing it would keep the pod's sandbox (and this record)
    forever for a release no retry can make, and the CNI spec asks DEL to
    succeed when what it would release is out of reach. The lease stays
    allocated in the plugin's store (an address leaked, never handed out
    twice), so the operator is told which one to free.
    """
    ips = [str(ip.get("address")) for ip in record.result.get("ips", []) if isinstance(ip, dict)]
    log.error(
        "IPAM lease LEAKED: %s/%s (network %s, device %s, addresses %s): %s. Only that "
        "plugin can release it; the rest is undone without it. Free it in the plugin's "
        "store, or reinstall the plugin and run its DEL with the same netconf",
        record.container_id, record.ifname, record.network, record.device,
        ", ".join(ips) or "unknown (the ADD did not finish)", missing,
        extra=about(device=record.device),
    )  # fmt: skip


def _summary(problems: list[CniError]) -> CniError:
    """One error naming every problem (the first one's code)."""
    first = problems[0]
    return CniError(first.code, first.msg, "; ".join(str(p) for p in problems))


class CniHandler:
    """Answers CNI requests. With ``after`` (a task group that outlives the
    requests, e.g. the service's), work the pod cannot observe runs there after
    the reply; without it, before the reply."""

    def __init__(
        self, devices: DeviceSide, store: AttachmentStore, after: TaskGroup | None = None
    ) -> None:
        self.devices = devices
        self.store = store
        self._locks: dict[str, anyio.Lock] = {}
        self._users: dict[str, int] = {}
        self._after = after
        self._telling: dict[str, list[anyio.Event]] = {}  # device -> tells under way
        if after is not None:
            for record in store.all():
                if record.home:  # a crash came between an undo and its telling
                    self._tell_later(record)

    @asynccontextmanager
    async def _locked(self, *keys: str) -> AsyncIterator[None]:
        """Hold the locks of ``keys`` (always taken in the order given:
        container, then device); a lock nobody holds or waits for is dropped."""
        for key in keys:
            self._users[key] = self._users.get(key, 0) + 1
        try:
            async with self._lock_all(list(keys)):
                yield
        finally:
            for key in keys:
                self._users[key] -= 1
                if not self._users[key]:
                    del self._users[key], self._locks[key]

    @asynccontextmanager
    async def _lock_all(self, keys: list[str]) -> AsyncIterator[None]:
        if not keys:
            yield
            return
        async with self._locks.setdefault(keys[0], anyio.Lock()), self._lock_all(keys[1:]):
            yield

    async def handle(self, request: Request) -> tuple[int, bytes, bytes]:
        """(exit code, stdout, stderr) for one forwarded request."""
        version = peek_version(request.stdin)
        try:
            env = parse_env(request.env)
            if env.command == "VERSION":
                doc = {"cniVersion": version, "supportedVersions": list(SUPPORTED_VERSIONS)}
                return 0, json.dumps(doc).encode() + b"\n", b""
            conf = parse_netconf(request.stdin, env.command)
            out = await self._dispatch(env, conf)
            return 0, (json.dumps(out).encode() + b"\n") if out is not None else b"", b""
        except CniError as exc:
            log.warning("CNI %s failed: %s", request.env.get("CNI_COMMAND"), exc)
            return 1, exc.to_json(version), f"afxdp: {exc}\n".encode()
        except Exception as exc:  # a bug: still answer the runtime in CNI's terms
            log.exception("CNI request failed unexpectedly")
            err = CniError(IO_FAILURE, "internal error in afxdpd", repr(exc))
            return 1, err.to_json(version), f"afxdp: {err}\n".encode()

    async def _dispatch(self, env: Env, conf: NetConf) -> dict[str, Any] | None:
        if env.command == "STATUS":
            if not self.devices.ready:
                raise CniError(NOT_READY, "afxdpd is not ready")
            return None
        if env.command == "GC":
            await self.gc(env, conf)
            return None
        async with self._locked(f"container:{env.container_id}", f"dev:{conf.device_id}"):
            held = self.store.get((env.container_id, env.ifname))
            await self._settled(conf.device_id, *([held.device] if held else []))
            if env.command == "ADD":
                return await self.add(env, conf)
            if env.command == "DEL":
                await self.delete(env, conf)
                return None
            await self.check(env, conf)
            return None

    # ADD

    async def add(self, env: Env, conf: NetConf) -> dict[str, Any]:
        dev = conf.device_id
        try:
            allocated = self.devices.device_allocated(dev)
        except AfxdpError as exc:  # not known yet: a retry may find it allocated
            raise CniError(TRY_AGAIN_LATER, f"deviceID: {dev}: {exc}") from exc
        if allocated is None:
            raise CniError(
                INVALID_CONFIG, f"deviceID: {dev} is not a device of any afxdp pool here"
            )
        if not allocated:
            raise CniError(INVALID_CONFIG, f"deviceID: {dev} is not allocated to a pod "
                           "(kubelet has not called Allocate for it)")  # fmt: skip
        if not link.exists(env.netns):
            raise CniError(UNKNOWN_CONTAINER, f"network namespace {env.netns} does not exist")
        if _is_own_netns(env.netns):
            raise CniError(INVALID_ENV, f"CNI_NETNS {env.netns} is afxdpd's own network "
                           "namespace (the host's), not a pod's; refused")  # fmt: skip
        key = (env.container_id, env.ifname)
        previous = self.store.get(key)
        if previous is not None and previous.complete:
            if previous.device == dev:
                self._attached(env, dev)
                return previous.result  # a repeated ADD: the same answer
            raise CniError(
                INVALID_CONFIG,
                f"deviceID: {env.ifname} of container {env.container_id} is "
                f"{previous.device} already; DEL it first",
            )
        if previous is not None:  # an ADD that afxdpd did not finish (it crashed)
            problems = await self._undo(previous, env.path)
            await self._settled(previous.device)
            if problems:
                raise CniError(IO_FAILURE, "undoing an earlier unfinished ADD failed",
                               _summary(problems).details)  # fmt: skip
        if conf.ipam_type:  # refused before any step: no device moved for nothing
            ipam.find_plugin(conf.ipam_type, env.path)
        host_up = await _in(None, link.admin_up, dev)
        if host_up is None:
            raise CniError(INVALID_CONFIG, f"deviceID: {dev} is not in the host network namespace",
                           "it may still be in another pod's namespace")  # fmt: skip
        try:  # a link re-created under its name has lost the pod's program
            await self.devices.ensure_program(dev)
        except AfxdpError as exc:  # nothing done yet: nothing to undo
            raise CniError(TRY_AGAIN_LATER, f"deviceID: {dev} lacks its pod's XDP program",
                           str(exc)) from exc  # fmt: skip
        # The first steps are noted with the record: IPAM, and the move when no
        # ethtool step comes before it (both start at once).
        await self.store.put(
            Attachment(env.container_id, env.ifname, dev, env.netns, conf.name, env=env.raw,
                       netconf=conf.raw, host_up=host_up, netdev=self.devices.describe(dev),
                       complete=False, ipam=bool(conf.ipam_type), moved=not _ethtool_cmds(conf))
        )  # fmt: skip
        try:
            return await self._add_steps(env, conf)
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                record = self.store.get(key)
                problems = await self._undo(record, env.path) if record else []
            for problem in problems:
                log.error("ADD %s: rollback step failed: %s", dev, problem,
                          extra=about(device=dev))  # fmt: skip
            if isinstance(exc, (*_STEP_ERRORS, CniError)):
                undone = "everything was undone"
                if problems:
                    undone = f"undoing it failed too (a DEL retries): {_summary(problems).details}"
                if isinstance(exc, CniError):
                    details = "; ".join(filter(None, (exc.details, undone)))
                    raise CniError(exc.code, exc.msg, details) from exc
                raise CniError(IO_FAILURE, f"setting up {dev} failed; {undone}", str(exc)) from exc
            raise

    async def _note(self, key: tuple[str, str], **changes: Any) -> Attachment:
        """Record, durably, a step about to be taken (or the ADD's end)."""
        record = self.store.get(key)
        assert record is not None
        record = replace(record, **changes)
        await self.store.put(record)
        return record

    async def _add_steps(self, env: Env, conf: NetConf) -> dict[str, Any]:
        dev, netns, key = conf.device_id, env.netns, (env.container_id, env.ifname)
        cmds = _ethtool_cmds(conf)
        ipam_result: dict[str, Any] | None = None

        async def lease() -> None:  # noted with the record
            nonlocal ipam_result
            if conf.ipam_type:
                try:
                    ipam_result = await ipam.add(env, conf)
                except ipam.NotRun:
                    # Never started (gone since the check, not executable): it
                    # holds no lease, and the undo must not need it.
                    await self._note(key, ipam=False)
                    raise

        async def move(ip: str | None = None) -> None:
            if cmds:  # on the host side, before the move
                await self._ethtool(key, dev, cmds, ip)
                await self._note(key, moved=True)
            try:  # up in the pod in the same message: one request less
                await _in(None, link.move, dev, Path(netns), True)
            except (NetlinkError, LookupError):
                # Refused (a link of that name in the pod, ...): it did not move, and
                # the undo must not move the pod's own link of that name out. But
                # the kernel moves first and sets the link up after: when only that
                # failed, the device is in the pod and the undo brings it home.
                if await _in(None, link.admin_up, dev) is not None:
                    await self._note(key, moved=False)
                raise

        if any("-ip-" in cmd for cmd in cmds):  # ethtool needs IPAM's address first
            await lease()
            await move(_first_ipv4(ipam_result))
        else:
            await _together(lease, move)
        ips, routes = (ipam_result["ips"], ipam_result["routes"]) if ipam_result else ([], [])
        mac = await _in(netns, link.setup, dev, ips, routes)
        out = results.build(conf.cni_version, ipam_result, dev, mac, netns)
        await self._note(key, result=out, complete=True)
        self._attached(env, dev)
        log.info("ADD %s: %s moved into %s", env.container_id, dev, netns,
                 extra=about(device=dev))  # fmt: skip
        return out

    def _attached(self, env: Env, dev: str) -> None:
        """Tell the device side which pod ``dev`` is in now, when the runtime
        says (Kubernetes runtimes put K8S_POD_NAME in CNI_ARGS)."""
        pod = env.args.get("K8S_POD_NAME")
        if pod:
            self.devices.pod_attached(dev, pod)

    async def _ethtool(
        self, key: tuple[str, str], dev: str, cmds: tuple[str, ...], ip: str | None
    ) -> None:
        """The ethtool commands, each noted (with what it changes) before it runs."""
        changes: list[ethtool.Change] = []
        for argv in ethtool.render(cmds, dev, ip):
            changes.append(await ethtool.before(argv))
            await self._note(key, ethtool=[c.to_doc() for c in changes])
            try:
                changes[-1] = changes[-1].after(await ethtool.run(argv))
            except ethtool.Failed:
                if not changes[-1].rereads:  # refused: nothing that -X default must undo
                    changes.pop()
                    await self._note(key, ethtool=[c.to_doc() for c in changes])
                raise
            await self._note(key, ethtool=[c.to_doc() for c in changes])

    # Undo: DEL, a failed ADD, GC, an unfinished ADD found later

    async def _bring_home(self, dev: str, netns: str, up: bool) -> bool:
        """Move ``dev`` from ``netns`` back to the host as it was; False if not there.

        A device already home (a DEL cut short between the move and the link-up,
        by a crash) is still set up as it was: the retried DEL finishes the job.
        """
        moved = link.exists(netns) and await _in(netns, link.leave, dev, link.HOST_NETNS, up)
        if not moved and up and await _in(None, link.admin_up, dev) is not None:
            await _in(None, link.set_up, dev)  # a DEL retried after a crash mid-way
        return bool(moved)

    async def _at_home(self, dev: str) -> bool:
        """Whether ``dev`` is in the host netns."""
        return await _in(None, link.admin_up, dev) is not None

    async def _undo(self, record: Attachment, path: tuple[str, ...]) -> list[CniError]:
        """Undo the steps ``record`` names, each even when another fails; the
        lease is released while the device comes home (ethtool settings are
        restored once it is home).

        Returns the failures; the steps that failed stay in the record (a
        retried DEL runs only those), and a record with none left is removed
        once the device side has been told that the device came home.
        """
        dev = record.device
        at_home: list[CniError] = []
        released: list[CniError] = []
        left: dict[str, Any] = {}

        async def come_home() -> None:
            if record.moved:
                try:
                    await self._bring_home(dev, record.netns, record.host_up)
                except Exception as exc:
                    at_home.append(_as_cni(exc, f"moving {dev} out of {record.netns} failed"))
                    left["moved"] = True
            changes = [ethtool.Change.from_doc(d) for d in record.ethtool]
            if changes and "moved" in left:
                left["ethtool"] = record.ethtool  # still in the pod: restore it when it is home
                return
            for n, change in reversed(list(enumerate(changes))):
                try:
                    if not await self._at_home(dev):
                        break  # gone with its netns: nothing to restore on
                    await ethtool.restore(change)
                except Exception as exc:
                    at_home.append(_as_cni(exc, f"restoring ethtool settings of {dev} failed"))
                    left["ethtool"] = [c.to_doc() for c in changes[: n + 1]]
                    break  # restores undo in order: the earlier ones wait for this one

        async def release() -> None:
            if record.ipam:
                try:
                    old_env, old_conf = self._request_of(record, path)
                    await ipam.delete(old_env, old_conf)
                except ipam.Missing as exc:
                    _leaked(record, exc)  # the step is dropped: no retry can release it
                except Exception as exc:
                    released.append(_as_cni(exc, "IPAM DEL failed"))
                    left["ipam"] = True

        async with anyio.create_task_group() as tg:
            tg.start_soon(come_home)
            tg.start_soon(release)
        home = record.home or (record.moved and "moved" not in left)
        if left or home:
            steps = {"moved": False, "ipam": False, "ethtool": [], **left}
            now = replace(record, complete=False, home=home, **steps)
            if now != self.store.get(record.key):
                await self.store.put(now)
            if home:
                await self._tell(now)
        else:
            await self.store.remove(record.key)
        return at_home + released

    async def _tell(self, record: Attachment) -> None:
        """Tell the device side that ``record``'s device came home: after the
        reply when there is a task group for it, else now."""
        if self._after is None:
            await self._told(record)
        else:
            self._tell_later(record)

    def _tell_later(self, record: Attachment) -> None:
        assert self._after is not None
        done = anyio.Event()
        self._telling.setdefault(record.device, []).append(done)

        async def tell() -> None:
            try:
                await self._told(record)
            finally:
                done.set()
                waiting = self._telling[record.device]
                waiting.remove(done)
                if not waiting:
                    del self._telling[record.device]

        self._after.start_soon(tell)

    async def _told(self, record: Attachment) -> None:
        """The telling itself, then the record's ``home`` note dropped (the
        record with it when nothing else is left). Never raises: it may run in
        the service's task group, where a failure would end the service."""
        dev = record.device
        with anyio.CancelScope(shield=True):  # started: finished, even at shutdown
            keep_xdp = False
            try:
                if record.netconf:
                    doc = json.dumps(record.netconf).encode()
                    keep_xdp = parse_netconf(doc, "DEL").skip_unload_bpf
            except Exception as exc:  # still told, with the default
                log.warning("%s: the recorded netconf is unreadable: %s", dev, exc,
                            extra=about(device=dev))  # fmt: skip
            try:
                await self.devices.came_home(dev, keep_xdp)
            except Exception:
                log.exception("%s: telling the device side it came home failed", dev,
                              extra=about(device=dev))  # fmt: skip
            try:
                current = self.store.get(record.key)
                if current is None or not current.home:
                    return
                if current.moved or current.ipam or current.ethtool:
                    await self.store.put(replace(current, home=False))
                else:
                    await self.store.remove(current.key)
            except Exception:
                log.exception("%s: dropping the attachment record's home note failed", dev,
                              extra=about(device=dev))  # fmt: skip

    async def _settled(self, *devices: str) -> None:
        """Wait until the device side has been told about each of ``devices``
        (a device is handed on only after the work of its last undo)."""
        for dev in devices:
            for done in list(self._telling.get(dev, ())):
                await done.wait()

    @staticmethod
    def _request_of(record: Attachment, path: tuple[str, ...]) -> tuple[Env, NetConf]:
        """The ADD's request as a DEL (on today's CNI_PATH when the runtime gave one)."""
        env = dict(record.env, CNI_COMMAND="DEL")
        if path:
            env["CNI_PATH"] = ":".join(path)
        return parse_env(env), parse_netconf(json.dumps(record.netconf).encode(), "DEL")

    async def delete(self, env: Env, conf: NetConf) -> None:
        dev = conf.device_id
        record = self.store.get((env.container_id, env.ifname))
        if record is None or record.device != dev:
            # Not this container's device (or DEL repeated): nothing of ours to undo.
            log.info("DEL %s/%s: holds no attachment of %s; nothing to do",
                     env.container_id, env.ifname, dev, extra=about(device=dev))  # fmt: skip
            return
        problems = await self._undo(record, env.path)
        log.info("DEL %s: %s undone%s", env.container_id, dev,
                 " with errors" if problems else "", extra=about(device=dev))  # fmt: skip
        if problems:
            raise _summary(problems)

    # CHECK, GC

    async def check(self, env: Env, conf: NetConf) -> None:
        if version_tuple(conf.cni_version) < (0, 4, 0):
            raise CniError(INCOMPATIBLE_VERSION, "CHECK needs cniVersion 0.4.0 or later")
        prev = conf.prev_result
        if prev is None:
            raise CniError(INVALID_CONFIG, "prevResult: is required for CHECK")
        if not link.exists(env.netns):
            raise CniError(UNKNOWN_CONTAINER, f"network namespace {env.netns} does not exist")
        dev = conf.device_id
        inside = await _in(env.netns, link.state, dev)
        if inside is None:
            raise CniError(CHECK_MISMATCH, f"{dev} is not in {env.netns}")
        if not inside.up:
            raise CniError(CHECK_MISMATCH, f"{dev} is down in {env.netns}")
        for ip in prev.get("ips", []):
            if ip["address"] not in inside.addresses:
                raise CniError(CHECK_MISMATCH, f"{dev} lacks address {ip['address']}",
                               f"has {sorted(inside.addresses)}")  # fmt: skip
        dsts = {dst for dst, _gw in inside.routes}
        for route in prev.get("routes", []):
            if route["dst"] not in dsts:
                raise CniError(CHECK_MISMATCH, f"route to {route['dst']} is missing in {env.netns}")
        if conf.ipam_type:
            await ipam.check(env, conf, prev)

    async def gc(self, env: Env, conf: NetConf) -> None:
        """Undo attachments of this network that the runtime no longer lists."""
        valid = set(conf.valid_attachments or ())
        for record in self.store.all():
            if record.network != conf.name or record.key in valid:
                continue
            log.info("GC: %s/%s (%s) is stale", record.container_id, record.ifname,
                     record.device, extra=about(device=record.device))  # fmt: skip
            async with self._locked(f"container:{record.container_id}", f"dev:{record.device}"):
                await self._settled(record.device)
                current = self.store.get(record.key)
                if current is None:
                    continue  # a DEL got there first
                for problem in await self._undo(current, env.path):
                    log.warning("GC %s: %s", record.container_id, problem,
                                extra=about(device=record.device))  # fmt: skip
