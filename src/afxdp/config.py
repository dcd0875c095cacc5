"""The device plugin config file: msgspec model and every validation rule.

The format is the one users of the original project already write (its README
is the reference). Keys match case-insensitively, as the original's Go decoder
did, so ``ExcludeDevices`` and ``excludeDevices`` are the same key. Unknown keys
are accepted with a warning (old configs carry some), ``null`` where an object
is required is an error. Every error names its JSON path and all of them are
reported at once.

Validation walks the decoded JSON by hand rather than letting msgspec convert
it: msgspec stops at the first error and matches keys case-sensitively, and
both would be regressions for users.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import stat
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import msgspec

from afxdp import contracts
from afxdp.errors import ConfigError, ConfigIssue
from afxdp.jsondepth import too_deep

LOG_LEVELS = ("debug", "info", "warning", "error")
MODES = ("primary", "cdq")
# How a pool is offered to kubelet: the device plugin, or Dynamic Resource
# Allocation (resource.k8s.io/v1). One API per pool: no device is handed out by two.
APIS = ("devicePlugin", "dra")
LOG_DIR = Path("/var/log/afxdp-k8s-plugins")

# Bounds of the original (its error texts say 100 and 1000; the bounds are the truth).
PRIMARY_MAX = 10
SECONDARY_MAX = 64
UID_MIN, UID_MAX = 1000, 256000
UDS_TIMEOUT_MIN, UDS_TIMEOUT_MAX, UDS_TIMEOUT_DEFAULT = 30, 300, 30
NAME_MAX = 50
POOL_NAME_MAX = 20
# A config is a few KiB: one near this size is a mistake, and is held whole in memory.
MAX_FILE_BYTES = 16 * 1024 * 1024
# A node name as kubelet registers it: a DNS subdomain (FQDNs with dots on many
# clouds), labels of at most 63 characters, 253 in all.
HOSTNAME_MAX = 253

_NAME_RE = re.compile(r"[a-zA-Z0-9_-]+")
_POOL_NAME_RE = re.compile(r"[a-zA-Z0-9]+")
_HOSTNAME_RE = re.compile(r"[a-zA-Z0-9-]{1,63}(\.[a-zA-Z0-9-]{1,63})*")
_LOG_FILE_RE = re.compile(r"[a-zA-Z0-9_-]+(\.log|\.txt)")
# Anchored (the original's was not, so "xx0000:81:00.1yy" passed); upper case is
# accepted and folded, since sysfs spells addresses in lower case.
_PCI_RE = re.compile(r"[0-9a-f]{4}:[0-9a-f]{2,4}:[0-9a-f]{2}\.[0-9a-f]")
_HEX = frozenset("0123456789abcdefABCDEF")

Mode = Literal["primary", "cdq"]
Api = Literal["devicePlugin", "dra"]


class Device(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """A device named by exactly one of name, MAC (normalised) or PCI address."""

    name: str | None = None
    mac: str | None = None
    pci: str | None = None
    secondary: int = 0

    def describe(self) -> str:
        """How the config names this device, for messages."""
        if self.name is not None:
            return f"name {self.name}"
        if self.mac is not None:
            return f"mac {self.mac}"
        return f"pci {self.pci}"


class Driver(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """Devices selected by kernel driver name (or link kind for virtual devices)."""

    name: str
    primary: int = 0
    secondary: int = 0
    exclude_devices: tuple[Device, ...] = ()
    exclude_addressed: bool = False


class Node(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """Per-node replacement of a pool's drivers and devices."""

    hostname: str
    drivers: tuple[Driver, ...] = ()
    devices: tuple[Device, ...] = ()


