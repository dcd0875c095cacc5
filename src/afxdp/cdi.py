"""CDI specs: the pools' devices described for container runtimes that read them.

afxdpd writes one spec per pool, ``<cdi-dir>/afxdp.dev-<pool>.json``, kind
``afxdp.dev/<pool>``, with one CDI device per netdev named by the netdev:
``afxdp.dev/<pool>=<netdev>``. Allocate names these in ``cdi_devices``
(Kubernetes 1.28+); a runtime with CDI applies them, others ignore the field
and use the envs and mounts Allocate returns as well, so both stay.

A device's edits are:

- the mount the device plugin returns too: the device's host directory at
  ``/tmp/afxdp_dp/<netdev>/`` (``<uds-dir>/<netdev>/``; pinned-map pools
  ``<pin-dir>/<pool>/<netdev>/``; pools that hand out bare netdevs: none). The
  directory, not the socket file: a bind mount of a file pins its inode, so a
  socket that a restarted afxdpd re-creates would be invisible to the pod.
- one env var naming it: ``AFXDP_DEVICE_<POOL>_<NETDEV, encoded>=<netdev>``.

Why a variable per device: CDI edits are per device and a runtime applies the
devices' edits one after another; an env var of a later device *replaces* one
of the same name (verified with podman 4.3). A shared name would tell a
container given two devices about the last one only, and under Kubernetes,
where CDI edits are applied after kubelet's envs, a spec setting
``AFXDP_DEVICES_<POOL>`` would overwrite the device plugin's correct list. So
the spec never sets that one (Allocate's envs keep it), and each device gets a
name of its own: a container finds all its devices of a pool as the values of
the variables starting with ``AFXDP_DEVICE_<POOL>_``. The netdev part of the
name is encoded one-to-one so that two netdevs never share a variable (turning
punctuation into ``_`` would give ``eth-1`` and ``eth_1`` one variable, and one
device would vanish): lower-case letters are upper-cased, digits kept, every
other byte becomes ``_`` and its two hex digits. ``ens1f0`` gives
``ENS1F0``, ``eth0.100`` gives ``ETH0_2E100``. Read the value, not the name.

Version: ``0.3.0``, the first tagged CDI spec; everything used here is in it,
and runtimes refuse specs newer than they know (podman 4.3's CDI library,
0.5.x, rejects 0.6.0). Names follow that library's rules: a class (the pool)
starts with a letter; a device name starts and ends with a letter or digit and
holds only letters, digits, ``_ - . :``. Pools and netdevs outside them get no
CDI device (their pods still get Allocate's envs and mounts).

Specs are not removed at shutdown: containers of running pods that restart
while afxdpd is down are created from them again.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import Any

import anyio

from afxdp.bpf import pinning
from afxdp.config import Pool
from afxdp.logsetup import about
from afxdp.uds.server import socket_path
from afxdp.workers import Work, run_sync

log = logging.getLogger(__name__)

VENDOR = "afxdp.dev"
SPEC_VERSION = "0.3.0"
POD_DIR = PurePosixPath("/tmp/afxdp_dp")  # DESIGN 3.3: the pod's view of a device
ENV_PREFIX = "AFXDP_DEVICE_"
MOUNT_OPTIONS = ("rbind", "rw")  # what kubelet's device plugin mounts get

_CLASS_RE = re.compile(r"[A-Za-z](?:[A-Za-z0-9_-]*[A-Za-z0-9])?")
_DEVICE_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_.:-]*[A-Za-z0-9])?")
_PLAIN = frozenset("abcdefghijklmnopqrstuvwxyz0123456789")


def kind(pool: str) -> str:
    """The CDI kind (vendor/class) of ``pool``'s devices."""
    return f"{VENDOR}/{pool}"


def device_name(pool: str, netdev: str) -> str:
    """The fully qualified CDI name of ``netdev`` of ``pool``."""
    return f"{kind(pool)}={netdev}"


def pool_supported(pool: str) -> bool:
    """Whether ``pool`` can be a CDI class (runtimes reject the spec otherwise)."""
    return _CLASS_RE.fullmatch(pool) is not None


def device_supported(netdev: str) -> bool:
    """Whether ``netdev`` can be a CDI device name."""
    return _DEVICE_RE.fullmatch(netdev) is not None


def env_var(pool: str, netdev: str) -> str:
    """The variable naming ``netdev`` in a container (one-to-one in ``netdev``)."""
    encoded = "".join(
        c.upper() if c in _PLAIN else "".join(f"_{b:02X}" for b in c.encode()) for c in netdev
    )
    return f"{ENV_PREFIX}{pool.upper()}_{encoded}"


