"""The demo's pod: an AF_XDP app as a pod runs it, started by the demo inside
the pod's network namespace and a private mount and UTS namespace.

It sees only what kubelet would give it from Allocate: its hostname is the pod
name, the device list is in the ``AFXDP_DEVICES_<POOL>`` variable, and the
mounts put each device's handshake socket at ``/tmp/afxdp_dp/<netdev>/`` (a
fresh tmpfs on /tmp, as a container has its own). Then it does what a DPDK or
CNDP app does: the UDS handshake for the XSKMAP, an AF_XDP socket on queue 0,
its fd into the map; and counts the UDP frames to PORT that reach its RX ring.

Talks to the demo over stdin/stdout, one JSON object per line: it says
``ready``; the demo answers ``{"sent": N}`` once the wire has sent; it says
``done`` with what it received (waiting at most a bounded time for the rest).

In a container (``--container``) the runtime has done all of that already.

usage: python -m afxdp.demo.pod [--container] POD_NAME ENV_VAR PORT [HOST=POD_PATH...]
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import select
import socket
import struct
import sys
import time
from pathlib import Path

from afxdp.bpf import libbpf
from afxdp.uds.client import UdsClient
from afxdp.xsk import XskSocket

MS_BIND = 4096
SIOCGIFADDR, SIOCGIFHWADDR = 0x8915, 0x8927
RECEIVE_LIMIT = 10.0  # seconds to wait for the rest after the wire has sent
QUIET = 0.5  # ... or this long with no new frame: the rest was dropped


def say(**kw: object) -> None:
    print(json.dumps(kw), flush=True)


def _mount(source: str, target: str, fstype: str | None, flags: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    enc = [s.encode() if s is not None else None for s in (source, target, fstype)]
    if libc.mount(enc[0], enc[1], enc[2], ctypes.c_ulong(flags), None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source} on {target}: {os.strerror(err)}")


def enter_pod(name: str, mounts: list[tuple[str, str]]) -> None:
    """Become the pod: its hostname, its /tmp with kubelet's mounts in it.

    The mount sources are opened before the fresh /tmp hides them (the demo's
    own directory may well be under /tmp), then bound through /proc/self/fd.
    """
    socket.sethostname(name)
    sources = [os.open(host, os.O_PATH) for host, _ in mounts]
    is_dir = [Path(host).is_dir() for host, _ in mounts]  # before /tmp is hidden
    _mount("tmpfs", "/tmp", "tmpfs", 0)
    for fd, directory, (_host, inside) in zip(sources, is_dir, mounts, strict=True):
        target = Path(inside)
        if directory:
            target.mkdir(parents=True, exist_ok=True)
        else:  # a file (a socket): bound onto an empty file
            target.parent.mkdir(parents=True, exist_ok=True)
            target.touch()
        _mount(f"/proc/self/fd/{fd}", inside, None, MS_BIND)
        os.close(fd)


def addresses(netdev: str) -> tuple[str, str]:
    """(IPv4 address, MAC) of ``netdev`` in this netns (ioctl: /sys may be the host's)."""
    req = struct.pack("256s", netdev.encode())
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ipv4 = socket.inet_ntoa(fcntl.ioctl(s, SIOCGIFADDR, req)[20:24])
        mac = fcntl.ioctl(s, SIOCGIFHWADDR, req)[18:24].hex(":")
    return ipv4, mac


def udp_dport(frame: bytes) -> int | None:
    if len(frame) < 42 or frame[12:14] != b"\x08\x00" or frame[23] != 17:
        return None
    ihl = (frame[14] & 0xF) * 4
    return int(struct.unpack_from("!H", frame, 14 + ihl + 2)[0])


def receive(xsk: XskSocket, port: int) -> None:
    got, first, last = 0, 0.0, 0.0
    sent: int | None = None
    deadline = quiet_since = 0.0
    poller = select.poll()
    poller.register(sys.stdin.fileno(), select.POLLIN)
    while True:
        now = time.monotonic()
        if sent is not None and (got >= sent or now > deadline or now - quiet_since > QUIET):
            break
        if sent is None and poller.poll(0):
            sent = int(json.loads(sys.stdin.readline())["sent"])
            deadline, quiet_since = now + RECEIVE_LIMIT, now
        if xsk.wait(0.05):
            n = sum(udp_dport(f) == port for f in xsk.recv(256))
            if n:
                stamp = time.monotonic()
                first = first or stamp
                last, quiet_since, got = stamp, stamp, got + n
    say(event="done", received=got, seconds=last - first, stats=xsk.stats().__dict__)


def main(argv: list[str]) -> int:
    container = argv[0] == "--container"
    name, env_var, port, *mounts = argv[1:] if container else argv
    if not container:
        enter_pod(name, [(m.split("=", 1)[0], m.split("=", 1)[1]) for m in mounts])
    netdev = os.environ[env_var].split()[0]
    ipv4, mac = addresses(netdev)
    say(event="up", netdev=netdev, ip=ipv4, mac=mac, hostname=socket.gethostname())
    with UdsClient.for_device(netdev) as client:
        client.connect()  # sends our hostname: afxdpd asks kubelet whose device this is
        version = client.version()
        map_fd = client.xsk_map_fd(netdev)
        try:
            with XskSocket(netdev, 0) as xsk:
                libbpf.map_update_u32(map_fd, 0, xsk.fileno())
                say(event="ready", version=version)
                receive(xsk, int(port))
        finally:
            os.close(map_fd)
        client.fin()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
