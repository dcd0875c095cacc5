"""The soak: many pod lifecycles through afxdpd, then nothing may be left (issue 8).

afxdpd runs as its own process (its fds, threads and RSS are read from
/proc/<pid>), with its own dirs under a temp dir. The grpcio kubelet double
(tests/kubelet.py) plays kubelet; the CNI goes through the real static shim
(installed as ``afxdpctl install-cni --allow-dir`` does) with host-local IPAM
from /usr/lib/cni. The pool has one veth "NIC" per worker; each NIC's peer sits
in a wire netns.

One lifecycle, on its worker's NIC: Allocate (which reclaims the NIC from the
previous, forgotten pod: allocations are kubelet's to end) -> PodResources lists
the pod -> the pod's netns -> shim ADD -> the UDS handshake as the pod (connect
with its name, version, xsk_map_fd, fin) -> shim DEL (the NIC is home again) ->
netns deleted -> kubelet forgets the pod. A failure names the lifecycle and step.

Lifecycles run in ten phases; between phases nothing is in flight and afxdpd's
fds, threads and RSS are sampled, so every sample sees the same state (each NIC
allocated to a forgotten pod). The last sample may exceed the first (after 10 %)
by at most the stated bounds. At the end afxdpd gets SIGTERM and must exit 0;
then no XDP program, pin, socket, stray netns or host-local lease may be left,
every NIC must be on the host and the CNI attachment record must be empty.

With ``--slowloris N`` (40 by default; 0 serves no metrics) afxdpd also serves
its metrics port, and N slow clients (tests/slowloris.py: a request line, then a
byte a second, back at once when cut off) keep taking every slot of it, and
/healthz and /readyz are probed as kubelet does, every half second with its 1 s
deadline, throughout (issue 19): one probe that is not a 200 in time fails the
soak. The clients leave for each sample (so afxdpd's fds are counted without
them) and afxdpd must have closed its side of every one of their connections
within 5 s; then they come back, all of them, before a probe is made again.

Who holds what (issue 19, attack 1): in each lifecycle a second Allocate of the
device, while kubelet lists its pod, must be refused; and afxdpd's status, read
every 0.2 s throughout, may never show a device with a pod the soak did not
hand it to, nor free while kubelet lists its pod, nor the pool changed.

With ``--reloads-per-second R`` (10 by default; 0: none) a reloader rewrites
the config and sends afxdpd SIGHUP meanwhile, up to R times a second, one
reload at a time: valid configs (the same pool and devices, all else at
random), renamed into place or written in place, sometimes torn (truncated,
SIGHUP, then written), and invalid ones (not JSON, not UTF-8, a bad value at a
JSON path, no file). After a valid one no reload may be refused, after an
invalid one none applied (see "reloads while pods come and go" below).

usage: python -m tests.soak [--lifecycles N] [--concurrency C] [--slowloris N]
[--reloads-per-second R] [--seed S]; prints a JSON summary.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import math
import os
import random
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AsyncExitStack, suppress
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Any

import anyio
import grpc
from anyio.abc import Process, TaskGroup, TaskStatus

from afxdp import config, metrics
from afxdp.bpf import libbpf, pinning
from afxdp.cni import shim
from afxdp.cni.attachments import AttachmentStore
from afxdp.control import fetch_status
from afxdp.demo.lab import LabError, ip, wait_for
from afxdp.demo.story import cleanup_stack
from afxdp.deviceplugin.v1beta1 import api_pb2 as dp
from afxdp.errors import ConfigError
from afxdp.status import Status
from afxdp.uds.client import AsyncUdsClient, Request, pod_socket_path
from afxdp.workers import Work, run_program, run_sync
from tests.kubelet import FakeKubelet, PluginClient
from tests.slowloris import Prober, Slowloris, get

POOL = "soak"
RESOURCE = f"afxdp/{POOL}"
NETWORK = "afxdp-soak"  # the netconf's name: host-local keeps its leases under it
SUBNET = "10.97.0"
CNI_PATH = Path("/usr/lib/cni")
START_TIMEOUT = 30.0  # afxdpd registered and its sockets up (2 shared cores)
STOP_TIMEOUT = 20.0  # afxdpd gone after SIGTERM
CNI_TIMEOUT = 30.0  # one shim call (afxdpd's own IPAM limit is 60 s)
UDS_TIMEOUT = 10.0  # one handshake reply (afxdpd asks kubelet with a 5 s timeout)
PHASES = 10  # samples after every 10 % of the lifecycles
SLOWLORIS = metrics.MAX_CLIENTS + 8  # the clients of the report (issue 19)


RELOADS_PER_SECOND = 10.0  # the reloader's pace: a SIGHUP every 50 to 150 ms
RELOAD_TIMEOUT = 15.0  # every reload under way answered (one waits for an Allocate)
HOLDERS_EVERY = 0.2  # seconds between two reads of the status, to check its holders
# What a pool's udsTimeout may be in the valid configs (seconds; -1: no
# timeout, 0: the default), and so the only idle timeouts a handout may get.
UDS_TIMEOUTS = (-1, 0, 30, 60, 300)
IDLE_TIMEOUTS = {None, float(config.UDS_TIMEOUT_DEFAULT), 30.0, 60.0, 300.0}


class SoakError(Exception):
    """The soak found a failure, a leak or growth; the message says which."""


class StepFailed(SoakError):
    """One lifecycle failed at ``step``."""

    def __init__(self, number: int, pod: str, device: str, step: str, exc: BaseException):
        self.device = device
        detail = f"{type(exc).__name__}: {exc}".strip()
        super().__init__(
            f"lifecycle {number} (pod {pod}, device {device}): {step} failed: {detail}"
        )


@dataclass(frozen=True)
class Sample:
    """afxdpd's resources after ``after`` lifecycles, with none in flight."""

    after: int
    fds: int
    threads: int
    rss_kib: int


def sample(pid: int, after: int) -> Sample:
    status = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return Sample(
        after=after,
        fds=len(os.listdir(f"/proc/{pid}/fd")),
        threads=int(status["Threads"]),
        rss_kib=int(status["VmRSS"].split()[0]),
    )


def connections_on(pid: int, port: int) -> int:
    """How many of ``pid``'s fds are TCP connections on its local ``port`` (its
    listener not counted)."""
    sockets = set()
    for table in ("tcp", "tcp6"):
        lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        for fields in (line.split() for line in lines):
            local, state, inode = fields[1], fields[3], fields[9]
            if int(local.rsplit(":", 1)[1], 16) == port and state != "0A":  # 0A: LISTEN
                sockets.add(f"socket:[{inode}]")
    found = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with suppress(FileNotFoundError):  # closed since listed
            found += os.readlink(f"/proc/{pid}/fd/{fd}") in sockets
    return found


