"""Receiver side of the RX benchmark, run inside the pod netns.

usage: xsk_rx.py xsk|kernel MAP_PATH NETDEV PORT SECONDS
Prints {"frames": N, "seconds": T} counted from the first frame on.
"""

from __future__ import annotations

import json
import socket
import sys
import time

from afxdp.bpf import libbpf
from afxdp.xsk import XskSocket


def main() -> None:
    mode, map_path, netdev, port, seconds = sys.argv[1:6]
    window = float(seconds)
    frames = 0
    if mode == "xsk":
        map_fd = libbpf.obj_get(map_path)  # type: ignore[arg-type]
        xsk = XskSocket(netdev, 0, frames=8192, ring_size=4096)
        libbpf.map_update_u32(map_fd, 0, xsk.fileno())
        print("ready", flush=True)
        xsk.wait(30)
        start = time.monotonic()
        while time.monotonic() - start < window:
            frames += len(xsk.recv(256))
            if not xsk.rx.ready():
                xsk.wait(0.05)
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        sock.bind(("0.0.0.0", int(port)))
        sock.settimeout(0.05)
        print("ready", flush=True)
        sock.settimeout(30)
        sock.recv(2048)
        sock.settimeout(0.05)
        start = time.monotonic()
        while time.monotonic() - start < window:
            try:
                sock.recv(2048)
                frames += 1
            except TimeoutError:
                pass
    print(json.dumps({"frames": frames, "seconds": time.monotonic() - start}), flush=True)


if __name__ == "__main__":
    main()
