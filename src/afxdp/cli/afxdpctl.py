"""``afxdpctl``: validate configs, show what this node would offer and what the
running afxdpd has handed out, and check the node for what afxdpd needs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import msgspec
import uvloop

from afxdp import __version__, control, inventory, pools
from afxdp.cli import doctor, top
from afxdp.cli.common import Exit, default_node_name, load_or_report, table
from afxdp.cni import shim
from afxdp.config import LoadedConfig
from afxdp.secondary import DevlinkSubfunctions
from afxdp.service import Paths
from afxdp.status import AllocationStatus, DeviceStatus, NotStatus, Status


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
                "name": p.name,
                "resource": p.config.resource_name,
                "mode": p.config.mode,
                "devices": [d.summary() for d in p.devices.values()],
            }
            for p in assembly.pools
        ],
        "warnings": [str(w) for w in loaded.warnings] + assembly.warnings,
    }


def discover_lines(report: dict[str, Any], *, wide: bool = False) -> list[str]:
    """Three tables, as ``status`` prints them: the node, its netdevs, the
    devices each pool would offer (``-o wide``: more columns)."""
    pools_ = report["pools"]
    lines = table(
        ["NODE", "NETDEVS", "POOLS", "DEVICES"],
        [(report["node"], len(report["netdevs"]), len(pools_),
          sum(len(p["devices"]) for p in pools_))],
    )  # fmt: skip
    headers = ["NETDEV", "DRIVER", "PCI", "MAC", "STATE", "IPV4"]
    if wide:
        headers += ["KIND", "NUMA", "RX-QUEUES", "TX-QUEUES", "VIRTUAL"]
    rows: list[list[object]] = []
    for nd in report["netdevs"]:
        row: list[object] = [nd["name"], nd["driver"] or None, nd["pci"], nd["mac"],
                             nd["oper_state"], ",".join(nd["ipv4"]) or None]  # fmt: skip
        if wide:
            row += [nd["kind"], nd["numa_node"], nd["rx_queues"], nd["tx_queues"],
                    _yes(nd["virtual"])]  # fmt: skip
        rows.append(row)
    lines += ["", *table(headers, rows)]
    headers = ["POOL", "RESOURCE", "MODE", "DEVICE", "STATE"]
    if wide:
        headers += ["NUMA", "PARENT"]
    rows = []
    for p in pools_:
        for d in p["devices"]:
            row = [p["name"], p["resource"], p["mode"], d["id"], d["state"]]
            rows.append([*row, d["numa"], d["parent"]] if wide else row)
    lines += ["", *table(headers, rows)]
    return lines


def _discover(args: argparse.Namespace) -> int:
    loaded = load_or_report(args.config)
    if loaded is None:
        return Exit.CONFIG
    # uvloop on purpose: the service runs on it, so the dry run proves the
    # inventory path works there too.
    report = uvloop.run(_discover_report(loaded, args.node_name))
    if args.output in DOCUMENTS:
        code = _print_document(report, args.output)
        if code != Exit.OK:
            return code
    else:
        print("\n".join(discover_lines(report, wide=args.output == "wide")))
        if not report["pools"]:
            print("no pools would be advertised on this node", file=sys.stderr)
    for w in report["warnings"]:
        print(f"warning: {w}", file=sys.stderr)
    return Exit.OK


# ``status`` exit codes: an exec probe's verdict. 3 is Exit.HOST, the code the
# original used when the host could not be served.
READY, NOT_READY, NOT_RUNNING = Exit.OK, 1, Exit.HOST
OUTPUTS = ("table", "wide", "json", "yaml")
DOCUMENTS = ("json", "yaml")  # the whole document, not tables


def _add_output(command: argparse.ArgumentParser, more: str = "") -> None:
    """``-o table|wide|json|yaml`` and ``--json``, alike on every command that has them."""
    command.add_argument("-o", "--output", choices=OUTPUTS, default="table",
                         help="table (default), wide (more columns), json or yaml (the "
                              f"whole document){more}")  # fmt: skip
    command.add_argument("--json", dest="output", action="store_const", const="json",
                         help="the same as -o json")  # fmt: skip


def _print_document(doc: object, output: str) -> int:
    """``doc`` as JSON or YAML on stdout; Exit.CONFIG when YAML cannot be written here."""
    if output == "json":
        sys.stdout.write(msgspec.json.format(msgspec.json.encode(doc)).decode() + "\n")
        return Exit.OK
    try:
        sys.stdout.write(msgspec.yaml.encode(doc).decode())
    except ImportError:
        print("-o yaml needs PyYAML (pip install PyYAML)", file=sys.stderr)
        return Exit.CONFIG
    return Exit.OK


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _prog(a: AllocationStatus) -> object:
    """The program's id, marked when it is off its device (its link was deleted;
    ``xdp_fault`` in the JSON says why). One word: cells split on spaces."""
    return f"{a.xdp_prog_id}(detached)" if a.xdp_fault else a.xdp_prog_id


def _frames(d: DeviceStatus) -> object:
    """What its XDP program counted, one word: per queue, redirected/no
    socket/control (``q0=200/5/0,q3=0/17/0``: frames arrive on queue 3, where
    no socket is bound)."""
    if d.xdp_frames is None:
        return None
    return ",".join(f"q{q.queue}={q.redirected}/{q.no_socket}/{q.control}"
                    for q in d.xdp_frames) or "0"  # fmt: skip


def status_lines(doc: Status, *, wide: bool = False) -> list[str]:
    """Three tables: the node, its pools, their devices (``-o wide``: more
    columns); a fourth with the prepared DRA claims when there are any."""
    devices = [(p, d) for p in doc.pools for d in p.devices]
    lines = table(
        ["NODE", "READY", "POOLS", "DEVICES", "ALLOCATED", "QUEUED-DELS", "DATAPATH"],
        [(doc.node, _yes(not doc.unready_reasons()), len(doc.pools), len(devices),
          len(doc.allocations), doc.queued_dels, doc.datapath)],
    )  # fmt: skip
    lines.append("")
    lines += table(
        ["POOL", "RESOURCE", "API", "MODE", "REGISTERED", "DEVICES", "FREE"],
        [(p.label, p.resource, p.api, p.mode, _yes(p.registered), len(p.devices),
          sum(d.state == "free" for d in p.devices)) for p in doc.pools],
    )  # fmt: skip
    headers = ["POOL", "DEVICE", "STATE", "HEALTH", "POD"]
    if wide:
        headers += ["NUMA", "PARENT", "XDP-MODE", "PROG-ID", "SOCKET", "CONNECTIONS", "ACTIVE",
                    "FRAMES(R/N/C)"]  # fmt: skip
    rows: list[list[object]] = []
    allocations = {a.device: a for a in doc.allocations}
    for pool, d in devices:
        a = allocations.get(d.id)
        # Taken over from kubelet's word after the state record was lost: say so.
        state = f"{d.state}, setup unknown" if a is not None and a.setup_unknown else d.state
        row: list[object] = [pool.label, d.id, state, d.health, d.pod]
        if wide:
            row += [d.numa, d.parent]
            # A free device may carry its prepared program: say which.
            row += [d.xdp_mode, d.xdp_prog_id, None, None, None] if a is None else [
                a.xdp_mode, _prog(a), a.uds_socket or a.pinned_map,
                a.uds_connections, a.uds_active,
            ]  # fmt: skip
            row.append(_frames(d))
        rows.append(row)
    lines.append("")
    lines += table(headers, rows)
    if doc.claims:  # DRA: each prepared ResourceClaim (one word per cell)
        lines.append("")
        lines += table(
            ["CLAIM", "UID", "DEVICES", "PODS"],
            [(f"{c.namespace}/{c.name}", c.uid, ",".join(c.devices) or None,
              ",".join(c.pods) or None) for c in doc.claims],
        )  # fmt: skip
    return lines


def _status(args: argparse.Namespace) -> int:
    where = args.run_dir / control.SOCKET_NAME
    try:
        doc = control.fetch_status(args.run_dir)
    except OSError as exc:
        print(f"afxdpd is not answering on {where}: {exc.strerror or exc}", file=sys.stderr)
        return NOT_RUNNING
    except NotStatus as exc:
        print(f"what answered on {where} is not afxdpd's status: {exc}", file=sys.stderr)
        return NOT_RUNNING
    if args.output in DOCUMENTS:
        code = _print_document(doc, args.output)
        if code != Exit.OK:
            return code
    else:
        print("\n".join(status_lines(doc, wide=args.output == "wide")))
    reasons = doc.unready_reasons()
    for reason in reasons:
        print(f"not ready: {reason}", file=sys.stderr)
    return NOT_READY if reasons else READY


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
    ap.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
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
    _add_output(discover)
    discover.set_defaults(func=_discover)
    status = sub.add_parser("status", help="what the running afxdpd offers and has handed out")
    status.add_argument("--run-dir", type=Path, default=Paths().run_dir,
                        help="afxdpd's --run-dir (default: %(default)s)")  # fmt: skip
    _add_output(status, "; exit 0 ready, 1 not ready, 3 not answering")
    status.set_defaults(func=_status)
    doctor_p = sub.add_parser(
        "doctor",
        help="check this node for what afxdpd needs, each failure with its fix; exit 0 "
             "only when every check passes",
    )  # fmt: skip
    defaults = Paths()
    doctor.configure(doctor_p, kubelet_dir=defaults.kubelet_dir, pin_dir=defaults.pin_dir)
    top_p = sub.add_parser(
        "top",
        help="each device's XDP verdicts per second by queue (redirected, no socket, control), "
             "refreshed in the terminal",
    )  # fmt: skip
    top.configure(top_p, run_dir=defaults.run_dir)
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
