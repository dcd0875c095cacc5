"""The demo node's kernel objects: "NICs" (veth pairs), a wire netns, pod netns.

Each NIC is a veth pair: one end stays on the host and is pooled by afxdpd, the
other end is in the "wire" netns, from which traffic is sent into the NIC as a
switch port would. Everything is made with iproute2 and recorded, so that
``remove`` takes all of it away again, whatever step the demo reached. Names
carry the run's tag (other runs, and tests, may be going on at the same time).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

import anyio

from afxdp.workers import Work, run_program

log = logging.getLogger(__name__)

IP_TIMEOUT = 10.0


class LabError(RuntimeError):
    """An iproute2 command failed."""


async def ip(*args: str, netns: str | None = None) -> str:
    argv = ["ip", *(["-n", netns] if netns else []), *args]
    done = await run_program(argv, timeout=IP_TIMEOUT, work=Work.NETLINK)
    if done.returncode != 0:
        raise LabError(f"{' '.join(argv)}: {done.stderr.decode().strip()}")
    return done.stdout.decode()


async def link_info(name: str, netns: str | None = None) -> dict[str, Any] | None:
    """``ip -d link show`` of ``name`` as JSON, or None when it does not exist."""
    try:
        return dict(json.loads(await ip("-j", "-d", "link", "show", name, netns=netns))[0])
    except LabError:
        return None


@dataclass
class Nic:
    name: str  # the pooled end, on the host
    wire: str  # its peer in the wire netns


@dataclass
class DemoLab:
    tag: str
    namespaces: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)

    def ns_name(self, what: str) -> str:
        return f"afxdp-demo-{self.tag}-{what}"

    @property
    def wire_ns(self) -> str:
        return self.ns_name("wire")

    async def netns(self, what: str) -> str:
        name = self.ns_name(what)
        self.namespaces.append(name)  # before: a half-made one is removed too
        await ip("netns", "add", name)
        await ip("link", "set", "lo", "up", netns=name)
        return name

    async def drop_netns(self, name: str) -> None:
        await _quietly(ip("netns", "del", name))
        self.namespaces.remove(name)

    async def nic(self, index: int) -> Nic:
        """A NIC ``nic<index>-<tag>`` whose wire end is up in the wire netns."""
        nic = Nic(f"nic{index}-{self.tag}", f"wire{index}-{self.tag}")
        self.links.append(nic.name)
        await ip("link", "add", nic.name, "type", "veth", "peer", "name", nic.wire,
                 "netns", self.wire_ns)  # fmt: skip
        await ip("link", "set", nic.name, "up")
        await ip("link", "set", nic.wire, "up", netns=self.wire_ns)
        return nic

    async def remove(self) -> None:
        """Delete every link and netns made (a link in a pod netns goes with it)."""
        for name in self.links:
            if await link_info(name) is not None:
                await _quietly(ip("link", "del", name))
        for ns in self.namespaces:
            await _quietly(ip("netns", "del", ns))

    async def leftovers(self) -> list[str]:
        """What of this run still exists (the demo checks its own cleanup)."""
        found = [f"link {n}" for n in self.links if await link_info(n) is not None]
        listed = await ip("netns", "list")
        found += [f"netns {ns}" for ns in self.namespaces if ns in listed.split()]
        return found


async def _quietly(step: Any) -> None:
    try:
        await step
    except (LabError, OSError) as exc:
        log.warning("cleanup: %s", exc)


async def wait_for(what: str, check: Any, timeout: float, poll: float = 0.05) -> Any:
    """Poll the async ``check()`` until it returns something true; raise past ``timeout``."""
    with anyio.move_on_after(timeout):
        while not (result := await check()):
            await anyio.sleep(poll)
        return result
    raise TimeoutError(f"{what}: not within {timeout:g} s")
