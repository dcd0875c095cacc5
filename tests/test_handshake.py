"""The handshake state machine alone: the original's table (TestStart) and more."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from afxdp.uds.handshake import (
    ApplyBusyPoll,
    CheckHost,
    Close,
    Handshake,
    HostCheck,
    ProtocolError,
    Send,
    State,
    hostname_matches,
)

MAP_FD = 7
XSK_FD = 9


def connected(devices: dict[str, int] | None = None) -> Handshake:
    h = Handshake(devices or {"devA": MAP_FD})
    assert h.receive(b"/connect, podA") == [CheckHost("podA")]
    assert h.host_checked(HostCheck.OK) == [Send("/host_ok")]
    return h


def replies(actions: list[object]) -> list[str]:
    return [a.text for a in actions if isinstance(a, Send)]


def test_full_session() -> None:
    h = connected({"devA": 3, "devB": 4})
    assert h.receive(b"/version") == [Send("0.1")]
    assert h.receive(b"/xsk_map_fd,devA") == [Send("/fd_ack", 3)]
    assert h.receive(b"/xsk_map_fd, devB") == [Send("/fd_ack", 4)]
    assert h.receive(b"/xsk_map_fd,devX") == [Send("/fd_nak")]
    assert h.receive(b"/config_busy_poll,20,64", [XSK_FD]) == [ApplyBusyPoll(XSK_FD, 20, 64)]
    assert h.state.value == "busy_poll"
    assert h.busy_poll_done(True) == [Send("/config_busy_poll_ack")]
    assert h.receive(b"/config_busy_poll, 1, 2", [XSK_FD]) == [ApplyBusyPoll(XSK_FD, 1, 2)]
    assert h.busy_poll_done(False) == [Send("/config_busy_poll_nak")]
    assert h.receive(b"/fin") == [Send("/fin_ack"), Close()]
    assert h.state is State.CLOSED


@pytest.mark.parametrize("form", [b"/connect,podA", b"/connect, podA", b"/connect,podA\0"])
def test_connect_forms(form: bytes) -> None:
    assert Handshake({}).receive(form) == [CheckHost("podA")]


@pytest.mark.parametrize(
    "request_",
    [
        b"/connect", b"/connect,", b"/connect, podA, podB", b"/connect,a,b,c,d,e",
        b"podA, /connect", b"podA, /connect, podA", b"\\0/connect, podA", b"dkjfhgkjdfs/connect, podA",
        b" /connect, podA", b"\\/connect, podA", b",/connect, podA", b"/connect\\0, podA",
        b"/connect*", b"\\/connect*", b"*/connect*", b"/connect, podA,", b"/connect,podA,dkjfhgkjdfs",
    ],
)  # fmt: skip
def test_malformed_connect_gets_host_nak_and_close(request_: bytes) -> None:
    h = Handshake({})
    assert h.receive(request_) == [Send("/host_nak"), Close()]


@pytest.mark.parametrize(
    "request_", [b"\\0", b"asdfxc", b"asdfxc,", b"asdfxc, podA,", b"\\", b"*", b"connect",
                 b"connect/", b"/Connect", b"/version", b"", b"\xff\xfe", b"/connect\0,podA",
                 b"x" * 300]
)  # fmt: skip
def test_junk_before_connect_gets_nak_and_the_connection_stays(request_: bytes) -> None:
    """The original said nothing and closed; a client deserves an answer."""
    h = Handshake({})
    assert h.receive(request_) == [Send("/nak")]
    assert h.state is State.AWAIT_HOST
    assert h.receive(b"/connect,podA") == [CheckHost("podA")]


def test_host_check_outcomes() -> None:
    for result, reply in [(HostCheck.REFUSED, "/host_nak"), (HostCheck.ERROR, "/error")]:
        h = Handshake({})
        h.receive(b"/connect,podA")
        # Exactly one reply, then close (the original sent /error AND /host_nak).
        assert h.host_checked(result) == [Send(reply), Close()]


@pytest.mark.parametrize(
    ("request_", "reply"),
    [
        (b"/xsk_map_fd", "/nak"), (b"/xsk_map_fd,", "/fd_nak"), (b"/xsk_map_fd, devA, devB", "/nak"),
        (b"/xsk_map_fd, devA,", "/nak"), (b"/xsk_map_fd/fin", "/nak"), (b"/xsk_map_fd, /fin", "/fd_nak"),
        (b"devA, /xsk_map_fd", "/nak"), (b"devA, /xsk_map_fd, devA", "/nak"), (b"\\0/xsk_map_fd, devA", "/nak"),
        (b" /xsk_map_fd, devA", "/nak"), (b",/xsk_map_fd, devA", "/nak"), (b"/xsk_map_fd,\\0", "/fd_nak"),
        (b"/xsk_map_fd, devAdkjfhgkjdfs", "/fd_nak"), (b"/xsk_map_fd, devA\\", "/fd_nak"),
        (b"/xsk_map_fd, devA,dkjfhgkjdfs", "/nak"),
        (b"\\0", "/nak"), (b"", "/nak"), (b" ", "/nak"), (b",", "/nak"), (b"/", "/nak"), (b"\\", "/nak"),
        (b"*", "/nak"), (b";", "/nak"), (b"\n", "/nak"), (b"/version/fin", "/nak"), (b"/version /fin", "/nak"),
        (b"/version,/fin", "/nak"), (b"/version\n/fin", "/nak"), (b"/connect, podA", "/nak"),
        (b"/config_busy_poll", "/nak"), (b"/config_busy_poll,1", "/nak"), (b"/config_busy_poll,a,b", "/nak"),
        (b"/config_busy_poll,-1,5", "/nak"), (b"/config_busy_poll,1,2,3", "/nak"),
        (b"/config_busy_poll,99999999999,2", "/nak"), (b"/config_busy_poll,1,2", "/config_busy_poll_nak"),
    ],
)  # fmt: skip
def test_requests_after_connect(request_: bytes, reply: str) -> None:
    h = connected()
    assert h.receive(request_) == [Send(reply)]
    assert h.state is State.CONNECTED
    assert h.receive(b"/fin") == [Send("/fin_ack"), Close()]


def test_more_than_one_fd_is_malformed() -> None:
    h = connected()
    assert h.receive(b"/config_busy_poll,1,2", [XSK_FD, XSK_FD + 1]) == [Send("/nak")]


def test_out_of_order_driving_is_a_bug_not_input() -> None:
    h = Handshake({})
    with pytest.raises(ProtocolError):
        h.host_checked(HostCheck.OK)
    h.receive(b"/connect,p")
    with pytest.raises(ProtocolError):
        h.receive(b"/version")
    with pytest.raises(ProtocolError):
        h.busy_poll_done(True)


@pytest.mark.parametrize(
    ("sent", "pod", "ok"),
    [
        ("podA", "podA", True), ("podA", "podAB", False), ("pod", "podA", False),
        ("p" * 54, "p" * 54 + "-7d9f8c6b5-x2x4z", True), ("p" * 53, "p" * 60, True),
        ("p" * 52, "p" * 60, False), ("q" * 54, "p" * 60, False),
    ],
)  # fmt: skip
def test_truncated_hostnames_still_match(sent: str, pod: str, ok: bool) -> None:
    assert hostname_matches(sent, pod) is ok


@settings(max_examples=500)
@given(st.lists(st.tuples(st.binary(max_size=80), st.integers(0, 2)), max_size=12),
       st.sampled_from(list(HostCheck)), st.booleans())  # fmt: skip
def test_any_message_sequence_gets_exactly_one_reply_each(
    msgs: list[tuple[bytes, int]], check: HostCheck, busy_ok: bool
) -> None:
    h = Handshake({"devA": MAP_FD})
    for data, nfds in msgs:
        if h.state is State.CLOSED:
            break
        actions = h.receive(data, [XSK_FD] * nfds)
        sends = 0
        while actions:
            a = actions.pop(0)
            if isinstance(a, Send):
                sends += 1
                assert a.fd in (None, MAP_FD)
            elif isinstance(a, CheckHost):
                actions += h.host_checked(check)
            elif isinstance(a, ApplyBusyPoll):
                assert a.fd == XSK_FD
                actions += h.busy_poll_done(busy_ok)
        assert sends == 1
        assert h.state in (State.AWAIT_HOST, State.CONNECTED, State.CLOSED)
