"""``afxdpctl``: validate configs and show what this node would offer."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import msgspec
import uvloop

from afxdp import control, inventory, pools
from afxdp.cli.common import Exit, default_node_name, load_or_report
from afxdp.cni import shim
from afxdp.config import LoadedConfig
from afxdp.secondary import DevlinkSubfunctions
from afxdp.service import Paths


def _validate(args: argparse.Namespace) -> int:
    loaded = load_or_report(args.file)
    if loaded is None:
        return Exit.CONFIG
    for warning in loaded.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    names = ", ".join(p.name for p in loaded.config.pools) or "none"
    print(f"{args.file}: valid; {len(loaded.config.pools)} pool(s): {names}")
    return Exit.OK


async def _discover_report(loaded: LoadedConfig, node_name: str) -> dict[str, Any]:
    netdevs = await inventory.scan()
    assembly = pools.assemble(
        loaded.config,
        netdevs,
        node_name,
        unprivileged_bpf_disabled=inventory.unprivileged_bpf_disabled(),
        secondary=DevlinkSubfunctions(),
    )
    return {
        "node": node_name,
        "netdevs": [msgspec.to_builtins(nd) for nd in netdevs],
        "pools": [
            {
                "resource": p.config.resource_name,
                "mode": p.config.mode,
                "devices": [d.summary() for d in p.devices.values()],
            }
            for p in assembly.pools
        ],
        "warnings": [str(w) for w in loaded.warnings] + assembly.warnings,
    }


def _discover(args: argparse.Namespace) -> int:
    loaded = load_or_report(args.config)
    if loaded is None:
        return Exit.CONFIG
    # uvloop on purpose: the service runs on it, so the dry run proves the
    # inventory path works there too.
    report = uvloop.run(_discover_report(loaded, args.node_name))
    if args.json:
        sys.stdout.write(msgspec.json.format(msgspec.json.encode(report)).decode() + "\n")
        return Exit.OK
    print(f"node {report['node']}: {len(report['netdevs'])} netdev(s)")
    for nd in report["netdevs"]:
        ips = ",".join(nd["ipv4"]) or "-"
        print(
            f"  {nd['name']:<16} driver={nd['driver'] or '-':<12} pci={nd['pci'] or '-':<13} "
            f"mac={nd['mac'] or '-'} state={nd['oper_state']} ipv4={ips}"
        )
    for p in report["pools"]:
        devs = " ".join(f"{d['id']}({d['state']})" for d in p["devices"])
        print(f"pool {p['resource']} [{p['mode']}]: {devs}")
    if not report["pools"]:
        print("no pools would be advertised on this node")
    for w in report["warnings"]:
        print(f"warning: {w}", file=sys.stderr)
    return Exit.OK


def _status(args: argparse.Namespace) -> int:
    try:
        doc = control.read_status(args.run_dir)
    except OSError as exc:
        print(f"afxdpd is not answering on {args.run_dir / control.SOCKET_NAME}: {exc}",
              file=sys.stderr)  # fmt: skip
        return Exit.HOST
    if args.json:
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
        return Exit.OK
    print(f"node {doc['node']}: {'ready' if doc['ready'] else 'NOT READY'}")
    for p in doc["pools"]:
        reg = "registered" if p["registered"] else "NOT registered"
        print(f"pool {p['resource']} [{p['mode']}] {reg} ({p['registrations']} registration(s))")
        for d in p["devices"]:
            numa = "-" if d["numa"] is None else d["numa"]
            print(f"  {d['id']:<16} {d['state']:<10} numa={numa}")
    for a in doc["allocations"]:
        how = a["uds_socket"] or a["pinned_map"] or "raw netdev"
        xdp = f"xdp={a['xdp_mode']} prog={a['xdp_prog_id']}" if a["xdp_mode"] else "no xdp"
        print(f"allocated {a['device']} ({a['pool']}): {xdp} {how} "
              f"connections={a['uds_connections']}")  # fmt: skip
    return Exit.OK


def _install_cni(args: argparse.Namespace) -> int:
    allow: list[Path] | None = args.allow_dir
    try:
        dest = shim.install(args.bin_dir, allow)
    except ValueError as exc:
        print(f"install-cni: {exc}", file=sys.stderr)
        return Exit.CONFIG
    dirs = allow if allow is not None else shim.DEFAULT_DIRS
    print(f"installed the afxdp CNI plugin at {dest}; it reaches afxdpd only in "
          f"{', '.join(map(str, dirs))}")  # fmt: skip
    return Exit.OK


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="afxdpctl", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    config = sub.add_parser("config", help="config file tools")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    validate = config_sub.add_parser(
        "validate", help="check a config file; exit 0 when valid, 1 with every error otherwise"
    )
    validate.add_argument("file", type=Path)
    validate.set_defaults(func=_validate)
    discover = sub.add_parser(
        "discover",
        help="dry run: this node's netdevs and the pools the config would build (changes nothing)",
    )
    discover.add_argument("--config", type=Path, default=Path("config.json"))
    discover.add_argument(
        "--node-name", default=default_node_name(), help="default: $NODE_NAME, else the hostname"
    )
    discover.add_argument("--json", action="store_true", help="machine-readable output")
    discover.set_defaults(func=_discover)
    status = sub.add_parser("status", help="what the running afxdpd offers and has handed out")
    status.add_argument("--run-dir", type=Path, default=Paths().run_dir,
                        help="afxdpd's --run-dir (default: %(default)s)")  # fmt: skip
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=_status)
    install = sub.add_parser(
        "install-cni", help="copy the CNI plugin (the static 'afxdp' shim) into a CNI bin dir"
    )
    install.add_argument("bin_dir", type=Path, nargs="?", default=Path("/opt/cni/bin"),
                         help="default: %(default)s")  # fmt: skip
    install.add_argument(
        "--allow-dir", type=Path, action="append", metavar="DIR",
        help="a directory where the shim may reach afxdpd (a netconf's daemonSocket, DIR/cni.sock)"
             " and queue DELs; repeatable; replaces the defaults "
             f"({', '.join(map(str, shim.DEFAULT_DIRS))}), written to BIN_DIR/{shim.CONF_NAME}",
    )  # fmt: skip
    install.set_defaults(func=_install_cni)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