@dataclass(frozen=True)
class Bounds:
    """How much the last sample may exceed the one after the first 10 % (RSS:
    the median of the last three, the first three's; ``growth``).

    fds: the same allocations are live at every sample, so a lasting increase
    is a leak; the margin covers a gRPC or PodResources connection caught
    opening. threads: anyio's worker threads come and go with load (idle ones
    end after 10 s), within the fixed limits of afxdp.workers. RSS: the
    allocator's caches settle; the issue's bound for 1,000 lifecycles is 5 %.
    """

    fds: int = 4
    threads: int = 8
    rss_percent: float = 5.0


@dataclass
class Summary:
    lifecycles: int
    concurrency: int
    seconds: float
    rate_per_s: float
    bounds: dict[str, float]
    samples: list[Sample]
    watch_updates: int
    slowloris: int = 0  # clients on the metrics port during every phase
    slowloris_connections: int = 0
    probes: int = 0  # of /healthz and /readyz, each to be a 200 within 1 s
    probes_failed: list[str] = field(default_factory=list)  # the first 10
    probe_failures: int = 0
    slowest_probe_s: float = 0.0
    # Who held what (issue 19): each lifecycle's Allocate and ADD answered OK,
    # and a second Allocate of its device, while its pod held it, refused.
    allocates_ok: int = 0
    adds_ok: int = 0
    second_allocates_refused: int = 0
    allocate_results: dict[str, int] = field(default_factory=dict)  # afxdpd's count, by result
    holder_checks: int = 0  # status documents checked against the soak's record
    holder_problem_count: int = 0
    holder_problems: list[str] = field(default_factory=list)  # the first 10
    # The reloads: SIGHUPs sent (by what was written before), and afxdpd's counts.
    seed: int = 0  # of the reloader's choices
    reloads_per_second: float = 0.0  # the pace asked for
    reloads: int = 0
    reloads_written: dict[str, int] = field(default_factory=dict)
    reloads_applied: int = 0
    reloads_refused: int = 0
    reloads_by_watch: int = 0  # begun by afxdpd's file watch, seeing the writes
    reloads_torn: dict[str, int] = field(default_factory=dict)  # of the torn steps, by result
    reload_problems: list[str] = field(default_factory=list)
    scrapes: int = 0  # of /metrics, by the reloader, to be answered as the probes are
    scrape_failures: list[str] = field(default_factory=list)  # the first 10
    scrape_failure_count: int = 0
    afxdpd_exit: int | None = None
    leaks: list[str] = field(default_factory=list)
    growth: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def growth(samples: Sequence[Sample], bounds: Bounds) -> list[str]:
    """What grew past ``bounds`` from the first sample to the last. RSS is
    compared as the median of the first three samples and of the last three:
    one sample can catch the heap between the service's trims (a 40 MB spike
    was seen once), while a leak raises every later sample."""
    first, last = samples[0], samples[-1]
    found = []
    if len(samples) >= 6:
        first = replace(first, rss_kib=statistics.median_low(s.rss_kib for s in samples[:3]))
        last = replace(last, rss_kib=statistics.median_low(s.rss_kib for s in samples[-3:]))
    if last.fds > first.fds + bounds.fds:
        found.append(f"fds {first.fds} after {first.after} -> {last.fds} after {last.after}")
    if last.threads > first.threads + bounds.threads:
        found.append(
            f"threads {first.threads} after {first.after} -> {last.threads} after {last.after}"
        )
    if last.rss_kib > first.rss_kib * (1 + bounds.rss_percent / 100):
        pct = (last.rss_kib / first.rss_kib - 1) * 100
        found.append(f"RSS {first.rss_kib} KiB after {first.after} -> {last.rss_kib} KiB "
                     f"after {last.after} (+{pct:.1f} %, bound {bounds.rss_percent:g} %)")  # fmt: skip
    return found


def checkpoints(lifecycles: int) -> list[int]:
    """The lifecycle counts after which to sample: every 10 %, and the end."""
    return sorted({math.ceil(lifecycles * k / PHASES) for k in range(1, PHASES + 1)} - {0})


def host_socket(answer: dp.ContainerAllocateResponse, device: str) -> Path:
    """Where the pod's /tmp/afxdp_dp/<device>/afxdp.sock is on the host, from
    Allocate's mounts (a directory mount or the socket itself)."""
    inside = PurePosixPath(pod_socket_path(device))
    for mount in answer.mounts:
        target = PurePosixPath(mount.container_path)
        if target == inside or target in inside.parents:
            return Path(mount.host_path) / inside.relative_to(target)
    raise SoakError(f"Allocate of {device} mounts nothing at {inside}: {list(answer.mounts)}")


# --- reloads while pods come and go (issue 19) ------------------------------
#
# A reload must never change who holds a device (only kubelet's word does), and
# one afxdpd refuses keeps the running config. The reloader rewrites the config
# file and sends SIGHUP, one reload at a time, as fast as afxdpd answers up to
# its pace: valid configs (the soak's pool and devices, all else at random:
# udsTimeout, logLevel, the devices' order, how keys are spelled, an unknown
# key, the layout), written as an operator's tool does (a rename) or in place
# (truncate and write), and invalid ones (not JSON, cut short, not UTF-8, a bad
# value at a JSON path, no file at all). A "torn" write truncates the file,
# sends SIGHUP and then writes: the reload may read it empty, half or whole,
# and must refuse or apply it cleanly.
#
# afxdpd's file watch reloads too when it sees the file change. To know what
# each reload read, the reloader waits before and after each SIGHUP until every
# reload begun has been answered: afxdpd logs "SIGHUP: reloading" or "...
# changed; reloading" before a reload and counts it (afxdp_config_reloads_total,
# ok or invalid) when done, so "answered == SIGHUPs sent + watch lines logged"
# (the counters read first, then the log) means none is under way. Every reload
# answered between the two waits read what the reloader wrote: after a valid
# write none may be refused, after an invalid one none applied.

RELOAD_KINDS = {  # what a reloader step writes, and how often
    "valid, renamed": 4,
    "valid, in place": 2,
    "valid, torn": 2,
    "invalid": 5,
    "missing": 1,
}


def _spell(rng: random.Random, key: str) -> str:
    """``key`` as a user may spell it: afxdpd matches keys case-insensitively."""
    return rng.choice([key, key[0].upper() + key[1:], key.lower()])


def _set(obj: dict[str, Any], key: str, value: Any) -> None:
    """Set ``key`` however ``obj`` spells it (else add it)."""
    found = [k for k in obj if k.lower() == key.lower()]
    obj[found[0] if found else key] = value


def valid_config(rng: random.Random, devices: Sequence[str]) -> dict[str, Any]:
    """A config afxdpd must apply without changing who holds what: the soak's
    pool with its devices; what it sets at random decides nothing about holders."""
    pool: dict[str, Any] = {
        _spell(rng, "name"): POOL,
        _spell(rng, "mode"): "primary",
        _spell(rng, "devices"): [{"name": d} for d in rng.sample(list(devices), len(devices))],
    }
    if rng.random() < 0.8:
        pool[_spell(rng, "udsTimeout")] = rng.choice(UDS_TIMEOUTS)
    doc: dict[str, Any] = {_spell(rng, "pools"): [pool]}
    if rng.random() < 0.8:
        # Levels that keep afxdpd's info lines: the reloader counts its "reloading" lines.
        doc[_spell(rng, "logLevel")] = rng.choice(["info", "debug"])
    if rng.random() < 0.2:
        doc["soakNote"] = rng.randrange(1000)  # an unknown key: a warning, no more
    return doc


