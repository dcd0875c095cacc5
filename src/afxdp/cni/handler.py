"""The CNI verbs: ADD, DEL, CHECK, GC, STATUS, VERSION (CNI spec 1.1).

ADD: the device must be one of our pools' and allocated to a pod; IPAM in the
host netns, ethtool filters (primary mode), move into the pod's netns keeping
the name, link up, addresses and routes. Any failure undoes every step done.
DEL: idempotent; brings the device home (when its netns still exists), IPAM
DEL, resets ethtool, and gives the device back to the device-plugin side; it
finishes every step even when one fails, then reports what failed.
Requests for the same container are serialized, others run concurrently.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import anyio
import anyio.to_thread
from pyroute2.netlink.exceptions import NetlinkError

from afxdp.cni import ethtool, ipam, link
from afxdp.cni import result as results
from afxdp.cni.attachments import Attachment, AttachmentStore
from afxdp.cni.errors import (
    CHECK_MISMATCH,
    INCOMPATIBLE_VERSION,
    INVALID_CONFIG,
    IO_FAILURE,
    NOT_READY,
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
from afxdp.netns import run_in

log = logging.getLogger(__name__)

Undo = Callable[[], Awaitable[Any]]


class DeviceSide(Protocol):
    """What the CNI needs of the device-plugin side."""

    @property
    def ready(self) -> bool: ...

    def device_allocated(self, device: str) -> bool | None:
        """Whether ``device`` is allocated; None when no pool has it."""
        ...

    async def release(self, device: str, keep_xdp: bool = False) -> bool: ...

    def describe(self, device: str) -> dict[str, Any]:
        """What the host knows of ``device`` (kept with the attachment)."""
        ...


async def _in(netns: str | Path | None, fn: Callable[..., Any], *args: Any) -> Any:
    """A blocking netlink call in a worker thread, inside ``netns`` when given."""
    where = Path(netns) if netns else None
    return await anyio.to_thread.run_sync(partial(run_in, where, fn, *args))


def _first_ipv4(ipam_result: dict[str, Any] | None) -> str | None:
    for ip in (ipam_result or {}).get("ips", []):
        if ":" not in ip["address"]:
            return str(ip["address"]).split("/")[0]
    return None


class CniHandler:
    def __init__(self, devices: DeviceSide, store: AttachmentStore) -> None:
        self.devices = devices
        self.store = store
        self._locks: dict[str, anyio.Lock] = {}

    def _lock(self, key: str) -> anyio.Lock:
        return self._locks.setdefault(key, anyio.Lock())

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
        async with self._lock(f"container:{env.container_id}"), self._lock(f"dev:{conf.device_id}"):
            if env.command == "ADD":
                return await self.add(env, conf)
            if env.command == "DEL":
                await self.delete(env, conf)
                return None
            await self.check(env, conf)
            return None

    async def add(self, env: Env, conf: NetConf) -> dict[str, Any]:
        dev = conf.device_id
        allocated = self.devices.device_allocated(dev)
        if allocated is None:
            raise CniError(
                INVALID_CONFIG, f"deviceID: {dev} is not a device of any afxdp pool here"
            )
        if not allocated:
            raise CniError(INVALID_CONFIG, f"deviceID: {dev} is not allocated to a pod "
                           "(kubelet has not called Allocate for it)")  # fmt: skip
        if not link.exists(env.netns):
            raise CniError(UNKNOWN_CONTAINER, f"network namespace {env.netns} does not exist")
        previous = self.store.get((env.container_id, env.ifname))
        if previous is not None and previous.device == dev:
            return previous.result  # a repeated ADD: the same answer
        host_up = await _in(None, link.admin_up, dev)
        if host_up is None:
            raise CniError(INVALID_CONFIG, f"deviceID: {dev} is not in the host network namespace",
                           "it may still be in another pod's namespace")  # fmt: skip
        undo: list[Undo] = []
        try:
            result = await self._add_steps(env, conf, host_up, undo)
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                for step in reversed(undo):
                    try:
                        await step()
                    except Exception as undo_exc:
                        log.error("rollback step for %s failed: %s", dev, undo_exc)
            if isinstance(exc, NetlinkError | LookupError | OSError):
                raise CniError(IO_FAILURE, f"setting up {dev} failed; everything was undone",
                               str(exc)) from exc  # fmt: skip
            raise
        return result

    async def _add_steps(
        self, env: Env, conf: NetConf, host_up: bool, undo: list[Undo]
    ) -> dict[str, Any]:
        dev, netns = conf.device_id, env.netns
        ipam_result = None
        if conf.ipam_type:
            ipam_result = await ipam.add(env, conf)
            undo.append(partial(ipam.delete, env, conf))
        if conf.mode == "primary" and conf.ethtool_cmds:
            argvs = ethtool.render(conf.ethtool_cmds, dev, _first_ipv4(ipam_result))
            applied = ethtool.Applied(dev)
            undo.append(partial(ethtool.reset, applied))
            await ethtool.apply(argvs, dev, applied)
        await _in(None, link.move, dev, Path(netns))
        undo.append(partial(self._bring_home, dev, netns, host_up))
        ips, routes = (ipam_result["ips"], ipam_result["routes"]) if ipam_result else ([], [])
        inside = await _in(netns, link.setup, dev, ips, routes)
        out = results.build(conf.cni_version, ipam_result, dev, inside.mac, netns)
        await self.store.put(
            Attachment(env.container_id, env.ifname, dev, netns, conf.name, env=env.raw,
                       netconf=conf.raw, result=out, host_up=host_up,
                       netdev=self.devices.describe(dev))
        )  # fmt: skip
        log.info("ADD %s: %s moved into %s", env.container_id, dev, netns)
        return out

    async def _bring_home(self, dev: str, netns: str, up: bool) -> bool:
        """Move ``dev`` from ``netns`` back to the host as it was; False if not there."""
        if not link.exists(netns) or not await _in(netns, link.leave, dev, link.HOST_NETNS):
            return False
        if up:
            await _in(None, link.set_up, dev)
        return True

    async def delete(self, env: Env, conf: NetConf) -> None:
        dev = conf.device_id
        record = self.store.get((env.container_id, env.ifname))
        problems: list[CniError] = []
        home = False
        try:
            home = await self._bring_home(dev, env.netns, record.host_up if record else True)
        except (NetlinkError, LookupError, OSError) as exc:
            problems.append(
                CniError(IO_FAILURE, f"moving {dev} out of {env.netns} failed", str(exc))
            )
        if conf.ipam_type:
            try:
                await ipam.delete(env, conf)
            except CniError as exc:
                problems.append(exc)
        if home and conf.mode == "primary" and conf.ethtool_cmds:
            # -ip- does not matter for a reset; any address renders the commands.
            argvs = ethtool.render(conf.ethtool_cmds, dev, "192.0.2.1")
            for problem in await ethtool.reset(ethtool.Applied.assumed(dev, argvs)):
                log.warning("DEL %s: %s", dev, problem)
        await self.devices.release(dev, keep_xdp=conf.skip_unload_bpf)
        await self.store.remove((env.container_id, env.ifname))
        log.info("DEL %s: %s%s", env.container_id, dev, " (brought home)" if home else "")
        if problems:
            first = problems[0]
            raise CniError(first.code, first.msg, "; ".join(str(p) for p in problems))

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
            log.info("GC: %s/%s (%s) is stale", record.container_id, record.ifname, record.device)
            old_env = parse_env(
                {**record.env, "CNI_COMMAND": "DEL", "CNI_PATH": ":".join(env.path)}
            )
            old_conf = parse_netconf(json.dumps(record.netconf).encode(), "DEL")
            async with self._lock(f"container:{record.container_id}"):
                await self.delete(old_env, old_conf)
