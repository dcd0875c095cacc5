"""The static shim on its own: where it may find afxdpd, any input, a missing or
misbehaving afxdpd. Every shim here is installed into a temp bin dir with its
own allowed directories (``afxdpctl install-cni --allow-dir``), so no test
ever reaches a real afxdpd in /run/afxdp."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from afxdp.cli import afxdpctl
from afxdp.cli.common import Exit
from afxdp.cni import shim
from afxdp.cni.frame import Request, encode_reply

# What a peer does with a connection: gets the request bytes (empty when it
# hung up before reading) and returns the reply bytes, or None to hang up.
Behaviour = Callable[[bytes], bytes | None]


class FakeAfxdpd:
    """A fake afxdpd (a real unix socket, a thread) that answers as it is told.

    Named as a fake: the real one is exercised through this shim in test_cni.
    """

    def __init__(self, path: Path, behaviour: Behaviour, *, read_first: bool = True) -> None:
        self.path, self.behaviour, self.read_first = path, behaviour, read_first
        self.requests: list[bytes] = []
        self._srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._srv.bind(str(path))
        self._srv.listen(16)
        self._srv.settimeout(0.1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._srv.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(10)
                try:
                    data = b""
                    if self.read_first:
                        while chunk := conn.recv(1 << 16):
                            data += chunk
                    self.requests.append(data)
                    reply = self.behaviour(data)
                    if reply is not None:
                        conn.sendall(reply)
                except OSError:
                    pass  # the shim hung up: its business, checked by the test

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._srv.close()
        self.path.unlink(missing_ok=True)


@pytest.fixture
def fake_daemon() -> Iterator[Callable[..., FakeAfxdpd]]:
    made: list[FakeAfxdpd] = []

    def start(path: Path, behaviour: Behaviour, **kw: bool) -> FakeAfxdpd:
        made.append(FakeAfxdpd(path, behaviour, **kw))
        return made[-1]

    yield start
    for daemon in made:
        daemon.close()


def install(bin_dir: Path, *allow: Path) -> Path:
    """The shim installed as an operator would, allowed only ``allow``."""
    code = afxdpctl.main(["install-cni", str(bin_dir), *(f"--allow-dir={d}" for d in allow)])
    assert code == Exit.OK
    return bin_dir / shim.NAME


def run(exe: Path, stdin: bytes, command: str, **env: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([str(exe)], input=stdin, capture_output=True, timeout=30,
                          env={"CNI_COMMAND": command, **env}, check=False)  # fmt: skip


def conf(sock: Path | str | None, version: str = "1.0.0") -> bytes:
    doc = {"cniVersion": version, "type": "afxdp"}
    if sock is not None:
        doc["daemonSocket"] = str(sock)
    return json.dumps(doc).encode()


def cni_error(done: subprocess.CompletedProcess[bytes]) -> dict[str, object]:
    err = json.loads(done.stdout)
    assert done.returncode == 1 and set(err) >= {"cniVersion", "code", "msg"}, done
    return dict(err)


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    d = tmp_path / "run"
    d.mkdir()
    return d


@pytest.fixture
def exe(tmp_path: Path, run_dir: Path) -> Path:
    return install(tmp_path / "bin", run_dir)


def ok(_request: bytes) -> bytes:
    return encode_reply(0, b'{"cniVersion":"1.0.0"}')


def test_shim_is_static() -> None:
    out = subprocess.run(
        ["file", "-L", str(shim.path())], capture_output=True, text=True, check=False
    )
    if out.returncode == 0:
        assert "statically linked" in out.stdout
    else:  # no file(1): ask the ELF itself for an interpreter
        assert b"/lib64/ld-linux" not in shim.path().read_bytes()


def test_shim_builds_warning_free_with_wall_wextra(tmp_path: Path) -> None:
    source = Path(__file__).parents[1] / "cni_shim" / "afxdp.c"
    done = subprocess.run(["gcc", "-static", "-O2", "-Wall", "-Wextra", "-o", str(tmp_path / "s"),
                           str(source)], capture_output=True, text=True, check=False)  # fmt: skip
    assert done.returncode == 0 and done.stderr == "", done.stderr


# ---- where the shim may look for afxdpd ----------------------------------


def test_daemon_socket_outside_the_allowed_dirs_is_refused_and_never_contacted(
    tmp_path: Path, exe: Path, run_dir: Path, fake_daemon: Callable[..., FakeAfxdpd]
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    rogue = fake_daemon(elsewhere / "cni.sock", ok)
    for command in ("ADD", "DEL", "CHECK", "STATUS", "VERSION"):
        err = cni_error(run(exe, conf(rogue.path, "0.4.0"), command))
        assert err["code"] == 7 and err["cniVersion"] == "0.4.0"
        assert "daemonSocket" in str(err["msg"]) and str(run_dir) in str(err["msg"])
    assert rogue.requests == []
    assert not (elsewhere / "del-queue").exists() and not (run_dir / "del-queue").exists()


@pytest.mark.parametrize(
    "escape",
    ["{run}/../elsewhere/cni.sock", "{run}/./../elsewhere/cni.sock", "{run}/link-out/cni.sock",
     "elsewhere/cni.sock", "{run}/..", "/"],
)  # fmt: skip
def test_daemon_socket_cannot_escape_an_allowed_dir(
    tmp_path: Path, exe: Path, run_dir: Path, fake_daemon: Callable[..., FakeAfxdpd], escape: str
) -> None:
    (tmp_path / "elsewhere").mkdir()
    rogue = fake_daemon(tmp_path / "elsewhere" / "cni.sock", ok)
    (run_dir / "link-out").symlink_to(tmp_path / "elsewhere")
    err = cni_error(run(exe, conf(escape.format(run=run_dir)), "ADD"))
    assert err["code"] == 7 and "daemonSocket" in str(err["msg"])
    assert rogue.requests == []


def test_symlinked_socket_dir_whose_real_path_is_allowed_is_used(
    tmp_path: Path, exe: Path, run_dir: Path, fake_daemon: Callable[..., FakeAfxdpd]
) -> None:
    (run_dir / "sub").mkdir()
    daemon = fake_daemon(run_dir / "sub" / "afxdpd.sock", ok)
    (tmp_path / "link-in").symlink_to(run_dir / "sub")
    done = run(exe, conf(tmp_path / "link-in" / "afxdpd.sock"), "ADD")
    assert (done.returncode, done.stdout) == (0, b'{"cniVersion":"1.0.0"}'), done
    assert len(daemon.requests) == 1


def test_daemon_socket_not_a_plain_string_is_a_config_error(exe: Path) -> None:
    for stdin in (b'{"daemonSocket": 5}', b'{"daemonSocket": "/run/afxdp/a\\u0041.sock"}'):
        err = cni_error(run(exe, stdin, "ADD"))
        assert err["code"] == 7 and "daemonSocket" in str(err["msg"])


def test_without_allowed_dirs_file_only_the_default_dirs_are_allowed(tmp_path: Path) -> None:
    # The package's own shim has no afxdp.conf beside it.
    assert not (shim.path().parent / shim.CONF_NAME).exists()
    err = cni_error(run(shim.path(), conf(tmp_path / "cni.sock"), "ADD"))
    assert err["code"] == 7
    assert "/run/afxdp, /host/run/afxdp" in str(err["msg"])


def test_invalid_allowed_dirs_file_fails_closed(tmp_path: Path, run_dir: Path) -> None:
    exe = install(tmp_path / "bin", run_dir)
    (tmp_path / "bin" / shim.CONF_NAME).write_text(f"{run_dir}\nrelative/dir\n")
    err = cni_error(run(exe, conf(run_dir / "cni.sock"), "DEL"))
    assert err["code"] == 7 and "line 2" in str(err["details"])
    assert not (run_dir / "del-queue").exists()


def test_the_netconf_socket_then_each_allowed_dir_is_tried_in_order(
    tmp_path: Path, fake_daemon: Callable[..., FakeAfxdpd]
) -> None:
    # As under the Multus thick plugin: the netconf names the host path, which
    # is not there inside the Multus container; the host's run dir is seen at
    # the second allowed dir.
    container_run, host_run = tmp_path / "run" / "afxdp", tmp_path / "host" / "run" / "afxdp"
    host_run.mkdir(parents=True)
    exe = install(tmp_path / "bin", container_run, host_run)
    second = fake_daemon(host_run / "cni.sock", ok)
    done = run(exe, conf(container_run / "cni.sock"), "ADD")
    assert done.returncode == 0 and len(second.requests) == 1, done
    # Once the first allowed dir serves, it wins over the second ...
    container_run.mkdir(parents=True)
    first = fake_daemon(container_run / "cni.sock", ok)
    assert run(exe, conf(None), "ADD").returncode == 0
    assert (len(first.requests), len(second.requests)) == (1, 1)
    # ... and a reachable netconf socket wins over both.
    named = fake_daemon(host_run / "named.sock", ok)
    assert run(exe, conf(named.path), "ADD").returncode == 0
    assert (len(named.requests), len(first.requests), len(second.requests)) == (1, 1, 1)
    assert Request.decode(named.requests[0]).env["CNI_COMMAND"] == "ADD"


def test_unreachable_del_is_queued_in_the_first_candidate_dir_that_exists(tmp_path: Path) -> None:
    missing, present = tmp_path / "missing", tmp_path / "present"
    present.mkdir()
    exe = install(tmp_path / "bin", missing, present)
    stdin = conf(missing / "cni.sock")
    done = run(exe, stdin, "DEL", CNI_CONTAINERID="c1")
    assert (done.returncode, done.stdout) == (0, b""), done
    assert not missing.exists()
    (queued,) = (present / "del-queue").iterdir()
    request = Request.decode(queued.read_bytes())
    assert request.stdin == stdin and request.env["CNI_CONTAINERID"] == "c1"


def test_unreachable_del_creates_the_first_allowed_dir_when_none_exists(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    exe = install(tmp_path / "bin", first, second)
    assert run(exe, conf(None), "DEL").returncode == 0
    assert len(list((first / "del-queue").iterdir())) == 1 and not second.exists()


def test_unreachable_del_never_creates_dirs_below_an_allowed_dir(
    tmp_path: Path, exe: Path, run_dir: Path
) -> None:
    # run_dir exists, so the DEL lands there, not in the netconf's sub dir.
    assert run(exe, conf(run_dir / "a" / "b" / "cni.sock"), "DEL").returncode == 0
    assert not (run_dir / "a").exists() and len(list((run_dir / "del-queue").iterdir())) == 1


# ---- install-cni ---------------------------------------------------------


def test_install_cni_writes_the_allowed_dirs_and_a_plain_install_restores_the_defaults(
    tmp_path: Path, run_dir: Path
) -> None:
    bin_dir = tmp_path / "bin"
    install(bin_dir, run_dir, Path("/host/run/afxdp/"))
    lines = [ln for ln in (bin_dir / shim.CONF_NAME).read_text().splitlines() if ln[:1] != "#"]
    assert lines == [str(run_dir), "/host/run/afxdp"]
    assert os.access(bin_dir / shim.NAME, os.X_OK)
    assert afxdpctl.main(["install-cni", str(bin_dir)]) == Exit.OK
    assert not (bin_dir / shim.CONF_NAME).exists()


@pytest.mark.parametrize("bad", ["relative/dir", "/run/../etc", "/run/afxdp\n/etc"])
def test_install_cni_refuses_a_dir_the_shim_would_misread(tmp_path: Path, bad: str) -> None:
    assert afxdpctl.main(["install-cni", str(tmp_path / "bin"), "--allow-dir", bad]) == Exit.CONFIG
    assert not (tmp_path / "bin").exists()


# ---- a missing or misbehaving afxdpd -------------------------------------


@pytest.fixture(scope="module")
def allowed_root(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(shim, allowed dir) for many examples: each example works in a fresh sub dir."""
    root = tmp_path_factory.mktemp("allowed")
    return install(tmp_path_factory.mktemp("bin"), root), root


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    st.binary(max_size=300),
    st.sampled_from(["ADD", "DEL", "CHECK", "GC", "STATUS", "VERSION", "", "X"]),
)
def test_any_input_without_afxdpd_gives_a_cni_answer(
    allowed_root: tuple[Path, Path], junk: bytes, command: str
) -> None:
    exe, root = allowed_root
    tmp = Path(tempfile.mkdtemp(dir=root))
    stdin = b'{"daemonSocket": "%s", ' % str(tmp / "none.sock").encode() + junk
    done = run(exe, stdin, command)
    assert done.returncode in (0, 1)
    if command == "VERSION":
        assert done.returncode == 0 and "1.1.0" in json.loads(done.stdout)["supportedVersions"]
    elif command == "DEL":
        assert done.returncode == 0 and done.stdout == b""
        (queued,) = (tmp / "del-queue").iterdir()
        assert Request.decode(queued.read_bytes()).stdin == stdin
    else:
        err = cni_error(done)
        assert err["code"] == (50 if command == "STATUS" else 11)
        assert str(tmp / "none.sock") in str(err["msg"])


