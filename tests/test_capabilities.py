"""The capabilities DaemonSet's set is what afxdpd needs, and all it needs:
the device lifecycle (Allocate, CNI ADD into a netns, the UDS handshake,
AF_XDP traffic, DEL, a clean stop) passes with afxdpd under exactly that set
and fails with any one of them taken away. And install-cni needs none.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.test_deploy import CAPABILITIES, container, daemonset

pytestmark = pytest.mark.privileged

# The set, stated here and checked against deploy/capabilities/daemonset.yaml.
NEEDED = ("NET_ADMIN", "SYS_ADMIN", "CHOWN", "DAC_OVERRIDE")
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}


def _security_context(name: str) -> dict[str, object]:
    spec = daemonset(CAPABILITIES / "daemonset.yaml")["spec"]["template"]["spec"]
    ctx: dict[str, object] = container(spec, name)["securityContext"]
    return ctx


def lifecycle(caps: tuple[str, ...], tag: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "tests.capdemo", ",".join(caps), "--frames", "200", "--tag", tag]
    return subprocess.run(argv, capture_output=True, text=True, env=ENV, timeout=120, check=False)


def test_the_variant_adds_exactly_the_stated_set_and_drops_all() -> None:
    ctx = _security_context("afxdpd")
    assert ctx["capabilities"] == {"drop": ["ALL"], "add": list(NEEDED)}
    assert ctx["privileged"] is False and ctx["allowPrivilegeEscalation"] is False


def test_the_lifecycle_passes_under_exactly_the_variants_capabilities() -> None:
    add = yaml.safe_load(yaml.safe_dump(_security_context("afxdpd")))["capabilities"]["add"]
    done = lifecycle(tuple(add), f"cap{os.getpid() % 1000}")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "demo: OK: 2 pods through Allocate, CNI ADD, handshake, AF_XDP, DEL" in done.stdout
    assert "nothing left behind" in done.stdout


# How the lifecycle fails without each (measured; the README's table says why).
WITHOUT = {
    # No XDP program can be attached (NET_ADMIN) or loaded (bpf(): SYS_ADMIN):
    # every device is unhealthy and kubelet is offered none.
    "NET_ADMIN": "1 device(s) wanted, 0 available",
    "SYS_ADMIN": "1 device(s) wanted, 0 available",
    # Allocate cannot hand the socket to the pool's uid.
    "CHOWN": "Operation not permitted",
    # The stop cannot remove the sockets from dirs the pod's user owns.
    "DAC_OVERRIDE": "afxdpd left behind",
}


@pytest.mark.parametrize("missing", NEEDED)
def test_the_lifecycle_fails_with_one_fewer(missing: str) -> None:
    tag = f"c{missing[:3].lower()}{os.getpid() % 100}"
    done = lifecycle(tuple(c for c in NEEDED if c != missing), tag)
    assert done.returncode != 0, f"passes without {missing}: {done.stdout[-2000:]}"
    assert WITHOUT[missing] in done.stdout + done.stderr, done.stdout[-2000:] + done.stderr[-2000:]


def test_install_cni_needs_no_capability(tmp_path: Path) -> None:
    assert _security_context("install-cni")["capabilities"] == {"drop": ["ALL"]}
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(mode=0o755)  # root's, as the host's /opt/cni/bin
    afxdpctl = [sys.executable, "-m", "afxdp.cli.afxdpctl", "install-cni", str(bin_dir)]
    done = subprocess.run(["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--", *afxdpctl],
                          capture_output=True, text=True, env=ENV, timeout=60, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert os.access(bin_dir / "afxdp", os.X_OK)
