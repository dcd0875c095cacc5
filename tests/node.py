"""A node under test: the real service in-process, its kubelet double, its devices."""

from __future__ import annotations

import json
import subprocess
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio

from afxdp import control
from afxdp.config import load_config
from afxdp.dra.claims import ClaimSource
from afxdp.service import Paths, Service
from tests.fakes import FakeSubfunctions
from tests.kernel import Lab
from tests.kubelet import FakeKubelet, PluginClient


def pool_config(devices: list[str], **extra: Any) -> dict[str, Any]:
    """One primary pool ``pool1`` over ``devices`` by name."""
    pool = {"name": "pool1", "mode": "primary", "devices": [{"name": d} for d in devices]}
    return {"pools": [{**pool, **extra}]}


class NodeUnderTest:
    def __init__(self, tmp: Path, lab: Lab, devices: list[str],
                 config: dict[str, Any] | None = None) -> None:  # fmt: skip
        self.tmp, self.lab, self.devices = tmp, lab, devices
        self.config = config or pool_config(devices)
        self.kubelet = FakeKubelet(tmp / "kubelet")
        self.paths = Paths(tmp / "kubelet", tmp / "uds", tmp / "pins", tmp / "run")
        self.service: Service | None = None

    def plugin(self, pool: str = "pool1") -> PluginClient:
        return PluginClient(self.kubelet.plugin_dir / f"afxdp-{pool}.sock")

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """A blocking call (grpcio, control socket) off the event loop."""
        return await anyio.to_thread.run_sync(fn, *args)

    async def allocate(self, *devices: str) -> Any:
        return await self.call(self.plugin().allocate, list(devices))

    async def states(self) -> dict[str, str]:
        status = await self.call(control.read_status, self.paths.run_dir)
        return {d["id"]: d["state"] for d in status["pools"][0]["devices"]}


@asynccontextmanager
async def running(
    node: NodeUnderTest,
    secondary: FakeSubfunctions | None = None,
    *,
    registration: bool = True,
    claim_source: ClaimSource | None = None,
) -> AsyncIterator[NodeUnderTest]:
    """The service up for the block's duration: its pools registered with the
    kubelet double (unless ``registration`` is False: kubelet.sock absent)."""
    if registration:
        node.kubelet.start_registration()
    node.kubelet.start_pod_resources()
    config = load_config(json.dumps(node.config).encode()).config
    node.service = Service(config, "node1", node.paths, secondary or FakeSubfunctions())
    if claim_source is not None:  # DRA: where NodePrepareResources reads claims
        node.service.claim_source = claim_source
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(node.service.run)
            yield node
            tg.cancel_scope.cancel()
    finally:
        node.kubelet.stop()
        subprocess.run(["umount", str(node.paths.pin_dir)], capture_output=True, check=False)
