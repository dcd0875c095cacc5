"""A CNI request's environment and network config, validated.

Keys of the network config fold case, as the original's Go decoder did (its
NAD examples are written that way); unknown keys are ignored, as CNI expects.
Errors carry the spec's codes: 4 for the environment, 6 for undecodable
config (not JSON, not UTF-8, nested deeper than MAX_DEPTH), 7 for an invalid
one (naming the field), 1 for an unsupported version.

``ethtoolCmds`` rule (checked here, at parse time; code 7 naming the entry):

1. Characters: letters, digits, ``-``, ``:``, ``.``, ``/`` and ASCII
   whitespace (space, tab, CR, LF, FF): the original's rule, whose Go ``\\s``
   is ASCII only. Words are split on ASCII whitespace.
2. The first word is a subcommand a filter setup needs, and only those:
   ``-N``/``--config-ntuple``, ``-U``/``--config-nfc`` (flow rules),
   ``-X``/``--set-rxfh-indir``/``--rxfh`` (RSS), ``-K``/``--features``/
   ``--offload``, ``-L``/``--set-channels``, ``-G``/``--set-ring``. Never a
   global flag first, nor ``-f`` (flash), ``-E`` (EEPROM), ``-W``, ``--reset``,
   ``-s``, ``-p`` or any other.
3. The second word, the device ethtool acts on, is ``-device-`` or the
   request's ``deviceID`` written out: a netconf can change the pod's NIC and
   no other; something to change follows it. (GC and STATUS carry no
   deviceID and run no ethtool: for them the device word need only look like
   a device name.)
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
from afxdp.jsondepth import MAX_DEPTH, too_deep
from afxdp.netdev import name_problem

SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
LATEST = SUPPORTED_VERSIONS[-1]
COMMANDS = ("ADD", "DEL", "CHECK", "GC", "STATUS", "VERSION")

_DEVICE_RE = re.compile(r"[a-zA-Z0-9_-]{1,50}")
# The original's ethtool pattern: letters, digits, '-', ':', '.', '/' and
# whitespace, where Go's \s is ASCII only (Python's would pass U+2003 too).
# No shell ever sees these strings (argv only); the pattern keeps them plain.
_ASCII_SPACE = " \t\n\r\f"
_ETHTOOL_RE = re.compile(rf"[a-zA-Z0-9:./{_ASCII_SPACE}-]+")
_ETHTOOL_SPLIT = re.compile(rf"[{_ASCII_SPACE}]+")
DEVICE_WORD = "-device-"
ETHTOOL_SUBCOMMANDS = frozenset({
    "-N", "--config-ntuple", "-U", "--config-nfc",
    "-X", "--set-rxfh-indir", "--rxfh",
    "-K", "--features", "--offload",
    "-L", "--set-channels",
    "-G", "--set-ring",
})  # fmt: skip
_LOG_FILE_RE = re.compile(r"[a-zA-Z0-9_-]+(\.log|\.txt)")
_CONTAINER_ID_RE = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.\-]*")
# Where CNI runtimes put a pod's network namespace: a file under /run/netns or
# /var/run/netns (containerd, CRI-O, podman), or a process's own
# (/proc/<pid>/ns/net: cri-dockerd). afxdpd opens and enters it as root, so
# ADD and CHECK take nothing else, and an attachment record that names
# anything else is not trusted (attachments.py).
_NETNS_RE = re.compile(
    r"/(?:var/)?run/netns/(?!\.\.?$)[^/\0]+|/proc/(?:\d+|self|thread-self)(?:/task/\d+)?/ns/net"
)

# Which variables each verb needs (CNI spec 1.1, "Parameters").
_REQUIRED_ENV = {
    "ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
    "DEL": ("CNI_CONTAINERID", "CNI_IFNAME", "CNI_PATH"),
    "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
    "GC": ("CNI_PATH",),
    "STATUS": ("CNI_PATH",),
    "VERSION": (),
}


def valid_container_id(container_id: str) -> bool:
    """Whether ``container_id`` is one (CNI_CONTAINERID's rule)."""
    return bool(_CONTAINER_ID_RE.fullmatch(container_id))


def netns_problem(path: str) -> str | None:
    """Why ``path`` is not a network namespace as CNI runtimes name one; None
    when it is."""
    if _NETNS_RE.fullmatch(path):
        return None
    return f"{path!r} is not /run/netns/NAME, /var/run/netns/NAME or /proc/PID/ns/net"


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
    if container_id and not valid_container_id(container_id):
        raise CniError(INVALID_ENV, "CNI_CONTAINERID must be letters, digits, '_', '.' and '-'",
                       f"got {container_id!r}")  # fmt: skip
    ifname = env.get("CNI_IFNAME", "")
    if ifname and name_problem(ifname):
        raise CniError(INVALID_ENV, "CNI_IFNAME is not a valid interface name", f"got {ifname!r}")
    netns = env.get("CNI_NETNS", "")
    if command in ("ADD", "CHECK") and (problem := netns_problem(netns)):
        raise CniError(INVALID_ENV, "CNI_NETNS is not where runtimes put network namespaces",
                       problem)  # fmt: skip
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
        netns=netns,
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


def decode_json(data: bytes) -> Any:
    """``data`` as JSON, or CniError code 6: not JSON, not UTF-8, or too deep.

    UTF-8 and nesting are checked here, before the decoder, with the document's
    byte offset: which exception msgspec raises for a bad byte is its accident
    (UnicodeDecodeError before 0.23, DecodeError since), and so is where deep
    nesting meets the interpreter's recursion limit (``jsondepth``).
    """
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CniError(DECODE_FAILURE, "network configuration is not valid UTF-8",
                       f"bad byte at offset {exc.start}") from None  # fmt: skip
    if (deep := too_deep(data)) is not None:
        where = f"at {deep.path or 'the document'}, byte {deep.offset}"
        raise CniError(
            DECODE_FAILURE, f"network configuration nests deeper than {MAX_DEPTH} levels", where
        )
    try:
        return msgspec.json.decode(data)
    except msgspec.DecodeError as exc:
        raise CniError(
            DECODE_FAILURE, "network configuration is not valid JSON", str(exc)
        ) from None


def peek_version(stdin: bytes) -> str:
    """The request's cniVersion if it can be read at all (for error replies); never raises."""
    try:
        doc = decode_json(stdin)
    except CniError:
        return LATEST
    version = doc.get("cniVersion") if isinstance(doc, dict) else None
    return version if isinstance(version, str) and version in SUPPORTED_VERSIONS else LATEST


def _invalid(field: str, msg: str) -> CniError:
    return CniError(INVALID_CONFIG, f"{field}: {msg}")


def parse_netconf(stdin: bytes, command: str) -> NetConf:
    doc = decode_json(stdin)
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
    elif version not in SUPPORTED_VERSIONS:  # VERSION answers in one we speak (peek_version)
        version = LATEST
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
        _check_ethtool(f"ethtoolCmds[{i}]", cmd, device_id)
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
        cni_version=version,
        name=get("name", str, ""),
        mode=mode,
        device_id=device_id,
        ipam_type=ipam_type,
        ethtool_cmds=tuple(cmds),
        skip_unload_bpf=get("skipUnloadBpf", bool, False),
        prev_result=prev,
        valid_attachments=valid,
    )


