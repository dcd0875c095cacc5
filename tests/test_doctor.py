"""``afxdpctl doctor``: each verdict from written-down facts, then real runs on this machine."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from afxdp.cli.doctor import UNLIMITED, Check, Facts, checks, kernel_version
from tests.kubelet import FakeKubelet

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}

GOOD = Facts(
    kernel="6.1.0-18-amd64",
    bpffs_mounts=["/sys/fs/bpf"],
    pin_dir="/var/run/afxdp_dp",
    pin_dir_fs="tmpfs",
    af_xdp_error=None,
    af_xdp_errno=None,
    memlock=(8 << 20, 8 << 20),
    libbpf_version="1.1",
    libbpf_error=None,
    xdp_object="/usr/lib/python3/dist-packages/afxdp/bpf/xdp_redirect.o",
    cni_bin_dir="/opt/cni/bin",
    cni_bin_dir_error=None,
    kubelet_dir="/var/lib/kubelet",
    device_plugins_dir=True,
    pod_resources_socket=True,
    unprivileged_bpf_disabled=2,
    datapath="map-in-map",
    datapath_reason="the kernel takes an XSKMAP in a map of maps",
)
NAMES = [
    "kernel", "af_xdp socket", "bpffs", "memlock", "libbpf", "xdp program", "cni bin dir",
    "kubelet device-plugins", "kubelet pod-resources", "unprivileged bpf", "datapath",
]  # fmt: skip


def verdicts(**changes: Any) -> dict[str, Check]:
    return {c.name: c for c in checks(msgspec.structs.replace(GOOD, **changes))}


def test_a_node_with_everything_passes_every_check() -> None:
    results = verdicts()
    assert list(results) == NAMES
    assert [n for n, c in results.items() if not c.ok] == []
    assert all(c.fix is None for c in results.values())
    assert "clang is not needed at run time" in results["xdp program"].detail
    assert results["unprivileged bpf"].info
    assert "requiresUnprivilegedBpf take no devices" in results["unprivileged bpf"].detail
    assert results["datapath"].info and results["datapath"].detail.startswith("map-in-map")


def test_doctor_says_which_datapath_layout_runs_and_why_never_failing() -> None:
    per_pod = verdicts(datapath="per-pod", datapath_reason="AFXDP_DATAPATH=per-pod")["datapath"]
    assert per_pod.ok and per_pod.info
    assert per_pod.detail.startswith("per-pod (AFXDP_DATAPATH=per-pod)")
    unknown = verdicts(datapath=None, datapath_reason="no libbpf")["datapath"]
    assert unknown.ok and unknown.detail == "not known: no libbpf"


@pytest.mark.parametrize(
    ("changes", "failing", "fix"),
    [
        ({"kernel": "4.19.0-26"}, "kernel", "run a 5.4 or newer kernel"),
        ({"kernel": "weird"}, "kernel", "run a 5.4 or newer kernel"),
        ({"af_xdp_error": "Address family not supported by protocol",
          "af_xdp_errno": errno.EAFNOSUPPORT}, "af_xdp socket", "CONFIG_XDP_SOCKETS=y"),
        ({"af_xdp_error": "Operation not permitted", "af_xdp_errno": errno.EPERM},
         "af_xdp socket", "CAP_NET_RAW"),
        ({"bpffs_mounts": ["/elsewhere"]}, "bpffs", "mount -t bpf bpf /sys/fs/bpf"),
        # memlock matters only before 5.11 (memcg accounting since)
        ({"kernel": "5.10.0", "memlock": (64 << 10, 64 << 10)}, "memlock", "LimitMEMLOCK=infinity"),
        ({"libbpf_version": None, "libbpf_error": "libbpf.so.1: cannot open shared object file"},
         "libbpf", "apt-get install libbpf1"),
        ({"xdp_object": None}, "xdp program", "wheel built with clang"),
        ({"cni_bin_dir_error": "does not exist"}, "cni bin dir", "--cni-bin-dir"),
        ({"device_plugins_dir": False}, "kubelet device-plugins", "--kubelet-dir"),
        ({"pod_resources_socket": False}, "kubelet pod-resources", "--kubelet-dir"),
    ],
)  # fmt: skip
def test_each_missing_need_fails_its_check_alone_with_its_fix(
    changes: dict[str, Any], failing: str, fix: str
) -> None:
    results = verdicts(**changes)
    assert [n for n, c in results.items() if not c.ok] == [failing]
    assert fix in (results[failing].fix or "")


@pytest.mark.parametrize(
    ("kernel", "memlock"),
    [
        ("5.11.0", (64 << 10, 64 << 10)),  # memcg accounting: memlock does not matter
        ("5.10.0", (UNLIMITED, UNLIMITED)),
        ("5.10.0", (8 << 20, 8 << 20)),
    ],
)
def test_memlock_passes_with_memcg_accounting_or_enough_of_it(
    kernel: str, memlock: tuple[int, int]
) -> None:
    assert verdicts(kernel=kernel, memlock=memlock)["memlock"].ok


def test_a_pin_dir_inside_a_bpffs_is_enough() -> None:
    assert verdicts(bpffs_mounts=[], pin_dir_fs="bpf")["bpffs"].ok
    assert verdicts(bpffs_mounts=[GOOD.pin_dir], pin_dir_fs="bpf")["bpffs"].ok
    assert not verdicts(bpffs_mounts=[], pin_dir_fs="tmpfs")["bpffs"].ok


def test_informational_checks_never_fail() -> None:
    for value in (0, 1, 2, None):
        check = verdicts(unprivileged_bpf_disabled=value)["unprivileged bpf"]
        assert check.ok and check.info


def test_kernel_versions_parse() -> None:
    assert kernel_version("6.18.44-fc-v657") == (6, 18)
    assert kernel_version("5.4.0") == (5, 4)
    assert kernel_version("nonsense") is None


def doctor(*flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "afxdp.cli.afxdpctl", "doctor", *flags],
        capture_output=True, text=True, env=ENV, check=False, timeout=60,
    )  # fmt: skip


@pytest.mark.privileged
def test_this_machine_without_kubelet_fails_the_kubelet_checks_with_their_fix(
    tmp_path: Path,
) -> None:
    kubelet_dir = tmp_path / "kubelet"  # there, but empty: no kubelet runs here
    kubelet_dir.mkdir()
    done = doctor("--kubelet-dir", str(kubelet_dir), "--cni-bin-dir",
                  str(tmp_path / "no-cni-bin"), "--pin-dir", str(tmp_path / "pins"), "-o", "json")  # fmt: skip
    assert done.returncode == 1, done.stderr
    doc = json.loads(done.stdout)
    results = {c["name"]: c for c in doc["checks"]}
    assert doc["ok"] is False
    failed = {n for n, c in results.items() if not c["ok"]}
    # What this machine has (MACHINE.md): a 6.x kernel, AF_XDP, libbpf 1.x, the built program.
    for need in ("kernel", "af_xdp socket", "memlock", "libbpf", "xdp program"):
        assert need not in failed, results[need]
    for missing in ("kubelet device-plugins", "kubelet pod-resources", "cni bin dir"):
        assert missing in failed
    assert f"{kubelet_dir}/device-plugins/ is missing" in results[
        "kubelet device-plugins"]["detail"]  # fmt: skip
    assert "--kubelet-dir" in results["kubelet pod-resources"]["fix"]
    assert results["cni bin dir"]["detail"] == f"{tmp_path / 'no-cni-bin'} does not exist"
    assert doc["facts"]["kernel"] == os.uname().release


@pytest.fixture
def bpffs(tmp_path: Path) -> Iterator[Path]:
    pins = tmp_path / "pins"
    pins.mkdir()
    subprocess.run(["mount", "-t", "bpf", "bpf", str(pins)], check=True, capture_output=True)
    try:
        yield pins
    finally:
        subprocess.run(["umount", str(pins)], check=False, capture_output=True)


@pytest.mark.privileged
def test_this_machine_with_kubelet_cni_dir_and_bpffs_passes_and_exits_0(
    tmp_path: Path, bpffs: Path
) -> None:
    kubelet = FakeKubelet(tmp_path / "kubelet")  # real gRPC sockets where kubelet has them
    kubelet.start_pod_resources()
    cni_bin = tmp_path / "cni-bin"
    cni_bin.mkdir()
    try:
        done = doctor("--kubelet-dir", str(kubelet.dir), "--cni-bin-dir", str(cni_bin),
                      "--pin-dir", str(bpffs))  # fmt: skip
    finally:
        kubelet.stop()
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[-1] == "all checks passed"
    words = {ln.split()[0] for ln in lines[:-1]}
    assert words <= {"PASS", "INFO"}, done.stdout
    assert any(ln.startswith("PASS  bpffs") and str(bpffs) in ln for ln in lines)
