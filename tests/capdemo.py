"""The demo's pod lifecycle with afxdpd under a capability set, run by
tests/test_capabilities.py:

    python -m tests.capdemo CAP[,CAP...] DEMO-ARGS...

afxdpd starts as a container runtime starts a root process with those
capabilities: ``setpriv`` limits its bounding set to them (root's execve then
grants exactly those), inheritable empty. Every pool gets ``uid`` 1500 (a pod
that runs as that user), which needs CHOWN and DAC_OVERRIDE besides.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from afxdp.demo import __main__ as demo_main
from afxdp.demo import story

POOL_UID = 1500


def main() -> int:
    caps, demo_argv = sys.argv[1].split(","), sys.argv[2:]
    demo_python = story._python

    def python(module: str, *argv: str) -> list[str]:
        cmd = demo_python(module, *argv)
        if module != "afxdp.cli.afxdpd":
            return cmd
        # The story has written afxdpd's config by now: give its pools a uid.
        config = Path(argv[argv.index("--config") + 1])
        doc = json.loads(config.read_text())
        doc["pools"] = [{**pool, "uid": POOL_UID} for pool in doc["pools"]]
        config.write_text(json.dumps(doc))
        bounding = ",".join(["-all", *(f"+{c.lower()}" for c in caps if c)])
        return ["setpriv", f"--bounding-set={bounding}", "--inh-caps=-all", "--", *cmd]

    story._python = python
    return demo_main.main(demo_argv)


if __name__ == "__main__":
    sys.exit(main())