def _encode(rng: random.Random, doc: Any) -> bytes:
    return json.dumps(doc, indent=rng.choice([None, 2])).encode()


def invalid_config(rng: random.Random, devices: Sequence[str]) -> tuple[str, bytes]:
    """A config afxdpd must refuse, keeping the running one: what is wrong with
    it, and its bytes."""
    doc = valid_config(rng, devices)
    (pool,) = next(v for k, v in doc.items() if k.lower() == "pools")
    text = _encode(rng, doc)
    device = rng.choice(list(devices))
    wrong: list[tuple[str, Callable[[], bytes]]] = [
        ("not JSON: cut short", lambda: text[: rng.randrange(1, len(text))]),
        ("not JSON: empty", lambda: b""),
        ("not UTF-8", lambda: text.replace(device.encode(), device.encode() + b"\xff", 1)),
        ("not an object", lambda: _encode(rng, [doc])),
    ]
    bad_values: list[tuple[str, Any]] = [
        ("udsTimeout", rng.choice([1, 29, 301, "60", True, 2.5])),
        ("mode", rng.choice(["secondary", "", None, 1])),
        ("name", rng.choice(["soak-pool", "", "x" * 21])),
        ("uid", rng.choice([1, 999, 256001])),
        ("bpfMapPinningEnable", True),  # without udsServerDisable
        ("devices", {"name": device}),
    ]
    for key, value in bad_values:

        def bad(key: str = key, value: Any = value) -> bytes:
            _set(pool, key, value)
            return _encode(rng, doc)

        wrong.append((f"pools[0].{key}: {value!r}", bad))

    def bad_device() -> bytes:
        _set(pool, "devices", [{"name": device, "mac": "02:00:00:00:00:01"}])
        return _encode(rng, doc)

    def bad_level() -> bytes:
        _set(doc, "logLevel", rng.choice(["verbose", 3, "INFO "]))
        return _encode(rng, doc)

    wrong += [("pools[0].devices[0]: both name and mac", bad_device), ("logLevel", bad_level)]
    why, make = rng.choice(wrong)
    return why, make()


def check_config(data: bytes, devices: Sequence[str], valid: bool) -> None:
    """That afxdpd's own loader takes ``data`` as the soak means it: a valid
    config with the soak's pool and devices as they are, or an invalid one."""
    try:
        loaded = config.load_config(data)
    except ConfigError as exc:
        if valid:
            raise SoakError(f"the soak's valid config is refused: {exc}: {data!r}") from None
        return
    if not valid:
        raise SoakError(f"the soak's invalid config is valid: {data!r}")
    pools = [(p.name, p.mode, sorted(d.name or "" for d in p.devices)) for p in loaded.config.pools]
    if pools != [(POOL, "primary", sorted(devices))]:
        raise SoakError(f"the soak's valid config changes the pools: {pools}")


@dataclass(frozen=True)
class Reloads:
    """afxdpd's reload counts when none was under way."""

    applied: int
    refused: int
    watched: int  # begun by afxdpd's file watch
    invalid: bool  # afxdp_config_invalid: the last read was refused


def reload_problems(kind: str, why: str, before: Reloads, after: Reloads) -> list[str]:
    """What is wrong with what afxdpd made of one step's config (``kind`` of
    RELOAD_KINDS; ``why`` an invalid one is), from its counts around the step."""
    applied, refused = after.applied - before.applied, after.refused - before.refused
    what = f"{kind} ({why})" if why else kind
    if applied + refused < 1:
        return [f"{what}: the SIGHUP was not answered"]
    if kind.startswith("valid") and kind != "valid, torn" and (refused or after.invalid):
        return [f"{what}: refused ({refused} of {applied + refused} reloads)"]
    if kind in ("invalid", "missing") and (applied or not after.invalid):
        return [f"{what}: applied ({applied} of {applied + refused} reloads)"]
    return []


def parse_metric(body: bytes, name: str, labels: str = "") -> float:
    """A sample's value in Prometheus text (0 when absent: a labelled
    counter appears only once counted)."""
    found = re.search(rb"^%s%s (\S+)$" % (re.escape(name.encode()), re.escape(labels.encode())),
                      body, re.M)  # fmt: skip
    return float(found[1]) if found else 0.0


