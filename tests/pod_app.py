"""A tiny AF_XDP "pod" app for the privileged tests, run inside the pod netns.

It gets the XSKMAP (over the UDS handshake, or from a pinned map), binds an
AF_XDP socket to queue 0 of the device, and counts frames to a UDP port that
arrive in its RX ring versus in a kernel UDP socket. It talks to the test over
stdin/stdout, one JSON object per line.

It then sends COUNT UDP frames of its own through the socket's TX ring, from
POD_MAC/POD_IP to PEER_MAC/PEER_IP port PORT-1.

usage: pod_app.py uds SOCKET HOSTNAME NETDEV PORT COUNT POD_MAC POD_IP PEER_MAC PEER_IP
       pod_app.py pinned MAP_PATH - NETDEV PORT COUNT POD_MAC POD_IP PEER_MAC PEER_IP
"""

from __future__ import annotations

import json
import select
import socket
import struct
import sys
import time

from afxdp.bpf import libbpf
from afxdp.uds.client import UdsClient
from afxdp.xsk import XskSocket


def say(**kw: object) -> None:
    print(json.dumps(kw), flush=True)


def udp_dport(frame: bytes) -> int | None:
    if len(frame) < 42 or frame[12:14] != b"\x08\x00" or frame[23] != 17:
        return None
    ihl = (frame[14] & 0xF) * 4
    return int(struct.unpack_from("!H", frame, 14 + ihl + 2)[0])


def udp_frame(src_mac: str, dst_mac: str, src_ip: str, dst_ip: str, *, port: int, n: int) -> bytes:
    payload = b"afxdp-tx-%05d" % n
    udp = struct.pack("!HHHH", 40000, port, 8 + len(payload), 0) + payload  # no UDP checksum
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), n & 0xFFFF, 0, 64, 17, 0,
                               socket.inet_aton(src_ip), socket.inet_aton(dst_ip)))  # fmt: skip
    words = struct.unpack("!10H", bytes(ip))
    total = sum(words)
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    struct.pack_into("!H", ip, 10, ~total & 0xFFFF)
    macs = bytes.fromhex(dst_mac.replace(":", "")) + bytes.fromhex(src_mac.replace(":", ""))
    return macs + b"\x08\x00" + bytes(ip) + udp


def main() -> None:
    mode, where, hostname, netdev, port, count = sys.argv[1:7]
    pod_mac, pod_ip, peer_mac, peer_ip = sys.argv[7:11]
    client = None
    if mode == "uds":
        client = UdsClient(where)
        client.connect(hostname)
        map_fd = client.xsk_map_fd(netdev)
    else:
        map_fd = libbpf.obj_get(where)  # type: ignore[arg-type]
    info = libbpf.map_info(map_fd)
    kernel = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    kernel.bind(("0.0.0.0", int(port)))
    kernel.setblocking(False)
    say(event="ready", map_type=info.type, map_name=info.name.decode())

    def drain() -> int:
        n = 0
        while True:
            try:
                kernel.recv(2048)
                n += 1
            except BlockingIOError:
                return n

    # The test sent N control frames before our XSK is in the map: they go to
    # the kernel. Count them as they arrive, up to N or a deadline.
    expected = int(sys.stdin.readline().split()[1])
    before, until = 0, time.monotonic() + 10
    while before < expected and time.monotonic() < until:
        select.select([kernel], [], [], 0.2)
        before += drain()
    xsk = XskSocket(netdev, 0)
    libbpf.map_update_u32(map_fd, 0, xsk.fileno())
    say(event="xsk", control_to_kernel=before)
    got, deadline = 0, time.monotonic() + 15
    while got < int(count) and time.monotonic() < deadline:
        if xsk.wait(0.2):
            got += sum(udp_dport(f) == int(port) for f in xsk.recv())
    # Every frame sent reached the XSK or the deadline passed: whatever the
    # kernel socket holds now arrived before, so no settling time is needed.
    kernel_count = drain()
    frames = [
        udp_frame(pod_mac, peer_mac, pod_ip, peer_ip, port=int(port) - 1, n=i)
        for i in range(int(count))
    ]
    sent = 0
    while sent < len(frames) and time.monotonic() < deadline + 10:
        sent += xsk.send(frames[sent : sent + 64])
        time.sleep(0.001)
    xsk.flush()
    say(event="done", xsk=got, kernel=kernel_count, sent=sent, stats=xsk.stats().__dict__)
    xsk.close()
    if client is not None:
        client.fin()
        client.close()


if __name__ == "__main__":
    main()
