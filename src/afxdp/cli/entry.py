"""The console scripts. The commands need the ``node`` extra (grpclib, pyroute2,
uvloop, ...), which a pod that only uses the client library does not install:
say so in one line instead of a traceback. ``--version`` needs none of it, and
answers there too."""

from __future__ import annotations

import sys

from afxdp import __version__


def _missing(command: str, exc: ModuleNotFoundError) -> int:
    if sys.argv[1:] == ["--version"]:  # what the command's parser would print, exit 0
        print(f"{command} {__version__}")
        return 0
    print(f"{command}: needs the node extra ({exc.name} is missing): "
          "pip install 'afxdp[node]'", file=sys.stderr)  # fmt: skip
    return 3


def afxdpd() -> int:
    from afxdp.cli.heap import use_system_malloc  # noqa: PLC0415 - before the heavy imports

    use_system_malloc()
    try:
        from afxdp.cli import afxdpd as command  # noqa: PLC0415 - to say what is missing
    except ModuleNotFoundError as exc:
        return _missing("afxdpd", exc)
    return command.main()


def afxdpctl() -> int:
    try:
        from afxdp.cli import afxdpctl as command  # noqa: PLC0415 - to say what is missing
    except ModuleNotFoundError as exc:
        return _missing("afxdpctl", exc)
    return command.main()