def _check_ethtool(field: str, cmd: Any, device_id: str) -> None:
    """The ethtoolCmds rule of the module docstring, for one entry."""
    if not isinstance(cmd, str) or not cmd.strip(_ASCII_SPACE):
        raise _invalid(field, "must be a non-empty string")
    if not _ETHTOOL_RE.fullmatch(cmd):
        raise _invalid(field, "may only hold letters, digits, ASCII spaces and - : . / "
                       f"(ethtool arguments without 'ethtool'), got {cmd!r}")  # fmt: skip
    words = _ETHTOOL_SPLIT.split(cmd.strip(_ASCII_SPACE))
    if words[0] not in ETHTOOL_SUBCOMMANDS:
        allowed = " ".join(sorted(ETHTOOL_SUBCOMMANDS))
        raise _invalid(field, f"subcommand {words[0]!r} is not allowed: the first word must be "
                       f"one a filter setup needs ({allowed})")  # fmt: skip
    target = words[1] if len(words) > 1 else ""
    allowed_targets = {DEVICE_WORD, device_id} if device_id else {DEVICE_WORD}
    if target not in allowed_targets and not (not device_id and _DEVICE_RE.fullmatch(target)):
        raise _invalid(field, f"must act on the pod's device: the word after {words[0]} must be "
                       f"{DEVICE_WORD} or the deviceID, got {target!r}")  # fmt: skip
    if len(words) < 3:
        raise _invalid(field, f"says nothing to change on the device after {words[0]} {target}")


def _valid_attachments(value: Any) -> tuple[tuple[str, str], ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(
        isinstance(a, dict) and isinstance(a.get("containerID"), str) for a in value
    ):
        raise _invalid("cni.dev/valid-attachments", "must be a list of {containerID, ifname}")
    return tuple((a["containerID"], str(a.get("ifname", ""))) for a in value)
