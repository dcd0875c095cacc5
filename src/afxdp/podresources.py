"""Who holds a device: kubelet's PodResources API (DESIGN.md 3.2).

The UDS server uses it to check that a client's hostname is the pod that was
given the device. Who holds a device is known before its pod connects: from a
List right after Allocate (``prefetch``), or from the CNI ADD that moved the
device into its pod (``attached``); a handshake of that pod is answered from
memory, any other asks kubelet. A fresh channel per question: kubelet
restarts, and these questions are rare.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import anyio
from grpclib.client import Channel

from afxdp.deviceplugin.podresources import api_grpc, api_pb2
from afxdp.logsetup import about
from afxdp.uds.handshake import HostCheck, hostname_matches

log = logging.getLogger(__name__)

TIMEOUT = 2.5  # per attempt
ATTEMPTS = 2
PREFETCH_FOR = 10.0  # how long after Allocate to keep asking who holds the device
FIRST_ASK = 0.05  # the first List after an Allocate (kubelet lists the pod right after it)
SLOWEST_ASK = 1.0  # the longest wait between two Lists while devices wait


class PodResourcesChecker:
    """Answers "is ``hostname`` the pod holding ``device`` of ``resource``?"."""

    def __init__(self, socket_path: Path, timeout: float = TIMEOUT) -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        # (resource, device) -> names of the pods kubelet last said hold it, or
        # the pod the CNI ADD named (``attached``) until kubelet speaks again. A
        # handshake whose hostname matches needs no live lookup; any other asks
        # kubelet. An entry goes when the allocation ends (``forget``), so it
        # never vouches for a pod that no longer holds the device.
        self._holders: dict[tuple[str, str], frozenset[str]] = {}
        # A List answer is kubelet's word as of when the List began: it must not
        # bring back a holder forgotten, or drop a pod attached, meanwhile. Each
        # forget/attached is an era; a device changed in an era later than a
        # List's beginning keeps what it has when that List answers.
        self._era = 0
        self._changed: dict[str, int] = {}  # device -> its last era, while Lists are out
        self._asked: list[int] = []  # the era each List under way began in
        self.lookups = 0  # live PodResources calls (status, tests)
        # Devices whose holder a prefetch waits for: (resource, device) -> (when
        # it began, when to give up). One task asks for all of them (_asking).
        self._waiting: dict[tuple[str, str], tuple[float, float]] = {}
        self._asking = False
        self._wake = anyio.Event()  # set when a device joins the wait

    async def list_pods(self) -> api_pb2.ListPodResourcesResponse:
        channel = Channel(path=str(self.socket_path))
        try:
            stub = api_grpc.PodResourcesListerStub(channel)
            return await stub.List(api_pb2.ListPodResourcesRequest(), timeout=self.timeout)
        finally:
            channel.close()

    async def _pods(self) -> api_pb2.ListPodResourcesResponse | None:
        """The pods kubelet knows, or None (logged) when it cannot be asked; what
        it says becomes the holders of every device not changed meanwhile."""
        self.lookups += 1
        began = self._era
        self._asked.append(began)
        try:
            pods = await self._ask()
            if pods is not None:
                self._learn(pods, began)
            return pods
        finally:
            self._asked.remove(began)
            if not self._asked:  # no answer older than a change is still to come
                self._changed.clear()

    async def _ask(self) -> api_pb2.ListPodResourcesResponse | None:
        for attempt in range(ATTEMPTS):
            try:
                pods = await self.list_pods()
                break
            except Exception as exc:
                # Seen under load: one call on a fresh channel that never gets its
                # answer while kubelet answers every other one; and grpclib raising
                # AttributeError from a connection kubelet dropped mid-call. One
                # more try, on a new channel, before saying kubelet cannot say.
                if attempt + 1 == ATTEMPTS:
                    log.warning("pod resources lookup at %s failed: %s", self.socket_path, exc)
                    return None
        return pods

    def _learn(self, pods: api_pb2.ListPodResourcesResponse, began: int) -> None:
        """Kubelet's answer to a List begun in era ``began``: the holders of
        every device, but those forgotten or attached since (their news is newer)."""
        newer = {device for device, era in self._changed.items() if era > began}
        holders: dict[tuple[str, str], set[str]] = {}
        for pod in pods.pod_resources:
            for container in pod.containers:
                for devs in container.devices:
                    for dev_id in devs.device_ids:
                        if dev_id not in newer:
                            holders.setdefault((devs.resource_name, dev_id), set()).add(pod.name)
        kept = {k: v for k, v in self._holders.items() if k[1] in newer}
        self._holders = {**{k: frozenset(v) for k, v in holders.items()}, **kept}

    def _change(self, device: str) -> None:
        self._era += 1
        if self._asked:  # only a List under way can bring an answer older than this
            self._changed[device] = self._era

    def forget(self, device: str) -> None:
        """The allocation of ``device`` ended: vouch for no pod of it any more."""
        self._change(device)
        self._holders = {k: v for k, v in self._holders.items() if k[1] != device}
        self._waiting = {k: v for k, v in self._waiting.items() if k[1] != device}

    def attached(self, resource: str, device: str, pod: str) -> None:
        """The CNI ADD moved ``device`` into pod ``pod`` (the runtime's
        K8S_POD_NAME): its holder, so that pod's first handshake need not wait
        for kubelet. Kubelet's word comes first: a pod other than those kubelet
        already named for this allocation is not vouched for (its handshake asks
        kubelet), and the next List begun after this replaces it."""
        key = (resource, device)
        known = self._holders.get(key)
        if known is not None and pod not in known:
            log.info("the CNI ADD of %s names pod %r, kubelet lists %s as its holder: "
                     "kubelet answers that pod's handshake", device, pod, sorted(known),
                     extra=about(device=device))  # fmt: skip
            return
        self._change(device)
        self._holders = {**self._holders, key: frozenset({pod})}
        # Placed: the prefetch need not ask kubelet about it (a List, parsing
        # every pod of the node on the event loop, as the pod's handshake comes).
        self._waiting = {k: v for k, v in self._waiting.items() if k != key}

    async def prefetch(self, resource: str, device: str, deadline: float = PREFETCH_FOR) -> None:
        """Learn who holds ``device`` before its pod connects: kubelet lists a pod
        once it is admitted, right after Allocate. Gives up quietly at ``deadline``.

        One task asks for every device that waits (the first prefetch's; later
        ones join its wait and return): a List FIRST_ASK after the latest
        Allocate, then less often as the wait grows (doubling, up to
        SLOWEST_ASK). A burst of Allocates (a Deployment scaled up) asks kubelet
        at most every FIRST_ASK, not once per pod: each List parses every pod
        of the node, on the event loop that serves the next Allocate."""
        key = (resource, device)
        if key in self._holders:
            return
        now = anyio.current_time()
        self._waiting[key] = (now, now + deadline)
        if self._asking:
            self._wake.set()  # asked about FIRST_ASK from now, not at the next slow turn
            return
        self._asking = True
        try:
            while self._waiting:
                newest = max(began for began, _ in self._waiting.values())
                wait = anyio.current_time() - newest  # as long again as waited so far
                await self._until(anyio.current_time() + min(max(wait, FIRST_ASK), SLOWEST_ASK))
                if not self._waiting:  # every device's pod placed meanwhile (``attached``)
                    break
                await self._pods()
                now = anyio.current_time()
                self._waiting = {k: (began, end) for k, (began, end) in self._waiting.items()
                                 if k not in self._holders and end > now}  # fmt: skip
        finally:
            self._asking = False

    async def _until(self, due: float) -> None:
        """Sleep until ``due``, or FIRST_ASK after a device joins the wait."""
        while (left := due - anyio.current_time()) > 0:
            self._wake = anyio.Event()
            with anyio.move_on_after(left):
                await self._wake.wait()
            if self._wake.is_set():
                due = min(due, anyio.current_time() + FIRST_ASK)

    async def held(self) -> dict[str, set[str]] | None:
        """Device IDs that pods hold, by resource; None when kubelet cannot say."""
        pods = await self._pods()
        if pods is None:
            return None
        out: dict[str, set[str]] = {}
        for pod in pods.pod_resources:
            for container in pod.containers:
                for devs in container.devices:
                    out.setdefault(devs.resource_name, set()).update(devs.device_ids)
        return out

    async def stale(self, resource: str, devices: Sequence[str]) -> list[str]:
        """Those of ``devices`` that no pod holds; none when kubelet cannot say."""
        held = await self.held()
        if held is None:
            return []
        return [d for d in devices if d not in held.get(resource, set())]

    async def check(self, hostname: str, *, resource: str, device: str) -> HostCheck:
        cached = self._holders.get((resource, device), frozenset())
        if any(hostname_matches(hostname, pod) for pod in cached):
            return HostCheck.OK  # no wait on kubelet
        pods = await self._pods()
        if pods is None:
            return HostCheck.ERROR
        for pod in pods.pod_resources:
            if not hostname_matches(hostname, pod.name):
                continue
            for container in pod.containers:
                for devs in container.devices:
                    if devs.resource_name == resource and device in devs.device_ids:
                        return HostCheck.OK
        log.info("refused %r: no pod of that name holds %s device %s", hostname, resource, device,
                 extra=about(device=device))  # fmt: skip
        return HostCheck.REFUSED
