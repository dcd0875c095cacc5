"""The UDS handshake as a sans-IO state machine (DESIGN.md 3.3).

Messages go in, actions come out; no sockets, no fds opened or closed here. The
server performs the actions (send a reply, ask kubelet who the pod is, apply
busy-poll options, close) and feeds the results back.

Each request (or result fed back) is first classified into an ``Input``; what
happens then is looked up in ``TRANSITIONS``, the one place the protocol's
moves are written down (the tests check the machine against it):

  state        input                                   reply                    next
  AWAIT_HOST   CONNECT       /connect,<host>           (CheckHost, no reply yet) CHECKING
  AWAIT_HOST   CONNECT_BAD   contains /connect, else   /host_nak + Close        CLOSED
  CHECKING     HOST_OK | HOST_REFUSED | HOST_ERROR     /host_ok | /host_nak,    CONNECTED |
                                                       /error + Close           CLOSED
  CONNECTED    VERSION       /version                  0.1                      CONNECTED
  CONNECTED    MAP_FD        /xsk_map_fd,<our dev>     /fd_ack + the map fd     CONNECTED
  CONNECTED    MAP_FD_OTHER  /xsk_map_fd,<other dev>   /fd_nak                  CONNECTED
  CONNECTED    BUSY_POLL     /config_busy_poll,t,b +fd (ApplyBusyPoll)          BUSY_POLL
  CONNECTED    BUSY_POLL_NO_FD  the same without fd    /config_busy_poll_nak    CONNECTED
  BUSY_POLL    BUSY_POLL_OK | BUSY_POLL_FAILED         _ack | _nak              CONNECTED
  open         FIN           /fin                      /fin_ack + Close         CLOSED
  open         OTHER         anything else             /nak                     unchanged

("open" is AWAIT_HOST or CONNECTED: the states in which a request may arrive.)
Exactly one reply per request. Both ``/connect,host`` and the original Go
client's ``/connect, host`` forms are accepted (spaces are dropped from
arguments, as the original did).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

VERSION = "0.1"
# DPDK and CNDP use 64-byte request buffers; a longer request is no client's.
MAX_REQUEST = 256
# Busy-poll values are C ints in setsockopt.
_INT_MAX = 2**31 - 1
# DPDK sends "/connect,<hostname>" from a 64-byte buffer with a NUL: hostnames
# reach us cut at 54 characters (53 with the Go client's ", "). kubelet itself
# cuts a pod's hostname at 63. A name this long may be a prefix of the pod name.
TRUNCATED_HOSTNAME_MIN = 53


class State(enum.Enum):
    AWAIT_HOST = "await_host"
    CHECKING = "checking"
    CONNECTED = "connected"
    BUSY_POLL = "busy_poll"
    CLOSED = "closed"


class HostCheck(enum.Enum):
    OK = "ok"
    REFUSED = "refused"
    ERROR = "error"


class Input(enum.Enum):
    """What a request (or a result fed back) is, as far as the protocol cares."""

    CONNECT = "connect"
    CONNECT_BAD = "connect_bad"
    HOST_OK = "host_ok"
    HOST_REFUSED = "host_refused"
    HOST_ERROR = "host_error"
    VERSION = "version"
    MAP_FD = "map_fd"
    MAP_FD_OTHER = "map_fd_other"
    BUSY_POLL = "busy_poll"
    BUSY_POLL_NO_FD = "busy_poll_no_fd"
    BUSY_POLL_OK = "busy_poll_ok"
    BUSY_POLL_FAILED = "busy_poll_failed"
    FIN = "fin"
    OTHER = "other"


_S, _I = State, Input
# (state, input) -> (reply, next state). A reply of None means the machine asks
# the server to do something first (CheckHost, ApplyBusyPoll) and replies when
# the result is fed back. Moving to CLOSED always comes with a Close action.
# A pair that is not here is the server driving the machine out of order.
TRANSITIONS: Mapping[tuple[State, Input], tuple[str | None, State]] = {
    (_S.AWAIT_HOST, _I.CONNECT): (None, _S.CHECKING),
    (_S.AWAIT_HOST, _I.CONNECT_BAD): ("/host_nak", _S.CLOSED),
    (_S.AWAIT_HOST, _I.FIN): ("/fin_ack", _S.CLOSED),
    (_S.AWAIT_HOST, _I.OTHER): ("/nak", _S.AWAIT_HOST),
    (_S.CHECKING, _I.HOST_OK): ("/host_ok", _S.CONNECTED),
    (_S.CHECKING, _I.HOST_REFUSED): ("/host_nak", _S.CLOSED),
    (_S.CHECKING, _I.HOST_ERROR): ("/error", _S.CLOSED),
    (_S.CONNECTED, _I.VERSION): (VERSION, _S.CONNECTED),
    (_S.CONNECTED, _I.MAP_FD): ("/fd_ack", _S.CONNECTED),
    (_S.CONNECTED, _I.MAP_FD_OTHER): ("/fd_nak", _S.CONNECTED),
    (_S.CONNECTED, _I.BUSY_POLL): (None, _S.BUSY_POLL),
    (_S.CONNECTED, _I.BUSY_POLL_NO_FD): ("/config_busy_poll_nak", _S.CONNECTED),
    (_S.CONNECTED, _I.FIN): ("/fin_ack", _S.CLOSED),
    (_S.CONNECTED, _I.OTHER): ("/nak", _S.CONNECTED),
    (_S.BUSY_POLL, _I.BUSY_POLL_OK): ("/config_busy_poll_ack", _S.CONNECTED),
    (_S.BUSY_POLL, _I.BUSY_POLL_FAILED): ("/config_busy_poll_nak", _S.CONNECTED),
}
# Every reply the server may send (only MAP_FD's, /fd_ack, carries an fd).
REPLIES = frozenset(reply for reply, _next in TRANSITIONS.values() if reply is not None)
# The states in which a request may arrive (the others wait for a result).
OPEN_STATES = frozenset(state for state, _input in TRANSITIONS if _input is Input.OTHER)
_HOST_INPUT = {
    HostCheck.OK: Input.HOST_OK,
    HostCheck.REFUSED: Input.HOST_REFUSED,
    HostCheck.ERROR: Input.HOST_ERROR,
}


@dataclass(frozen=True)
class Send:
    """Send ``text`` as one packet, with ``fd`` in SCM_RIGHTS when given."""

    text: str
    fd: int | None = None


@dataclass(frozen=True)
class CheckHost:
    """Ask kubelet whether ``hostname`` is the pod holding this allocation."""

    hostname: str


@dataclass(frozen=True)
class ApplyBusyPoll:
    """Set SO_PREFER_BUSY_POLL=1, SO_BUSY_POLL=timeout, SO_BUSY_POLL_BUDGET=budget on ``fd``."""

    fd: int
    timeout: int
    budget: int


@dataclass(frozen=True)
class Close:
    """Close this connection (the server keeps listening for the next one)."""


Action = Send | CheckHost | ApplyBusyPoll | Close


class ProtocolError(Exception):
    """The server drove the state machine out of order (a bug, not bad input)."""


def hostname_matches(sent: str, pod_name: str) -> bool:
    """Whether a client's hostname names ``pod_name``, allowing for truncation."""
    return sent == pod_name or (len(sent) >= TRUNCATED_HOSTNAME_MIN and pod_name.startswith(sent))


