"""The wire: UDP traffic sent into a NIC from the far end of its veth.

The ARP trap: the XDP program redirects every frame that arrives on queue 0 to
the pod's AF_XDP socket, ARP requests and replies too, so the pod's kernel never
answers ARP and a sender cannot resolve the pod's address. The wire side
therefore gets a static (permanent) neighbour entry for the pod's IP, as a
real sender to an AF_XDP pod needs one (or the app must answer ARP itself).
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from pathlib import Path

from afxdp.demo.lab import ip
from afxdp.netns import run_in

PAYLOAD = b"afxdp-demo-frame".ljust(64, b".")
BURST = 64
PACE = 200_000  # frames/s at most: the pod's pure-Python receiver keeps up with this


@dataclass(frozen=True)
class Sent:
    frames: int
    seconds: float


async def route_to_pod(wire_ns: str, wire_dev: str, pod_ip: str, pod_mac: str) -> None:
    """A host route and a permanent neighbour entry: no ARP needed (see above)."""
    await ip("route", "replace", f"{pod_ip}/32", "dev", wire_dev, netns=wire_ns)
    await ip("neigh", "replace", pod_ip, "lladdr", pod_mac, "dev", wire_dev, "nud", "permanent",
             netns=wire_ns)  # fmt: skip


def _blast(pod_ip: str, port: int, count: int, limit: float) -> Sent:
    """``count`` datagrams to ``pod_ip:port`` at most at PACE, for at most ``limit`` s."""
    start = time.monotonic()
    sent = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        # Not connected: a pod whose kernel gets the frames (no AF_XDP socket in
        # the map) answers "port unreachable", which must not end the sending.
        target = (pod_ip, port)
        while sent < count:
            now = time.monotonic()
            if now - start > limit:
                break
            ahead = sent / PACE - (now - start)
            if ahead > 0:
                time.sleep(ahead)  # pacing, not waiting for an outcome
            for _ in range(min(BURST, count - sent)):
                try:
                    sock.sendto(PAYLOAD, target)
                except BlockingIOError:  # the veth queue is full: try again later
                    break
                sent += 1
    return Sent(sent, time.monotonic() - start)


def send(wire_ns: str, pod_ip: str, port: int, count: int, limit: float) -> Sent:
    """Send from inside the wire netns (a fresh thread; blocking: run it off the loop)."""
    return run_in(Path("/run/netns") / wire_ns, _blast, pod_ip, port, count, limit)