class Reloader:
    """Rewrites afxdpd's config and sends it SIGHUP (see above), until cancelled;
    holds ``pause`` for each step, so the soak can sample between steps."""

    def __init__(self, soak: Soak, rate: float, seed: int) -> None:
        assert soak.afxdpd is not None and soak.metrics_port is not None
        self.soak = soak
        self.pid = soak.afxdpd.pid
        self.rate = rate
        self.rng = random.Random(seed)
        self.path = soak.config_path
        self.pause = anyio.Lock()
        self.sent = 0  # SIGHUPs
        self.written = dict.fromkeys(RELOAD_KINDS, 0)  # SIGHUPs by what was written
        self.problems: list[str] = []
        # What afxdpd made of the torn steps' reloads: refused ones read a half file.
        self.torn = {"applied": 0, "refused": 0}
        self.scrapes = 0
        self.scrape_failures: list[str] = []  # the first 10
        self.scrape_failure_count = 0
        self.sighups_logged = 0  # afxdpd's "SIGHUP: reloading" lines
        self._log_at = 0
        self._log_lines = {b"SIGHUP: reloading": 0, b" changed; reloading": 0}

    async def run(self) -> None:
        while True:
            # Paced by the steps' starts: a step that took longer than the
            # interval (afxdpd slow to answer) is followed by the next at once.
            due = anyio.current_time() + self.rng.uniform(0.5, 1.5) / self.rate
            async with self.pause:
                await self.step()
            await anyio.sleep(max(0.0, due - anyio.current_time()))

    async def step(self) -> None:
        kinds, weights = zip(*RELOAD_KINDS.items(), strict=True)
        (kind,) = self.rng.choices(kinds, weights)
        why, data = "", b""
        if kind == "invalid":
            why, data = invalid_config(self.rng, self.soak.devices)
        elif kind != "missing":
            data = _encode(self.rng, valid_config(self.rng, self.soak.devices))
        check_config(data, self.soak.devices, valid=kind.startswith("valid"))
        if kind == "missing":
            await run_sync(Work.DISK, partial(self.path.unlink, missing_ok=True))
        elif kind == "valid, torn":
            pass  # written after the SIGHUP
        elif kind == "valid, renamed" or self.rng.random() < 0.5:
            await run_sync(Work.DISK, self._rename, data)
        else:
            await run_sync(Work.DISK, self._in_place, data)
        before = await self.settled()
        if kind == "valid, torn":
            await run_sync(Work.DISK, self._torn, data, self.rng.uniform(0, 0.01))
        else:
            self._sighup()
        self.written[kind] += 1
        after = await self.settled()
        self.problems += reload_problems(kind, why, before, after)
        if kind == "valid, torn":
            self.torn["applied"] += after.applied - before.applied
            self.torn["refused"] += after.refused - before.refused

    def _sighup(self) -> None:
        os.kill(self.pid, signal.SIGHUP)
        self.sent += 1  # at once: ``settled`` waits for as many answers

    def _rename(self, data: bytes) -> None:
        """As an operator's tool writes: the whole file under another name, then renamed."""
        part = self.path.with_name(self.path.name + ".new")
        part.write_bytes(data)
        os.replace(part, self.path)

    def _in_place(self, data: bytes) -> None:
        with self.path.open("wb") as f:  # truncated, then written: a reload may see either
            f.write(data)

    def _torn(self, data: bytes, pause: float) -> None:
        """Truncate, SIGHUP, then write in two halves ``pause`` apart: the
        reload reads the file empty, half written or whole."""
        with self.path.open("wb") as f:
            self._sighup()
            half = len(data) // 2
            f.write(data[:half])
            f.flush()
            time.sleep(pause)  # not a wait for anything: the window a reader may fall in
            f.write(data[half:])

    async def settled(self) -> Reloads:
        """afxdpd's counts once every reload begun has been answered."""

        async def answered() -> Reloads | None:
            body = await self.scrape("/metrics")  # first: a reload is logged before it counts
            self.sighups_logged, watched = await run_sync(Work.DISK, self._logged)
            counted = partial(parse_metric, body, "afxdp_config_reloads_total")
            found = Reloads(
                applied=int(counted('{result="ok"}')),
                refused=int(counted('{result="invalid"}')),
                watched=watched,
                invalid=parse_metric(body, "afxdp_config_invalid") == 1,
            )
            begun = self.sent + watched
            if found.applied + found.refused > begun:
                raise SoakError(f"afxdpd answered {found.applied + found.refused} reloads, but "
                                f"only {begun} were begun: {found}")  # fmt: skip
            return found if found.applied + found.refused == begun else None

        try:
            found: Reloads = await wait_for("every reload answered", answered, RELOAD_TIMEOUT,
                                            poll=0.01)  # fmt: skip
        except TimeoutError as exc:
            raise SoakError(f"{exc}: {self.sent} SIGHUPs sent\n{self.soak.log_tail()}") from None
        return found

    def _logged(self) -> tuple[int, int]:
        """How many SIGHUP and file-watch reloads afxdpd's log has begun so far
        (read on from where the last call stopped, whole lines only)."""
        with self.soak.path("afxdpd.log").open("rb") as f:
            f.seek(self._log_at)
            new = f.read()
        complete = new[: new.rfind(b"\n") + 1]
        self._log_at += len(complete)
        for line in complete.splitlines():
            for marker in self._log_lines:
                self._log_lines[marker] += marker in line
        sighups, watched = self._log_lines.values()
        return sighups, watched

    async def scrape(self, path: str) -> bytes:
        """GET ``path`` on the metrics port, among the slowloris clients; like a
        probe it must be answered, so a failure is counted (a second try goes on)."""
        assert self.soak.metrics_port is not None
        lock = self.soak.prober.lock if self.soak.prober is not None else anyio.Lock()
        for _ in range(3):
            async with lock:  # not while the soak samples (see Soak._sample)
                status, body = await get("127.0.0.1", self.soak.metrics_port, path)
            self.scrapes += 1
            if status == "200":
                return body
            self.scrape_failure_count += 1
            if len(self.scrape_failures) < 10:
                self.scrape_failures.append(f"scrape {self.scrapes} of {path}: {status}")
        raise SoakError(f"{path} not answered: {'; '.join(self.scrape_failures)}")


def holder_problems(
    doc: Status,
    devices: Sequence[str],
    handed: Mapping[str, Sequence[str]],
    before: Mapping[str, tuple[int, str | None]],
    after: Mapping[str, tuple[int, str | None]],
) -> list[str]:
    """What afxdpd's status ``doc``, read between ``before`` and ``after``
    (each device's count of pods the soak handed it to, and the pod kubelet
    listed on it), shows that the soak's own record rules out: the pool not
    served as configured, a device shown with a pod the soak did not hand it to
    meanwhile, a device free (or unknown) while kubelet listed one pod on it
    throughout, or a handout with an idle timeout no valid config sets."""
    pools = [p for p in doc.pools if p.label == POOL]
    if len(pools) != 1 or pools[0].draining or not pools[0].registered:
        return [f"pool {POOL} is not served as configured: {pools}"]
    found = []
    ids = sorted(d.id for d in pools[0].devices)
    if ids != sorted(devices):
        found.append(f"pool {POOL} has the devices {ids}, not {sorted(devices)}")
    for dev in pools[0].devices:
        if dev.id not in before or dev.id not in after:
            continue
        (count0, pod0), (count1, pod1) = before[dev.id], after[dev.id]
        holders = list(handed[dev.id][max(count0 - 1, 0) : count1])
        if dev.pod is not None and dev.pod.name not in holders:
            found.append(f"{dev.id} is shown held by {dev.pod}; the soak handed it to "
                         f"{holders or 'no pod'} meanwhile")  # fmt: skip
        if pod0 is not None and pod0 == pod1 and dev.state in ("free", "unknown"):
            found.append(f"{dev.id} is {dev.state} while kubelet lists pod {pod0} on it")
    for alloc in doc.allocations:
        if alloc.device in before and alloc.uds_idle_timeout not in IDLE_TIMEOUTS:
            found.append(f"{alloc.device} was handed out with an idle timeout of "
                         f"{alloc.uds_idle_timeout} s, which no valid config sets")  # fmt: skip
    return found


