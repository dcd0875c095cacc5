"""IPAM plugins beyond host-local work in afxdpd's container: each runs as a
real process inside a root made of exactly the DaemonSet's CNI mounts (the
view afxdpd's container has; here a chroot whose host side is a temp dir),
called through ``afxdp.cni.ipam`` as the CNI handler calls it.

- whereabouts keeps its config file and kubeconfig in
  /etc/cni/net.d/whereabouts.d/ on the host: a FAKE whereabouts (the real one
  needs an API server, and no package ships it here) reads them there.
- dhcp calls its daemon at /run/cni/dhcp.sock: the real plugin reaches the real
  daemon, started on the "host" with its socket there.
- host-local keeps its leases in the host's /var/lib/cni/networks.

Without the mounts the same calls fail, which is what they did before the
DaemonSet had them.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from tests.test_deploy import DAEMONSETS, DEPLOY, daemonset, mounts

pytestmark = pytest.mark.privileged

ROOT = Path(__file__).resolve().parent.parent
PLUGINS = Path("/usr/lib/cni")  # containernetworking-plugins
WHEREABOUTS_DIR = "/etc/cni/net.d/whereabouts.d"
DHCP_SOCKET = "/run/cni/dhcp.sock"  # the dhcp plugin's default
FAKE_WHEREABOUTS = f'''#!{sys.executable}
"""FAKE whereabouts: reads its flat config file and the kubeconfig it names
where whereabouts does, in the root it runs in, and answers the address the
file names (standing in for the API server's allocation)."""
import json, os, sys
CONF = "{WHEREABOUTS_DIR}/whereabouts.conf"
command = os.environ["CNI_COMMAND"]
if command == "VERSION":
    print(json.dumps({{"cniVersion": "1.0.0", "supportedVersions": ["1.0.0"]}}))
    sys.exit(0)
try:
    with open(CONF) as f:
        conf = json.load(f)
    with open(conf["kubernetes"]["kubeconfig"]) as f:
        f.read()
except OSError as exc:
    print(json.dumps({{"cniVersion": "1.0.0", "code": 7, "msg": f"fake whereabouts: {{exc}}"}}))
    sys.exit(1)
if command == "ADD":
    print(json.dumps({{"cniVersion": "1.0.0", "ips": [{{"address": conf["fakeAddress"]}}]}}))
'''


def cni_mounts(ds: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(host path, container path, read-only) of afxdpd's mounts that CNI and
    IPAM plugins use: the host dirs under a ``cni`` directory."""
    return [
        (volume["hostPath"]["path"], path, bool(mount.get("readOnly")))
        for path, (mount, volume) in mounts(ds).items()
        if "hostPath" in volume and "cni" in PurePosixPath(path).parts
    ]


class Node:
    """A node's filesystem (``host``) and a way to run an IPAM call in
    afxdpd's container on it: a root with the machine's runtime (the image's
    stand-in) read-only and the DaemonSet's CNI mounts from ``host``."""

    def __init__(self, tmp: Path) -> None:
        self.host = tmp / "host"
        self.root = tmp / "container"
        self.root.mkdir()
        (self.root / "tmp").mkdir()
        for top in ("bin", "lib", "lib64", "sbin"):  # merged /usr: links, as on the machine
            if Path("/" + top).is_symlink():
                (self.root / top).symlink_to(os.readlink("/" + top))
        bin_dir = self.host / "opt/cni/bin"
        bin_dir.mkdir(parents=True)
        for name in ("host-local", "dhcp"):
            shutil.copy2(PLUGINS / name, bin_dir / name)
        fake = bin_dir / "whereabouts"
        fake.write_text(FAKE_WHEREABOUTS)
        fake.chmod(0o755)
        wb = self.host / WHEREABOUTS_DIR.lstrip("/")
        wb.mkdir(parents=True)
        (wb / "whereabouts.kubeconfig").write_text("apiVersion: v1\nkind: Config\n")
        (wb / "whereabouts.conf").write_text(json.dumps({
            "datastore": "kubernetes",
            "kubernetes": {"kubeconfig": f"{WHEREABOUTS_DIR}/whereabouts.kubeconfig"},
            "fakeAddress": "10.77.0.5/24",
        }))  # fmt: skip
        for d in ("run/cni", "var/lib/cni"):
            (self.host / d).mkdir(parents=True)

    def runtime_binds(self) -> list[str]:
        """What the image would provide: the interpreter, afxdp and sh."""
        paths = {"/usr", "/dev", "/proc", sys.base_prefix, str(ROOT)}
        return sorted(p for p in paths if not any(p.startswith(q + "/") for q in paths))

    def call(self, ds: dict[str, Any], command: str, conf: dict[str, Any],
             without: str = "") -> dict[str, Any]:  # fmt: skip
        """One ``ipam`` call in afxdpd's container (``without``: a mount left out)."""
        lines = ["set -e"]
        for path in self.runtime_binds():
            target = shlex.quote(str(self.root / path.lstrip("/")))
            lines += [f"mkdir -p {target}", f"mount --rbind {shlex.quote(path)} {target}"]
        for host_path, path, read_only in cni_mounts(ds):
            if path == without:
                continue
            source = shlex.quote(str(self.host / host_path.lstrip("/")))
            target = shlex.quote(str(self.root / path.lstrip("/")))
            lines += [f"mkdir -p {target}", f"mount --bind {source} {target}"]
            if read_only:
                lines.append(f"mount -o remount,bind,ro {target}")
        python = shlex.quote(sys.executable)
        lines.append(f"exec chroot {self.root} {python} -m tests.ipam_in_root")
        env = {
            "CNI_COMMAND": command, "CNI_CONTAINERID": "ctr1", "CNI_IFNAME": "net1",
            "CNI_NETNS": "/run/netns/afxdp-ipam-paths", "CNI_PATH": "/opt/cni/bin",
        }  # fmt: skip
        done = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", "\n".join(lines)],
            input=json.dumps({"env": env, "conf": conf}), capture_output=True, text=True,
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": str(ROOT)}, cwd="/", timeout=60,
            check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        answer: dict[str, Any] = json.loads(done.stdout)
        return answer


def netconf(ipam: dict[str, Any]) -> dict[str, Any]:
    return {"cniVersion": "1.0.0", "name": "ipam-net", "type": "afxdp", "mode": "primary",
            "deviceID": "nic0", "ipam": ipam}  # fmt: skip


@pytest.fixture
def node(tmp_path: Path) -> Node:
    return Node(tmp_path)


@pytest.fixture
def dhcp_daemon(node: Node) -> Iterator[subprocess.Popen[bytes]]:
    """The real dhcp daemon on the node (a host process, as its systemd unit
    runs it), serving at /run/cni/dhcp.sock of ``node.host``."""
    sock = node.host / DHCP_SOCKET.lstrip("/")
    proc = subprocess.Popen([PLUGINS / "dhcp", "daemon", "-socketpath", str(sock)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while True:  # it says nothing when it listens: connect until it answers
            with socket.socket(socket.AF_UNIX) as probe:
                try:
                    probe.connect(str(sock))
                    break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        proc.kill()
                        _, err = proc.communicate()
                        raise AssertionError(f"dhcp daemon not serving: {err!r}") from None
            time.sleep(0.05)
        yield proc
    finally:
        proc.terminate()
        proc.wait(timeout=10)


DAEMONSET_IDS = [str(p.relative_to(DEPLOY)) for p in DAEMONSETS]


@pytest.mark.parametrize("path", DAEMONSETS, ids=DAEMONSET_IDS)
def test_a_whereabouts_style_plugin_reads_its_config_dir_from_the_host(
    node: Node, path: Path
) -> None:
    ds = daemonset(path)
    ipam = {"type": "whereabouts", "range": "10.77.0.0/24"}
    added = node.call(ds, "ADD", netconf(ipam))
    assert added == {"result": {"ips": [{"address": "10.77.0.5/24"}], "routes": [], "dns": {}}}
    assert node.call(ds, "DEL", netconf(ipam)) == {"result": None}
    # The same plugin without the host's /etc/cni/net.d: what happened before.
    refused = node.call(ds, "ADD", netconf(ipam), without="/etc/cni/net.d")
    assert refused["error"]["code"] == 7
    assert f"{WHEREABOUTS_DIR}/whereabouts.conf" in refused["error"]["msg"]


@pytest.mark.parametrize("path", DAEMONSETS, ids=DAEMONSET_IDS)
def test_the_dhcp_plugin_reaches_its_daemon_on_the_host(
    node: Node, path: Path, dhcp_daemon: subprocess.Popen[bytes]
) -> None:
    ds = daemonset(path)
    # DEL: the plugin asks the daemon to release the lease (it holds none: a
    # reply from the daemon is a success; no daemon is an error).
    assert node.call(ds, "DEL", netconf({"type": "dhcp"})) == {"result": None}
    lost = node.call(ds, "DEL", netconf({"type": "dhcp"}), without="/run/cni")
    assert DHCP_SOCKET in lost["error"]["details"] + lost["error"]["msg"], lost
    assert dhcp_daemon.poll() is None


@pytest.mark.parametrize("path", DAEMONSETS, ids=DAEMONSET_IDS)
def test_host_local_keeps_its_leases_in_the_hosts_var_lib_cni(node: Node, path: Path) -> None:
    ds = daemonset(path)
    ipam = {"type": "host-local", "subnet": "10.78.0.0/24"}  # no dataDir: its default
    added = node.call(ds, "ADD", netconf(ipam))
    (address,) = [ip["address"] for ip in added["result"]["ips"]]
    leases = node.host / "var/lib/cni/networks/ipam-net"
    assert (leases / address.split("/")[0]).read_text().startswith("ctr1")
    assert node.call(ds, "DEL", netconf(ipam)) == {"result": None}
    assert not (leases / address.split("/")[0]).exists()
