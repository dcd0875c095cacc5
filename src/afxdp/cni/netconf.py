"""A CNI request's environment and network config, validated.

Keys of the network config fold case, as the original's Go decoder did (its
NAD examples are written that way); unknown keys are ignored, as CNI expects.
Errors carry the spec's codes: 4 for the environment, 6 for undecodable
config, 7 for an invalid one (naming the field), 1 for an unsupported version.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import msgspec

from afxdp.cni.errors import (
    DECODE_FAILURE,
    INCOMPATIBLE_VERSION,
    INVALID_CONFIG,
    INVALID_ENV,
    CniError,
)

SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
LATEST = SUPPORTED_VERSIONS[-1]
COMMANDS = ("ADD", "DEL", "CHECK", "GC", "STATUS", "VERSION")

_DEVICE_RE = re.compile(r"[a-zA-Z0-9_-]{1,50}")
# The original's ethtool pattern: letters, digits, '-', ':', '.', '/' and spaces.
# No shell ever sees these strings (argv only); the pattern keeps them plain.
_ETHTOOL_RE = re.compile(r"[a-zA-Z0-9:./\s-]+")
_LOG_FILE_RE = re.compile(r"[a-zA-Z0-9_-]+(\.log|\.txt)")
_CONTAINER_ID_RE = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.\-]*")
_IFNAME_BAD = re.compile(r"[/:\s]")

# Which variables each verb needs (CNI spec 1.1, "Parameters").
_REQUIRED_ENV = {
    "ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
    "DEL": ("CNI_CONTAINERID", "CNI_IFNAME", "CNI_PATH"),
    "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
    "GC": ("CNI_PATH",),
    "STATUS": ("CNI_PATH",),
    "VERSION": (),
}


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split("."))


@dataclass(frozen=True)
class Env:
    command: str
    container_id: str
    netns: str
    ifname: str
    args: dict[str, str]
    path: tuple[str, ...]
    raw: dict[str, str]


def parse_env(env: dict[str, str]) -> Env:
    command = env.get("CNI_COMMAND", "")
    if command not in COMMANDS:
        raise CniError(INVALID_ENV, f"CNI_COMMAND must be one of {', '.join(COMMANDS)}",
                       f"got {command!r}")  # fmt: skip
    for name in _REQUIRED_ENV[command]:
        if not env.get(name):
            raise CniError(INVALID_ENV, f"{name} is required for {command}")
    container_id = env.get("CNI_CONTAINERID", "")
    if container_id and not _CONTAINER_ID_RE.fullmatch(container_id):
        raise CniError(INVALID_ENV, "CNI_CONTAINERID must be letters, digits, '_', '.' and '-'",
                       f"got {container_id!r}")  # fmt: skip
    ifname = env.get("CNI_IFNAME", "")
    if ifname and (len(ifname) > 15 or ifname in (".", "..") or _IFNAME_BAD.search(ifname)):
        raise CniError(INVALID_ENV, "CNI_IFNAME is not a valid interface name", f"got {ifname!r}")
    args: dict[str, str] = {}
    for part in filter(None, env.get("CNI_ARGS", "").split(";")):
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise CniError(INVALID_ENV, "CNI_ARGS must be K=V pairs separated by ';'",
                           f"bad entry {part!r}")  # fmt: skip
        args[key] = value
    return Env(
        command=command,
        container_id=container_id,
        netns=env.get("CNI_NETNS", ""),
        ifname=ifname,
        args=args,
        path=tuple(p for p in env.get("CNI_PATH", "").split(":") if p),
        raw=dict(env),
    )


@dataclass(frozen=True)
class NetConf:
    raw: dict[str, Any]  # the whole document, as IPAM gets it
    cni_version: str
    name: str
    mode: str
    device_id: str
    ipam_type: str | None
    ethtool_cmds: tuple[str, ...]
    skip_unload_bpf: bool
    prev_result: dict[str, Any] | None
    valid_attachments: tuple[tuple[str, str], ...] | None


def peek_version(stdin: bytes) -> str:
    """The request's cniVersion if it can be read at all (for error replies)."""
    try:
        doc = msgspec.json.decode(stdin)
    except (msgspec.DecodeError, RecursionError):
        return LATEST
    version = doc.get("cniVersion") if isinstance(doc, dict) else None
    return version if isinstance(version, str) and version in SUPPORTED_VERSIONS else LATEST


