"""Pools: which of the node's netdevs each pool takes, and their states. No I/O.

``assemble`` applies the seed README's rules to a config, the node's inventory
and the node's name. The rules, in order, per pool (config order):

- a pool that ``requiresUnprivilegedBpf`` takes nothing where the node forbids it;
- the first ``nodes[]`` entry naming this node replaces the pool's drivers and
  devices (an entry with neither makes the pool take nothing here);
- explicit devices (by name, MAC or PCI) come first, then each driver's
  devices sorted by name (deterministic, unlike the original), minus its
  ``excludeDevices``, minus IPv4-addressed ones with ``excludeAddressed``, at
  most ``primary`` of them;
- a netdev is in at most one pool (the first in config order wins); names
  starting with a reserved prefix are never pooled;
- in cdq mode each primary backs secondaries named by the provider, at most
  ``secondary`` of them (device's, else driver's, else the provider's capacity);
- pools that end up empty are not advertised;
- with ``kindCluster`` (at most one pool) the pool takes exactly the devices of
  the kind network afxdpd built (``kind_devices``), in place of its drivers,
  devices and nodes: never another veth, however its name or kind fits.

A virtual netdev has no PCI device; its "driver" is its link kind (``veth``),
so it is reached only when the config names that kind, its name or its MAC.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from afxdp import config as cfg
from afxdp.errors import DeviceError
from afxdp.netdev import NetDev
from afxdp.secondary import SecondaryDeviceProvider

PROHIBITED_PREFIXES = ("eno", "eth", "lo", "docker", "flannel", "cni")


class DeviceState(enum.Enum):
    FREE = "free"
    ALLOCATED = "allocated"
    UNHEALTHY = "unhealthy"
    UNKNOWN = "unknown"  # whether a pod holds it is not known yet (PoolDevice.unknown)


# Why an unknown device is refused (Allocate) and what status says of it.
UNKNOWN_HOLDER = (
    "the state record was unreadable; waiting for kubelet's PodResources to say who holds it"
)


@dataclass
class PoolDevice:
    """A device a pool advertises. Its ID is its netdev name."""

    id: str
    numa_node: int | None = None
    # For cdq secondaries: the primary netdev and the 1-based secondary index.
    parent: str | None = None
    index: int | None = None
    healthy: bool = True  # its link, as netlink says
    allocated: bool = False
    # Why the device cannot be handed out although its link is fine (our program
    # could not be attached to it ahead of Allocate); None when nothing is wrong.
    fault: str | None = None
    # Whether a pod holds it is not known: the durable record could not be
    # trusted and kubelet's PodResources has not answered yet. Never handed
    # out, prepared or released meanwhile; kubelet is told it is Unhealthy.
    unknown: bool = False
    # The pool whose pod holds it: a reload moved it into this pool while it
    # was allocated in that one. Not this pool's to hand out until that
    # allocation ends; kubelet is told it is Unhealthy meanwhile.
    held_by: str | None = None
    # The name its link was renamed to (that link is no longer the device);
    # cleared when a link is named the device's name again.
    renamed: str | None = None

    @property
    def usable(self) -> bool:
        """What kubelet is told: Healthy or Unhealthy."""
        return self.healthy and self.fault is None and not self.unknown and self.held_by is None

    @property
    def state(self) -> DeviceState:
        if self.unknown:
            return DeviceState.UNKNOWN
        if not self.usable:
            return DeviceState.UNHEALTHY
        return DeviceState.ALLOCATED if self.allocated else DeviceState.FREE

    def summary(self) -> dict[str, object]:
        """The device as status reports show it."""
        return {
            "id": self.id,
            "state": self.state.value,
            "numa": self.numa_node,
            "parent": self.parent,
            "fault": self.problem,
        }

    @property
    def problem(self) -> str | None:
        """Why it cannot be handed out although its link may be fine; None: nothing."""
        if self.renamed is not None:
            return f"its link was renamed to {self.renamed}"
        return self.fault or (f"a pod of pool {self.held_by} holds it" if self.held_by else None)


@dataclass
class Pool:
    """One advertised pool and the bookkeeping of its devices."""

    config: cfg.Pool
    devices: dict[str, PoolDevice] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.config.name

    def check_allocatable(self, ids: Sequence[str]) -> None:
        """Raise DeviceError naming every ID that cannot be allocated, and why."""
        problems = []
        for dev_id, count in _counts(ids).items():
            dev = self.devices.get(dev_id)
            if dev is None:
                problems.append(f"{dev_id}: unknown device in pool {self.name}")
            elif count > 1:
                problems.append(f"{dev_id}: requested {count} times")
            elif dev.unknown:
                problems.append(f"{dev_id}: {UNKNOWN_HOLDER}")
            elif dev.held_by is not None:
                problems.append(f"{dev_id}: a pod of pool {dev.held_by} holds it")
            elif dev.state is not DeviceState.FREE:
                problems.append(f"{dev_id}: {dev.state.value}")
        if problems:
            raise DeviceError("; ".join(problems))

    def allocate(self, ids: Sequence[str]) -> None:
        """Mark ``ids`` allocated, all or none."""
        self.check_allocatable(ids)
        for dev_id in ids:
            self.devices[dev_id].allocated = True

    def release(self, ids: Iterable[str]) -> None:
        """Mark ``ids`` free again; unknown IDs are ignored (release is idempotent)."""
        for dev_id in ids:
            dev = self.devices.get(dev_id)
            if dev is not None:
                dev.allocated = False

    def set_link(self, netdev: str, healthy: bool) -> list[str]:
        """Apply a link's health to the devices it carries; return the IDs that changed."""
        changed = []
        for dev in self.devices.values():
            if netdev in (dev.id, dev.parent) and dev.healthy != healthy:
                dev.healthy = healthy
                changed.append(dev.id)
        return changed


