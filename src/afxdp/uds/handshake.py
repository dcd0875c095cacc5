"""The UDS handshake as a sans-IO state machine (DESIGN.md 3.3).

Messages go in, actions come out; no sockets, no fds opened or closed here. The
server performs the actions (send a reply, ask kubelet who the pod is, apply
busy-poll options, close) and feeds the results back.

Transitions (exactly one reply per request):

  state        request                               -> actions                      next
  AWAIT_HOST   /connect,<host>                       -> CheckHost(host)              CHECKING
  AWAIT_HOST   anything containing /connect, else    -> /host_nak, Close             CLOSED
  CHECKING     host_checked(OK)                      -> /host_ok                     CONNECTED
  CHECKING     host_checked(REFUSED)                 -> /host_nak, Close             CLOSED
  CHECKING     host_checked(ERROR)                   -> /error, Close                CLOSED
  CONNECTED    /version                              -> 0.1                          CONNECTED
  CONNECTED    /xsk_map_fd,<dev>  (dev is ours)      -> /fd_ack + map fd             CONNECTED
  CONNECTED    /xsk_map_fd,<dev>  (any other dev)    -> /fd_nak                      CONNECTED
  CONNECTED    /config_busy_poll,<t>,<b> + fd        -> ApplyBusyPoll(fd, t, b)      BUSY_POLL
  CONNECTED    /config_busy_poll,<t>,<b> without fd  -> /config_busy_poll_nak        CONNECTED
  BUSY_POLL    busy_poll_done(ok)                    -> /config_busy_poll_ack|_nak   CONNECTED
  any open     /fin                                  -> /fin_ack, Close              CLOSED
  any open     anything else                         -> /nak                         unchanged

Both ``/connect,host`` and the original Go client's ``/connect, host`` forms
are accepted (spaces are dropped from arguments, as the original did).
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

    def _close(self, reply: str) -> list[Action]:
        self.state = State.CLOSED
        return [Send(reply), Close()]

    def receive(self, data: bytes, fds: Sequence[int] = ()) -> list[Action]:
        """A request arrived, with the fds that came in SCM_RIGHTS (the caller owns them)."""
        if self.state not in (State.AWAIT_HOST, State.CONNECTED):
            raise ProtocolError(f"request received in state {self.state.value}")
        text = _decode(data)
        # No request carries more than one fd.
        if text is None or len(fds) > 1:
            return [Send("/nak")]
        if text == "/fin":
            return self._close("/fin_ack")
        if self.state is State.AWAIT_HOST:
            return self._await_host(text)
        return self._connected(text, fds[0] if fds else None)

    def _await_host(self, text: str) -> list[Action]:
        if "/connect" not in text:
            return [Send("/nak")]
        args = _args(text, "/connect", 1)
        if args is None or not args[0]:
            return self._close("/host_nak")
        self.hostname = args[0]
        self.state = State.CHECKING
        return [CheckHost(args[0])]

    def _connected(self, text: str, fd: int | None) -> list[Action]:
        if "/xsk_map_fd" in text:
            args = _args(text, "/xsk_map_fd", 1)
            if args is None:
                return [Send("/nak")]
            map_fd = self.devices.get(args[0])
            return [Send("/fd_nak")] if map_fd is None else [Send("/fd_ack", map_fd)]
        if text == "/version":
            return [Send(VERSION)]
        if "/config_busy_poll" in text:
            args = _args(text, "/config_busy_poll", 2)
            if args is None or not all(a.isdigit() and int(a) <= _INT_MAX for a in args):
                return [Send("/nak")]
            if fd is None:
                return [Send("/config_busy_poll_nak")]
            self.state = State.BUSY_POLL
            return [ApplyBusyPoll(fd, int(args[0]), int(args[1]))]
        return [Send("/nak")]

    def host_checked(self, result: HostCheck) -> list[Action]:
        """The answer to the last CheckHost."""
        if self.state is not State.CHECKING:
            raise ProtocolError(f"host check result in state {self.state.value}")
        if result is HostCheck.OK:
            self.state = State.CONNECTED
            return [Send("/host_ok")]
        return self._close("/host_nak" if result is HostCheck.REFUSED else "/error")

    def busy_poll_done(self, ok: bool) -> list[Action]:
        """The outcome of the last ApplyBusyPoll."""
        if self.state is not State.BUSY_POLL:
            raise ProtocolError(f"busy poll result in state {self.state.value}")
        self.state = State.CONNECTED
        return [Send("/config_busy_poll_ack" if ok else "/config_busy_poll_nak")]