def host_dir(pool: Pool, netdev: str, *, uds_dir: Path, pin_dir: Path) -> Path | None:
    """The host directory a pod of ``pool`` sees at ``/tmp/afxdp_dp/<netdev>/``."""
    if pool.bpf_map_pinning_enable:
        return pinning.map_path(pin_dir, pool.name, netdev).parent
    if pool.uds_server_disable:
        return None  # a bare netdev: nothing to mount
    return socket_path(uds_dir, netdev).parent


def spec_for(
    pool: Pool, devices: Iterable[str], *, uds_dir: Path, pin_dir: Path
) -> dict[str, Any] | None:
    """The CDI spec of ``pool`` with ``devices``; None when it would have none.

    Devices that cannot be CDI names are left out; a spec must name at least
    one device, and a pool that cannot be a class has no spec at all.
    """
    if not pool_supported(pool.name):
        return None
    entries = []
    for netdev in sorted(set(devices)):
        if not device_supported(netdev):
            continue
        edits: dict[str, Any] = {"env": [f"{env_var(pool.name, netdev)}={netdev}"]}
        source = host_dir(pool, netdev, uds_dir=uds_dir, pin_dir=pin_dir)
        if source is not None:
            edits["mounts"] = [
                {
                    "hostPath": str(source),
                    "containerPath": str(POD_DIR / netdev),
                    "options": list(MOUNT_OPTIONS),
                }
            ]
        entries.append({"name": netdev, "containerEdits": edits})
    if not entries:
        return None
    return {"cdiVersion": SPEC_VERSION, "kind": kind(pool.name), "devices": entries}


def spec_path(cdi_dir: Path, pool: str) -> Path:
    return cdi_dir / f"{VENDOR}-{pool}.json"


def write_spec(cdi_dir: Path, spec: dict[str, Any]) -> bool:
    """Replace the pool's spec file atomically (mode 0644); False when unchanged.

    Runtimes read the directory whenever they like (containerd watches it), so
    the new file is written beside the old one under a name they skip (not
    ``.json``) and renamed over it: a reader sees the old spec or the new one.
    """
    return write_spec_file(spec_path(cdi_dir, spec["kind"].split("/", 1)[1]), spec)


def write_spec_file(path: Path, spec: dict[str, Any]) -> bool:
    """``write_spec`` at ``path`` (a DRA claim's spec has a file of its own)."""
    cdi_dir = path.parent
    data = (json.dumps(spec, indent=2) + "\n").encode()
    try:
        if path.read_bytes() == data:
            return False  # no rewrite, no spurious reload in a watching runtime
    except FileNotFoundError:
        pass
    cdi_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cdi_dir, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            os.fchmod(f.fileno(), 0o644)  # runtimes may read as another user
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return True


# -- DRA: one spec per prepared claim (dra/claims.py) -------------------------
# Kind ``afxdp.dev/claim``, a CDI device per claimed netdev named
# ``<claim uid>-<netdev>``: 38 characters at least, so never a pool's device
# (a netdev name, at most 15) even in a pool named "claim". The file name does
# not start with ``afxdp.dev-``: ``written_pools`` never takes it for a pool's.
CLAIM_KIND = f"{VENDOR}/claim"
CLAIM_PREFIX = f"{VENDOR}_claim-"


def claim_device_name(uid: str, netdev: str) -> str:
    """The fully qualified CDI name of ``netdev`` as claim ``uid`` has it."""
    return f"{CLAIM_KIND}={uid}-{netdev}"


def claim_spec_path(cdi_dir: Path, uid: str) -> Path:
    return cdi_dir / f"{CLAIM_PREFIX}{uid}.json"


def claim_spec(uid: str, devices: Iterable[tuple[Pool, str, list[tuple[str, str]]]]
               ) -> dict[str, Any]:  # fmt: skip
    """The CDI spec of claim ``uid``: each (pool, netdev, mounts) gets what the
    device plugin's Allocate gives a container: the mounts (host, container),
    ``AFXDP_DEVICES_<POOL>`` naming the claim's devices of that pool (the same
    value in each of them, so the order a runtime applies them in does not
    matter) and the device's own ``AFXDP_DEVICE_<POOL>_<NETDEV>``."""
    devices = list(devices)
    by_pool: dict[str, list[str]] = {}
    for pool, netdev, _ in devices:
        by_pool.setdefault(pool.name, []).append(netdev)
    entries = []
    for pool, netdev, mounts in devices:
        env = [f"{pool.env_var}={' '.join(by_pool[pool.name])}",
               f"{env_var(pool.name, netdev)}={netdev}"]  # fmt: skip
        edits: dict[str, Any] = {"env": env}
        if mounts:
            edits["mounts"] = [
                {"hostPath": host, "containerPath": container, "options": list(MOUNT_OPTIONS)}
                for host, container in mounts
            ]
        entries.append({"name": f"{uid}-{netdev}", "containerEdits": edits})
    return {"cdiVersion": SPEC_VERSION, "kind": CLAIM_KIND, "devices": entries}


