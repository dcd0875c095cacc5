"""The handshake state machine alone: the original's table (TestStart) and more."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from afxdp.uds.handshake import (
    MAX_REQUEST,
    OPEN_STATES,
    REPLIES,
    TRANSITIONS,
    Action,
    ApplyBusyPoll,
    CheckHost,
    Close,
    Handshake,
    HostCheck,
    Input,
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


# Every reply DESIGN.md 3.3 names: written out here, not taken from the module.
PROTOCOL_REPLIES = {
    "/host_ok", "/host_nak", "/error", "0.1", "/fd_ack", "/fd_nak",
    "/config_busy_poll_ack", "/config_busy_poll_nak", "/fin_ack", "/nak",
}  # fmt: skip
VALID_REQUESTS = [
    b"/connect,pod-a", b"/connect, pod-a", b"/version", b"/xsk_map_fd,devA", b"/xsk_map_fd, devA",
    b"/xsk_map_fd,devX", b"/config_busy_poll,20,64", b"/config_busy_poll, 1, 2", b"/fin",
]  # fmt: skip


def expected_input(state: State, request: bytes, nfds: int) -> Input:
    """What a well-formed request means in ``state``: an oracle apart from the machine."""
    verb = request.split(b",")[0]
    if nfds > 1:
        return Input.OTHER
    if request == b"/fin":
        return Input.FIN
    if state is State.AWAIT_HOST:
        return Input.CONNECT if verb == b"/connect" else Input.OTHER
    if verb == b"/version":
        return Input.VERSION
    if verb == b"/xsk_map_fd":
        return Input.MAP_FD if request.endswith(b"devA") else Input.MAP_FD_OTHER
    if verb == b"/config_busy_poll":
        return Input.BUSY_POLL if nfds else Input.BUSY_POLL_NO_FD
    return Input.OTHER


class HandshakeMachine(RuleBasedStateMachine):
    """Any sequence of requests, results and out-of-order calls, checked against
    ``TRANSITIONS``: one reply per request, replies from the protocol, an fd only
    with /fd_ack, states moving only along the table."""

    def __init__(self) -> None:
        super().__init__()
        self.h = Handshake({"devA": MAP_FD})
        self.awaiting = 0  # requests whose reply is still to come (at most one)

    def step(self, given: Input | None, actions: list[Action], before: State) -> None:
        sends = [a for a in actions if isinstance(a, Send)]
        after = self.h.state
        if given is not None:
            assert (before, given) in TRANSITIONS
            reply, want_after = TRANSITIONS[before, given]
            assert after is want_after
            assert [s.text for s in sends] == ([reply] if reply else [])
        # Whatever the input was, the move is one of the table's.
        moves = {(s, r, n) for (s, _i), (r, n) in TRANSITIONS.items()}
        assert (before, sends[0].text if sends else None, after) in moves
        for s in sends:
            assert s.text in PROTOCOL_REPLIES and s.text in REPLIES
            assert (s.fd is not None) == (s.text == "/fd_ack")
            assert s.fd in (None, MAP_FD)
        assert any(isinstance(a, Close) for a in actions) == (after is State.CLOSED)
        for a in actions:
            if isinstance(a, ApplyBusyPoll):
                assert a.fd == XSK_FD
        self.awaiting += 1 if given not in _RESULTS else 0
        self.awaiting -= len(sends)
        assert self.awaiting == (1 if after in (State.CHECKING, State.BUSY_POLL) else 0)

    def request(self, data: bytes, nfds: int, given: Input | None) -> None:
        before = self.h.state
        self.step(given, self.h.receive(data, [XSK_FD] * nfds), before)

    @precondition(lambda self: self.h.state is State.AWAIT_HOST)
    @rule(data=st.sampled_from([b"/connect,pod-a", b"/connect, pod-a"]))
    def connect(self, data: bytes) -> None:
        self.request(data, 0, Input.CONNECT)

    @precondition(lambda self: self.h.state in OPEN_STATES)
    @rule(data=st.sampled_from(VALID_REQUESTS), nfds=st.integers(0, 2))
    def valid(self, data: bytes, nfds: int) -> None:
        self.request(data, nfds, expected_input(self.h.state, data, nfds))

    @precondition(lambda self: self.h.state in OPEN_STATES)
    @rule(data=st.binary(max_size=80), nfds=st.integers(0, 2))
    def junk(self, data: bytes, nfds: int) -> None:
        self.request(data, nfds, None)

    @precondition(lambda self: self.h.state in OPEN_STATES)
    @rule(verb=st.sampled_from(VALID_REQUESTS), pad=st.integers(MAX_REQUEST, 2 * MAX_REQUEST))
    def over_long(self, verb: bytes, pad: int) -> None:
        self.request(verb + b"x" * pad, 0, Input.OTHER)

    @precondition(lambda self: self.h.state is State.CHECKING)
    @rule(result=st.sampled_from(list(HostCheck)))
    def host_checked(self, result: HostCheck) -> None:
        given = {HostCheck.OK: Input.HOST_OK, HostCheck.REFUSED: Input.HOST_REFUSED,
                 HostCheck.ERROR: Input.HOST_ERROR}[result]  # fmt: skip
        self.step(given, self.h.host_checked(result), State.CHECKING)

    @precondition(lambda self: self.h.state is State.BUSY_POLL)
    @rule(ok=st.booleans())
    def busy_poll_done(self, ok: bool) -> None:
        self.step(Input.BUSY_POLL_OK if ok else Input.BUSY_POLL_FAILED,
                  self.h.busy_poll_done(ok), State.BUSY_POLL)  # fmt: skip

    @rule(call=st.sampled_from(["receive", "host_checked", "busy_poll_done"]))
    def out_of_order(self, call: str) -> None:
        """A call the state does not allow is the server's bug: refused, nothing moves."""
        before = self.h.state
        allowed = {"receive": OPEN_STATES, "host_checked": {State.CHECKING},
                   "busy_poll_done": {State.BUSY_POLL}}[call]  # fmt: skip
        if before in allowed:
            return
        with pytest.raises(ProtocolError):
            if call == "receive":
                self.h.receive(b"/version")
            elif call == "host_checked":
                self.h.host_checked(HostCheck.OK)
            else:
                self.h.busy_poll_done(True)
        assert self.h.state is before

    @precondition(lambda self: self.h.state is State.CLOSED)
    @rule()
    def next_connection(self) -> None:
        self.h = Handshake({"devA": MAP_FD})

    @invariant()
    def state_is_known(self) -> None:
        assert self.h.state in {s for s, _i in TRANSITIONS} | {State.CLOSED}


_RESULTS = {Input.HOST_OK, Input.HOST_REFUSED, Input.HOST_ERROR, Input.BUSY_POLL_OK,
            Input.BUSY_POLL_FAILED}  # fmt: skip

TestHandshakeMachine = HandshakeMachine.TestCase
TestHandshakeMachine.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)


def test_the_table_is_the_protocol() -> None:
    """The table's replies are DESIGN.md's, and every state but CLOSED can be left."""
    assert REPLIES == PROTOCOL_REPLIES
    assert {State.AWAIT_HOST, State.CONNECTED} == OPEN_STATES
    assert {s for s, _i in TRANSITIONS} == set(State) - {State.CLOSED}
    assert {n for _r, n in TRANSITIONS.values()} == set(State)
