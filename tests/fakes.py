"""Fakes, only where the real thing cannot exist on the test machines.

FakeSubfunctions stands in for devlink subfunctions on an ``ice`` NIC with CDQ
firmware: this kernel has no devlink and the machine has no such NIC. With
``links=True`` each "subfunction" it creates is a real veth pair, so that the
rest of an allocation (XDP, UDS server) runs on a real netdev.

FakeDatapath stands in for the kernel side of a handout (XDP attach, pins, UDS
servers) so that the device rules (all-or-nothing Allocate, reclaim, reconcile,
shutdown) are tested without privileges; the real one is tested on real links.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import anyio

from afxdp.errors import DeviceError
from afxdp.inventory import NetDev


class FakeSubfunctions:
    """FAKE SecondaryDeviceProvider: records creations instead of calling devlink."""

    def __init__(
        self,
        capable_drivers: frozenset[str] = frozenset({"ice"}),
        capacity: int = 64,
        *,
        links: bool = False,
    ) -> None:
        self.capable_drivers = capable_drivers
        self.max = capacity
        self.links = links
        self.created: list[str] = []
        self.deleted: list[str] = []

    def capacity(self, primary: NetDev) -> int:
        return self.max if primary.driver in self.capable_drivers else 0

    def name(self, primary: NetDev, index: int) -> str:
        return f"{primary.name}sf{index}"

    def create(self, primary: NetDev, index: int) -> str:
        name = self.name(primary, index)
        if name in self.created:
            raise DeviceError(f"{name}: already exists")
        if self.links:
            _ip("link", "add", name, "type", "veth", "peer", "name", peer_of(name))
            for link in (name, peer_of(name)):
                _ip("link", "set", link, "up")
        self.created.append(name)
        return name

    def delete(self, name: str) -> None:
        if name in self.created:
            if self.links:
                _ip("link", "del", name)
            self.created.remove(name)
            self.deleted.append(name)


def peer_of(secondary: str) -> str:
    """The veth peer of a fake secondary (IFNAMSIZ allows the extra letter)."""
    return f"{secondary}p"


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise DeviceError(f"ip {' '.join(args)}: {done.stderr.strip()}")


class PerPod:
    """What a FAKE program of the per-pod layout answers for the map-in-map
    parts of Program: no slot, no counters."""

    carrier = None  # a program per handout

    def give(self, control_to_kernel: bool) -> Any:
        raise DeviceError("per-pod fake: no slot")

    def install(self) -> None:
        pass

    def counters(self) -> None:
        return None

    def counters_fd(self) -> None:
        return None


class FakeProgram(PerPod):
    """FAKE Program: an 'attached' program that records its detach; one
    abandoned stays on its device in ``left`` (device -> program id), where
    the next attach finds it, as the kernel keeps it attached."""

    def __init__(
        self,
        device: str,
        prog_id: int,
        log: list[str],
        left: dict[str, int] | None = None,
        replaced: int | None = None,
    ) -> None:
        self.device, self.prog_id, self._log = device, prog_id, log
        self._left = left if left is not None else {}
        self.map_fd = 1000 + prog_id
        self.mode_name = "native"
        self.replaced = replaced
        self.ifindex = 0  # not known
        self.off = False  # not on its link now: ensure_attached puts it back
        self.refused: str | None = None  # why ensure_attached cannot (another program)

    def ensure_attached(self, *, ask: bool = False) -> bool:
        if self.refused is not None:
            raise DeviceError(f"{self.device}: {self.refused}")
        again, self.off = self.off, False
        if again:
            self._log.append(f"again {self.device}")
        return again

    def detach(self) -> None:
        self._log.append(f"detach {self.device}")

    def abandon(self) -> None:
        self._log.append(f"abandon {self.device}")
        self._left[self.device] = self.prog_id


class FakeHandshake:
    """FAKE UDS server: no socket; listen/serve/close are recorded."""

    def __init__(self, netdev: str, path: Path, idle_timeout: float | None,
                 log: list[str]) -> None:  # fmt: skip
        self.netdev, self.path, self.idle_timeout, self._log = netdev, path, idle_timeout, log
        self.connections = self.active = self.refused = self.denied = self.failed = 0

    def listen(self) -> None:
        self._log.append(f"listen {self.netdev}")

    async def serve(self) -> None:
        await anyio.sleep_forever()

    def close(self, *, keep_dir: bool = False) -> None:
        self._log.append(f"close {self.netdev}")


class FakeDatapath:
    """FAKE Datapath: records every step in ``log``; ``fail_attach`` names devices
    whose attach raises, ``in_pods`` devices that are in a pod's netns."""

    layout = "per-pod"

    def __init__(self) -> None:
        self.log: list[str] = []
        self.fail_attach: set[str] = set()
        self.in_pods: set[str] = set()
        self.stale: dict[str, int] = {}
        self.gone: set[int] = set()  # program ids that no longer exist
        self._ids = 0

    def detach_stale(self, device: str) -> int | None:
        prog = self.stale.pop(device, None)
        if prog is not None:
            self.log.append(f"detach_stale {device}")
        return prog

    def detach_at(self, ifindex: int, prog_id: int | None) -> int | None:
        """Recorded ("detach_at <ifindex> <prog_id>"): the FAKE knows no ifindexes."""
        self.log.append(f"detach_at {ifindex} {prog_id}")
        return prog_id

    def attach(self, device: str) -> FakeProgram:
        """Attaches in place of a program of ours left on ``device`` ("replace")."""
        if device in self.fail_attach:
            raise DeviceError(f"{device}: attach failed (fake)")
        self._ids += 1
        replaced = self.stale.pop(device, None)
        self.log.append(f"{'attach' if replaced is None else 'replace'} {device}")
        return FakeProgram(device, self._ids, self.log, self.stale, replaced)

    def carry(self, device: str) -> FakeProgram:
        raise DeviceError("per-pod fake: no slot program")

    def adopt(self, device: str, prog_id: int) -> FakeProgram:
        if prog_id in self.gone:
            raise DeviceError(f"program {prog_id} is gone (fake)")
        self.log.append(f"adopt {device}")
        return FakeProgram(device, prog_id, self.log, self.stale)

    def ours(self, device: str) -> int | None:
        """A program of ours left on ``device`` (``stale``), unless it is in a pod."""
        return None if device in self.in_pods else self.stale.get(device)

    def pin(self, program: Any, path: Path, uid: int) -> None:
        self.log.append(f"pin {path.parent.name}")

    def unpin(self, path: Path) -> None:
        self.log.append(f"unpin {path.parent.name}")

    def in_host(self, device: str) -> bool:
        return device not in self.in_pods

    def uds_server(self, *, netdev: str, path: Path, idle_timeout: float | None,
                   **_: Any) -> FakeHandshake:  # fmt: skip
        return FakeHandshake(netdev, path, idle_timeout, self.log)


