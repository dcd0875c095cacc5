"""``afxdpd``: the node service (device plugin servers, netlink health, UDS
servers, XDP loader) in one asyncio process on uvloop."""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import resource
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import anyio

from afxdp import __version__, logsetup
from afxdp.cli.common import Exit, default_node_name, load_or_report
from afxdp.cli.heap import use_system_malloc
from afxdp.config import LOG_DIR, refuse_pinned_maps
from afxdp.datapath import LAYOUT_ENV, MAP_IN_MAP, PER_POD, forced_layout
from afxdp.dra.apiserver import ApiServerClaims
from afxdp.errors import ConfigError
from afxdp.kindnet import KindNetError
from afxdp.metrics import DEFAULT_ADDRESS, MetricsBindError, parse_address
from afxdp.secondary import DevlinkSubfunctions
from afxdp.service import Paths, Service

log = logging.getLogger("afxdpd")

STATE_DIR = Path("/var/lib/afxdp")
CDI_DIR = Path("/var/run/cdi")
# How long a stop waits for CNI requests in flight (IPAM gets 60 s; kubelet's
# terminationGracePeriodSeconds in the DaemonSet must exceed this).
DRAIN_TIMEOUT = 25.0


def parser() -> argparse.ArgumentParser:
    d = Paths()
    ap = argparse.ArgumentParser(
        prog="afxdpd",
        description=__doc__,
        epilog=f"environment: {LAYOUT_ENV}={MAP_IN_MAP} or {PER_POD} forces the datapath "
        "layout (default: map-in-map, one XDP program per device and a pod's XSKMAP in its "
        "slot, where the kernel takes it, else per-pod, one XDP program per pod); "
        "afxdpctl doctor says which one runs here",
    )
    ap.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    ap.add_argument("--config", type=Path, default=Path("config.json"),
                    help="config file (default: ./config.json, as the original)")  # fmt: skip
    ap.add_argument(
        "--node-name",
        default=default_node_name(),
        help="matched with nodes[].hostname (default: $NODE_NAME, else the hostname)",
    )
    ap.add_argument(
        "--kubelet-dir",
        type=Path,
        default=d.kubelet_dir,
        help=f"has device-plugins/ and pod-resources/ (default: {d.kubelet_dir})",
    )
    ap.add_argument("--uds-dir", type=Path, default=d.uds_dir,
                    help=f"the per-device UDS sockets (default: {d.uds_dir})")  # fmt: skip
    ap.add_argument("--pin-dir", type=Path, default=d.pin_dir,
                    help=f"bpffs for pinned maps (default: {d.pin_dir})")  # fmt: skip
    ap.add_argument("--no-pinned-maps", action="store_true",
                    help="refuse pools with bpfMapPinningEnable: the pin dir does not reach "
                         "kubelet (an unprivileged afxdpd, deploy/capabilities/)")  # fmt: skip
    ap.add_argument("--run-dir", type=Path, default=d.run_dir,
                    help=f"control socket and CNI socket (default: {d.run_dir})")  # fmt: skip
    ap.add_argument("--cdi-dir", type=Path, default=CDI_DIR,
                    help="where the CDI spec of each pool is written when the config's cdi "
                         f"is true (default: {CDI_DIR})")  # fmt: skip
    ap.add_argument("--state-dir", type=Path, default=STATE_DIR,
                    help="the durable record of allocations, kept across restarts "
                         f"(default: {STATE_DIR})")  # fmt: skip
    ap.add_argument("--log-dir", type=Path, default=LOG_DIR,
                    help=f"where the config's logFile is written (default: {LOG_DIR})")  # fmt: skip
    ap.add_argument("--metrics-address", default=DEFAULT_ADDRESS, metavar="HOST:PORT",
                    help="serves /metrics, /healthz and /readyz over HTTP; empty disables "
                         f"(default: {DEFAULT_ADDRESS})")  # fmt: skip
    ap.add_argument("--kube-api", metavar="URL", default=None,
                    help="where DRA's NodePrepareResources reads ResourceClaims: http://HOST:PORT "
                         "or unix:///PATH of an API server proxy (no TLS yet; default: none, "
                         "every claim refused saying so)")  # fmt: skip
    ap.add_argument("--log-format", choices=logsetup.FORMATS, default="text",
                    help="text, or json: one JSON object per line (default: text)")  # fmt: skip
    return ap


async def _main(service: Service) -> None:
    # Signals are ours before the service starts: a SIGTERM while it starts
    # (the control socket already answers) is handled once it has started, instead
    # of killing afxdpd with the kind network or handouts half made.
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with anyio.create_task_group() as tg:
            await tg.start(service.run)
            async for signum in signals:
                if signum == signal.SIGHUP:
                    log.info("SIGHUP: reloading %s", service.config_path)
                    tg.start_soon(service.reload)
                    continue
                log.info("%s: shutting down", signal.Signals(signum).name)
                # Requests in flight finish (bounded); then everything stops.
                with anyio.move_on_after(DRAIN_TIMEOUT):
                    await service.drain()
                tg.cancel_scope.cancel()
                break