class Soak:
    def __init__(
        self,
        work: Path,
        concurrency: int,
        slowloris: int = 0,
        reloads_per_second: float = 0.0,
        seed: int = 0,
    ) -> None:
        self.work = work
        self.slowloris = slowloris
        self.reloads_per_second = reloads_per_second
        self.seed = seed
        self.reloader: Reloader | None = None
        self.metrics_port: int | None = None
        self.attack: Slowloris | None = None
        self.prober: Prober | None = None
        self._load: TaskGroup | None = None  # the slowloris load and the prober
        self._attack_scope = anyio.CancelScope()
        self._attack_ended = anyio.Event()
        self.tag = secrets.token_hex(3)
        # At most 15 characters (IFNAMSIZ - 1): "sk" + 6 + index.
        self.devices = [f"sk{self.tag}{i}" for i in range(concurrency)]
        self.wire_ns = f"afxdp-soak-{self.tag}-wire"
        self.kubelet = FakeKubelet(work / "kubelet")
        self.afxdpd: Process | None = None
        self.watch_updates = 0
        self._stopping = False
        self._plugin: PluginClient | None = None
        # Who holds what, by the soak's own record: each device's pods in the
        # order Allocate handed it to them, and the pod kubelet lists on it now.
        self.handed: dict[str, list[str]] = {d: [] for d in self.devices}
        self.listed: dict[str, str | None] = dict.fromkeys(self.devices)
        self.allocates_ok = 0
        self.adds_ok = 0
        self.second_allocates_refused = 0
        self.holder_checks = 0
        self.holder_problems: list[str] = []  # the first 10
        self.holder_problem_count = 0
        self._holders_lock = anyio.Lock()  # held by each status read; the samples take it

    # --- places -----------------------------------------------------------

    def path(self, name: str) -> Path:
        return self.work / name

    @property
    def run_dir(self) -> Path:
        return self.path("run")

    @property
    def config_path(self) -> Path:
        return self.path("config.json")

    @property
    def serves_metrics(self) -> bool:
        return bool(self.slowloris or self.reloads_per_second)

    def pod_ns(self, number: int) -> str:
        return f"afxdp-soak-{self.tag}-pod{number}"

    # --- the node ---------------------------------------------------------

    async def setup(self, stack: AsyncExitStack) -> None:
        stack.push_async_callback(self._remove_lab)
        await ip("netns", "add", self.wire_ns)
        for i, dev in enumerate(self.devices):
            await ip("link", "add", dev, "type", "veth", "peer", "name", f"sw{self.tag}{i}",
                     "netns", self.wire_ns)  # fmt: skip
            await ip("link", "set", dev, "up")
            await ip("link", "set", f"sw{self.tag}{i}", "up", netns=self.wire_ns)
        # Where the shim may reach afxdpd is the installer's choice, not the netconf's.
        shim.install(self.path("cni-bin"), [self.run_dir])
        self.kubelet.start_registration()
        self.kubelet.start_pod_resources()
        stack.callback(self.kubelet.stop)
        await self._start_afxdpd(stack)
        self._plugin = PluginClient(self.kubelet.plugin_dir / f"afxdp-{POOL}.sock")
        stack.callback(self._plugin.close)

    async def _start_afxdpd(self, stack: AsyncExitStack) -> None:
        pool = {"name": POOL, "mode": "primary", "devices": [{"name": d} for d in self.devices]}
        self.config_path.write_text(json.dumps({"logLevel": "info", "pools": [pool]}))
        log = self.path("afxdpd.log").open("wb")
        stack.callback(log.close)
        argv = [sys.executable, "-m", "afxdp.cli.afxdpd", "--config", str(self.config_path),
                "--node-name", "soak-node", "--kubelet-dir", str(self.kubelet.dir),
                "--uds-dir", str(self.path("uds")), "--pin-dir", str(self.path("pins")),
                "--run-dir", str(self.run_dir), "--log-dir", str(self.path("log")),
                "--cdi-dir", str(self.path("cdi")),
                "--metrics-address", "127.0.0.1:0" if self.serves_metrics else ""]  # fmt: skip
        self.afxdpd = await anyio.open_process(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
        )
        stack.push_async_callback(self._kill_afxdpd)
        try:
            await run_sync(Work.DEVICES, self._wait_registered)
            await wait_for("afxdpd's sockets", self._sockets_up, START_TIMEOUT)
            if self.serves_metrics:
                self.metrics_port = await wait_for("afxdpd's metrics port", self._metrics_port,
                                                   START_TIMEOUT)  # fmt: skip
        except TimeoutError as exc:
            raise SoakError(f"afxdpd did not come up: {exc}\n{self.log_tail()}") from None
        if self.slowloris:
            assert self.metrics_port is not None
            self.attack = Slowloris("127.0.0.1", self.metrics_port)
            self.prober = Prober("127.0.0.1", self.metrics_port)
        if self.reloads_per_second:
            self.reloader = Reloader(self, self.reloads_per_second, self.seed)

    async def _start_attack(self) -> None:
        """The slowloris load, in the load group; back once every client is in."""
        assert self.attack is not None and self._load is not None
        attack, ended, before = self.attack, anyio.Event(), self.attack.connections

        async def attacking(task_status: TaskStatus[anyio.CancelScope]) -> None:
            try:
                with anyio.CancelScope() as scope:
                    task_status.started(scope)
                    await attack.run(self.slowloris)
            finally:
                ended.set()

        self._attack_scope = await self._load.start(attacking)
        self._attack_ended = ended

        async def connected() -> bool:
            return attack.connections >= before + self.slowloris

        try:
            await wait_for("the slowloris clients' connects", connected, START_TIMEOUT)
        except TimeoutError as exc:
            raise SoakError(str(exc)) from None

    async def _sample(self, after: int) -> Sample:
        """afxdpd's resources, with no reload under way and no status read (the
        reloader finishes its step and waits, as the holders' check does)."""
        async with AsyncExitStack() as quiet:
            if self.reloader is not None:
                await quiet.enter_async_context(self.reloader.pause)
            await quiet.enter_async_context(self._holders_lock)
            return await self._sample_unloaded(after)

    async def _sample_unloaded(self, after: int) -> Sample:
        """afxdpd's resources; the slowloris load leaves for it (its connections,
        always coming and going, are not what is measured) and comes back."""
        assert self.afxdpd is not None
        pid = self.afxdpd.pid
        if self.prober is None or self.metrics_port is None:
            return await run_sync(Work.DISK, sample, pid, after)
        port = self.metrics_port
        # No probe meanwhile: one among the attack's first connects may be the
        # oldest to await its request (kubelet's comes at once; this one, from
        # this loop, only once those connects are done).
        async with self.prober.lock:
            self._attack_scope.cancel()
            await self._attack_ended.wait()

            async def closed() -> bool:
                return await run_sync(Work.DISK, connections_on, pid, port) == 0

            try:
                await wait_for("afxdpd closing its side", closed, 5.0)
            except TimeoutError:
                held = await run_sync(Work.DISK, connections_on, pid, port)
                raise SoakError(f"afxdpd still holds {held} connections on its metrics port "
                                "5 s after their clients left") from None  # fmt: skip
            found = await run_sync(Work.DISK, sample, pid, after)
            await self._start_attack()
        return found

    async def _metrics_port(self) -> int | None:
        """The port afxdpd bound for "127.0.0.1:0", from its log line saying so."""
        text = self.path("afxdpd.log").read_text(errors="replace")
        found = re.search(r"metrics and health on http://127\.0\.0\.1:(\d+)/", text)
        return int(found[1]) if found else None

    def _wait_registered(self) -> None:
        if not self.kubelet.wait_registrations(1, timeout=START_TIMEOUT):
            raise TimeoutError(f"no registration within {START_TIMEOUT:g} s")

    async def _sockets_up(self) -> bool:
        if self.afxdpd is not None and self.afxdpd.returncode is not None:
            raise SoakError(f"afxdpd exited with {self.afxdpd.returncode}:\n{self.log_tail()}")
        return all((self.run_dir / s).exists() for s in ("control.sock", "cni.sock"))

    def log_tail(self, lines: int = 20, naming: str = "") -> str:
        """The last ``lines`` lines of afxdpd's log (those naming ``naming``)."""
        try:
            text = self.path("afxdpd.log").read_text(errors="replace")
        except OSError:
            return "(no afxdpd log)"
        found = [ln for ln in text.splitlines() if naming in ln]
        return "\n".join(f"  | {ln}" for ln in found[-lines:])

    # --- kubelet's ListAndWatch stream, held open as kubelet holds it -------

    async def watch(self) -> None:
        assert self._plugin is not None
        while not self._stopping:
            stream = self._plugin.list_and_watch(read_timeout=0.5)
            try:
                while not self._stopping:
                    try:
                        await run_sync(Work.NETLINK, next, stream)
                    except TimeoutError:
                        continue
                    except StopIteration:
                        break
                    self.watch_updates += 1
            except Exception as exc:  # grpc.RpcError: the stream's deadline; reopen
                if not self._stopping:
                    code = getattr(exc, "code", lambda: None)()
                    if code is None or code.name != "DEADLINE_EXCEEDED":
                        raise SoakError(f"ListAndWatch ended: {exc}") from exc
            finally:
                stream.cancel()

    # --- one pod ----------------------------------------------------------

    async def lifecycle(self, number: int, device: str) -> None:
        pod = f"soak-{self.tag}-{number}"
        step = "Allocate"
        async with cleanup_stack() as undo:  # what a failed lifecycle leaves is undone
            try:
                assert self._plugin is not None
                response = await run_sync(Work.DEVICES, self._plugin.allocate, [device])
                self.handed[device].append(pod)
                self.allocates_ok += 1
                (answer,) = response.container_responses
                sock = host_socket(answer, device)
                self.kubelet.hold(pod, RESOURCE, device)  # as kubelet: listed once allocated
                self.listed[device] = pod
                undo.callback(self._forget, pod, device)

                step = "netns add"
                netns = self.pod_ns(number)
                undo.push_async_callback(self._quietly, ip, "netns", "del", netns)
                await ip("netns", "add", netns)

                step = "CNI ADD"
                conf = self.netconf(device)
                undo.push_async_callback(self._quietly, self.cni, "DEL", conf, netns, pod)
                result = await self.cni("ADD", conf, netns, pod)
                iface = result["interfaces"][0]
                if (iface["name"], iface["sandbox"]) != (device, f"/run/netns/{netns}"):
                    raise SoakError(f"ADD gave {iface}")
                self.adds_ok += 1

                step = "a second Allocate, while the pod holds the device"
                await self.second_allocate(device)

                step = "UDS handshake"
                await self.handshake(sock, pod, device)

                step = "CNI DEL"
                await self.cni("DEL", conf, netns, pod)
                try:
                    socket.if_nametoindex(device)
                except OSError:
                    raise SoakError(f"{device} is not back on the host") from None

                step = "netns del"
                await ip("netns", "del", netns)

                step = "kubelet forgets the pod"
                self._forget(pod, device)
            except Exception as exc:
                raise StepFailed(number, pod, device, step, exc) from exc
            undo.pop_all()  # all done in order: nothing to undo

    def netconf(self, device: str) -> dict[str, Any]:
        return {
            "cniVersion": "1.0.0",
            "name": NETWORK,
            "type": shim.NAME,
            "mode": "primary",
            "deviceID": device,  # Multus injects it from the device plugin's answer
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": f"{SUBNET}.0/24", "gateway": f"{SUBNET}.1"}]],
                "dataDir": str(self.path("ipam")),
            },
        }

    async def cni(self, command: str, conf: dict[str, Any], netns: str, pod: str) -> Any:
        env = {
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": pod,
            "CNI_NETNS": f"/run/netns/{netns}",
            "CNI_IFNAME": "net1",
            "CNI_PATH": f"{self.path('cni-bin')}:{CNI_PATH}",
            "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={pod}",
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        }
        done = await run_program([str(self.path("cni-bin") / shim.NAME)],
                                 stdin=json.dumps(conf).encode(), env=env, timeout=CNI_TIMEOUT)  # fmt: skip
        if done.returncode != 0:
            raise SoakError(f"shim exited {done.returncode}: {done.stdout.decode().strip()} "
                            f"{done.stderr.decode().strip()}")  # fmt: skip
        return json.loads(done.stdout) if done.stdout.strip() else None

    async def handshake(self, sock: Path, pod: str, device: str) -> None:
        """What DPDK's AF_XDP PMD does per queue, as the pod named ``pod``."""
        request = Request.connect(pod)
        try:
            async with await AsyncUdsClient.open(sock, UDS_TIMEOUT) as client:
                await client.call(request)
                await client.call(request := Request.version())
                map_fd = await client.call(request := Request.xsk_map_fd(device))
                assert map_fd is not None
                try:
                    info = libbpf.map_info(map_fd)
                    if info.type != libbpf.BPF_MAP_TYPE_XSKMAP:
                        raise SoakError(f"the fd afxdpd sent is a map of type {info.type}")
                finally:
                    os.close(map_fd)
                await client.call(request := Request.fin())
        except TimeoutError:
            raise SoakError(f"no reply to {request.text!r} within {UDS_TIMEOUT:g} s") from None

    def _forget(self, pod: str, device: str) -> None:
        self.listed[device] = None  # first: the holders' check may not expect it listed after
        # A new list, not an edit: the double's gRPC threads read it concurrently.
        self.kubelet.pods = [p for p in self.kubelet.pods if p.name != pod]

    async def second_allocate(self, device: str) -> None:
        """Allocate ``device`` again while kubelet lists its pod: refused, as
        kubelet is told (FAILED_PRECONDITION), or two pods would hold it."""
        assert self._plugin is not None
        try:
            await run_sync(Work.DEVICES, self._plugin.allocate, [device])
        except grpc.RpcError as exc:
            code = exc.code()
            if code != grpc.StatusCode.FAILED_PRECONDITION:
                raise SoakError(f"refused with {code}, not FAILED_PRECONDITION: "
                                f"{exc.details()}") from None  # fmt: skip
            self.second_allocates_refused += 1
            return
        raise SoakError(f"answered OK: {device} is handed to a second pod")

    async def check_holders(self) -> None:
        """Read afxdpd's status every HOLDERS_EVERY s until cancelled; what it
        shows must agree with the soak's record (``holder_problems``)."""
        while True:
            async with self._holders_lock:
                before = {d: (len(self.handed[d]), self.listed[d]) for d in self.devices}
                try:
                    doc = await run_sync(Work.DISK, fetch_status, self.run_dir)
                except OSError as exc:
                    raise SoakError(f"afxdpd's status not answered: {exc}") from None
                after = {d: (len(self.handed[d]), self.listed[d]) for d in self.devices}
            self.holder_checks += 1
            found = holder_problems(doc, self.devices, self.handed, before, after)
            self.holder_problem_count += len(found)
            self.holder_problems += found[: 10 - len(self.holder_problems)]
            await anyio.sleep(HOLDERS_EVERY)

    @staticmethod
    async def _quietly(fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """A clean-up step whose failure must not hide the failure being cleaned up."""
        with suppress(SoakError, LabError, OSError):
            await fn(*args)

    # --- the run ----------------------------------------------------------

    async def run(self, lifecycles: int) -> list[Sample]:
        """All lifecycles, in phases, with ListAndWatch held open; a sample per phase."""
        samples: list[Sample] = []
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self.watch)
                async with anyio.create_task_group() as load:  # until the phases are done
                    self._load = load
                    if self.prober is not None:
                        await self._start_attack()  # probed once every client is in
                        load.start_soon(self.prober.run)
                    if self.reloader is not None:
                        load.start_soon(self.reloader.run)
                    load.start_soon(self.check_holders)
                    try:
                        await self._phases(lifecycles, samples)
                    finally:
                        self._stopping = True
                        load.cancel_scope.cancel()
        except* SoakError as group:
            raise _first(group) from None
        return samples

    async def _phases(self, lifecycles: int, samples: list[Sample]) -> None:
        assert self.afxdpd is not None
        done = 0
        for end in checkpoints(lifecycles):
            numbers = iter(range(done, end))

            async def worker(device: str, numbers: Any = numbers) -> None:
                for number in numbers:
                    await self.lifecycle(number, device)

            async with anyio.create_task_group() as tg:
                for device in self.devices:
                    tg.start_soon(worker, device)
            done = end
            samples.append(await self._sample(done))

    async def tally(self, summary: Summary) -> None:
        """The counts of who held what and of the reloads, into ``summary``,
        once the load has stopped (the last reload answered)."""
        summary.allocates_ok, summary.adds_ok = self.allocates_ok, self.adds_ok
        summary.second_allocates_refused = self.second_allocates_refused
        summary.holder_checks = self.holder_checks
        summary.holder_problem_count = self.holder_problem_count
        summary.holder_problems = self.holder_problems
        summary.seed = self.seed
        summary.reloads_per_second = self.reloads_per_second
        if self.reloader is None:
            return
        reloader = self.reloader
        final = await reloader.settled()
        summary.reloads, summary.reloads_written = reloader.sent, reloader.written
        summary.reloads_applied, summary.reloads_refused = final.applied, final.refused
        summary.reloads_by_watch = final.watched
        summary.reloads_torn = reloader.torn
        summary.reload_problems = reloader.problems[:10]
        if len(reloader.problems) > 10:
            summary.reload_problems.append(f"... {len(reloader.problems)} in all")
        if reloader.sighups_logged != reloader.sent:
            summary.reload_problems.append(f"afxdpd began {reloader.sighups_logged} reloads "
                                           f"on SIGHUP, of {reloader.sent} sent")  # fmt: skip
        body = await reloader.scrape("/metrics")
        summary.allocate_results = {
            result.decode(): int(float(n))
            for result, n in re.findall(rb'^afxdp_allocate_seconds_count\{pool="%s",'
                                        rb'result="(\w+)"\} (\S+)$' % POOL.encode(), body, re.M)
        }  # fmt: skip
        summary.scrapes, summary.scrape_failures = reloader.scrapes, reloader.scrape_failures
        summary.scrape_failure_count = reloader.scrape_failure_count

    async def stop_afxdpd(self) -> int | None:
        """SIGTERM, as the kubelet's pod deletion does; its exit code (None: hung)."""
        assert self.afxdpd is not None
        self.afxdpd.send_signal(signal.SIGTERM)
        with anyio.move_on_after(STOP_TIMEOUT):
            await self.afxdpd.wait()
        return self.afxdpd.returncode

    async def leaks(self) -> list[str]:
        """What afxdpd and the lifecycles left behind."""
        found = []
        for dev in self.devices:
            try:
                index = socket.if_nametoindex(dev)
            except OSError:
                found.append(f"{dev} is not in the host netns")
                continue
            prog = await run_sync(Work.NETLINK, libbpf.xdp_query_id, index)
            if prog:
                found.append(f"XDP program {prog} on {dev}")
        for name in ("pins", "uds"):
            if self.path(name).exists():
                found += [f"{p} under the {name} dir" for p in self.path(name).rglob("*")]
        if self.path("pins").exists() and pinning.fs_type(self.path("pins")) == "bpf":
            found.append(f"bpffs still mounted at {self.path('pins')}")
        found += [f"socket {p}" for p in self.kubelet.plugin_dir.glob("afxdp-*")]
        found += [f"socket {p}" for p in self.run_dir.glob("*.sock")]
        listed = (await ip("netns", "list")).split()
        found += [f"netns {ns}" for ns in listed if ns.startswith(f"afxdp-soak-{self.tag}-pod")]
        leases = self.path("ipam") / NETWORK
        if leases.exists():
            found += [f"host-local lease {p.name}" for p in leases.iterdir() if _is_ip(p.name)]
        record = AttachmentStore(self.run_dir / "cni-attachments.json").all()
        found += [f"attachment {a.key} of {a.device}" for a in record]
        return found

    async def _kill_afxdpd(self) -> None:
        """Only when the soak failed before stopping it: end its whole session."""
        if self.afxdpd is None or self.afxdpd.returncode is not None:
            return
        self.afxdpd.send_signal(signal.SIGTERM)
        with anyio.move_on_after(STOP_TIMEOUT):
            await self.afxdpd.wait()
            return
        with suppress(ProcessLookupError):
            os.killpg(self.afxdpd.pid, signal.SIGKILL)
        await self.afxdpd.wait()

    async def _remove_lab(self) -> None:
        pins = self.path("pins")
        if pins.exists() and pinning.fs_type(pins) == "bpf":
            await run_program(["umount", str(pins)], timeout=10, work=Work.NETLINK)
        for dev in self.devices:
            await self._quietly(ip, "link", "del", dev)  # the peer goes with it
        listed = (await ip("netns", "list")).split()
        for ns in listed:
            if ns.startswith(f"afxdp-soak-{self.tag}-"):
                await self._quietly(ip, "netns", "del", ns)