def _counts(ids: Sequence[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for i in ids:
        out[i] = out.get(i, 0) + 1
    return out


@dataclass
class Assembly:
    """The pools of this node and what was skipped on the way, for the log."""

    pools: list[Pool]
    warnings: list[str]


def is_prohibited(name: str) -> bool:
    return name.startswith(PROHIBITED_PREFIXES)


class _Index:
    """The inventory looked up by name, MAC, PCI address and driver."""

    def __init__(self, netdevs: Iterable[NetDev]) -> None:
        self.by_name: dict[str, NetDev] = {}
        self.by_mac: dict[str, NetDev] = {}
        self.by_pci: dict[str, NetDev] = {}
        self.by_driver: dict[str, list[NetDev]] = {}
        # Sorted so that a MAC or PCI address shared by several netdevs (VLANs,
        # bonds) resolves to the same one every time.
        for nd in sorted(netdevs, key=lambda d: d.name):
            self.by_name[nd.name] = nd
            if nd.mac:
                self.by_mac.setdefault(nd.mac, nd)
            if nd.pci:
                self.by_pci.setdefault(nd.pci, nd)
            self.by_driver.setdefault(nd.driver, []).append(nd)

    def resolve(self, dev: cfg.Device) -> NetDev | None:
        if dev.name is not None:
            return self.by_name.get(dev.name)
        if dev.mac is not None:
            return self.by_mac.get(dev.mac)
        return self.by_pci.get(dev.pci or "")


def assemble(
    config: cfg.Config,
    netdevs: Iterable[NetDev],
    node_name: str,
    *,
    unprivileged_bpf_disabled: int | None,
    secondary: SecondaryDeviceProvider,
    kind_devices: Sequence[str] = (),
) -> Assembly:
    """Build this node's pools (see the module docstring for the rules).

    ``kind_devices``: the pooled ends of the kind network (``KindNet.devices``);
    used only when the config says ``kindCluster``.
    """
    index = _Index(netdevs)
    taken: dict[str, str] = {}  # netdev name -> pool that took it
    warnings: list[str] = []
    pools: list[Pool] = []
    for i, pc in enumerate(config.pools):
        where = f"pools[{i}] ({pc.name})"
        if pc.requires_unprivileged_bpf and unprivileged_bpf_disabled != 0:
            warnings.append(
                f"{where}: takes no devices: it requires unprivileged BPF and this node has "
                f"kernel.unprivileged_bpf_disabled={unprivileged_bpf_disabled}"
            )
            continue
        if config.kind_cluster:
            chosen = _choose_kind(
                index, kind_devices, where=where, pool=pc.name, taken=taken, warnings=warnings
            )
        else:
            chosen = _choose_configured(
                index, pc, i, node_name=node_name, taken=taken, warnings=warnings
            )
        pool = Pool(pc)
        for nd, limit in chosen:
            if pc.mode == "primary":
                pool.devices[nd.name] = PoolDevice(nd.name, nd.numa_node, healthy=nd.link_up)
                continue
            capacity = secondary.capacity(nd)
            if capacity == 0:
                warnings.append(
                    f"{where}: {nd.name} (driver {nd.driver or 'none'}) cannot back cdq "
                    "secondary devices; skipped"
                )
                continue
            for k in range(1, min(limit or capacity, capacity) + 1):
                sid = secondary.name(nd, k)
                pool.devices[sid] = PoolDevice(
                    sid, nd.numa_node, parent=nd.name, index=k, healthy=nd.link_up
                )
        if pool.devices:
            pools.append(pool)
        else:
            warnings.append(f"{where}: no devices on node {node_name}; not advertised")
    return Assembly(pools, warnings)


def _choose_kind(
    index: _Index,
    kind_devices: Sequence[str],
    *,
    where: str,
    pool: str,
    taken: dict[str, str],
    warnings: list[str],
) -> list[tuple[NetDev, int]]:
    """The kind network's pooled ends, by name; nothing else."""
    if not kind_devices:
        warnings.append(f"{where}: kindCluster is set but no kind network was built")
    chosen = []
    for name in kind_devices:
        nd = index.by_name.get(name)
        if nd is None:
            warnings.append(f"{where}: kind network device {name} is not on this node; skipped")
        else:
            taken[name] = pool
            chosen.append((nd, 0))
    return chosen


def _choose_configured(
    index: _Index,
    pc: cfg.Pool,
    i: int,
    *,
    node_name: str,
    taken: dict[str, str],
    warnings: list[str],
) -> list[tuple[NetDev, int]]:
    """The pool's drivers and devices, or those of its ``nodes[]`` entry for this node."""
    drivers, devices, base = pc.drivers, pc.devices, f"pools[{i}]"
    for j, node in enumerate(pc.nodes):
        if node.hostname.lower() == node_name.lower():
            drivers, devices, base = node.drivers, node.devices, f"pools[{i}].nodes[{j}]"
            break
    return _choose(
        index,
        drivers=drivers,
        devices=devices,
        base=base,
        pool=pc.name,
        taken=taken,
        warnings=warnings,
    )


def _choose(
    index: _Index,
    *,
    drivers: Sequence[cfg.Driver],
    devices: Sequence[cfg.Device],
    base: str,
    pool: str,
    taken: dict[str, str],
    warnings: list[str],
) -> list[tuple[NetDev, int]]:
    """The primary netdevs a pool takes, each with its secondary limit (0 = no limit)."""
    chosen: list[tuple[NetDev, int]] = []

    def take(nd: NetDev, limit: int) -> None:
        taken[nd.name] = pool
        chosen.append((nd, limit))

    for j, dev in enumerate(devices):
        where = f"{base}.devices[{j}] ({dev.describe()})"
        nd = index.resolve(dev)
        if nd is None:
            warnings.append(f"{where}: no such netdev on this node; skipped")
        elif is_prohibited(nd.name):
            warnings.append(f"{where}: {nd.name} has a reserved name prefix; never pooled")
        elif nd.name in taken:
            warnings.append(f"{where}: {nd.name} is already in pool {taken[nd.name]}; skipped")
        else:
            take(nd, dev.secondary)
    for drv in drivers:
        excluded = {nd.name for nd in map(index.resolve, drv.exclude_devices) if nd}
        count = 0
        for nd in index.by_driver.get(drv.name, ()):
            if drv.primary and count >= drv.primary:
                break
            if (
                nd.name in taken
                or nd.name in excluded
                or is_prohibited(nd.name)
                or (drv.exclude_addressed and nd.ipv4)
            ):
                continue
            take(nd, drv.secondary)
            count += 1
    return chosen


def preferred(
    pool: Pool, available: Sequence[str], must_include: Sequence[str], size: int
) -> list[str]:
    """Kubelet's GetPreferredAllocation for one container.

    Keeps ``must_include``; fills up to ``size`` from ``available`` preferring
    free healthy devices on one NUMA node (the must-include devices' node, else
    the node with the most candidates), then any other free healthy device,
    then whatever else kubelet offered. Deterministic: ties go by name.
    """
    chosen = list(dict.fromkeys(must_include))
    rest = sorted(set(available) - set(chosen))
    if len(chosen) >= size:
        return chosen[:size] if size > 0 else chosen

    def numa(dev_id: str) -> int | None:
        dev = pool.devices.get(dev_id)
        return dev.numa_node if dev else None

    good = [d for d in rest if d in pool.devices and pool.devices[d].state is DeviceState.FREE]
    anchor = _most_common([numa(d) for d in chosen])
    if anchor is None:
        anchor = _most_common([numa(d) for d in good])
    same_node = [d for d in good if anchor is not None and numa(d) == anchor]
    ordered = same_node + [d for d in good if d not in same_node]
    ordered += [d for d in rest if d not in ordered]
    return chosen + ordered[: size - len(chosen)]


def _most_common(values: Iterable[int | None]) -> int | None:
    counts: dict[int, int] = {}
    for v in values:
        if v is not None:
            counts[v] = counts.get(v, 0) + 1
    # Highest count first, then the lowest node number for determinism.
    return min(counts, key=lambda n: (-counts[n], n)) if counts else None