class FakeKernel:
    """FAKE Datapath that keeps the kernel's view, for the device state machine
    (test_device_machine.py): which program is attached to which link, which
    links are in the host's netns, in a pod's, or gone, which maps are pinned
    and which UDS sockets listen. It outlives an afxdpd (a restart finds what
    the last run left attached and pinned), as the kernel does.

    ``links``: name -> "up" | "down" (in our netns), "pod" (in a pod's netns),
    "gone" (no such link). ``on_remove(device, prog_id, how)`` is told each
    time afxdpd takes a program off a link (replaced, detached), at that very
    moment. ``delay`` (method name -> extra event-loop turns) is read by the
    test's stand-in for ``run_sync``, to make a call slow."""

    layout = "per-pod"

    def __init__(self, links: dict[str, str]) -> None:
        self.links = links
        self.attached: dict[str, int] = {}  # link -> program id
        self.pins: dict[str, int] = {}  # pinned map path -> program id
        self.listening: dict[str, int] = {}  # link -> UDS servers listening
        # link -> its ifindex; a link re-created under its name gets a new one
        self.ifindexes: dict[str, int] = {name: n for n, name in enumerate(links, 1)}
        self.delay: dict[str, int] = {}
        self.on_remove: Any = None
        self._ids = 0

    def recreate(self, device: str) -> int:
        """A new link under ``device``'s name: a new ifindex, nothing attached."""
        self.attached.pop(device, None)
        self.ifindexes[device] = max(self.ifindexes.values(), default=0) + 1
        return self.ifindexes[device]

    def in_host(self, device: str) -> bool:
        return self.links.get(device) in ("up", "down")

    def _here(self, device: str) -> None:
        if not self.in_host(device):
            raise DeviceError(f"{device}: no such netdev in this network namespace (fake)")

    def take_off(self, device: str, how: str) -> int | None:
        prog = self.attached.pop(device, None)
        if prog is not None and self.on_remove is not None:
            self.on_remove(device, prog, how)
        return prog

    def detach_stale(self, device: str) -> int | None:
        self._here(device)
        return self.take_off(device, "detach_stale")

    def detach_at(self, ifindex: int, prog_id: int | None) -> int | None:
        """By the link's ifindex, whatever its name (only ours: prog_id, or any)."""
        for link, index in self.ifindexes.items():
            on = self.attached.get(link)
            if index == ifindex and self.in_host(link) and on is not None \
                    and prog_id in (None, on):  # fmt: skip
                return self.take_off(link, "detach_at")
        return None

    def attach(self, device: str) -> KernelProgram:
        self._here(device)
        replaced = self.take_off(device, "replaced by attach")
        self._ids += 1
        self.attached[device] = self._ids
        return KernelProgram(self, device, self._ids, replaced)

    def carry(self, device: str) -> KernelProgram:
        raise DeviceError("per-pod fake: no slot program")

    def adopt(self, device: str, prog_id: int) -> KernelProgram:
        if prog_id not in self.attached.values():
            raise DeviceError(f"program {prog_id} is gone (fake)")
        return KernelProgram(self, device, prog_id, None, adopted=True)

    def ours(self, device: str) -> int | None:
        return self.attached.get(device) if self.in_host(device) else None

    def pin(self, program: Any, path: Path, uid: int) -> None:
        self.pins[str(path)] = program.prog_id

    def unpin(self, path: Path) -> None:
        self.pins.pop(str(path), None)

    def uds_server(self, *, netdev: str, path: Path, idle_timeout: float | None,
                   **_: Any) -> KernelHandshake:  # fmt: skip
        return KernelHandshake(self, netdev, path, idle_timeout)


