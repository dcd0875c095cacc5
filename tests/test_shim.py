"""The static shim on its own: any input, a missing or misbehaving afxdpd."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from afxdp.cni import shim
from afxdp.cni.frame import Request


def run(stdin: bytes, command: str, **env: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([str(shim.path())], input=stdin, capture_output=True, timeout=30,
                          env={"CNI_COMMAND": command, **env}, check=False)  # fmt: skip


def test_shim_is_static() -> None:
    out = subprocess.run(
        ["file", "-L", str(shim.path())], capture_output=True, text=True, check=False
    )
    if out.returncode == 0:
        assert "statically linked" in out.stdout
    else:  # no file(1): ask the ELF itself for an interpreter
        assert b"/lib64/ld-linux" not in shim.path().read_bytes()


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    st.binary(max_size=300),
    st.sampled_from(["ADD", "DEL", "CHECK", "GC", "STATUS", "VERSION", "", "X"]),
)
def test_any_input_without_afxdpd_gives_a_cni_answer(tmp_path_factory: pytest.TempPathFactory,
                                                       junk: bytes, command: str) -> None:  # fmt: skip
    tmp = tmp_path_factory.mktemp("shim")
    stdin = b'{"daemonSocket": "%s", ' % str(tmp / "none.sock").encode() + junk
    done = run(stdin, command)
    assert done.returncode in (0, 1)
    if command == "VERSION":
        assert done.returncode == 0 and "1.1.0" in json.loads(done.stdout)["supportedVersions"]
    elif command == "DEL":
        assert done.returncode == 0 and done.stdout == b""
        (queued,) = (tmp / "del-queue").iterdir()
        assert Request.decode(queued.read_bytes()).stdin == stdin
    else:
        err = json.loads(done.stdout)
        assert done.returncode == 1 and err["code"] == (50 if command == "STATUS" else 11)
        assert str(tmp / "none.sock") in err["msg"]


@pytest.fixture
def bad_daemon(tmp_path: Path) -> Iterator[tuple[Path, list[bytes]]]:
    """An 'afxdpd' that reads the request, then answers with what the test says."""
    path = tmp_path / "cni.sock"
    replies: list[bytes] = []
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(4)
    srv.settimeout(0.2)
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            with conn:
                while conn.recv(65536):
                    pass
                conn.sendall(replies.pop(0))

    t = threading.Thread(target=loop)
    t.start()
    yield path, replies
    stop.set()
    t.join()
    srv.close()


@pytest.mark.parametrize("reply", [b"", b"junk", b"1:0,0:,", b"3:abc,0:,0:,", b"999999999:x,",
                                   b"1:0,10:short,0:,"])  # fmt: skip
def test_malformed_reply_is_an_io_error(bad_daemon: tuple[Path, list[bytes]], reply: bytes) -> None:
    path, replies = bad_daemon
    replies.append(reply)
    done = run(b'{"cniVersion": "0.4.0", "daemonSocket": "%s"}' % str(path).encode(), "ADD")
    err = json.loads(done.stdout)
    assert done.returncode == 1 and err["code"] == 5 and err["cniVersion"] == "0.4.0"


def test_reply_is_printed_and_its_code_returned(bad_daemon: tuple[Path, list[bytes]]) -> None:
    path, replies = bad_daemon
    replies.append(b"1:7,5:hello,4:warn,")
    done = run(b'{"daemonSocket": "%s"}' % str(path).encode(), "ADD")
    assert (done.returncode, done.stdout, done.stderr) == (7, b"hello", b"warn")


def test_oversized_config_is_refused(tmp_path: Path) -> None:
    done = run(
        b'{"daemonSocket": "%s", "x": "' % str(tmp_path / "s").encode() + b"a" * (9 << 20), "ADD"
    )
    assert done.returncode == 1 and json.loads(done.stdout)["code"] == 6
