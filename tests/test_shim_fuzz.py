"""The built C shim under arbitrary CNI_* env and stdin, with no afxdpd and with
a fake afxdpd that answers junk, hangs up or sends an oversized frame.

Property: the shim never dies by a signal, its output is bounded, and when it
fails its stdout is exactly one CNI error JSON (cniVersion, code, msg) with a
spec code and a non-zero exit. The fake peer never sends a well-formed reply,
so every answer checked here is the shim's own."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from afxdp.cni.frame import netstring
from tests.test_shim import FakeAfxdpd, install

SPEC_CODES = {1, 2, 3, 4, 5, 6, 7, 11, 50, 51}
VERBS = [b"ADD", b"DEL", b"CHECK", b"GC", b"STATUS", b"VERSION"]
ENV_KEYS = ["CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS", "CNI_PATH",
            "TRACEPARENT", "TRACESTATE", "CNI_OTHER"]  # fmt: skip
MAX_OUTPUT = 64 << 10  # the shim's own messages are a few KiB at most
SHIM_STDIN_LIMIT = 1 << 20  # cni_shim MAX_STDIN, = afxdp.cni.frame.MAX_FIELD

# Env values are C strings: anything but NUL, up to the kernel's 128 KiB per string.
env_value = st.one_of(
    st.binary(max_size=200).map(lambda b: b.replace(b"\0", b"")),
    st.sampled_from(VERBS),
    st.integers(1, 120_000).map(lambda n: b"\xff" * n),
)
env_strategy = st.dictionaries(st.sampled_from(ENV_KEYS), env_value, max_size=len(ENV_KEYS))


def stdin_strategy(sockets: list[bytes]) -> st.SearchStrategy[bytes]:
    """Arbitrary bytes, and netconf-like text whose daemonSocket is one of ``sockets``."""
    text = st.text(max_size=100).map(lambda s: s.encode("utf-8", "surrogatepass"))
    netconf = st.builds(
        lambda ver, sock, junk: b'{"cniVersion": "%s", "daemonSocket": "%s", ' % (ver, sock) + junk,
        st.sampled_from([b"1.0.0", b"0.4.0", b"", b'\xe9\x00"', b"9" * 40]),
        st.sampled_from(sockets),
        st.binary(max_size=2000) | text,
    )
    return st.one_of(st.binary(max_size=64 << 10), netconf)


def junk(_request: bytes) -> bytes:
    return b"this is not a netstring"


def oversized(_request: bytes) -> bytes:
    return netstring(b"0") + b"%d:" % (64 << 20) + b"x" * (5 << 20)


def hang_up(_request: bytes) -> None:
    return None


PEERS: dict[str, tuple[Callable[[bytes], bytes | None], bool]] = {
    "junk": (junk, True),
    "hangs-up-at-once": (hang_up, False),
    "hangs-up-after-reading": (hang_up, True),
    "oversized-frame": (oversized, True),
}


@pytest.fixture(scope="module")
def shims(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[Path, Path]]]:
    """Per peer: (shim, its only allowed dir); 'none' has no afxdpd at all."""
    out: dict[str, tuple[Path, Path]] = {}
    daemons: list[FakeAfxdpd] = []
    try:
        for name in ("none", *PEERS):
            run_dir = tmp_path_factory.mktemp(f"run-{name}")
            out[name] = (install(tmp_path_factory.mktemp(f"bin-{name}"), run_dir), run_dir)
            if name in PEERS:
                behaviour, read_first = PEERS[name]
                daemons.append(FakeAfxdpd(run_dir / "cni.sock", behaviour, read_first=read_first))
        yield out
    finally:
        for d in daemons:
            d.close()


def check(done: subprocess.CompletedProcess[bytes], command: bytes | None, peer: str) -> None:
    assert done.returncode >= 0, f"killed by signal {-done.returncode}"
    assert len(done.stdout) + len(done.stderr) <= MAX_OUTPUT
    if done.returncode == 0:
        # Success without afxdpd answering: only the shim's own answers.
        if command == b"VERSION":
            assert "1.1.0" in json.loads(done.stdout)["supportedVersions"]
        else:
            assert command == b"DEL" and peer == "none" and done.stdout == b"", done
        return
    assert done.returncode == 1, done
    err = json.loads(done.stdout)  # exactly one JSON document
    assert isinstance(err, dict) and set(err) >= {"cniVersion", "code", "msg"}, err
    assert isinstance(err["cniVersion"], str) and isinstance(err["msg"], str) and err["msg"]
    assert err["code"] in SPEC_CODES, err


def run(exe: Path, env: dict[str, bytes], stdin: bytes) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([str(exe)], input=stdin, capture_output=True, timeout=30,
                          env={k.encode(): v for k, v in env.items()}, check=False)  # fmt: skip


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
@given(peer=st.sampled_from(["none", *PEERS]), env=env_strategy, data=st.data())
def test_shim_never_crashes_and_fails_with_one_cni_error(
    shims: dict[str, tuple[Path, Path]], peer: str, env: dict[str, bytes], data: st.DataObject
) -> None:
    exe, run_dir = shims[peer]
    sockets = [str(run_dir / "cni.sock").encode(), str(run_dir / "other.sock").encode(),
               b"/etc/cni.sock", str(run_dir).encode() + b"/../x.sock", b"\xff\xfe"]  # fmt: skip
    stdin = data.draw(stdin_strategy(sockets), label="stdin")
    done = run(exe, env, stdin)
    check(done, env.get("CNI_COMMAND"), peer)
    code = json.loads(done.stdout)["code"] if done.returncode else 0
    event(f"{peer}: exit {done.returncode}, code {code}")


@pytest.mark.parametrize("peer", ["none", "junk"])
def test_stdin_above_the_shim_limit_is_one_decode_error(
    shims: dict[str, tuple[Path, Path]], peer: str
) -> None:
    exe, _ = shims[peer]
    done = run(exe, {"CNI_COMMAND": b"ADD"}, b"{" * (SHIM_STDIN_LIMIT + 1))
    check(done, b"ADD", peer)
    assert json.loads(done.stdout)["code"] == 6