class Pool(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """One pool, advertised as resource ``afxdp/<name>``."""

    name: str
    mode: Mode
    drivers: tuple[Driver, ...] = ()
    devices: tuple[Device, ...] = ()
    nodes: tuple[Node, ...] = ()
    uid: int = 0
    uds_server_disable: bool = False
    bpf_map_pinning_enable: bool = False
    # Seconds; None means the idle timeout is disabled (the file's -1).
    uds_timeout: int | None = UDS_TIMEOUT_DEFAULT
    requires_unprivileged_bpf: bool = False
    api: Api = "devicePlugin"

    @property
    def dra(self) -> bool:
        """Whether the pool is offered through DRA (else the device plugin)."""
        return self.api == "dra"

    # ARP and IPv6 neighbour discovery to the pod's kernel, not its socket
    # (map-in-map datapath only: the per-pod program has no such check).
    control_frames_to_kernel: bool = False

    @property
    def resource_name(self) -> str:
        return contracts.resource_name(self.name)

    @property
    def env_var(self) -> str:
        return contracts.env_var(self.name)


class Config(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """The whole config file."""

    pools: tuple[Pool, ...] = ()
    log_level: str = "info"
    log_file: str | None = None
    kind_cluster: bool = False
    # Write a CDI spec per pool and name CDI devices in Allocate (Kubernetes 1.28+).
    cdi: bool = True


class LoadedConfig(msgspec.Struct, frozen=True):
    """A valid config and the warnings found while reading it."""

    config: Config
    warnings: tuple[ConfigIssue, ...] = ()


def load_config(data: bytes | str) -> LoadedConfig:
    """Decode and validate a config document; raise ConfigError listing every problem."""
    # Our own UTF-8 and nesting checks, before the decoder sees the document:
    # which exception msgspec raises for a bad byte is its accident
    # (UnicodeDecodeError before 0.23, DecodeError since), and so is where deep
    # nesting meets the recursion limit (``jsondepth``); the answer must not
    # depend on the version. (The validator's walk recurses too: the bound
    # keeps it far from the limit.)
    if not _is_utf8(data):
        raise ConfigError(_invalid_utf8(data))
    if (deep := too_deep(data)) is not None:
        problem = f"nests deeper than {deep.limit} levels (byte {deep.offset})"
        raise ConfigError([ConfigIssue(deep.path or "<document>", problem)])
    try:
        raw = msgspec.json.decode(data)
    except msgspec.DecodeError as exc:
        raise ConfigError([ConfigIssue("<document>", f"not valid JSON: {exc}")]) from None
    v = _Validator()
    config = v.config(raw)
    if v.errors or config is None:
        raise ConfigError(v.errors)
    return LoadedConfig(config, tuple(v.warnings))


def _is_utf8(data: bytes | str) -> bool:
    """Whether ``data`` is valid UTF-8 (a str: holds no lone surrogate)."""
    try:
        data.decode("utf-8") if isinstance(data, bytes) else data.encode("utf-8")
    except UnicodeError:
        return False
    return True


def _invalid_utf8(data: bytes | str) -> list[ConfigIssue]:
    """Where a document that is not UTF-8 has its bad bytes, by JSON path.

    A decoder only says "invalid UTF-8"; the stdlib parser keeps the bad bytes as
    surrogates (surrogateescape), so a walk can name each string that has them.
    """
    raw = data if isinstance(data, bytes) else data.encode("utf-8", "surrogatepass")
    try:
        doc = json.loads(raw.decode("utf-8", "surrogateescape"))
    except ValueError as exc:
        return [ConfigIssue("<document>", f"not valid UTF-8 JSON: {exc}")]
    issues: list[ConfigIssue] = []

    def bad(text: str) -> str | None:
        try:
            text.encode()
        except UnicodeEncodeError as exc:
            byte = ord(text[exc.start]) - 0xDC00
            return f"is not valid UTF-8 (byte 0x{byte & 0xFF:02x} at character {exc.start})"
        return None

    def walk(node: Any, path: str) -> None:
        if isinstance(node, str) and (problem := bad(node)):
            issues.append(ConfigIssue(path, problem))
        elif isinstance(node, list):
            for i, item in enumerate(node):
                walk(item, f"{path}[{i}]")
        elif isinstance(node, dict):
            for key, value in node.items():
                key_path = f"{path}.{key}" if path else key
                if problem := bad(key):
                    issues.append(ConfigIssue(key_path.encode(errors="replace").decode(),
                                              f"key {problem}"))  # fmt: skip
                else:
                    walk(value, key_path)

    walk(doc, "")
    return issues or [ConfigIssue("<document>", "is not valid UTF-8")]


_FILE_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a directory",
               stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device"}  # fmt: skip


def read_config_file(path: str | Path) -> bytes:
    """The bytes of the config file at ``path``: a regular file of at most
    MAX_FILE_BYTES, else a ConfigError naming ``path``.

    Opened with O_NONBLOCK: opening a FIFO to read waits for a writer, maybe for
    ever, and a device's open may wait or act. The fstat of what was opened (a
    stat of the path could see another file) refuses anything but a regular
    file before a byte is read; the reads then block as file reads do.
    """

    def refused(why: str) -> ConfigError:
        return ConfigError([ConfigIssue(str(path), why)])

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise refused(f"cannot read: {exc.strerror or exc}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = _FILE_KINDS.get(stat.S_IFMT(mode), "not a file")
            raise refused(f"is {kind}, not a regular file; refused")
        os.set_blocking(fd, True)
        chunks, size = [], 0
        while chunk := os.read(fd, MAX_FILE_BYTES + 1 - size):  # grown since: still bounded
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_FILE_BYTES:
                raise refused(f"is larger than {MAX_FILE_BYTES} bytes; refused")
        return b"".join(chunks)
    except OSError as exc:
        raise refused(f"cannot read: {exc.strerror or exc}") from None
    finally:
        os.close(fd)


def load_config_file(path: str | Path) -> LoadedConfig:
    """Read ``path`` (``read_config_file``) and validate it; an unreadable file
    is a ConfigError too."""
    return load_config(read_config_file(path))


def refuse_pinned_maps(config: Config) -> None:
    """ConfigError naming every pool with ``bpfMapPinningEnable``, for an
    afxdpd started with ``--no-pinned-maps`` (the capabilities DaemonSet).

    A pinned map reaches a pod only through a bpffs that afxdpd mounts in its
    pin dir and kubelet sees, which takes Bidirectional mount propagation, which
    Kubernetes grants privileged containers only. Without it afxdpd would pin
    maps into a mount nobody else sees and hand pods an empty directory: the
    pool is refused instead of half served."""
    why = (
        "wants pinned maps, and this afxdpd runs with --no-pinned-maps: its pin dir "
        "cannot reach kubelet (that needs a privileged container, deploy/daemonset.yaml)"
    )
    issues = [
        ConfigIssue(f"pools[{i}].bpfMapPinningEnable", f"pool {pool.name!r} {why}")
        for i, pool in enumerate(config.pools)
        if pool.bpf_map_pinning_enable
    ]
    if issues:
        raise ConfigError(issues)


def parse_mac(text: str) -> str | None:
    """Parse a MAC as Go's net.ParseMAC does (EUI-48/64/IPoIB, ``:``, ``-`` or ``.``).

    Returns the lower-case, colon-separated form, or None when it is not a MAC.
    """
    if len(text) < 14:
        return None
    if text[2] in ":-":
        sep = text[2]
        if (len(text) + 1) % 3:
            return None
        groups = text.split(sep)
        if len(groups) not in (6, 8, 20) or any(len(g) != 2 for g in groups):
            return None
    elif text[4] == ".":
        if (len(text) + 1) % 5:
            return None
        words = text.split(".")
        if len(words) * 2 not in (6, 8, 20) or any(len(w) != 4 for w in words):
            return None
        groups = [w[i : i + 2] for w in words for i in (0, 2)]
    else:
        return None
    if any(c not in _HEX for g in groups for c in g):
        return None
    return ":".join(groups).lower()


_JSON_TYPES: Mapping[type, str] = {
    dict: "object",
    list: "array",
    str: "string",
    int: "number",
    float: "number",
    bool: "boolean",
    type(None): "null",
}

T = TypeVar("T")


def _kind(value: Any) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


class _Validator:
    """Walks decoded JSON, collecting errors and warnings with their paths."""

    def __init__(self) -> None:
        self.errors: list[ConfigIssue] = []
        self.warnings: list[ConfigIssue] = []

    def error(self, path: str, message: str) -> None:
        self.errors.append(ConfigIssue(path, message))

    # -- generic helpers -------------------------------------------------

    def fields(self, raw: Any, path: str, known: tuple[str, ...]) -> dict[str, Any] | None:
        """Map the canonical names in ``known`` to values; warn on unknown keys.

        Keys fold case as Go's decoder does; among spellings of one key the
        last in the document wins, as in Go.
        """
        if not isinstance(raw, dict):
            self.error(path or "<document>", f"must be an object, got {_kind(raw)}")
            return None
        by_fold = {k.lower(): k for k in known}
        out: dict[str, Any] = {}
        for key, value in raw.items():
            canonical = by_fold.get(key.lower())
            if canonical is not None:
                out[canonical] = value
                continue
            where = f"{path}.{key}" if path else key
            close = difflib.get_close_matches(key.lower(), list(by_fold), n=1, cutoff=0.75)
            hint = f" (did you mean '{by_fold[close[0]]}'?)" if close else ""
            self.warnings.append(ConfigIssue(where, f"unknown key ignored{hint}"))
        return out

    def typed(self, obj: dict[str, Any], key: str, path: str, kind: type[T], default: T) -> T:
        """The value of ``key`` if it has JSON type ``kind``; ``null`` counts as absent (Go)."""
        value = obj.get(key)
        if value is None:
            return default
        # bool is an int in Python but never a number in JSON.
        if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
            return value
        want = {str: "a string", int: "an integer", bool: "a boolean"}[kind]
        shown = f"{value!r}" if isinstance(value, (int, float)) else _kind(value)
        self.error(f"{path}.{key}", f"must be {want}, got {shown}")
        return default

    def items(
        self, obj: dict[str, Any], key: str, path: str, each: Callable[[Any, str], T | None]
    ) -> tuple[T, ...]:
        value = obj.get(key)
        if value is None:
            return ()
        where = f"{path}.{key}" if path else key
        if not isinstance(value, list):
            self.error(where, f"must be an array, got {_kind(value)}")
            return ()
        out: list[T] = []
        for i, elem in enumerate(value):
            parsed = each(elem, f"{where}[{i}]")
            if parsed is not None:
                out.append(parsed)
        return tuple(out)

    def name_rule(
        self, value: str | None, path: str, regex: re.Pattern[str], chars: str, limit: int
    ) -> None:
        # The original checks the characters before the length; keep its order.
        if value is None or value == "":
            return
        if not regex.fullmatch(value):
            self.error(path, f"must only contain {chars}, got {value!r}")
        elif len(value) > limit:
            self.error(path, f"must be between 1 and {limit} characters, got {len(value)}")

    def count_rule(self, value: int, path: str, low: int, high: int) -> None:
        if value != 0 and not low <= value <= high:
            self.error(path, f"must be between {low} and {high}, got {value}")

    # -- the schema --------------------------------------------------------

    def config(self, raw: Any) -> Config | None:
        obj = self.fields(raw, "", ("pools", "logLevel", "logFile", "kindCluster", "cdi"))
        if obj is None:
            return None
        log_level = self.typed(obj, "logLevel", "", str, "")
        if log_level and log_level not in LOG_LEVELS:
            self.error("logLevel", f"must be one of {', '.join(LOG_LEVELS)}, got {log_level!r}")
        log_file = self.typed(obj, "logFile", "", str, "")
        if log_file and not _LOG_FILE_RE.fullmatch(log_file):
            self.error(
                "logFile",
                "must be a bare file name of letters, digits, '_' and '-' ending in .log or .txt"
                f", got {log_file!r}",
            )
        kind_cluster = self.typed(obj, "kindCluster", "", bool, False)
        cdi = self.typed(obj, "cdi", "", bool, True)
        pools = self.items(obj, "pools", "", self.pool)
        self.unique(
            [(p.name.lower(), f"pools[{i}].name") for i, p in enumerate(pools) if p.name],
            "duplicate pool name (names may differ only in case: env vars are upper-cased)",
        )
        if kind_cluster and len(pools) > 1:
            self.error("kindCluster", f"a kind cluster takes at most one pool, got {len(pools)}")
        return Config(
            pools=pools,
            log_level=log_level or "info",
            log_file=log_file or None,
            kind_cluster=kind_cluster,
            cdi=cdi,
        )

    def unique(self, keyed: list[tuple[str, str]], message: str) -> None:
        first: dict[str, str] = {}
        for key, path in keyed:
            if key in first:
                self.error(path, f"{message}: also at {first[key]}")
            else:
                first[key] = path

    def pool(self, raw: Any, path: str) -> Pool | None:
        obj = self.fields(
            raw,
            path,
            (
                "name",
                "mode",
                "drivers",
                "devices",
                "nodes",
                "uid",
                "udsServerDisable",
                "bpfMapPinningEnable",
                "udsTimeout",
                "requiresUnprivilegedBpf",
                "api",
                "controlFramesToKernel",
            ),
        )
        if obj is None:
            return None
        start = len(self.errors)
        name = self.typed(obj, "name", path, str, "")
        if not name:
            self.error(f"{path}.name", "is required")
        self.name_rule(name, f"{path}.name", _POOL_NAME_RE, "letters and digits", POOL_NAME_MAX)
        mode = self.typed(obj, "mode", path, str, "")
        if not mode:
            self.error(f"{path}.mode", "is required")
        elif mode not in MODES:
            self.error(f"{path}.mode", f"must be one of {', '.join(MODES)}, got {mode!r}")
        drivers = self.items(obj, "drivers", path, self.driver)
        devices = self.items(obj, "devices", path, self.device)
        nodes = self.items(obj, "nodes", path, self.node)
        self.unique(
            [(n.hostname.lower(), f"{path}.nodes[{i}].hostname") for i, n in enumerate(nodes)],
            "duplicate node entry",
        )
        if not any(obj.get(k) for k in ("drivers", "devices", "nodes")):
            self.error(path, "must contain devices, drivers or nodes")
        uid = self.typed(obj, "uid", path, int, 0)
        if uid != 0 and not UID_MIN <= uid <= UID_MAX:
            self.error(f"{path}.uid", f"must be 0 or between {UID_MIN} and {UID_MAX}, got {uid}")
        timeout = self.typed(obj, "udsTimeout", path, int, 0)
        if timeout not in (-1, 0) and not UDS_TIMEOUT_MIN <= timeout <= UDS_TIMEOUT_MAX:
            self.error(
                f"{path}.udsTimeout",
                f"must be -1, 0, or between {UDS_TIMEOUT_MIN} and {UDS_TIMEOUT_MAX} seconds"
                f", got {timeout}",
            )
        uds_off = self.typed(obj, "udsServerDisable", path, bool, False)
        pinning = self.typed(obj, "bpfMapPinningEnable", path, bool, False)
        if pinning and not uds_off:
            self.error(
                f"{path}.bpfMapPinningEnable",
                "requires udsServerDisable: true (the pinned map replaces the UDS handshake; "
                "with both, one XDP program would replace the other's)",
            )
        unpriv = self.typed(obj, "requiresUnprivilegedBpf", path, bool, False)
        api = self.typed(obj, "api", path, str, "devicePlugin")
        if api not in APIS:
            self.error(f"{path}.api", f"must be one of {', '.join(APIS)}, got {api!r}")
        control = self.typed(obj, "controlFramesToKernel", path, bool, False)
        if len(self.errors) > start:
            return None
        return Pool(
            name=name,
            mode="cdq" if mode == "cdq" else "primary",
            drivers=drivers,
            devices=devices,
            nodes=nodes,
            uid=uid,
            uds_server_disable=uds_off,
            bpf_map_pinning_enable=pinning,
            uds_timeout=None if timeout == -1 else (timeout or UDS_TIMEOUT_DEFAULT),
            requires_unprivileged_bpf=unpriv,
            api="dra" if api == "dra" else "devicePlugin",
            control_frames_to_kernel=control,
        )

    def driver(self, raw: Any, path: str) -> Driver | None:
        obj = self.fields(
            raw, path, ("name", "primary", "secondary", "excludeDevices", "excludeAddressed")
        )
        if obj is None:
            return None
        start = len(self.errors)
        name = self.typed(obj, "name", path, str, "")
        if not name:
            self.error(f"{path}.name", "is required: a driver must have a name")
        self.name_rule(
            name, f"{path}.name", _NAME_RE, "letters, digits, hyphen and underscore", NAME_MAX
        )
        primary = self.typed(obj, "primary", path, int, 0)
        self.count_rule(primary, f"{path}.primary", 1, PRIMARY_MAX)
        secondary = self.typed(obj, "secondary", path, int, 0)
        self.count_rule(secondary, f"{path}.secondary", 1, SECONDARY_MAX)
        excluded = self.items(obj, "excludeDevices", path, self.device)
        addressed = self.typed(obj, "excludeAddressed", path, bool, False)
        if len(self.errors) > start:
            return None
        return Driver(
            name=name,
            primary=primary,
            secondary=secondary,
            exclude_devices=excluded,
            exclude_addressed=addressed,
        )

    def device(self, raw: Any, path: str) -> Device | None:
        obj = self.fields(raw, path, ("name", "mac", "pci", "secondary"))
        if obj is None:
            return None
        start = len(self.errors)
        name = self.typed(obj, "name", path, str, "")
        mac = self.typed(obj, "mac", path, str, "")
        pci = self.typed(obj, "pci", path, str, "")
        given = [k for k, v in (("name", name), ("mac", mac), ("pci", pci)) if v]
        if not given:
            self.error(path, "a device must be identified by one of name, mac or pci")
        elif len(given) > 1:
            self.error(
                path,
                "only one form of device identification can be used (name, mac or pci)"
                f", got {' and '.join(given)}",
            )
        self.name_rule(
            name, f"{path}.name", _NAME_RE, "letters, digits, hyphen and underscore", NAME_MAX
        )
        norm_mac = parse_mac(mac) if mac else None
        if mac and norm_mac is None:
            self.error(f"{path}.mac", f"must be a MAC address like 68:05:ca:2d:e9:1b, got {mac!r}")
        if pci and not _PCI_RE.fullmatch(pci.lower()):
            self.error(
                f"{path}.pci", f"must be a PCI address in BDF form like 0000:81:00.1, got {pci!r}"
            )
        secondary = self.typed(obj, "secondary", path, int, 0)
        self.count_rule(secondary, f"{path}.secondary", 1, SECONDARY_MAX)
        if len(self.errors) > start:
            return None
        return Device(name=name or None, mac=norm_mac, pci=pci.lower() or None, secondary=secondary)

    def node(self, raw: Any, path: str) -> Node | None:
        obj = self.fields(raw, path, ("hostname", "drivers", "devices"))
        if obj is None:
            return None
        start = len(self.errors)
        hostname = self.typed(obj, "hostname", path, str, "")
        if not hostname:
            self.error(f"{path}.hostname", "is required: a node must have a hostname")
        self.name_rule(
            hostname,
            f"{path}.hostname",
            _HOSTNAME_RE,
            "letters, digits, hyphens and dots, labels of at most 63 characters "
            "(a node name as kubectl get nodes shows it)",
            HOSTNAME_MAX,
        )
        # A node with neither drivers nor devices is valid (the README's own
        # example): the pool takes nothing on that node.
        drivers = self.items(obj, "drivers", path, self.driver)
        devices = self.items(obj, "devices", path, self.device)
        if len(self.errors) > start:
            return None
        return Node(hostname=hostname, drivers=drivers, devices=devices)