@pytest.mark.parametrize("reply", [b"", b"junk", b"1:0,0:,", b"3:abc,0:,0:,", b"999999999:x,",
                                   b"1:0,10:short,0:,", b"1:0,0:,0:,trailing"])  # fmt: skip
def test_malformed_reply_is_an_io_error(
    exe: Path, run_dir: Path, fake_daemon: Callable[..., FakeAfxdpd], reply: bytes
) -> None:
    daemon = fake_daemon(run_dir / "cni.sock", lambda _: reply)
    err = cni_error(run(exe, conf(daemon.path, "0.4.0"), "ADD"))
    assert err["code"] == 5 and err["cniVersion"] == "0.4.0"


def test_oversized_reply_is_an_io_error_with_bounded_output(
    exe: Path, run_dir: Path, fake_daemon: Callable[..., FakeAfxdpd]
) -> None:
    daemon = fake_daemon(run_dir / "cni.sock", lambda _: encode_reply(0, b"x" * (5 << 20)))
    done = run(exe, conf(daemon.path), "ADD")
    err = cni_error(done)
    assert err["code"] == 5 and "larger than" in str(err["msg"]) and len(done.stdout) < 4096


def test_daemon_hanging_up_before_reading_is_an_error_not_a_signal(
    exe: Path, run_dir: Path, fake_daemon: Callable[..., FakeAfxdpd]
) -> None:
    # A big request, so that the shim is still writing when the peer is gone
    # (EPIPE: without care, SIGPIPE kills the shim).
    daemon = fake_daemon(run_dir / "cni.sock", lambda _: None, read_first=False)
    stdin = (
        conf(daemon.path)[:-1] + b', "pad": "' + b"p" * (900 << 10)
    )  # under the 1 MiB limit, over a socket buffer + b'"}'
    err = cni_error(run(exe, stdin, "ADD"))
    assert err["code"] in (5, 11) and str(daemon.path) in str(err["msg"])


def test_reply_is_printed_and_its_code_returned(
    exe: Path, run_dir: Path, fake_daemon: Callable[..., FakeAfxdpd]
) -> None:
    daemon = fake_daemon(run_dir / "cni.sock", lambda _: b"1:7,5:hello,4:warn,")
    done = run(exe, conf(daemon.path), "ADD")
    assert (done.returncode, done.stdout, done.stderr) == (7, b"hello", b"warn")


def test_oversized_config_is_refused(exe: Path, run_dir: Path) -> None:
    done = run(exe, conf(run_dir / "s")[:-1] + b', "x": "' + b"a" * (9 << 20), "ADD")
    assert cni_error(done)["code"] == 6
