"""Pods as real podman containers on a CNI network whose plugin is the afxdp shim.

A private podman: its own storage and CNI dirs under the demo's work dir, and
the settings this kind of machine needs (``CONTAINERS_CONF``: runc, since crun
refuses hybrid cgroups; ulimits within reach without CAP_SYS_RESOURCE; the CNI
network backend). No registry is reachable, so the image is a busybox rootfs
imported locally, and the pod app's Python (the interpreter, this package and
its environment) is bind-mounted read-only from the host.

Each pod gets a network of its own naming the device kubelet allocated to it
(``deviceID``: what Multus injects from the device plugin's answer).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tarfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import Process

import afxdp
from afxdp.workers import Work, run_program

IMAGE = "afxdp-demo-busybox"
TIMEOUT = 60.0
# AF_XDP sockets need NET_RAW; bpf() on the handed-over map needs BPF (the node
# forbids unprivileged bpf); the UMEM is locked memory (IPC_LOCK). The default
# seccomp profile blocks bpf() altogether.
CAPS = ["--cap-add", "NET_RAW,BPF,IPC_LOCK", "--security-opt", "seccomp=unconfined"]


class PodmanError(RuntimeError):
    """A podman command failed."""


class Podman:
    def __init__(self, work: Path, cni_bin: Path, tag: str) -> None:
        self.work = work / "podman"
        self.cni_bin = cni_bin
        self.tag = tag
        self.net_dir = self.work / "net.d"
        # Podman refuses a runroot path longer than 50 characters.
        self.cmd = ["podman", "--root", str(self.work / "root"), "--runroot",
                    str(self.work / "run"), "--storage-driver", "vfs"]  # fmt: skip
        self.env = {**os.environ, "CONTAINERS_CONF": str(self.work / "containers.conf")}

    async def podman(self, *args: str, timeout: float = TIMEOUT) -> str:
        done = await run_program([*self.cmd, *args], env=self.env, timeout=timeout,
                                 work=Work.DISK)  # fmt: skip
        if done.returncode != 0:
            raise PodmanError(f"podman {' '.join(args)}: {done.stderr.decode().strip()}")
        return done.stdout.decode()

    async def setup(self, cni_path: Path) -> None:
        """The config and the image (no registry: a local busybox rootfs)."""
        self.net_dir.mkdir(parents=True)
        (self.work / "containers.conf").write_text(
            '[engine]\nruntime = "runc"\n'
            "[containers]\n"
            'default_ulimits = ["nofile=20000:20000", "nproc=4096:4096"]\n'
            '[network]\nnetwork_backend = "cni"\n'
            f'cni_plugin_dirs = ["{self.cni_bin}", "{cni_path}"]\n'
            f'network_config_dir = "{self.net_dir}"\n'
        )
        rootfs = self.work / "rootfs"
        (rootfs / "bin").mkdir(parents=True)
        shutil.copy("/usr/bin/busybox", rootfs / "bin" / "busybox")
        (rootfs / "bin" / "sh").symlink_to("busybox")
        for link in ("lib", "lib64"):  # merged /usr: the host's Python finds its loader
            (rootfs / link).symlink_to(f"usr/{link}")
        with tarfile.open(self.work / "rootfs.tar", "w") as tar:
            tar.add(rootfs, arcname=".")
        await self.podman("import", str(self.work / "rootfs.tar"), IMAGE)

    def network(self, pod: str, plugin: dict[str, Any]) -> str:
        """A CNI network for ``pod`` with ``plugin`` (our shim) as its only plugin."""
        name = f"afxdp-demo-{pod}"
        conf = {k: v for k, v in plugin.items() if k not in ("cniVersion", "name")}
        conflist = {"cniVersion": "1.0.0", "name": name, "plugins": [conf]}
        (self.net_dir / f"{name}.conflist").write_text(json.dumps(conflist, indent=2))
        return name

    def container(self, pod: str) -> str:
        return f"afxdp-demo-{self.tag}-{pod}"

    async def run(
        self, pod: str, network: str, envs: Mapping[str, str], mounts: list[tuple[str, str]],
        port: int,
    ) -> Process:  # fmt: skip
        """``podman run`` of the pod app (stdin/stdout are its JSON lines)."""
        package = str(Path(afxdp.__file__).parents[1])
        host_python = sorted({"/usr", sys.base_prefix, sys.prefix, package})
        argv = [
            *self.cmd, "run", "--rm", "-i", "--name", self.container(pod), "--hostname", pod,
            "--network", network, *CAPS,
            *[a for k, v in envs.items() for a in ("-e", f"{k}={v}")],
            *[a for host, inside in mounts for a in ("-v", f"{host}:{inside}")],
            *[a for d in host_python for a in ("-v", f"{d}:{d}:ro")],
            IMAGE, sys.executable, "-m", "afxdp.demo.pod", "--container", pod, *envs, str(port),
        ]  # fmt: skip
        return await anyio.open_process(argv, env=self.env, stderr=None, start_new_session=True)

    async def remove(self, pod: str) -> None:
        """Remove the container if it is still there (podman runs the CNI DEL)."""
        await run_program([*self.cmd, "rm", "-f", "-t", "2", self.container(pod)],
                          env=self.env, timeout=TIMEOUT, work=Work.DISK)  # fmt: skip

    async def reset(self) -> None:
        """Everything podman made (containers, image, storage) goes."""
        await run_program([*self.cmd, "system", "reset", "--force"], env=self.env,
                          timeout=TIMEOUT, work=Work.DISK)  # fmt: skip
