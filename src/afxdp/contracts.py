"""Values fixed by programs we do not control (DESIGN.md section 3): one place each.

DPDK's AF_XDP PMD, CNDP and the original clients look for the socket and the
pinned map at these paths inside the pod; kubelet-visible names and the env
var a pod reads its device list from are part of the same contract. No I/O.
"""

from __future__ import annotations

from pathlib import Path

# Inside the pod: one directory per device (DPDK's default dp_path lies in it).
POD_DIR = Path("/tmp/afxdp_dp")
SOCKET_NAME = "afxdp.sock"  # <POD_DIR>/<netdev>/afxdp.sock
MAP_NAME = "xsks_map"  # the XSKMAP in our program, and the pinned map's file name
RESOURCE_PREFIX = "afxdp/"  # kubelet resource afxdp/<pool>
ENV_PREFIX = "AFXDP_DEVICES_"  # AFXDP_DEVICES_<POOL UPPERCASED> = "dev1 dev2"


def pod_device_dir(netdev: str) -> Path:
    """Where a device's directory is mounted in the pod."""
    return POD_DIR / netdev


def resource_name(pool: str) -> str:
    """The kubelet resource of a pool."""
    return f"{RESOURCE_PREFIX}{pool}"


def pool_of(resource: str) -> str | None:
    """The pool of a kubelet resource; None when it is not one of ours."""
    return resource.removeprefix(RESOURCE_PREFIX) if resource.startswith(RESOURCE_PREFIX) else None


def env_var(pool: str) -> str:
    return f"{ENV_PREFIX}{pool.upper()}"
