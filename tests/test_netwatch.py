"""netwatch.link_events: what the kernel's link messages mean for health.

The decoder reads three attributes by hand instead of pyroute2's full decode;
pyroute2's marshal, which decodes everything, is the oracle: every message the
kernel sends for a veth's whole life (created, up, down, moved into a netns and
back, destroyed) must mean the same to both. And no input makes it raise.
"""

from __future__ import annotations

import socket
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pyroute2.netlink.rtnl.marshal import MarshalRtnl

from afxdp.netwatch import RTMGRP_LINK, Change, LinkEvent, link_events
from tests.kernel import Lab, ip


def _by_pyroute2(msg: Any) -> LinkEvent | None:
    """What a fully decoded message means: the rule the decoder must keep."""
    name = msg.get("ifname")
    if not name or msg["family"] != socket.AF_UNSPEC:
        return None
    if msg["event"] == "RTM_DELLINK":
        moved = msg.get_attr("IFLA_NEW_NETNSID") is not None
        return LinkEvent(name, Change.MOVED_OUT if moved else Change.REMOVED, msg["index"])
    if msg["event"] == "RTM_NEWLINK":
        up = bool(msg["flags"] & 1) and str(msg.get("operstate")) in {"UP", "UNKNOWN"}
        return LinkEvent(name, Change.UP if up else Change.DOWN, msg["index"])
    return None


def _reads(sock: socket.socket) -> list[bytes]:
    out = []
    while True:
        try:
            out.append(sock.recv(1 << 20))
        except BlockingIOError:
            return out


@pytest.mark.privileged
def test_every_message_of_a_links_life_means_what_pyroute2_says(lab: Lab) -> None:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind((0, RTMGRP_LINK))
    sock.setblocking(False)
    with sock:
        ns = lab.netns("nwl")
        dev, peer = lab.veth(lab.name("nwa"), lab.name("nwb"))
        for args in (("up",), ("down",)):
            ip("link", "set", dev, *args)
        ip("link", "set", peer, "up")
        ip("link", "set", dev, "up")  # both ends up: operstate UP
        ip("link", "set", dev, "netns", ns)  # goodbye with IFLA_NEW_NETNSID
        ip("link", "set", dev, "netns", "1", netns=ns)  # home again (pid 1's netns)
        ip("link", "del", dev)  # destroyed, the peer with it
        lab.veth(dev, peer)  # re-created under the same name: a new link
        ip("link", "del", dev)
        reads = _reads(sock)
    ours = [e for data in reads for e in link_events(data)]
    marshal = MarshalRtnl()
    theirs = [e for data in reads for m in marshal.parse(data) if (e := _by_pyroute2(m))]
    assert ours == theirs
    mine = [e.change for e in ours if e.name == dev]
    for change in (Change.UP, Change.DOWN, Change.MOVED_OUT, Change.REMOVED):
        assert change in mine, (change, mine)  # the life above shows every kind
    # Each event names its link: the re-created one is told apart by its ifindex.
    first, again = (e.index for e in ours if e.name == dev and e.change is Change.REMOVED)
    assert 0 < first != again > 0


_HEADER = struct.Struct("=IHHII")


@settings(max_examples=300)
@given(st.binary(max_size=512), st.lists(st.tuples(st.integers(0, 70000), st.integers(0, 40))))
def test_no_input_makes_the_decoder_raise(junk: bytes, headers: list[tuple[int, int]]) -> None:
    assert isinstance(link_events(junk), list)
    # Headers of link messages whose lengths lie, with junk bodies behind them.
    data = b"".join(_HEADER.pack(n, 16 + k % 2, 0, 0, 0) + junk[: k * 8] for n, k in headers)
    for event in link_events(data):
        assert isinstance(event, LinkEvent) and event.name


def _rta(kind: int, payload: bytes) -> bytes:
    data = struct.pack("=HH", 4 + len(payload), kind) + payload
    return data + b"\0" * (-len(data) % 4)


def _newlink(name: str, flags: int, oper: int, family: int = socket.AF_UNSPEC) -> bytes:
    body = struct.pack("=BxHiII", family, 1, 7, flags, 0)
    body += _rta(3, name.encode() + b"\0") + _rta(16, bytes([oper]))
    return _HEADER.pack(_HEADER.size + len(body), 16, 0, 0, 0) + body


@pytest.mark.parametrize(
    ("flags", "oper", "change"),
    [
        (1, 6, Change.UP),  # IFF_UP, IF_OPER_UP
        (1, 0, Change.UP),  # IF_OPER_UNKNOWN: drivers that never say (usable)
        (0, 0, Change.DOWN),  # administratively down, whatever the driver says
        (0, 6, Change.DOWN),
        (1, 2, Change.DOWN),  # IF_OPER_DOWN: no carrier
        (1, 3, Change.DOWN),  # IF_OPER_LOWERLAYERDOWN: a veth whose peer is down
    ],
)
def test_a_link_is_up_when_administratively_up_and_usable(
    flags: int, oper: int, change: Change
) -> None:
    assert link_events(_newlink("eth9", flags, oper) * 2) == [LinkEvent("eth9", change, 7)] * 2


def test_a_bridge_ports_message_is_not_about_the_link_itself() -> None:
    # AF_BRIDGE messages say a port joined or left a bridge (a DELLINK for the
    # port when it leaves); the link itself is still there.
    assert link_events(_newlink("eth9", 1, 6, family=socket.AF_BRIDGE)) == []