def _first(group: BaseExceptionGroup[SoakError]) -> SoakError:
    """The first failure in a (nested) exception group of task groups."""
    found = group.exceptions[0]
    return found if isinstance(found, SoakError) else _first(found)


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


async def soak(
    lifecycles: int,
    concurrency: int,
    work: Path,
    bounds: Bounds = Bounds(),
    time_limit: float | None = None,
    *,
    slowloris: int = 0,
    reloads_per_second: float = 0.0,
    seed: int | None = None,
) -> Summary:
    """Run the soak in ``work`` (which the caller removes); raise SoakError on
    a failed lifecycle, a leak, growth past ``bounds``, (with ``slowloris``
    clients on the metrics port) a probe not answered, a status that shows a
    device with a pod it was not handed to, or free while its pod holds it,
    or (with ``reloads_per_second``) a reload not answered as its config
    deserves (``seed``: the reloader's choices, at random when None)."""
    if lifecycles < 1 or concurrency < 1 or slowloris < 0 or reloads_per_second < 0:
        raise ValueError("lifecycles and concurrency must be at least 1, slowloris and "
                         "reloads_per_second at least 0")  # fmt: skip
    limit = time_limit if time_limit is not None else 60 + 2.0 * lifecycles
    seed = seed if seed is not None else secrets.randbits(32)
    node = Soak(work, concurrency, slowloris, reloads_per_second, seed)
    with anyio.fail_after(limit):
        async with cleanup_stack() as stack:
            await node.setup(stack)
            started = time.monotonic()
            try:
                samples = await node.run(lifecycles)
            except StepFailed as exc:
                raise SoakError(f"{exc}\nafxdpd's log about {exc.device}:\n"
                                f"{node.log_tail(naming=exc.device)}") from None  # fmt: skip
            seconds = time.monotonic() - started
            summary = Summary(
                lifecycles=lifecycles,
                concurrency=concurrency,
                seconds=round(seconds, 2),
                rate_per_s=round(lifecycles / seconds, 2),
                bounds=asdict(bounds),
                samples=samples,
                watch_updates=node.watch_updates,
                slowloris=slowloris,
            )
            if node.attack is not None and node.prober is not None:
                summary.slowloris_connections = node.attack.connections
                summary.probes = node.prober.probes
                summary.probe_failures = node.prober.failures
                summary.probes_failed = node.prober.first_failures
                summary.slowest_probe_s = round(node.prober.slowest, 3)
            await node.tally(summary)
            summary.afxdpd_exit = await node.stop_afxdpd()
            summary.leaks = await node.leaks()
            summary.growth = growth(samples, bounds)
    problems = list(summary.leaks) + summary.growth + probing(summary) + holding(summary)
    problems += reloading(summary)
    if summary.afxdpd_exit != 0:
        problems.insert(0, f"afxdpd exited with {summary.afxdpd_exit} after SIGTERM")
    if problems:
        raise SoakError("soak failed:\n  " + "\n  ".join(problems) + "\n" + summary.to_json())
    return summary


