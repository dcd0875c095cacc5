"""Hostile and clumsy CNI input: afxdpd's real CNI socket server (``serve`` with a
real CniHandler) against peers that hang up, idle, oversize, nest or mis-encode;
the DEL queue replay with bad items; IPAM plugins that hang, fork, or print junk
(fake plugins, written here as scripts, run as a runtime runs them)."""

from __future__ import annotations

import json
import logging
import os
import socket
import stat
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from afxdp.cni import ipam
from afxdp.cni import server as cni_server
from afxdp.cni.attachments import AttachmentStore
from afxdp.cni.errors import CniError
from afxdp.cni.frame import Request, decode_reply, netstring
from afxdp.cni.handler import CniHandler
from afxdp.cni.netconf import parse_env, parse_netconf

pytestmark = pytest.mark.anyio

SERVER_LOG = "afxdp.cni.server"
VERSION_REQUEST = Request({"CNI_COMMAND": "VERSION"}, b'{"cniVersion":"1.0.0"}').encode()


class NoPoolsDevices:
    """Device-side double: afxdpd with no pools (the CNI parsing paths need no device)."""

    ready = True

    def __init__(self) -> None:
        self.home: list[str] = []

    def device_allocated(self, device: str) -> bool | None:
        return None

    async def came_home(self, device: str, keep_xdp: bool) -> None:
        self.home.append(device)

    def describe(self, device: str) -> dict[str, Any]:
        return {}

    async def ensure_program(self, device: str) -> None:
        raise AssertionError("no device of a pool here: an ADD never gets this far")

    def pod_attached(self, device: str, pod: str) -> None:
        raise AssertionError("no device of a pool here: an ADD never gets this far")


def make_handler(tmp: Path) -> CniHandler:
    return CniHandler(NoPoolsDevices(), AttachmentStore(tmp / "attachments.json"))


@asynccontextmanager
async def cni_socket(tmp: Path) -> AsyncIterator[Path]:
    """afxdpd's CNI socket served for the block; the serving task must not end by itself."""
    run_dir = tmp / "run"
    async with anyio.create_task_group() as tg:
        await tg.start(cni_server.serve, run_dir, make_handler(tmp))
        yield run_dir / cni_server.SOCKET_NAME
        tg.cancel_scope.cancel()


