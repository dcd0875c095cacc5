"""ethtool filters from the NAD's ``ethtoolCmds`` (primary mode only).

Each entry is ethtool's arguments without the word ``ethtool``; ``-device-``
becomes the netdev and ``-ip-`` its first IPAM address. They run as argv lists,
never through a shell, after the characters were checked (netconf.py). Unlike
the original, ntuple filtering is switched on only when a command needs it
(a NIC without ntuple support, veth for one, would fail every ADD otherwise),
and only what was done is undone.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass

import anyio

from afxdp.cni.errors import INVALID_CONFIG, IO_FAILURE, CniError

_NTUPLE_WORDS = frozenset({"-N", "-U", "--config-ntuple", "--config-nfc", "flow-type"})
_RXFH_WORDS = frozenset({"-X", "--set-rxfh-indir", "--rxfh"})


@dataclass
class Applied:
    """What was changed on a device, so it can be reset."""

    device: str
    ntuple: bool = False
    rxfh: bool = False

    @classmethod
    def assumed(cls, device: str, argvs: list[list[str]]) -> Applied:
        """What ``apply`` would have recorded for ``argvs`` (for DEL, which did not run it)."""
        return cls(
            device,
            ntuple=any(_NTUPLE_WORDS.intersection(a) for a in argvs),
            rxfh=any(_RXFH_WORDS.intersection(a) for a in argvs),
        )


def render(cmds: tuple[str, ...], device: str, ip: str | None) -> list[list[str]]:
    argvs = []
    for i, cmd in enumerate(cmds):
        if "-ip-" in cmd and ip is None:
            raise CniError(INVALID_CONFIG, f"ethtoolCmds[{i}]: uses -ip- but IPAM gave no address")
        argvs.append([w.replace("-device-", device).replace("-ip-", ip or "") for w in cmd.split()])
    return argvs


def _binary() -> str:
    found = shutil.which("ethtool")
    if found is None:
        raise CniError(IO_FAILURE, "ethtoolCmds are set but ethtool is not installed on the node")
    return found


async def _ethtool(args: list[str]) -> None:
    done = await anyio.run_process([_binary(), *args], check=False, stderr=subprocess.PIPE)
    if done.returncode != 0:
        raise CniError(IO_FAILURE, f"ethtool {' '.join(args)} failed",
                       done.stderr.decode(errors="replace").strip()[:500])  # fmt: skip


async def apply(argvs: list[list[str]], device: str, applied: Applied) -> None:
    """Run the commands; ``applied`` records each step as it succeeds."""
    if any(_NTUPLE_WORDS.intersection(a) for a in argvs):
        await _ethtool(["--features", device, "ntuple", "on"])
        applied.ntuple = True
    for argv in argvs:
        await _ethtool(argv)
        applied.rxfh = applied.rxfh or bool(_RXFH_WORDS.intersection(argv))


async def reset(applied: Applied) -> list[str]:
    """Undo what ``applied`` says was done; returns the failures (best effort)."""
    problems = []
    steps = []
    if applied.rxfh:
        steps.append(["-X", applied.device, "default"])
    if applied.ntuple:
        steps.append(["--features", applied.device, "ntuple", "off"])
    for step in steps:
        try:
            await _ethtool(step)
        except CniError as exc:
            problems.append(str(exc))
    return problems
