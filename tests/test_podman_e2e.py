"""A real CNI runtime: podman starts a container on a network whose plugin is
our shim, and the container sees the device, with its name and its IP."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

import anyio
import pytest

from afxdp.cni import shim
from tests.kernel import Lab, ip
from tests.node import running
from tests.test_cni import Node

pytestmark = [pytest.mark.privileged, pytest.mark.anyio]


def podman_env(tmp: Path) -> tuple[list[str], dict[str, str]]:
    """A private podman: its own storage, CNI dirs, and the settings this machine needs.

    Podman refuses a runroot path longer than 50 characters, so the stores live
    in a short directory of their own (removed by the caller).
    """
    conf = tmp / "containers.conf"
    conf.write_text(
        '[engine]\nruntime = "runc"\n'  # crun refuses the hybrid cgroups here
        "[containers]\n"
        'default_ulimits = ["nofile=20000:20000", "nproc=4096:4096"]\n'  # no CAP_SYS_RESOURCE
        '[network]\nnetwork_backend = "cni"\n'
        f'cni_plugin_dirs = ["{tmp / "cnibin"}", "/usr/lib/cni"]\n'
        f'network_config_dir = "{tmp / "net.d"}"\n'
    )
    store = Path(tempfile.mkdtemp(prefix="afxpm-"))
    cmd = ["podman", "--root", str(store / "root"), "--runroot", str(store / "run"),
           "--storage-driver", "vfs"]  # fmt: skip
    return cmd, {**os.environ, "CONTAINERS_CONF": str(conf)}


def busybox_image(tmp: Path, podman: list[str], env: dict[str, str]) -> str:
    """No registry is reachable: an image from Debian's busybox-static."""
    rootfs = tmp / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    shutil.copy("/usr/bin/busybox", rootfs / "bin" / "busybox")
    for applet in ("sh", "ip", "cat"):
        (rootfs / "bin" / applet).symlink_to("busybox")
    with tarfile.open(tmp / "rootfs.tar", "w") as tar:
        tar.add(rootfs, arcname=".")
    done = subprocess.run([*podman, "import", str(tmp / "rootfs.tar"), "afxdp-busybox"],
                          env=env, check=False, capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return "afxdp-busybox"


async def test_podman_container_gets_the_device(tmp_path: Path, lab: Lab) -> None:
    if shutil.which("podman") is None:
        pytest.fail("podman is not installed: scripts/bootstrap installs it")
    dev, peer = lab.veth(lab.name("pm"), lab.name("pn"))
    ip("link", "set", dev, "up")
    ip("link", "set", peer, "up")
    # Short: the kubelet socket path must stay under 108 bytes (pytest-NNNN grows).
    node = Node(tmp_path / "n", lab, [dev])
    podman, env = podman_env(tmp_path)
    shim.install(tmp_path / "cnibin", [node.paths.run_dir])
    (tmp_path / "net.d").mkdir()
    plugin = node.netconf(dev)  # Multus would inject deviceID; here the network names it
    plugin.pop("cniVersion")
    plugin.pop("name")
    conflist = {"cniVersion": "1.0.0", "name": "afxdp-net", "plugins": [plugin]}
    (tmp_path / "net.d" / "afxdp-net.conflist").write_text(json.dumps(conflist))
    image = busybox_image(tmp_path, podman, env)
    try:
        async with running(node):
            await node.allocate(dev)
            run = [
                *podman,
                "run",
                "--rm",
                "--network",
                "afxdp-net",
                image,
                "ip",
                "-o",
                "addr",
                "show",
                dev,
            ]
            done = await anyio.run_process(run, env=env, check=False)
            out = done.stdout.decode()
            assert done.returncode == 0, done.stderr.decode()
            assert f" {dev} " in out and "inet 10.78.0." in out, out
            # The container is gone: podman ran DEL, the device is home; it stays
            # allocated until kubelet ends the allocation (DEL never does).
            assert subprocess.run(["ip", "link", "show", dev], capture_output=True).returncode == 0
            assert (await node.states())[dev] == "allocated"
            assert node.leases() == set()
    finally:
        subprocess.run(
            [*podman, "system", "reset", "--force"], env=env, capture_output=True, check=False
        )
        shutil.rmtree(podman[2].rsplit("/", 1)[0], ignore_errors=True)
