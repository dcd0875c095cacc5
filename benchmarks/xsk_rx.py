"""Receiver side of the RX benchmark, run inside the pod netns.

usage: xsk_rx.py xsk|kernel MAP_PATH NETDEV PORT SECONDS
Prints {"frames": N, "seconds": T, "start": S, "dropped": D} counted from the
first frame on (S: the window's start on CLOCK_MONOTONIC, the clock the sender
stamps its progress with), where D is what reached this receiver's queue and
found it full during the same window: the proof that the sender outran the
receiver. For the AF_XDP
socket that is its own XDP_STATISTICS (rx ring full, no fill buffer); for the
UDP socket, the netns's Udp RcvbufErrors.
"""

from __future__ import annotations

import json
import socket
import sys
import time
from pathlib import Path

from afxdp.bpf import libbpf
from afxdp.xsk import XskSocket


def udp_rcvbuf_errors() -> int:
    names, values = (ln.split() for ln in Path("/proc/net/snmp").read_text().splitlines()
                     if ln.startswith("Udp:"))  # fmt: skip
    return int(values[names.index("RcvbufErrors")])


def main() -> None:
    mode, map_path, netdev, port, seconds = sys.argv[1:6]
    window = float(seconds)
    frames = 0
    if mode == "xsk":
        map_fd = libbpf.obj_get(map_path)  # type: ignore[arg-type]
        xsk = XskSocket(netdev, 0, frames=8192, ring_size=4096)
        libbpf.map_update_u32(map_fd, 0, xsk.fileno())

        def dropped() -> int:
            s = xsk.stats()
            return s.rx_dropped + s.rx_ring_full

        print("ready", flush=True)
        xsk.wait(30)
        start, before = time.monotonic(), dropped()
        while time.monotonic() - start < window:
            frames += len(xsk.recv(256))
            if not xsk.rx.ready():
                xsk.wait(0.05)
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        sock.bind(("0.0.0.0", int(port)))
        dropped = udp_rcvbuf_errors
        print("ready", flush=True)
        sock.settimeout(30)
        sock.recv(2048)
        sock.settimeout(0.05)
        start, before = time.monotonic(), dropped()
        while time.monotonic() - start < window:
            try:
                sock.recv(2048)
                frames += 1
            except TimeoutError:
                pass
    seconds_taken, drops = time.monotonic() - start, dropped() - before
    print(json.dumps({"frames": frames, "seconds": seconds_taken, "start": start,
                      "dropped": drops}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