class KernelProgram(PerPod):
    """FAKE Program on a FakeKernel. ``detach`` takes it off only when it is
    still the one attached and its link is in our netns (as the kernel's
    expected-fd detach); an adopted one's detach is ``detach_stale`` by the
    link's name, as the real ``_Adopted`` does."""

    def __init__(self, kernel: FakeKernel, device: str, prog_id: int, replaced: int | None,
                 *, adopted: bool = False) -> None:  # fmt: skip
        self.kernel, self.device, self.prog_id, self.replaced = kernel, device, prog_id, replaced
        self.adopted = adopted
        self.map_fd = 1000 + prog_id
        self.mode_name = "adopted" if adopted else "native"
        # The link it is on (0: not known, as an adopted one's until asked).
        self.ifindex = 0 if adopted else kernel.ifindexes[device]

    def ensure_attached(self, *, ask: bool = False) -> bool:
        """As the real one: on its link already, or attached again on a link
        re-created under the name; another program there is refused."""
        kernel = self.kernel
        if not ask and self.ifindex and kernel.ifindexes.get(self.device) == self.ifindex:
            return False
        kernel._here(self.device)
        on = kernel.attached.get(self.device)
        if on == self.prog_id:
            self.ifindex = kernel.ifindexes[self.device]
            return False
        if on is not None:
            raise DeviceError(f"{self.device}: another program ({on}) is attached (fake)")
        kernel.attached[self.device] = self.prog_id
        self.ifindex = kernel.ifindexes[self.device]
        return True

    def detach(self) -> None:
        if not self.kernel.in_host(self.device):
            return  # the real one's DeviceError is swallowed: nothing of ours to reach
        if self.adopted:
            self.kernel.take_off(self.device, "adopted program's detach (by name)")
        elif self.kernel.attached.get(self.device) == self.prog_id:
            self.kernel.take_off(self.device, "detach")

    def abandon(self) -> None:
        pass  # stays attached: the kernel keeps it