def exchange(path: Path, data: bytes) -> tuple[int, bytes, bytes]:
    """What the shim does: send, shut the write side, read the reply to the end."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(20)
        s.connect(str(path))
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server stopped reading (too big): its reply is still there
        return decode_reply(read_all(s))


def read_all(s: socket.socket) -> bytes:
    chunks = []
    while chunk := s.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


async def call(path: Path, data: bytes) -> tuple[int, Any]:
    code, out, _err = await anyio.to_thread.run_sync(exchange, path, data)
    return code, json.loads(out)


def assert_cni_error(reply: tuple[int, Any], code: int, text: str = "") -> None:
    """A CNI error per the spec: non-zero exit, {cniVersion, code, msg[, details]}."""
    exit_code, doc = reply
    assert exit_code != 0, doc
    assert set(doc) <= {"cniVersion", "code", "msg", "details"}, doc
    assert isinstance(doc["cniVersion"], str) and isinstance(doc["msg"], str), doc
    assert doc["code"] == code, doc
    assert text in doc["msg"] + doc.get("details", ""), doc


async def assert_still_serving(path: Path) -> None:
    code, doc = await call(path, VERSION_REQUEST)
    assert code == 0 and "1.1.0" in doc["supportedVersions"], doc


def server_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == SERVER_LOG]


async def wait_until(what: str, done: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await anyio.sleep(0.01)


def connect() -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(20)
    return s


def add_request(stdin: bytes, **env: str) -> bytes:
    full = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_NETNS": "/run/netns/none",
            "CNI_IFNAME": "net1", "CNI_PATH": "/usr/lib/cni", **env}  # fmt: skip
    return Request(full, stdin).encode()


def netconf(**extra: Any) -> bytes:
    doc = {"cniVersion": "1.0.0", "name": "n", "type": "afxdp", "deviceID": "dev1", **extra}
    return json.dumps(doc).encode()


# -- 1. peers that go away -------------------------------------------------------------------


async def test_a_peer_hanging_up_at_any_byte_is_logged_once_and_the_server_keeps_serving(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger=SERVER_LOG)
    request = VERSION_REQUEST
    async with cni_socket(tmp_path) as path:

        def hang_up(cut: int | None, shut: int | None) -> None:
            """Send ``request[:cut]`` (all of it when None), shut ``shut``, close."""
            with connect() as s:
                s.connect(str(path))
                if shut == socket.SHUT_RD:
                    s.shutdown(socket.SHUT_RD)  # the reply cannot land
                s.sendall(request[:cut])
                if shut == socket.SHUT_WR:
                    s.shutdown(socket.SHUT_WR)

        peers: list[tuple[int | None, int | None]] = [
            (c, None) for c in range(len(request) + 1)
        ]  # 0, 1, ... n bytes, close
        peers += [(None, socket.SHUT_WR), (None, socket.SHUT_RD)]  # whole, gone before reply
        for n, (cut, shut) in enumerate(peers, 1):
            await anyio.to_thread.run_sync(hang_up, cut, shut)
            # one at a time: each connection's own line, and the server still up after it
            await wait_until(f"line {n}", lambda: len(server_records(caplog)) >= n)  # noqa: B023
        await assert_still_serving(path)
        await wait_until("the last line", lambda: len(server_records(caplog)) > len(peers))
        peers_count = len(peers)
    # exactly one line per connection: none silent, none logged twice
    assert len(server_records(caplog)) == peers_count + 1


async def test_junk_then_hang_up_is_logged_once_and_the_server_keeps_serving(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger=SERVER_LOG)
    async with cni_socket(tmp_path) as path:

        def junk() -> None:
            with connect() as s:
                s.connect(str(path))
                s.sendall(b"\xff\x00 GET / HTTP/1.1\r\n\r\n" * 10)

        await anyio.to_thread.run_sync(junk)
        await wait_until("the junk's log line", lambda: len(server_records(caplog)) >= 1)
        (line,) = server_records(caplog)
        assert line.levelno == logging.WARNING and "malformed" in line.getMessage()
        await assert_still_serving(path)


async def test_a_peer_idling_past_the_read_timeout_gets_code_6_and_the_server_keeps_serving(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cni_server, "READ_TIMEOUT", 0.3)
    caplog.set_level(logging.DEBUG, logger=SERVER_LOG)
    async with cni_socket(tmp_path) as path:

        def idle() -> socket.socket:
            s = connect()
            s.connect(str(path))
            s.sendall(VERSION_REQUEST[:5])  # then nothing: no shutdown, no more bytes
            return s

        with await anyio.to_thread.run_sync(idle) as reader:
            code, out, _ = decode_reply(await anyio.to_thread.run_sync(read_all, reader))
        assert_cni_error((code, json.loads(out)), 6, "not complete within 0.3 s")
        with await anyio.to_thread.run_sync(idle) as deaf:  # will never read its reply
            deaf.shutdown(socket.SHUT_RD)
            await wait_until("two log lines", lambda: len(server_records(caplog)) >= 2)
        lines = [r.getMessage() for r in server_records(caplog)]
        assert len(lines) == 2 and all("not complete within 0.3 s" in m for m in lines), lines
        await assert_still_serving(path)


# -- 2 and 4. undecodable, oversized, too deep -----------------------------------------------


@pytest.mark.parametrize(
    ("request_bytes", "text"),
    [
        pytest.param(
            add_request(b'{"cniVersion":"1.0.0","name":"caf\xe9","deviceID":"d"}'),
            "not valid UTF-8",
            id="stdin-string",
        ),
        pytest.param(
            add_request(b'{"caf\xe9":1,"cniVersion":"1.0.0"}'), "not valid UTF-8", id="stdin-key"
        ),
        pytest.param(
            add_request(b'{"cniVersion":"1.0.0"} \xff'), "not valid UTF-8", id="stdin-tail"
        ),
        pytest.param(
            netstring(b"CNI_COMMAND=ADD\0CNI_CONTAINERID=caf\xe9\0") + netstring(netconf()),
            "not valid UTF-8",
            id="env-value",
        ),
        pytest.param(
            netstring(b"CNI_\xe9=1\0CNI_COMMAND=VERSION\0") + netstring(b"{}"),
            "not valid UTF-8",
            id="env-key",
        ),
        pytest.param(b"junk", "bad netstring length", id="not-a-frame"),
        pytest.param(VERSION_REQUEST[:-1], "truncated", id="truncated"),
        pytest.param(b"2000000:" + b"x" * 100 + b",", "over the limit", id="field-too-big"),
        pytest.param(
            add_request(netconf(x=json.loads("[" * 64 + "]" * 64))),
            "deeper than 64",
            id="65-levels",
        ),
        pytest.param(
            add_request(b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
            "deeper than 64",
            id="100000-levels",
        ),
    ],
)
async def test_undecodable_requests_get_a_code_6_cni_error_and_the_server_keeps_serving(
    tmp_path: Path, request_bytes: bytes, text: str
) -> None:
    async with cni_socket(tmp_path) as path:
        assert_cni_error(await call(path, request_bytes), 6, text)
        await assert_still_serving(path)


async def test_a_request_over_the_size_bound_gets_code_6_and_the_server_keeps_serving(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger=SERVER_LOG)
    oversized = add_request(b" " * cni_server.MAX_REQUEST)
    async with cni_socket(tmp_path) as path:
        assert_cni_error(await call(path, oversized), 6, f"larger than {cni_server.MAX_REQUEST}")
        await assert_still_serving(path)


async def test_a_netconf_64_levels_deep_is_still_decoded(tmp_path: Path) -> None:
    async with cni_socket(tmp_path) as path:
        # decoded, then refused for what it says (no pool has dev1): not a decode error
        deep = add_request(netconf(x=json.loads("[" * 63 + "]" * 63)))
        assert_cni_error(await call(path, deep), 7, "deviceID")


# -- 3. the DEL queue ---------------------------------------------------------------------


def del_request(stdin: bytes) -> bytes:
    env = {"CNI_COMMAND": "DEL", "CNI_CONTAINERID": "c1", "CNI_IFNAME": "net1", "CNI_PATH": "/x"}
    return Request(env, stdin).encode()


async def test_bad_queued_dels_are_moved_aside_once_and_the_good_one_replays(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=SERVER_LOG)
    run_dir = tmp_path / "run"
    queue = run_dir / cni_server.QUEUE_DIR
    queue.mkdir(parents=True)
    good = del_request(netconf(mode="cdq"))
    bad = {
        "1-utf8.del": del_request(b'{"cniVersion":"1.0.0","name":"caf\xe9","deviceID":"dev1"}'),
        "2-truncated.del": good[: len(good) // 2],
        "3-junk.del": b"\x00\xffjunk",
        "4-not-a-del.del": Request({"CNI_COMMAND": "ADD"}, b"{}").encode(),
        "6-bad-config.del": del_request(netconf(deviceID="../x")),
    }
    for name, data in bad.items():
        (queue / name).write_bytes(data)
    (queue / "5-good.del").write_bytes(good)
    os.mkfifo(queue / "7-fifo.del")  # would block a plain read forever
    handler = make_handler(tmp_path)

    assert await cni_server.replay_queue(run_dir, handler) == 1
    rejected = queue / cni_server.REJECTED_DIR
    assert sorted(p.name for p in rejected.iterdir()) == sorted([*bad, "7-fifo.del"])
    assert not list(queue.glob("*.del"))  # the good one is done and gone
    assert (rejected / "1-utf8.del").read_bytes() == bad["1-utf8.del"]  # kept as it was
    assert stat.S_ISFIFO((rejected / "7-fifo.del").lstat().st_mode)
    errors = [r for r in server_records(caplog) if r.levelno >= logging.ERROR]
    assert len(errors) == len(bad) + 1  # one line per rejected item
    assert all("rejected/" in r.getMessage() for r in errors)

    caplog.clear()
    assert await cni_server.replay_queue(run_dir, handler) == 0  # nothing again
    assert not server_records(caplog)
    assert len(list(rejected.iterdir())) == len(bad) + 1


async def test_a_queued_del_whose_handling_raises_is_moved_aside_and_the_rest_replay(
    tmp_path: Path,
) -> None:
    class Exploding:
        """Handler double: raises for one item, as a bug in the handler would."""

        def __init__(self) -> None:
            self.seen: list[str] = []

        async def handle(self, request: Request) -> tuple[int, bytes, bytes]:
            self.seen.append(request.env["CNI_CONTAINERID"])
            if request.env["CNI_CONTAINERID"] == "boom":
                raise RuntimeError("a bug")
            return 0, b"", b""

    queue = tmp_path / cni_server.QUEUE_DIR
    queue.mkdir()
    for name, container in (("1.del", "boom"), ("2.del", "fine")):
        env = {"CNI_COMMAND": "DEL", "CNI_CONTAINERID": container}
        (queue / name).write_bytes(Request(env, b"{}").encode())
    handler = Exploding()
    assert await cni_server.replay_queue(tmp_path, handler) == 1
    assert handler.seen == ["boom", "fine"]
    assert [p.name for p in (queue / cni_server.REJECTED_DIR).iterdir()] == ["1.del"]
    assert await cni_server.replay_queue(tmp_path, handler) == 0
    assert handler.seen == ["boom", "fine"]


# -- 6. IPAM plugins that misbehave (FAKE plugins: scripts standing in for a broken one) -----

VERSION_REPLY = '{"cniVersion":"1.0.0","supportedVersions":["0.3.1","0.4.0","1.0.0"]}'


def fake_plugin(bin_dir: Path, name: str, body: str) -> None:
    """A FAKE IPAM plugin: answers VERSION properly, runs ``body`` for anything else."""
    script = bin_dir / name
    script.write_text(
        "#!/bin/sh\n"
        f"# FAKE IPAM plugin {name} (a test double for a misbehaving plugin)\n"
        f"if [ \"$CNI_COMMAND\" = VERSION ]; then echo '{VERSION_REPLY}'; exit 0; fi\n"
        f"{body}\n"
    )
    script.chmod(0o755)


async def ipam_add(bin_dir: Path, plugin: str) -> CniError:
    env = parse_env({"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_NETNS": "/run/netns/x",
                     "CNI_IFNAME": "net1", "CNI_PATH": str(bin_dir)})  # fmt: skip
    conf = parse_netconf(netconf(ipam={"type": plugin}), "ADD")
    with pytest.raises(CniError) as info:
        await ipam.add(env, conf)
    return info.value


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie is dead; reaping it is its new parent's business


async def test_a_hanging_ipam_plugin_and_its_child_are_killed_at_the_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ipam, "TIMEOUT", 0.5)
    fake_plugin(tmp_path, "fake-ipam-hang", f"""
        [ "$CNI_COMMAND" = ADD ] || exit 0
        sleep 1000 &
        echo $! > {tmp_path}/child.pid
        echo $$ > {tmp_path}/plugin.pid
        wait""")  # fmt: skip
    try:
        err = await ipam_add(tmp_path, "fake-ipam-hang")
        assert err.code == 11 and "did not finish within 0.5 s" in err.msg, err
        pids = [int((tmp_path / f).read_text()) for f in ("plugin.pid", "child.pid")]
        await wait_until("the plugin and its child to die", lambda: not any(map(alive, pids)))
    finally:
        for f in ("plugin.pid", "child.pid"):
            pid_file = tmp_path / f
            if pid_file.exists() and alive(pid := int(pid_file.read_text())):
                os.kill(pid, 9)


@pytest.mark.parametrize(
    ("body", "text"),
    [
        ('echo "this is no result"', "this is no result"),
        ('echo "[1, 2]"', "[1, 2]"),
        ('echo \'{"ips": [{"address": "banana"}]}\'', "ips[0].address"),
        ('echo "\\377\\376 oops"; exit 0', "oops"),
        ('echo "crashed badly" >&2; exit 2', "crashed badly"),
    ],
)
async def test_ipam_junk_output_is_a_clean_code_5_error_quoting_it(
    tmp_path: Path, body: str, text: str
) -> None:
    fake_plugin(tmp_path, "fake-ipam-junk", body)
    err = await ipam_add(tmp_path, "fake-ipam-junk")
    assert err.code == 5 and text in f"{err.msg} {err.details}", err


@pytest.mark.parametrize("depth", [64, 100_000])
async def test_ipam_output_nested_past_the_bound_is_a_code_5_error_saying_so(
    tmp_path: Path, depth: int
) -> None:
    # 64 levels inside the result object: 65 in all, which a decoder takes;
    # 100000: where a decoder meets the recursion limit. The bound is ours.
    nested = "[" * depth + "]" * depth
    (tmp_path / "out.json").write_text(
        '{"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.2/24"}], "x": ' + nested + "}"
    )
    fake_plugin(tmp_path, "fake-ipam-deep", f"cat {tmp_path}/out.json")
    err = await ipam_add(tmp_path, "fake-ipam-deep")
    assert err.code == 5, err
    assert "printed no JSON object (nests deeper than 64 levels (at x" in err.msg, err


async def test_ipam_cni_error_code_is_passed_through(tmp_path: Path) -> None:
    fake_plugin(tmp_path, "fake-ipam-full", """
        echo '{"cniVersion":"1.0.0","code":107,"msg":"range is full","details":"10.0.0.0/30"}'
        exit 1""")  # fmt: skip
    err = await ipam_add(tmp_path, "fake-ipam-full")
    assert (err.code, err.details) == (107, "10.0.0.0/30") and "range is full" in err.msg


# -- 5. ethtoolCmds: the pod's device, the filter subcommands, ASCII separators -------------


@pytest.mark.parametrize(
    ("cmds", "text"),
    [
        (["-K eth1 tx off"], "must act on the pod's device"),
        (["-K -device- tx off", "-N eth0 flow-type udp4 action 1"], "must act on the pod's device"),
        (["-f -device- x.bin"], "subcommand '-f' is not allowed"),
        (["--flash -device- x.bin"], "subcommand '--flash' is not allowed"),
        (["-E -device- magic 0 offset 0 value 1"], "subcommand '-E' is not allowed"),
        (["-W -device- 1"], "subcommand '-W' is not allowed"),
        (["--reset -device- all"], "subcommand '--reset' is not allowed"),
        (["-s -device- speed 10"], "subcommand '-s' is not allowed"),
        (["-p -device- 5"], "subcommand '-p' is not allowed"),
        (["--debug 1 -K -device- tx off"], "subcommand '--debug' is not allowed"),
        (["-k -device-"], "subcommand '-k' is not allowed"),  # show, not set: not a filter setup
        (["-K\u2003-device- tx off"], "ASCII spaces"),
        (["-K -device-\u00a0tx off"], "ASCII spaces"),
        (["-K -device-"], "says nothing to change"),
        (["-K"], "must act on the pod's device"),
    ],
)
def test_ethtool_cmds_that_leave_the_pods_device_or_the_filter_subcommands_are_code_7(
    cmds: list[str], text: str
) -> None:
    with pytest.raises(CniError) as info:
        parse_netconf(netconf(ethtoolCmds=cmds), "ADD")
    index = len(cmds) - 1
    assert info.value.code == 7, info.value
    assert info.value.msg.startswith(f"ethtoolCmds[{index}]: ") and text in info.value.msg, (
        info.value
    )


@pytest.mark.parametrize(
    "cmd",
    [
        "-N -device- flow-type udp4 dst-ip -ip- action 2",
        "--config-ntuple dev1 flow-type udp4 dst-port 4000 action 1",
        "-U -device- flow-type tcp4 action 0",
        "--config-nfc -device- rx-flow-hash udp4 sdfn",
        "-X -device- equal 5 start 3",
        "--set-rxfh-indir dev1 equal 2",
        "--rxfh -device- equal 2",
        "-K -device- tx off",
        "--features dev1 ntuple on",
        "--offload -device- gro off",
        "-L -device- combined 4",
        "--set-channels -device- rx 2",
        "-G -device- rx 512",
        "--set-ring -device- tx 512",
        " \t-K\t-device-  tx off\n",
    ],
)
def test_ethtool_cmds_on_the_pods_device_with_a_filter_subcommand_are_accepted(cmd: str) -> None:
    assert parse_netconf(netconf(ethtoolCmds=[cmd]), "ADD").ethtool_cmds == (cmd,)


def test_ethtool_cmds_of_a_gc_request_without_device_id_need_a_device_like_word() -> None:
    gc = netconf(deviceID=None, ethtoolCmds=["-K -device- tx off", "-K ens1f0 tx off"])
    assert len(parse_netconf(gc, "GC").ethtool_cmds) == 2
    with pytest.raises(CniError) as info:
        parse_netconf(netconf(deviceID=None, ethtoolCmds=["-f -device- x.bin"]), "GC")
    assert info.value.code == 7 and "ethtoolCmds[0]" in info.value.msg
