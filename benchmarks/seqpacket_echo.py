"""The handshake's baseline peer: a bare SEQPACKET server, in its own process
(as afxdpd is), that sends every message back and does nothing else.

usage: seqpacket_echo.py PATH   (prints "ready" once listening; SIGTERM ends it)
"""

from __future__ import annotations

import socket
import sys


def main() -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as lst:
        lst.bind(sys.argv[1])
        lst.listen(16)
        print("ready", flush=True)
        while True:
            conn, _ = lst.accept()
            with conn:
                while msg := conn.recv(128):
                    conn.send(msg)


if __name__ == "__main__":
    main()
