"""``afxdpd`` and ``afxdpctl status`` as processes, as an operator runs them."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from afxdp import control
from afxdp.bpf import libbpf
from afxdp.cli.afxdpd import LOCK_FILE, lock_holder, lock_run_dir
from tests.kernel import Lab, ip
from tests.kubelet import FakeKubelet, PluginClient

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}


def afxdpd(*args: str) -> list[str]:
    return [sys.executable, "-m", "afxdp.cli.afxdpd", *args]


def test_invalid_config_exits_1_naming_every_error(tmp_path: Path) -> None:
    cfg = tmp_path / "config.json"
    cfg.write_text('{"pools": [{"name": "a-b", "mode": "x", "drivers": [{"name": "ice"}]}]}')
    done = subprocess.run(
        afxdpd("--config", str(cfg)), capture_output=True, text=True, env=ENV, check=False
    )
    assert done.returncode == 1
    assert "pools[0].name: must only contain letters and digits" in done.stderr
    assert "pools[0].mode: must be one of primary, cdq" in done.stderr


def test_an_unknown_datapath_layout_exits_1_naming_the_variable(tmp_path: Path) -> None:
    cfg = tmp_path / "config.json"
    cfg.write_text('{"pools": [{"name": "p", "mode": "primary", "drivers": [{"name": "ice"}]}]}')
    done = subprocess.run(
        afxdpd("--config", str(cfg), "--run-dir", str(tmp_path / "run")), capture_output=True,
        text=True, env={**ENV, "AFXDP_DATAPATH": "slots"}, check=False, timeout=30,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert "AFXDP_DATAPATH: must be map-in-map or per-pod or unset, got 'slots'" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "run").exists()
    helped = subprocess.run(afxdpd("--help"), capture_output=True, text=True, env=ENV, check=True)
    assert "AFXDP_DATAPATH=map-in-map or per-pod" in " ".join(helped.stdout.split())


def test_no_pinned_maps_refuses_a_pinned_map_pool_at_start_naming_it(tmp_path: Path) -> None:
    # The capabilities DaemonSet: its pin dir cannot reach kubelet, so a
    # pinned-map pool must stop afxdpd, not serve pods an empty directory.
    cfg = tmp_path / "config.json"
    pinned = {"name": "pinned", "mode": "primary", "drivers": [{"name": "ice"}],
              "udsServerDisable": True, "bpfMapPinningEnable": True}  # fmt: skip
    plain = {"name": "plain", "mode": "primary", "drivers": [{"name": "i40e"}]}
    cfg.write_text(json.dumps({"pools": [plain, pinned]}))
    done = subprocess.run(afxdpd("--config", str(cfg), "--no-pinned-maps",
                                 "--run-dir", str(tmp_path / "run")),
                          capture_output=True, text=True, env=ENV, check=False, timeout=30)  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert "pools[1].bpfMapPinningEnable: pool 'pinned' wants pinned maps" in done.stderr
    assert "--no-pinned-maps" in done.stderr and "plain" not in done.stderr
    assert not (tmp_path / "run").exists()  # refused before it touched anything


def test_unusable_log_dir_exits_2_saying_why(tmp_path: Path) -> None:
    cfg = tmp_path / "config.json"
    cfg.write_text(
        '{"logFile": "dp.log", "pools": [{"name": "p", "mode": "primary", "drivers": [{"name": "ice"}]}]}'
    )
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    done = subprocess.run(afxdpd("--config", str(cfg), "--log-dir", str(not_a_dir)),
                          capture_output=True, text=True, env=ENV, check=False)  # fmt: skip
    assert done.returncode == 2, done.stderr
    # argparse exits 2 too: the reason tells this failure apart, and names the culprit.
    assert "cannot set up logging" in done.stderr
    assert str(not_a_dir) in done.stderr
    assert "usage:" not in done.stderr


def test_a_part_that_cannot_start_exits_4_saying_why_not_with_a_traceback(tmp_path: Path) -> None:
    cfg = tmp_path / "config.json"
    cfg.write_text('{"pools": [{"name": "p", "mode": "primary", "drivers": [{"name": "ice"}]}]}')
    blocked = tmp_path / "run" / "control.sock"
    (blocked / "x").mkdir(parents=True)  # what sits there is no socket, and cannot go
    done = subprocess.run(
        afxdpd("--config", str(cfg), "--kubelet-dir", str(tmp_path / "kubelet"),
               "--uds-dir", str(tmp_path / "uds"), "--pin-dir", str(tmp_path / "pins"),
               "--run-dir", str(tmp_path / "run"), "--state-dir", str(tmp_path / "state"),
               "--log-dir", str(tmp_path / "log"), "--cdi-dir", str(tmp_path / "cdi"),
               "--metrics-address", ""),
        capture_output=True, text=True, env=ENV, check=False, timeout=30,
    )  # fmt: skip
    assert done.returncode == 4, done.stderr
    assert f"start-up failed: [Errno 21] Is a directory: '{blocked}'" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_metrics_port_another_process_holds_exits_7_before_anything_starts(
    tmp_path: Path,
) -> None:
    cfg = tmp_path / "config.json"
    cfg.write_text('{"pools": [{"name": "p", "mode": "primary", "drivers": [{"name": "ice"}]}]}')
    kubelet = FakeKubelet(tmp_path / "kubelet")
    kubelet.start_registration()
    with socket.socket() as taken:  # a real listener holds the port
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        done = subprocess.run(
            afxdpd("--config", str(cfg), "--kubelet-dir", str(kubelet.dir),
                   "--uds-dir", str(tmp_path / "uds"), "--pin-dir", str(tmp_path / "pins"),
                   "--run-dir", str(tmp_path / "run"), "--state-dir", str(tmp_path / "state"),
                   "--cdi-dir", str(tmp_path / "cdi"), "--metrics-address", f"127.0.0.1:{busy}"),
            capture_output=True, text=True, env=ENV, check=False, timeout=30,
        )  # fmt: skip
    try:
        assert done.returncode == 7, done.stderr
        assert f"cannot listen on 127.0.0.1:{busy} for /metrics, /healthz and /readyz: " \
               "Address already in use; exiting" in done.stderr  # fmt: skip
        assert "Traceback" not in done.stderr
        # Nothing was served meanwhile: no socket, no registration with kubelet.
        assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [LOCK_FILE]
        assert kubelet.registrations == []
    finally:
        kubelet.stop()


def test_the_run_dir_stays_locked_when_its_lock_file_is_deleted(tmp_path: Path) -> None:
    first = lock_run_dir(tmp_path)
    assert first is not None
    try:
        (tmp_path / LOCK_FILE).unlink()
        assert lock_run_dir(tmp_path) is None
        assert not (tmp_path / LOCK_FILE).exists(), "the refused one writes nothing"
        assert lock_holder(tmp_path) == str(os.getpid())  # from the kernel's list of locks
    finally:
        for fd in first:
            os.close(fd)
    again = lock_run_dir(tmp_path)
    assert again is not None, "free again once the holder is gone"
    for fd in again:
        os.close(fd)


def test_an_older_afxdpd_holding_only_the_lock_file_still_excludes_this_one(
    tmp_path: Path,
) -> None:
    # What afxdpd did before it locked the directory: flock the file, write the pid.
    old = os.open(tmp_path / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(old, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(old, b"4242\n")
        assert lock_run_dir(tmp_path) is None
        assert lock_holder(tmp_path) == "4242"
    finally:
        os.close(old)
    # Refused at the file, it let go of the directory as well.
    new = lock_run_dir(tmp_path)
    assert new is not None
    for fd in new:
        os.close(fd)


# What the re-exec'd process says: its pid, its argv, the allocator it runs on.
_REPORT = (
    "import os, sys, _testcapi; from afxdp.cli.heap import use_system_malloc; "
    "use_system_malloc(); print(os.getpid(), sys.argv[1:], _testcapi.pymem_getallocatorsname())"
)


def test_afxdpd_runs_on_glibc_malloc_in_the_same_process_with_the_same_arguments() -> None:
    env = {k: v for k, v in ENV.items() if k != "PYTHONMALLOC"}
    proc = subprocess.Popen([sys.executable, "-c", _REPORT, "--config", "x y"], env=env,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    out, _ = proc.communicate(timeout=30)
    assert out.split(maxsplit=1)[0] == str(proc.pid), "an exec, not a child that outlives us"
    assert out.split(maxsplit=1)[1] == "['--config', 'x y'] malloc\n"


def test_an_allocator_the_operator_chose_is_kept() -> None:
    done = subprocess.run([sys.executable, "-c", _REPORT], env={**ENV, "PYTHONMALLOC": "pymalloc"},
                          capture_output=True, text=True, check=True)  # fmt: skip
    assert done.stdout.endswith("[] pymalloc\n")


@pytest.mark.privileged
def test_serves_reports_status_and_cleans_up_on_sigterm(tmp_path: Path, lab: Lab) -> None:
    dev, peer = lab.veth(lab.name("ad"), lab.name("ae"))
    ip("link", "set", dev, "up")
    ip("link", "set", peer, "up")
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"logLevel": "debug", "logFile": "afxdp-dp.log", "pools": [
        {"name": "demo", "mode": "primary", "devices": [{"name": dev}]}]}))  # fmt: skip
    kubelet = FakeKubelet(tmp_path / "kubelet")
    kubelet.start_registration()
    kubelet.start_pod_resources()
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        afxdpd("--config", str(cfg), "--node-name", "node1", "--kubelet-dir", str(kubelet.dir),
               "--uds-dir", str(tmp_path / "uds"), "--pin-dir", str(tmp_path / "pins"),
               "--run-dir", str(run_dir), "--state-dir", str(tmp_path / "state"), "--log-dir", str(tmp_path / "log"),
               "--cdi-dir", str(tmp_path / "cdi")),
        env=ENV, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        regs = kubelet.wait_registrations(1, timeout=20)
        assert [r.resource_name for r in regs] == ["afxdp/demo"]
        environ = Path(f"/proc/{proc.pid}/environ").read_bytes().split(b"\0")
        assert b"PYTHONMALLOC=malloc" in environ, "afxdpd picks glibc's malloc (cli/heap.py)"
        assert b"MALLOC_ARENA_MAX=1" in environ
        deadline = time.monotonic() + 10
        while not (run_dir / "control.sock").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        PluginClient(kubelet.plugin_dir / "afxdp-demo.sock").allocate([dev])
        status = subprocess.run([sys.executable, "-m", "afxdp.cli.afxdpctl", "status",
                                 "--run-dir", str(run_dir), "-o", "wide"],
                                capture_output=True, text=True, env=ENV, check=False)  # fmt: skip
        assert status.returncode == 0, status.stdout + status.stderr
        cells = [ln.split() for ln in status.stdout.splitlines()]
        assert cells[1][:2] == ["node1", "yes"]
        assert ["demo", "afxdp/demo", "devicePlugin", "primary", "yes", "1", "0"] in cells
        assert next(c for c in cells if c[:3] == ["demo", dev, "allocated"])[7] == "native"
        assert libbpf.xdp_query_id(socket.if_nametoindex(dev)) != 0
        # Once ready, the start-up heap is out of the collector's sight (service.py).
        deadline = time.monotonic() + 10
        while not control.read_status(run_dir)["gc_frozen"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert control.read_status(run_dir)["gc_frozen"] > 10_000
        assert control.read_status(run_dir)["gc_enabled"] is True  # off only while starting
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        kubelet.stop()
    assert libbpf.xdp_query_id(socket.if_nametoindex(dev)) == 0
    assert not (tmp_path / "uds" / dev).exists()
    assert not (kubelet.plugin_dir / "afxdp-demo.sock").exists()
    assert not (run_dir / "control.sock").exists()
    log = (tmp_path / "log" / "afxdp-dp.log").read_text()
    assert "ready on node node1: afxdp/demo=1" in log
    assert oct((tmp_path / "log" / "afxdp-dp.log").stat().st_mode & 0o777) == "0o644"
