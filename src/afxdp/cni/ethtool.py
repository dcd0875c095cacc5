"""ethtool filters from the NAD's ``ethtoolCmds`` (primary mode only), and
putting back exactly what they changed.

Each entry is ethtool's arguments without the word ``ethtool``; ``-device-``
becomes the netdev and ``-ip-`` its first IPAM address. They run as argv lists,
never through a shell, after the characters were checked (netconf.py).

Before a command runs, what it is about to change is read (``before``) into a
``Change`` that the handler records in the attachment first; DEL (or a failed
ADD) hands it to ``restore``:

- ``-K``: the features as ethtool reports them; restore sets back the ones
  whose requested value differs now (not the features DEL "assumes").
- ``-L`` / ``-G``: the current channel / ring settings; restore sets back the
  ones that differ now.
- ``-N`` / ``-U`` with a flow rule: the rule IDs ethtool says it added
  ("Added rule with ID N"); restore deletes them. ``rx-flow-hash``: the
  fields hashed before; restore sets them again.
- ``-X``: restore is ``-X dev default`` (the driver's spread).

A command that cannot be put back (another subcommand, another device, a
rule deletion) is refused before anything runs. Unlike the original, ntuple
filtering is switched on only when a command needs it (a NIC without ntuple
support, veth for one, would fail every ADD otherwise), through a ``-K`` step
that is restored like any other.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from afxdp.cni.errors import INVALID_CONFIG, IO_FAILURE, CniError
from afxdp.workers import ProgramTimeout, run_program

TIMEOUT = 30.0  # a ring or channel change may reset a NIC; seconds, not minutes

_FEATURES = ("-K", "--features", "--offload")
_CHANNELS = ("-L", "--set-channels")
_RINGS = ("-G", "--set-ring")
_NTUPLE = ("-N", "-U", "--config-ntuple", "--config-nfc")
_RXFH = ("-X", "--set-rxfh-indir", "--rxfh")
_READ_OPTION = {"-L": "-l", "--set-channels": "-l", "-G": "-g", "--set-ring": "-g"}

_ADDED_RULE = re.compile(r"Added rule with ID (\d+)")
_FEATURE_LINE = re.compile(r"^(\t?)([\w-]+): (on|off)( \[fixed\])?( \[requested (on|off)\])?$")
# ethtool -n DEV rx-flow-hash TYPE prints one line per hashed field; -N takes letters.
_HASH_FIELDS = (("L2DA", "m"), ("VLAN tag", "v"), ("L3 proto", "t"), ("IP SA", "s"),
                ("IP DA", "d"), ("L4 bytes 0 & 1", "f"), ("L4 bytes 2 & 3", "n"),
                ("Discard", "r"))  # fmt: skip


class Failed(CniError):
    """ethtool ran and refused (non-zero exit): a command that changed nothing."""


@dataclass(frozen=True)
class Change:
    """How to put back what one ethtool command changes (kept in the attachment)."""

    kind: str  # "features" | "settings" | "rules" | "flow-hash" | "rxfh"
    device: str
    option: str = ""  # -L/-G for settings; the flow type for flow-hash
    before: dict[str, str] = field(default_factory=dict)
    rules: tuple[int, ...] = ()

    def to_doc(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> Change:
        return cls(**{**doc, "rules": tuple(doc.get("rules", ()))})

    @property
    def rereads(self) -> bool:
        """Whether restore compares with the device (so is harmless when nothing changed)."""
        return self.kind in ("features", "settings", "flow-hash")

    def after(self, stdout: str) -> Change:
        """This change completed by what the command printed (the rule IDs it added)."""
        if self.kind != "rules":
            return self
        return replace(self, rules=(*self.rules, *(int(n) for n in _ADDED_RULE.findall(stdout))))


def render(cmds: tuple[str, ...], device: str, ip: str | None) -> list[list[str]]:
    """The argv of each command, ``-device-`` and ``-ip-`` replaced; ntuple
    switched on first when a command needs it. Refuses what cannot be undone."""
    argvs = []
    for i, cmd in enumerate(cmds):
        if "-ip-" in cmd and ip is None:
            raise CniError(INVALID_CONFIG, f"ethtoolCmds[{i}]: uses -ip- but IPAM gave no address")
        argv = [w.replace("-device-", device).replace("-ip-", ip or "") for w in cmd.split()]
        _check(i, argv, device)
        argvs.append(argv)
    if any(a[0] in _NTUPLE and "rx-flow-hash" not in a for a in argvs):
        argvs.insert(0, ["--features", device, "ntuple", "on"])
    return argvs


def _check(i: int, argv: list[str], device: str) -> None:
    where = f"ethtoolCmds[{i}]"
    if argv[0] not in (*_FEATURES, *_CHANNELS, *_RINGS, *_NTUPLE, *_RXFH):
        raise CniError(INVALID_CONFIG, f"{where}: {argv[0]} cannot be undone at DEL; "
                       "use -K, -L, -G, -N, -U or -X")  # fmt: skip
    if len(argv) < 3 or argv[1] != device:
        raise CniError(INVALID_CONFIG, f"{where}: must name the pod's device ({device} or "
                       "-device-) right after the option, then what to change")  # fmt: skip
    if argv[0] in _NTUPLE and ("delete" in argv or "del" in argv):
        raise CniError(INVALID_CONFIG, f"{where}: deleting a rule cannot be undone at DEL")


def parse_features(text: str) -> dict[str, tuple[str, bool]]:
    """``ethtool -k``: each settable leaf feature -> (requested value, fixed).

    A line with indented lines under it is a group ("tx-checksumming"): setting
    it would set all its members, so only the members count.
    """
    rows: list[tuple[bool, str, str, bool]] = []
    for line in text.splitlines():
        m = _FEATURE_LINE.match(line)
        if m:
            indented, name, value, fixed, _, requested = m.groups()
            rows.append((bool(indented), name, requested or value, bool(fixed)))
    out = {}
    for n, (indented, name, wanted, fixed) in enumerate(rows):
        group = not indented and n + 1 < len(rows) and rows[n + 1][0]
        if not group:
            out[name] = (wanted, fixed)
    return out


def parse_settings(text: str) -> dict[str, str]:
    """``ethtool -l`` / ``-g``: the current settings as -L / -G keywords -> value."""
    _, found, current = text.partition("Current hardware settings:")
    out = {}
    for line in current.splitlines() if found else []:
        label, sep, value = line.partition(":")
        value = value.strip()
        if sep and value and value != "n/a":
            out[label.strip().lower().replace(" ", "-")] = value
    return out


def parse_flow_hash(text: str) -> str:
    """``ethtool -n DEV rx-flow-hash TYPE``: the fields as -N letters ("sdfn")."""
    lines = [ln.strip() for ln in text.splitlines()]
    return "".join(letter for label, letter in _HASH_FIELDS
                   if any(ln.startswith(label) for ln in lines))  # fmt: skip


def _binary() -> str:
    found = shutil.which("ethtool")
    if found is None:
        raise CniError(IO_FAILURE, "ethtoolCmds are set but ethtool is not installed on the node")
    return found


async def run(args: list[str]) -> str:
    """``ethtool *args``; its stdout. CniError (code 5) when it fails or hangs."""
    try:
        done = await run_program([_binary(), *args], timeout=TIMEOUT)
    except ProgramTimeout:
        raise CniError(
            IO_FAILURE, f"ethtool {' '.join(args)} timed out after {TIMEOUT:g} s"
        ) from None
    except OSError as exc:
        raise CniError(IO_FAILURE, f"ethtool {' '.join(args)} could not run", str(exc)) from None
    if done.returncode != 0:
        raise Failed(IO_FAILURE, f"ethtool {' '.join(args)} failed",
                       done.stderr.decode(errors="replace").strip()[:500])  # fmt: skip
    return done.stdout.decode(errors="replace")


async def before(argv: list[str]) -> Change:
    """What ``argv`` (checked by ``render``) is about to change, read from the device."""
    option, device = argv[0], argv[1]
    if option in _FEATURES:
        features = parse_features(await run(["-k", device]))
        return Change("features", device, before={k: v for k, (v, fixed) in features.items()
                                                   if not fixed})  # fmt: skip
    if option in _CHANNELS or option in _RINGS:
        short = _READ_OPTION[option]
        return Change("settings", device, short.upper(),
                      before=parse_settings(await run([short, device])))  # fmt: skip
    if option in _NTUPLE and argv[2] == "rx-flow-hash" and len(argv) > 3:
        fields = parse_flow_hash(await run(["-n", device, "rx-flow-hash", argv[3]]))
        return Change("flow-hash", device, argv[3], before={"fields": fields})
    if option in _NTUPLE:
        return Change("rules", device)
    return Change("rxfh", device)


async def restore(change: Change) -> None:
    """Put back what ``change`` records; idempotent. CniError when ethtool fails."""
    dev = change.device
    if change.kind == "features":
        now = parse_features(await run(["-k", dev]))
        args = [w for name, value in change.before.items()
                if name in now and now[name][0] != value for w in (name, value)]  # fmt: skip
        if args:
            await run(["-K", dev, *args])
    elif change.kind == "settings":
        settings = parse_settings(await run([change.option.lower(), dev]))
        args = [w for key, value in change.before.items()
                if settings.get(key, value) != value for w in (key, value)]  # fmt: skip
        if args:
            await run([change.option, dev, *args])
    elif change.kind == "rules":
        for rule in change.rules:
            try:
                await run(["-N", dev, "delete", str(rule)])
            except CniError:
                # Gone already (a repeated restore): fine; anything else is a failure.
                listed = await run(["-n", dev])
                if re.search(rf"Filter: {rule}\b", listed):
                    raise
    elif change.kind == "flow-hash":
        if change.before.get("fields"):
            await run(["-N", dev, "rx-flow-hash", change.option, change.before["fields"]])
    else:
        await run(["-X", dev, "default"])