def _invalid(field: str, msg: str) -> CniError:
    return CniError(INVALID_CONFIG, f"{field}: {msg}")


def parse_netconf(stdin: bytes, command: str) -> NetConf:
    try:
        doc = msgspec.json.decode(stdin)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise CniError(
            DECODE_FAILURE, "network configuration is not valid JSON", str(exc)
        ) from None
    if not isinstance(doc, dict):
        raise CniError(DECODE_FAILURE, "network configuration must be a JSON object")
    fold = {k.lower(): v for k, v in doc.items()}

    def get(key: str, kind: type, default: Any) -> Any:
        value = fold.get(key.lower())
        if value is None:
            return default
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise _invalid(key, f"must be a {kind.__name__}, got {type(value).__name__}")
        return value

    version = get("cniVersion", str, "")
    if command != "VERSION":
        if not version:
            raise _invalid("cniVersion", "is required")
        if version not in SUPPORTED_VERSIONS:
            supported = list(SUPPORTED_VERSIONS)
            detail = f"config is {version!r}, afxdp supports {supported}"
            raise CniError(INCOMPATIBLE_VERSION, "incompatible CNI versions", detail)
    mode = get("mode", str, "")
    if mode not in ("", "primary", "cdq"):
        raise _invalid("mode", f"must be primary or cdq, got {mode!r}")
    device_id = get("deviceID", str, "")
    if command in ("ADD", "DEL", "CHECK"):
        if not device_id:
            raise _invalid("deviceID", "is required (Multus sets it from the pod's allocation)")
        if not _DEVICE_RE.fullmatch(device_id):
            raise _invalid(
                "deviceID", f"must be 1-50 letters, digits, '_' or '-', got {device_id!r}"
            )
    ipam = get("ipam", dict, {})
    ipam_type = ipam.get("type") if ipam else None
    if ipam and not (isinstance(ipam_type, str) and _DEVICE_RE.fullmatch(ipam_type)):
        raise _invalid("ipam.type", "must name an IPAM plugin")
    cmds = get("ethtoolCmds", list, [])
    for i, cmd in enumerate(cmds):
        if not isinstance(cmd, str) or not cmd.strip():
            raise _invalid(f"ethtoolCmds[{i}]", "must be a non-empty string")
        if not _ETHTOOL_RE.fullmatch(cmd):
            raise _invalid(f"ethtoolCmds[{i}]",
                           "may only hold letters, digits, spaces and - : . / "
                           f"(ethtool arguments without 'ethtool'), got {cmd!r}")  # fmt: skip
    log_file = get("logFile", str, "")
    if log_file and not _LOG_FILE_RE.fullmatch(log_file):
        raise _invalid("logFile", f"must be a bare .log or .txt file name, got {log_file!r}")
    log_level = get("logLevel", str, "")
    if log_level and log_level not in ("debug", "info", "warning", "error"):
        raise _invalid("logLevel", f"must be debug, info, warning or error, got {log_level!r}")
    get("dpSyncer", bool, False)
    prev = get("prevResult", dict, None)
    valid = _valid_attachments(fold.get("cni.dev/valid-attachments"))
    return NetConf(
        raw=doc,
        cni_version=version or LATEST,
        name=get("name", str, ""),
        mode=mode,
        device_id=device_id,
        ipam_type=ipam_type,
        ethtool_cmds=tuple(cmds),
        skip_unload_bpf=get("skipUnloadBpf", bool, False),
        prev_result=prev,
        valid_attachments=valid,
    )


def _valid_attachments(value: Any) -> tuple[tuple[str, str], ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(
        isinstance(a, dict) and isinstance(a.get("containerID"), str) for a in value
    ):
        raise _invalid("cni.dev/valid-attachments", "must be a list of {containerID, ifname}")
    return tuple((a["containerID"], str(a.get("ifname", ""))) for a in value)
