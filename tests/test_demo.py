"""``python -m afxdp.demo`` (what ``make demo`` runs) end to end, and its clean-up
when it is interrupted at a step. Everything the demo makes carries its run tag,
so what is left can be looked for independently of the demo's own check."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from afxdp.datapath import LAYOUT_ENV, LAYOUTS

pytestmark = pytest.mark.privileged

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
FRAMES = 20_000
# The pod's receiver is pure Python: on a loaded machine it may fall behind the
# wire for longer than its RX ring lasts (2,048 frames, 10 ms at the wire's pace).
MIN_RECEIVED = 0.9


def demo(tag: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "afxdp.demo", "--tag", tag, "--frames", str(FRAMES), *args]


def leftovers(tag: str) -> list[str]:
    """Anything of run ``tag``: netns, links, processes, mounts, its work dir."""
    mark = f"-{tag}"
    found = []
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    found += [f"netns {ns}" for ns in netns.split() if f"afxdp-demo{mark}-" in ns]
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    found += [f"link {m}" for m in re.findall(r"^\d+: ((?:nic|wire)\d+" + mark + r")\b", links,
                                              re.M)]  # fmt: skip
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # the process ended meanwhile
        if f"afxdp-demo{mark}-" in text:
            found.append(f"process {cmdline.parent.name}: {text[:120]}")
    mounts = Path("/proc/self/mountinfo").read_text()
    found += [f"mount {ln.split()[4]}" for ln in mounts.splitlines() if f"afxdp-demo{mark}-" in ln]
    found += [f"dir {p}" for p in Path(tempfile.gettempdir()).glob(f"afxdp-demo{mark}-*")]
    return found


@pytest.fixture
def tag() -> Iterator[str]:
    """A run tag; whatever a failed run left is removed after the test (and reported)."""
    run = secrets.token_hex(2)
    yield run
    for item in leftovers(run):  # only after a failure: the test asserted there were none
        kind, _, name = item.partition(" ")
        if kind == "netns":
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        elif kind == "link":
            subprocess.run(["ip", "link", "del", name], capture_output=True)
        elif kind == "process":
            subprocess.run(["kill", "-9", name.rstrip(":")], capture_output=True)
        elif kind == "mount":
            subprocess.run(["umount", "-l", name], capture_output=True)
    for d in Path(tempfile.gettempdir()).glob(f"afxdp-demo-{run}-*"):
        subprocess.run(["rm", "-rf", str(d)], capture_output=True)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_demo_pods_receive_frames_over_af_xdp_and_nothing_is_left(tag: str, layout: str) -> None:
    started = time.monotonic()
    env = {**ENV, LAYOUT_ENV: layout}  # both datapath layouts, the fallback forced
    done = subprocess.run(demo(tag), capture_output=True, text=True, env=env, timeout=100)
    took = time.monotonic() - started
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    # afxdpctl status says which layout runs (the node table's last column).
    assert re.search(rf"│ \S+ +yes +.* {layout}$", out, re.MULTILINE), out
    # Both pods went through every step, each on its own device.
    assert re.findall(r"env   AFXDP_DEVICES_DEMO=(\S+)", out) == [f"nic0-{tag}", f"nic1-{tag}"]
    for pod in ("a", "b"):
        netns = f"afxdp-demo-{tag}-pod-{pod}"
        assert re.search(rf"CNI result: nic\d-{tag} in {netns}: 10\.99\.0\.\d+, mac ", out), out
        assert f"pod process: hostname demo-{pod}, sees nic" in out
    assert out.count("pod: handshake version 0.1, socket bound on queue 0") == 2
    assert out.count("CNI DEL demo-") == 2
    assert out.count("$ afxdpctl status") >= 6
    sent = [int(n.replace(",", "")) for n in re.findall(r"wire sent ([\d,]+) UDP frames", out)]
    got = [int(n.replace(",", "")) for n in re.findall(r"AF_XDP socket received ([\d,]+)", out)]
    assert sent == [FRAMES, FRAMES], out
    assert len(got) == 2 and all(MIN_RECEIVED * FRAMES <= g <= FRAMES for g in got), out
    summary = out.strip().splitlines()[-1]
    assert summary.startswith(
        "demo: OK: 2 pods through Allocate, CNI ADD, handshake, AF_XDP, DEL"
    ), out
    assert f"{sum(got):,}/{2 * FRAMES:,} frames received" in summary
    assert summary.endswith("nothing left behind")
    assert "afxdpd exited with 0" in out
    assert took < 60
    assert leftovers(tag) == []


@pytest.mark.timeout(120)
def test_demo_podman_containers_receive_frames_and_nothing_is_left(tag: str) -> None:
    if shutil.which("podman") is None:
        pytest.fail("podman is not installed: scripts/bootstrap installs it")
    done = subprocess.run(demo(tag, "--podman"), capture_output=True, text=True, env=ENV,
                          timeout=100)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert re.findall(r"env   AFXDP_DEVICES_DEMO=(\S+)", out) == [f"nic0-{tag}", f"nic1-{tag}"]
    # The container (podman's netns, podman's CNI ADD) saw the allocated device.
    for pod, nic in (("demo-a", "nic0"), ("demo-b", "nic1")):
        assert f"container afxdp-demo-{tag}-{pod} on network afxdp-demo-{pod}:" in out
        assert re.search(rf"{nic}-{tag} 10\.99\.0\.\d+, mac \S+, hostname {pod}", out), out
    got = [int(n.replace(",", "")) for n in re.findall(r"AF_XDP socket received ([\d,]+)", out)]
    assert len(got) == 2 and all(MIN_RECEIVED * FRAMES <= g <= FRAMES for g in got), out
    assert out.strip().splitlines()[-1].endswith("nothing left behind")
    assert leftovers(tag) == []


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("step", "where", "args"),
    [
        (3, "afxdpd up, Allocate under way", ()),
        (4, "CNI ADD, the pod app starting", ()),
        (6, "frames on the wire", ()),
        (6, "frames on the wire to a podman container", ("--podman",)),
    ],
)
def test_sigint_at_a_step_leaves_nothing_behind(
    tag: str, step: int, where: str, args: tuple[str, ...]
) -> None:
    proc = subprocess.Popen(demo(tag, *args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=ENV)  # fmt: skip
    seen: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # bounded by the test's timeout
            seen.append(line)
            if line.startswith(f"── step {step} of "):
                proc.send_signal(signal.SIGINT)
                break
        else:
            pytest.fail(f"the demo ended before step {step} ({where}):\n{''.join(seen)}")
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = "".join(seen) + rest
    assert proc.returncode == 130, out
    # The demo may have begun the next step before the signal arrived.
    reached = re.search(r"demo: interrupted at step (\d+); cleaned up, nothing left behind", out)
    assert reached is not None and step <= int(reached[1]) <= step + 1, out
    assert leftovers(tag) == []
