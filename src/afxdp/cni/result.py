"""CNI results in the request's version (0.3.0 to 1.1.0)."""

from __future__ import annotations

import ipaddress
from typing import Any

from afxdp.cni.netconf import version_tuple


def build(
    version: str, ipam: dict[str, Any] | None, name: str, mac: str, sandbox: str
) -> dict[str, Any]:
    """The ADD result: our one interface, IPAM's addresses on it, routes and DNS."""
    old = version_tuple(version) < (1, 0, 0)
    ips = []
    for ip in (ipam or {}).get("ips", []):
        entry = {"address": ip["address"], "interface": 0}
        if ip.get("gateway"):
            entry["gateway"] = ip["gateway"]
        if old:
            entry["version"] = str(ipaddress.ip_interface(ip["address"]).version)
        ips.append(entry)
    doc: dict[str, Any] = {
        "cniVersion": version,
        "interfaces": [{"name": name, "mac": mac, "sandbox": sandbox}],
        "ips": ips,
    }
    if ipam and ipam.get("routes"):
        doc["routes"] = ipam["routes"]
    doc["dns"] = (ipam or {}).get("dns") or {}
    return doc
