"""The status document: what afxdpd serves on its control socket, as typed structs.

afxdpd builds a ``Status`` and the control socket sends it as JSON; ``afxdpctl
status`` (and anything else that reads it) decodes the JSON back into the same
structs, so a field is named once, here, and never read back by a string key.

Compatibility, both ways: a field added later has a default (None, or an empty
value), so the document of an older afxdpd still decodes; fields this version
does not know are ignored (msgspec's default), so an older afxdpctl reads a
newer afxdpd. No I/O here.
"""

from __future__ import annotations

from collections.abc import Iterable

import msgspec

from afxdp.jsondepth import too_deep

HEALTHY, UNHEALTHY = "Healthy", "Unhealthy"  # kubelet's words (DESIGN.md 3.1)


class FdLimit(msgspec.Struct):
    """RLIMIT_NOFILE of the afxdpd process."""

    soft: int
    hard: int


class WorkerUsage(msgspec.Struct):
    """One kind of blocking work (``workers.Work``): threads allowed and in use."""

    limit: int
    busy: int


class ServerCounts(msgspec.Struct):
    """A server's connections (``unixserver.ServerStats``)."""

    served: int = 0
    refused: int = 0
    failed: int = 0
    accept_errors: int = 0
    active: int = 0
    evicted: int = 0


class UdsBudget(msgspec.Struct):
    """The node-wide bound on open UDS connections (``uds.server.ConnectionBudget``)."""

    limit: int
    active: int
    refused: int


class PodRef(msgspec.Struct, frozen=True):
    """The pod a device was handed to; the namespace is unknown when only the
    pod's name is known (PodResources' holders cache keeps names only)."""

    name: str
    namespace: str | None = None

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}" if self.namespace else self.name


class QueueFrames(msgspec.Struct):
    """Frames our XDP program gave a verdict on at one queue of a device,
    since the program was loaded (``frames.DeviceFrames``)."""

    queue: int
    redirected: int = 0  # to the pod's AF_XDP socket
    no_socket: int = 0  # no socket bound on the queue (or no pod's map): to the kernel
    control: int = 0  # ARP or IPv6 neighbour discovery (controlFramesToKernel): to the kernel

    @classmethod
    def of(cls, counts: dict[tuple[int, str], int]) -> list[QueueFrames]:
        by_queue: dict[int, dict[str, int]] = {}
        for (queue, action), n in counts.items():
            by_queue.setdefault(queue, {})[action] = n
        return [msgspec.convert({"queue": q, **a}, cls) for q, a in sorted(by_queue.items())]


class DeviceStatus(msgspec.Struct):
    """One device of a pool. ``state``: free, allocated, unhealthy or unknown (whether a pod
    holds it, while kubelet has not said: ``pools.DeviceState``)."""

    id: str
    state: str
    numa: int | None = None
    parent: str | None = None  # a cdq secondary's primary netdev
    fault: str | None = None  # why a device with a good link cannot be handed out
    health: str | None = None  # HEALTHY or UNHEALTHY: what kubelet is told
    pod: PodRef | None = None  # who holds it, when known
    prepared: bool = False  # a free device already carrying a fresh program of ours
    # That prepared program: its attach mode (native or generic) and id. An
    # allocated device's are in its AllocationStatus.
    xdp_mode: str | None = None
    xdp_prog_id: int | None = None
    # What its XDP program counted, by queue (queues it saw frames on); None:
    # its program counts nothing (per-pod layout), or it carries none.
    xdp_frames: list[QueueFrames] | None = None


class PoolStatus(msgspec.Struct):
    resource: str  # afxdp/<pool>
    mode: str  # primary or cdq
    registered: bool  # with kubelet, now
    registrations: int = 0  # how many times (kubelet restarts make it more than one)
    devices: list[DeviceStatus] = msgspec.field(default_factory=list)
    name: str | None = None  # the config's pool name; older afxdpd: see ``label``
    # Removed by a reload, its allocated devices not yet released: unregistered
    # on purpose, so it does not make the node unready.
    draining: bool = False
    # How kubelet is offered the pool: "devicePlugin" or "dra" (config.Pool.api);
    # a dra pool is registered when the DRA driver is.
    api: str = "devicePlugin"

    @property
    def label(self) -> str:
        """The pool's name (from the resource name when an older afxdpd left it out)."""
        return self.name or self.resource.rpartition("/")[2]


class AllocationStatus(msgspec.Struct):
    """What is set up for one handed-out device (``handouts.Handout``)."""

    pool: str
    device: str
    xdp_mode: str | None = None  # the attach mode: native or generic; None: no program
    xdp_prog_id: int | None = None
    uds_socket: str | None = None  # host path; None when the pool has no UDS server
    uds_connections: int = 0  # handshake connections accepted so far
    uds_active: int = 0  # open now
    uds_refused: int = 0
    uds_denied: int = 0
    uds_failed: int = 0
    uds_idle_timeout: float | None = None
    pinned_map: str | None = None  # host path of the pinned XSKMAP (pinned-map pools)
    # Taken over from kubelet's word after the state record was lost, while the
    # device was in its pod: its program and map are not known to afxdpd.
    setup_unknown: bool = False
    # Why the program is not on the device now (its link was deleted, ...);
    # None: it is, or there is none.
    xdp_fault: str | None = None