def raise_fd_limit() -> tuple[int, int]:
    """Soft RLIMIT_NOFILE up to the hard limit (no privilege needed): every UDS
    connection and CNI request holds an fd, and a container's default soft
    limit (1,024) is a few busy pods away."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the fd limit from %d to %d: %s", soft, hard, exc)
    return soft, hard


LOCK_FILE = "afxdpd.lock"


def lock_run_dir(run_dir: Path) -> tuple[int, int] | None:
    """Exclusive locks on the run dir and on ``<run-dir>/afxdpd.lock`` (which
    then holds our pid), held while the process lives; None when another
    afxdpd holds either (one afxdpd per node and run dir).

    The lock that counts is on the directory itself: a lock on a file is lost
    to anyone who unlinks the file (a second afxdpd would create a new one,
    lock that, and take over the sockets). Checking after the lock that the
    path still names the locked inode would not help: it stops a race with
    an unlink, not an unlink while we run. (Whoever removes the directory,
    our sockets with it, has unplugged us whatever we lock.) The file is
    locked too for afxdpd versions before this one, which lock only the
    file: during an upgrade an old and a new afxdpd still exclude each other
    (a DaemonSet's rolling update stops the old pod before starting the new
    one; this covers a surge, or one started by hand). A refused afxdpd
    writes nothing."""
    run_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    held: list[int] = []
    try:
        for path, flags in ((run_dir, os.O_RDONLY | os.O_DIRECTORY),
                            (run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT)):  # fmt: skip
            # O_CLOEXEC: a child (an IPAM plugin) must not keep the lock after we end.
            held.append(os.open(path, flags | os.O_CLOEXEC, 0o644))
            fcntl.flock(held[-1], fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BaseException as exc:
        for fd in held:
            os.close(fd)
        if isinstance(exc, BlockingIOError):
            return None
        raise
    dir_fd, file_fd = held
    os.ftruncate(file_fd, 0)
    os.write(file_fd, f"{os.getpid()}\n".encode())
    return dir_fd, file_fd


def lock_holder(run_dir: Path) -> str:
    """Who holds the run dir: the pid the lock file holds, else the pid the
    kernel lists for the directory's lock (the file may have been removed),
    else "?" (the holder's pid is not visible from our pid namespace)."""
    try:
        if written := (run_dir / LOCK_FILE).read_text().strip():
            return written
    except OSError:
        pass
    try:
        st = run_dir.stat()
        locks = Path("/proc/locks").read_text()
    except OSError:
        return "?"
    ours = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in locks.splitlines():
        # "1: FLOCK  ADVISORY  WRITE 1234 fe:00:260072 0 EOF"; "1: -> FLOCK ..." waits.
        fields = line.split()
        if fields[1:2] == ["FLOCK"] and fields[5:6] == [ours] and fields[4] != "0":
            return fields[4]
    return "?"


def main(argv: list[str] | None = None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    if args.metrics_address:
        try:
            parse_address(args.metrics_address)
        except ValueError as exc:
            ap.error(f"--metrics-address: {exc}")
    claim_source = None
    if args.kube_api:
        try:
            claim_source = ApiServerClaims(args.kube_api)
        except ValueError as exc:
            ap.error(f"--kube-api: {exc}")
    loaded = load_or_report(args.config, None if not args.no_pinned_maps else refuse_pinned_maps)
    if loaded is None:
        return Exit.CONFIG
    try:
        forced_layout()
    except ConfigError as exc:
        print(f"afxdpd: {exc}", file=sys.stderr)
        return Exit.CONFIG
    try:
        logsetup.setup(
            loaded.config.log_level, loaded.config.log_file, args.log_dir, args.log_format
        )
    except OSError as exc:
        print(f"cannot set up logging: {exc}", file=sys.stderr)
        return Exit.LOGGING
    for warning in loaded.warnings:
        log.warning("config: %s", warning)
    try:
        lock = lock_run_dir(args.run_dir)
    except OSError as exc:
        log.error("cannot lock the run dir %s: %s", args.run_dir, exc)
        return Exit.POOL
    if lock is None:
        print(f"afxdpd: another afxdpd (pid {lock_holder(args.run_dir)}) already serves "
              f"{args.run_dir}; exiting", file=sys.stderr)  # fmt: skip
        return Exit.RUNNING
    service = Service(
        loaded.config,
        args.node_name,
        Paths(
            args.kubelet_dir, args.uds_dir, args.pin_dir, args.run_dir, args.state_dir, args.cdi_dir
        ),
        DevlinkSubfunctions(),
        metrics_address=args.metrics_address,
        config_path=args.config,
        pinned_maps=not args.no_pinned_maps,
        freeze_heap=True,
    )
    if claim_source is not None:
        service.claim_source = claim_source
    service.fd_limit = raise_fd_limit()
    log.info("fd limit: %d (hard %d)", *service.fd_limit)
    try:
        anyio.run(_main, service, backend_options={"use_uvloop": True})
    except Exception as exc:
        # A part that fails to start reaches us inside its task groups' groups.
        failures = list(_leaves(exc))
        if not all(isinstance(e, KindNetError | MetricsBindError | OSError | ConfigError)
                   for e in failures):  # fmt: skip
            raise
        for failure in failures:
            if isinstance(failure, KindNetError):
                log.error("kind network: %s", failure)
            elif isinstance(failure, MetricsBindError):
                log.error("%s; exiting (another process has the port? pick another with "
                          "--metrics-address, and the probes' port with it)", failure)  # fmt: skip
            else:
                log.error("start-up failed: %s", failure)
        if any(isinstance(e, MetricsBindError) for e in failures):
            return Exit.METRICS
        if any(isinstance(e, KindNetError) for e in failures):
            return Exit.KIND
        if any(isinstance(e, ConfigError) for e in failures):  # map-in-map forced, refused
            return Exit.CONFIG
        return Exit.POOL
    return Exit.OK


def _leaves(exc: BaseException) -> Iterator[BaseException]:
    """The errors inside (nested) exception groups; ``exc`` itself if none."""
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    else:
        yield exc


if __name__ == "__main__":
    use_system_malloc()  # the console script does this before its imports
    sys.exit(main())