def probing(summary: Summary) -> list[str]:
    """What went wrong with the probes under the slowloris load, if it ran."""
    if not summary.slowloris:
        return []
    if summary.probes == 0 or summary.slowloris_connections < summary.slowloris:
        return [f"the probes or the slowloris load did not run: {summary.probes} probes, "
                f"{summary.slowloris_connections} of {summary.slowloris} clients connected"]  # fmt: skip
    if summary.probe_failures:
        return [f"{summary.probe_failures} of {summary.probes} probes failed under "
                f"{summary.slowloris} slowloris clients: " + "; ".join(summary.probes_failed)]  # fmt: skip
    return []


def holding(summary: Summary) -> list[str]:
    """What went wrong with who held what."""
    found = []
    if summary.holder_problem_count:
        found.append(f"{summary.holder_problem_count} problems in {summary.holder_checks} "
                     "status documents: " + "; ".join(summary.holder_problems))  # fmt: skip
    if summary.holder_checks == 0:
        found.append("the status was never read: the holders were not checked")
    every = {"allocates_ok": summary.allocates_ok, "adds_ok": summary.adds_ok,
             "second_allocates_refused": summary.second_allocates_refused}  # fmt: skip
    if set(every.values()) != {summary.lifecycles}:
        found.append(f"not one of each per lifecycle: {every}")
    if summary.allocate_results:  # afxdpd's own count of what the soak saw
        results = dict(summary.allocate_results)
        ok = results.pop("ok", 0)
        # The refusals' label is not checked: afxdpd counts them as "error"
        # (test_metrics.py::test_a_result_set_before_an_exception_is_the_one_counted).
        if (ok, sum(results.values())) != (summary.allocates_ok, summary.second_allocates_refused):
            found.append(f"afxdpd counted Allocates {summary.allocate_results}; the soak saw "
                         f"{summary.allocates_ok} answered OK and "
                         f"{summary.second_allocates_refused} refused")  # fmt: skip
    return found