class ClaimStatus(msgspec.Struct):
    """A ResourceClaim prepared on this node (``dra.claims.PreparedClaim``)."""

    uid: str
    namespace: str
    name: str
    devices: list[str] = msgspec.field(default_factory=list)  # "<pool>/<netdev>"
    pods: list[str] = msgspec.field(default_factory=list)  # reservedFor, "namespace/name"


class DraStatus(msgspec.Struct):
    """The DRA driver's registration with kubelet (``dra.registration``)."""

    driver: str
    registered: bool
    registrations: int = 0
    error: str = ""  # kubelet's reason when it refused the driver
    socket: str = ""  # the registration socket
    endpoint: str = ""  # the DRA service's socket


class Status(msgspec.Struct):
    """The whole document."""

    node: str
    ready: bool  # serving: every part started (registration is per pool)
    fd_limit: FdLimit | None = None
    workers: dict[str, WorkerUsage] = msgspec.field(default_factory=dict)
    servers: dict[str, ServerCounts] = msgspec.field(default_factory=dict)
    uds_budget: UdsBudget | None = None
    pools: list[PoolStatus] = msgspec.field(default_factory=list)
    allocations: list[AllocationStatus] = msgspec.field(default_factory=list)
    # CNI DELs the shim queued while afxdpd was down, not (yet) replayed; None:
    # an afxdpd that does not say.
    queued_dels: int | None = None
    # Objects set aside from the garbage collector once ready (gc.freeze); 0: none.
    gc_frozen: int = 0
    # The collector is off while afxdpd starts, on again once ready (or a minute on).
    gc_enabled: bool = True
    dra: DraStatus | None = None  # None: no pool is offered through DRA
    claims: list[ClaimStatus] = msgspec.field(default_factory=list)
    # The datapath layout (map-in-map or per-pod) and why; None: an older afxdpd.
    datapath: str | None = None
    datapath_reason: str | None = None

    def unready_reasons(self) -> list[str]:
        """Why this node cannot take pods yet; empty when it can.

        Ready means serving and every pool registered with kubelet: what
        ``/readyz`` says too, so ``afxdpctl status`` can be an exec probe.
        """
        reasons = [] if self.ready else ["afxdpd is still starting"]
        waiting = [p.resource for p in self.pools if not (p.registered or p.draining)]
        if waiting:
            reasons.append("not registered with kubelet: " + ", ".join(waiting))
        return reasons

    def allocation(self, device: str) -> AllocationStatus | None:
        return next((a for a in self.allocations if a.device == device), None)


def encode(status: Status) -> bytes:
    return msgspec.json.encode(status)


class NotStatus(Exception):
    """Bytes that are not a status document (what answered is not afxdpd)."""


def decode(data: bytes) -> Status:
    """The status document in ``data``, or NotStatus saying why not.

    UTF-8 and nesting are checked here, before the decoder: for a bad byte
    msgspec raises UnicodeDecodeError before 0.23 (DecodeError since), and for
    deep nesting RecursionError; neither would be NotStatus by itself.
    """
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise NotStatus(f"not UTF-8 (byte {exc.start})") from None
    if (deep := too_deep(data)) is not None:
        raise NotStatus(str(deep))
    try:
        return msgspec.json.decode(data, type=Status)
    except msgspec.MsgspecError as exc:  # not JSON, or JSON but not a Status
        raise NotStatus(str(exc)) from None


def pod_from_cni_args(cni_args: str) -> PodRef | None:
    """The pod named in a CNI request's ``CNI_ARGS`` (Kubernetes runtimes add
    ``K8S_POD_NAMESPACE`` and ``K8S_POD_NAME``); None when it names none.

    Lenient on purpose: a status report must not fail on an odd entry, which
    the CNI handler already refused or accepted when the request came.
    """
    args = dict(p.partition("=")[::2] for p in cni_args.split(";") if "=" in p)
    name = args.get("K8S_POD_NAME")
    if not name:
        return None
    return PodRef(name=name, namespace=args.get("K8S_POD_NAMESPACE") or None)


def pods_by_device(attachments: Iterable[tuple[str, dict[str, str]]]) -> dict[str, PodRef]:
    """Device -> pod, from the CNI attachments' (device, ADD env) pairs."""
    out: dict[str, PodRef] = {}
    for device, env in attachments:
        pod = pod_from_cni_args(env.get("CNI_ARGS", ""))
        if pod is not None:
            out[device] = pod
    return out
