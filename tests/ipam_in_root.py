"""Runs one IPAM call through ``afxdp.cni.ipam`` as afxdpd's CNI handler does,
for tests/test_ipam_paths.py, which starts it inside a root made of the
DaemonSet's mounts (the view afxdpd's container has):

    python -m tests.ipam_in_root < {"env": {...}, "conf": {...}}

Prints {"result": ...} or {"error": {"code", "msg", "details"}}.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import anyio

from afxdp.cni import ipam
from afxdp.cni.errors import CniError
from afxdp.cni.netconf import parse_env, parse_netconf


async def call(request: dict[str, Any]) -> dict[str, Any]:
    env = parse_env(request["env"])
    conf = parse_netconf(json.dumps(request["conf"]).encode(), env.command)
    try:
        if env.command == "ADD":
            return {"result": await ipam.add(env, conf)}
        await ipam.delete(env, conf)
        return {"result": None}
    except CniError as exc:
        return {"error": {"code": exc.code, "msg": exc.msg, "details": exc.details}}


if __name__ == "__main__":
    print(json.dumps(anyio.run(call, json.load(sys.stdin))))