def written_claims(cdi_dir: Path) -> set[str]:
    """The claim uids that have a spec of ours in ``cdi_dir``."""
    return _written(cdi_dir, CLAIM_PREFIX)


def remove_spec(cdi_dir: Path, pool: str) -> bool:
    """Remove the pool's spec; False when there was none."""
    try:
        spec_path(cdi_dir, pool).unlink()
    except FileNotFoundError:
        return False
    return True


def written_pools(cdi_dir: Path) -> set[str]:
    """The pools that have a spec of ours in ``cdi_dir``."""
    return _written(cdi_dir, f"{VENDOR}-")


def _written(cdi_dir: Path, prefix: str) -> set[str]:
    """What follows ``prefix`` in the names of the ``.json`` files in ``cdi_dir``."""
    try:
        names = os.listdir(cdi_dir)
    except FileNotFoundError:
        return set()
    return {
        n[len(prefix) : -len(".json")]
        for n in names
        if n.startswith(prefix) and n.endswith(".json")
    }


class CdiSpecs:
    """The node's CDI specs, one per pool, kept in step with the pools.

    A failure to write is logged, never raised: CDI is an extra, and a pool
    must keep working without it. Allocate names only devices whose spec is on
    disk (``names``), because a runtime refuses to create a container that asks
    for a CDI device it cannot find.
    """

    def __init__(self, cdi_dir: Path, *, uds_dir: Path, pin_dir: Path) -> None:
        self.cdi_dir = cdi_dir
        self.uds_dir = uds_dir
        self.pin_dir = pin_dir
        self._written: dict[str, frozenset[str]] = {}  # pool -> netdevs in its spec
        self._lock = anyio.Lock()  # one rewrite at a time: the last update wins

    async def start(self, pools: Iterable[Pool]) -> None:
        """Remove specs left for pools no longer configured (all, given none)."""
        keep = {p.name for p in pools}
        async with self._lock:
            try:
                found = await run_sync(Work.DISK, written_pools, self.cdi_dir)
                for pool in sorted(found - keep):
                    await run_sync(Work.DISK, remove_spec, self.cdi_dir, pool)
                    log.info("CDI: removed the spec of pool %s (no longer configured)", pool,
                             extra=about(pool=pool))  # fmt: skip
            except OSError as exc:
                log.error("CDI: cannot clean %s: %s", self.cdi_dir, exc)

    async def update(self, pool: Pool, devices: Iterable[str]) -> None:
        """Make the pool's spec describe ``devices`` (no write when it already does)."""
        wanted = sorted(set(devices))
        spec = spec_for(pool, wanted, uds_dir=self.uds_dir, pin_dir=self.pin_dir)
        named = frozenset(d["name"] for d in spec["devices"]) if spec else frozenset()
        left_out = [d for d in wanted if d not in named]
        async with self._lock:
            try:
                if spec is None:
                    await run_sync(Work.DISK, remove_spec, self.cdi_dir, pool.name)
                elif await run_sync(Work.DISK, write_spec, self.cdi_dir, spec):
                    log.info("CDI: %s describes %s", spec_path(self.cdi_dir, pool.name),
                             sorted(named), extra=about(pool=pool.name))  # fmt: skip
            except OSError as exc:
                # The previous file (if any) is intact: keep naming what it holds.
                log.error("CDI: cannot write the spec of pool %s: %s", pool.name, exc,
                          extra=about(pool=pool.name))  # fmt: skip
                return
            if left_out and self._written.get(pool.name) != named:  # once, not per update
                why = "netdev names" if pool_supported(pool.name) else "pool name (a CDI class)"
                log.warning("CDI: pool %s: no CDI device for %s: %s unusable in CDI",
                            pool.name, left_out, why, extra=about(pool=pool.name))  # fmt: skip
            self._written[pool.name] = named

    def names(self, pool: str, ids: Iterable[str]) -> list[str]:
        """The CDI device names for ``ids`` of ``pool`` (Allocate's ``cdi_devices``)."""
        written = self._written.get(pool, frozenset())
        return [device_name(pool, d) for d in ids if d in written]

    async def remove(self, pool: str) -> None:
        """Remove the pool's spec (the pool is gone)."""
        async with self._lock:
            self._written.pop(pool, None)
            try:
                await run_sync(Work.DISK, remove_spec, self.cdi_dir, pool)
            except OSError as exc:
                log.error("CDI: cannot remove the spec of pool %s: %s", pool, exc,
                          extra=about(pool=pool))  # fmt: skip
