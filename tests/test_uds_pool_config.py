"""A pool's UDS settings reach its servers: the real service on real veths,
Allocate through the kubelet double (issue 11: udsTimeout and uid were ignorable)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kernel import Lab, ip
from tests.node import NodeUnderTest as Node
from tests.node import pool_config, running

pytestmark = [pytest.mark.privileged, pytest.mark.anyio]

UID = 1234


@pytest.fixture
def device(lab: Lab) -> Iterator[str]:
    a, b = lab.veth(lab.name("uc"), lab.name("ud"))
    ip("link", "set", a, "up")
    ip("link", "set", b, "up")
    yield a


@pytest.mark.parametrize(("uds_timeout", "idle_timeout"), [(120, 120.0), (-1, None)])
async def test_the_uds_idle_timeout_comes_from_the_pool_config(
    tmp_path: Path, lab: Lab, device: str, uds_timeout: int, idle_timeout: float | None
) -> None:
    # Not 30: that is also the default, which a server ignoring the pool would use.
    node = Node(tmp_path, lab, [device], pool_config([device], udsTimeout=uds_timeout))
    async with running(node):
        await node.allocate(device)
        assert node.service is not None and node.service.devices is not None
        server = node.service.devices.handouts.handouts[device].uds
        assert server is not None and server.path.is_socket()
        assert server.idle_timeout == idle_timeout


# Enters the socket's directory as root (the test's temp dirs are private),
# then becomes ``uid`` and tries the handshake's first step.
POKE = r"""
import os, socket, sys
os.chdir(os.path.dirname(sys.argv[1]))
os.setgid(int(sys.argv[2])); os.setuid(int(sys.argv[2]))
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.settimeout(5)
try:
    s.connect(os.path.basename(sys.argv[1]))
    s.send(b"/connect,pod-a")
    print(repr(s.recv(128)))
except OSError as exc:
    print("refused", exc.errno)
"""


def poke(path: Path, uid: int) -> str:
    done = subprocess.run([sys.executable, "-c", POKE, str(path), str(uid)],
                          capture_output=True, text=True, timeout=10, check=True)  # fmt: skip
    return done.stdout.strip()


async def test_the_pool_uid_owns_the_socket_and_only_that_user_gets_in(
    tmp_path: Path, lab: Lab, device: str
) -> None:
    node = Node(tmp_path, lab, [device], pool_config([device], uid=UID))
    async with running(node):
        await node.allocate(device)
        # As kubelet: listed once allocated (listed at afxdpd's start, a pod
        # would hold it already, and afxdpd takes it over: Allocate refused).
        node.kubelet.hold("pod-a", "afxdp/pool1", device)
        sock = node.paths.uds_dir / device / "afxdp.sock"
        assert sock.stat().st_uid == UID and sock.parent.stat().st_uid == UID
        assert await node.call(poke, sock, UID) == "b'/host_ok'"
        refused = await node.call(poke, sock, UID + 1)
        assert refused == "b''" or refused.startswith("refused"), refused


async def test_the_pool_uid_owns_the_pinned_map(tmp_path: Path, lab: Lab, device: str) -> None:
    config = pool_config([device], udsServerDisable=True, bpfMapPinningEnable=True, uid=UID)
    node = Node(tmp_path, lab, [device], config)
    async with running(node):
        await node.allocate(device)
        pin = node.paths.pin_dir / "pool1" / device / "xsks_map"
        assert pin.stat().st_uid == UID and pin.parent.stat().st_uid == UID
