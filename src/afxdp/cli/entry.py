"""The console scripts. The commands need the ``node`` extra (grpclib, pyroute2,
uvloop, ...), which a pod that only uses the client library does not install:
say so in one line instead of a traceback."""

from __future__ import annotations

import sys


def _missing(command: str, exc: ModuleNotFoundError) -> int:
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