def reloading(summary: Summary) -> list[str]:
    """What went wrong with the reloads, if they ran."""
    if not summary.reloads_per_second:
        return []
    found = list(summary.reload_problems)
    if summary.scrape_failure_count:
        found.append(f"{summary.scrape_failure_count} of {summary.scrapes} scrapes of /metrics "
                     "failed: " + "; ".join(summary.scrape_failures))  # fmt: skip
    if not (summary.reloads_applied and summary.reloads_refused):
        found.append(f"the reloads did not run: {summary.reloads} SIGHUPs, "
                     f"{summary.reloads_applied} applied, {summary.reloads_refused} refused")  # fmt: skip
    return found


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.soak", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--lifecycles", type=int, default=1000, help="pod lifecycles (%(default)s)")
    ap.add_argument("--concurrency", type=int, default=8,
                    help="pods at once, and NICs in the pool (%(default)s)")  # fmt: skip
    ap.add_argument("--rss-percent", type=float, default=Bounds.rss_percent,
                    help="RSS growth allowed from 10 %% to the end (%(default)s)")  # fmt: skip
    ap.add_argument("--slowloris", type=int, default=SLOWLORIS,
                    help="slow clients on afxdpd's metrics port while /healthz and /readyz "
                         "are probed; 0: no metrics port (%(default)s)")  # fmt: skip
    ap.add_argument("--reloads-per-second", type=float, default=RELOADS_PER_SECOND,
                    help="config rewrites and SIGHUPs to afxdpd, valid and invalid ones, at "
                         "most this many a second; 0: none (%(default)s)")  # fmt: skip
    ap.add_argument("--seed", type=int, default=None,
                    help="of the reloader's choices (default: at random; the summary says)")  # fmt: skip
    ap.add_argument("--time-limit", type=float, default=None,
                    help="seconds before the soak gives up (default: 60 + 2 per lifecycle)")  # fmt: skip
    ap.add_argument("--keep", action="store_true",
                    help="keep the work dir (afxdpd's log, records) when the soak fails")  # fmt: skip
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="afxdp-soak-"))
    failed = True
    try:
        summary = anyio.run(
            partial(
                soak,
                slowloris=args.slowloris,
                reloads_per_second=args.reloads_per_second,
                seed=args.seed,
            ),
            args.lifecycles,
            args.concurrency,
            work,
            Bounds(rss_percent=args.rss_percent),
            args.time_limit,
            backend_options={"use_uvloop": True},
        )
    except (SoakError, TimeoutError) as exc:
        print(f"soak: FAILED: {exc or 'time limit reached'}", file=sys.stderr)
        return 1
    else:
        failed = False
    finally:
        if failed and args.keep:
            print(f"soak: work dir kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(summary.to_json())
    return 0


if __name__ == "__main__":
    sys.exit(main())
