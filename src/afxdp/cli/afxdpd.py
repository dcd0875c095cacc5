"""``afxdpd``: the node service (device plugin servers, netlink health, UDS
servers, XDP loader) in one asyncio process on uvloop."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

import anyio

from afxdp import logsetup
from afxdp.cli.common import Exit, default_node_name, load_or_report
from afxdp.config import LOG_DIR
from afxdp.secondary import DevlinkSubfunctions
from afxdp.service import Paths, Service

log = logging.getLogger("afxdpd")


def parser() -> argparse.ArgumentParser:
    d = Paths()
    ap = argparse.ArgumentParser(prog="afxdpd", description=__doc__)
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
    ap.add_argument("--run-dir", type=Path, default=d.run_dir,
                    help=f"control socket and CNI socket (default: {d.run_dir})")  # fmt: skip
    ap.add_argument("--log-dir", type=Path, default=LOG_DIR,
                    help=f"where the config's logFile is written (default: {LOG_DIR})")  # fmt: skip
    return ap


async def _main(service: Service) -> None:
    async with anyio.create_task_group() as tg:
        await tg.start(service.run)
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                log.info("%s: shutting down", signal.Signals(signum).name)
                tg.cancel_scope.cancel()
                break


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    loaded = load_or_report(args.config)
    if loaded is None:
        return Exit.CONFIG
    try:
        logsetup.setup(loaded.config.log_level, loaded.config.log_file, args.log_dir)
    except OSError as exc:
        print(f"cannot set up logging: {exc}", file=sys.stderr)
        return Exit.LOGGING
    for warning in loaded.warnings:
        log.warning("config: %s", warning)
    service = Service(
        loaded.config,
        args.node_name,
        Paths(args.kubelet_dir, args.uds_dir, args.pin_dir, args.run_dir),
        DevlinkSubfunctions(),
    )
    try:
        anyio.run(_main, service, backend_options={"use_uvloop": True})
    except OSError as exc:
        log.error("start-up failed: %s", exc)
        return Exit.POOL
    return Exit.OK


if __name__ == "__main__":
    sys.exit(main())