class KernelHandshake(FakeHandshake):
    """FAKE UDS server that counts, per link, the servers listening."""

    def __init__(self, kernel: FakeKernel, netdev: str, path: Path,
                 idle_timeout: float | None) -> None:  # fmt: skip
        super().__init__(netdev, path, idle_timeout, [])
        self.kernel = kernel
        self.open = False

    def listen(self) -> None:
        self.open = True
        self.kernel.listening[self.netdev] = self.kernel.listening.get(self.netdev, 0) + 1

    def close(self, *, keep_dir: bool = False) -> None:
        if self.open:
            self.open = False
            self.kernel.listening[self.netdev] -= 1


class FakeCarrier(FakeProgram):
    """FAKE map-in-map device program (``FakeSlotDatapath``): ``give`` makes
    a FakeGiven; detach and abandon are recorded."""

    def __init__(self, datapath: FakeSlotDatapath, device: str, prog_id: int) -> None:
        super().__init__(device, prog_id, datapath.log)
        self.datapath = datapath

    def give(self, control_to_kernel: bool) -> FakeProgram:
        self._log.append(f"give {self.device}")
        return FakeGiven(self)


class FakeGiven(FakeProgram):
    """FAKE pod's slot: ``install`` waits for its device's gate (a
    threading.Event in ``FakeSlotDatapath.gates``, when there is one) and
    fails for devices in ``fail_install``; ``detach`` takes it back."""

    def __init__(self, carrier: FakeCarrier) -> None:
        super().__init__(carrier.device, carrier.prog_id, carrier._log)
        self._carrier = carrier
        self.map_fd = 5000 + len(carrier._log)

    @property
    def carrier(self) -> FakeCarrier:  # type: ignore[override]
        return self._carrier

    def install(self) -> None:
        gate = self._carrier.datapath.gates.get(self.device)
        if gate is not None and not gate.wait(10):
            raise AssertionError("the gate never opened")
        if self.device in self._carrier.datapath.fail_install:
            raise DeviceError(f"{self.device}: the map of maps refused the update (fake)")
        self._log.append(f"install {self.device}")

    def detach(self) -> None:
        self._log.append(f"take back {self.device}")

    def abandon(self) -> None:
        self._log.append(f"leave slot {self.device}")


class FakeSlotDatapath(FakeDatapath):
    """FAKE Datapath of the map-in-map layout: ``carry`` puts a program on a
    device ("carry"), its ``give`` a map for the pod ("give"), installed in
    the background ("install"), taken back at release ("take back")."""

    layout = "map-in-map"

    def __init__(self) -> None:
        super().__init__()
        self.gates: dict[str, Any] = {}  # device -> threading.Event its installs wait for
        self.fail_install: set[str] = set()

    def carry(self, device: str) -> FakeProgram:
        if device in self.fail_attach:
            raise DeviceError(f"{device}: attach failed (fake)")
        self._ids += 1
        self.log.append(f"carry {device}")
        return FakeCarrier(self, device, self._ids)