def _args(text: str, verb: str, count: int) -> list[str] | None:
    """The ``count`` arguments of ``verb,a,b``, spaces removed; None if malformed."""
    parts = text.split(",")
    if len(parts) != count + 1 or parts[0] != verb:
        return None
    return [p.replace(" ", "") for p in parts[1:]]


def _decode(data: bytes) -> str | None:
    # A trailing NUL is what a C client sending strlen()+1 bytes looks like.
    data = data.rstrip(b"\0")
    if len(data) > MAX_REQUEST or b"\0" in data:
        return None
    try:
        return data.decode("ascii")
    except UnicodeDecodeError:
        return None


class Handshake:
    """One connection's handshake. ``devices`` maps netdev name to XSKMAP fd."""

    def __init__(self, devices: Mapping[str, int]) -> None:
        self.devices = dict(devices)
        self.state = State.AWAIT_HOST
        self.hostname: str | None = None

    def _move(
        self,
        given: Input,
        *,
        action: CheckHost | ApplyBusyPoll | None = None,
        fd: int | None = None,
    ) -> list[Action]:
        """Take the table's transition for ``given``: its reply (with ``fd``), or,
        where the table has no reply yet, ``action``."""
        try:
            reply, after = TRANSITIONS[self.state, given]
        except KeyError:
            raise ProtocolError(f"{given.value} in state {self.state.value}") from None
        self.state = after
        if reply is None:
            assert action is not None, f"{given.value} needs an action"
            return [action]
        send = Send(reply, fd)
        return [send, Close()] if after is State.CLOSED else [send]

    def receive(self, data: bytes, fds: Sequence[int] = ()) -> list[Action]:
        """A request arrived, with the fds that came in SCM_RIGHTS (the caller owns them)."""
        if self.state not in OPEN_STATES:
            raise ProtocolError(f"request received in state {self.state.value}")
        text = _decode(data)
        # No request carries more than one fd.
        if text is None or len(fds) > 1:
            return self._move(Input.OTHER)
        if text == "/fin":
            return self._move(Input.FIN)
        if self.state is State.AWAIT_HOST:
            return self._await_host(text)
        return self._connected(text, fds[0] if fds else None)

    def _await_host(self, text: str) -> list[Action]:
        if "/connect" not in text:
            return self._move(Input.OTHER)
        args = _args(text, "/connect", 1)
        if args is None or not args[0]:
            return self._move(Input.CONNECT_BAD)
        self.hostname = args[0]
        return self._move(Input.CONNECT, action=CheckHost(args[0]))

    def _connected(self, text: str, fd: int | None) -> list[Action]:
        if "/xsk_map_fd" in text:
            args = _args(text, "/xsk_map_fd", 1)
            if args is None:
                return self._move(Input.OTHER)
            map_fd = self.devices.get(args[0])
            if map_fd is None:
                return self._move(Input.MAP_FD_OTHER)
            return self._move(Input.MAP_FD, fd=map_fd)
        if text == "/version":
            return self._move(Input.VERSION)
        if "/config_busy_poll" in text:
            args = _args(text, "/config_busy_poll", 2)
            if args is None or not all(a.isdigit() and int(a) <= _INT_MAX for a in args):
                return self._move(Input.OTHER)
            if fd is None:
                return self._move(Input.BUSY_POLL_NO_FD)
            return self._move(Input.BUSY_POLL, action=ApplyBusyPoll(fd, int(args[0]), int(args[1])))
        return self._move(Input.OTHER)

    def host_checked(self, result: HostCheck) -> list[Action]:
        """The answer to the last CheckHost."""
        if self.state is not State.CHECKING:
            raise ProtocolError(f"host check result in state {self.state.value}")
        return self._move(_HOST_INPUT[result])

    def busy_poll_done(self, ok: bool) -> list[Action]:
        """The outcome of the last ApplyBusyPoll."""
        if self.state is not State.BUSY_POLL:
            raise ProtocolError(f"busy poll result in state {self.state.value}")
        return self._move(Input.BUSY_POLL_OK if ok else Input.BUSY_POLL_FAILED)
