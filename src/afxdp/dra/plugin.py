"""Kubelet's DRAPlugin service, v1 and v1beta1: a thin translation to ``Claims``.

The two versions' messages are the same but for v1's ``Device.share_id``
(unset here: no device is shared), so one translation serves both, given
the version's message module. Every claim of a request gets an answer: a
refusal is that claim's ``error``, never the call's (kubelet would retry every
claim of it). The claims of one call are prepared side by side.
"""

from __future__ import annotations

import logging
from types import ModuleType
from typing import Any

import anyio
from grpclib.server import Stream

from afxdp.dra import claims as cl
from afxdp.dra.v1 import api_grpc as v1_grpc
from afxdp.dra.v1 import api_pb2 as v1
from afxdp.dra.v1beta1 import api_grpc as v1beta1_grpc
from afxdp.dra.v1beta1 import api_pb2 as v1beta1

log = logging.getLogger(__name__)


async def prepare(claims: cl.Claims, pb: ModuleType, request: Any) -> Any:
    """NodePrepareResourcesResponse (of module ``pb``) for ``request``."""
    answers: dict[str, Any] = {}

    async def one(claim: Any) -> None:
        try:
            done = await claims.prepare(claim.namespace, claim.name, claim.uid)
        except cl.PrepareError as exc:
            log.warning("NodePrepareResources: %s", exc)
            answers[claim.uid] = pb.NodePrepareResourceResponse(error=str(exc))
            return
        except Exception as exc:  # a bug: that claim's answer, not the whole call's
            log.exception("NodePrepareResources: claim %s failed", claim.uid)
            answers[claim.uid] = pb.NodePrepareResourceResponse(error=f"afxdpd: {exc!r}")
            return
        answers[claim.uid] = pb.NodePrepareResourceResponse(
            devices=[
                pb.Device(
                    request_names=[d.request],
                    pool_name=d.dra_pool,
                    device_name=d.device,
                    cdi_device_ids=list(d.cdi_ids),
                )
                for d in done.devices
            ]
        )

    async with anyio.create_task_group() as tg:
        for claim in request.claims:
            tg.start_soon(one, claim)
    return pb.NodePrepareResourcesResponse(claims=answers)


async def unprepare(claims: cl.Claims, pb: ModuleType, request: Any) -> Any:
    answers: dict[str, Any] = {}

    async def one(claim: Any) -> None:
        try:
            await claims.unprepare(claim.uid)
        except Exception as exc:
            log.exception("NodeUnprepareResources: claim %s failed", claim.uid)
            answers[claim.uid] = pb.NodeUnprepareResourceResponse(error=f"afxdpd: {exc!r}")
        else:
            answers[claim.uid] = pb.NodeUnprepareResourceResponse()

    async with anyio.create_task_group() as tg:
        for claim in request.claims:
            tg.start_soon(one, claim)
    return pb.NodeUnprepareResourcesResponse(claims=answers)


class DraV1(v1_grpc.DRAPluginBase):
    """``k8s.io.kubelet.pkg.apis.dra.v1.DRAPlugin``."""

    def __init__(self, claims: cl.Claims) -> None:
        self.claims = claims

    async def NodePrepareResources(
        self, stream: Stream[v1.NodePrepareResourcesRequest, v1.NodePrepareResourcesResponse]
    ) -> None:
        req = await stream.recv_message()
        assert req is not None
        await stream.send_message(await prepare(self.claims, v1, req))

    async def NodeUnprepareResources(
        self, stream: Stream[v1.NodeUnprepareResourcesRequest, v1.NodeUnprepareResourcesResponse]
    ) -> None:
        req = await stream.recv_message()
        assert req is not None
        await stream.send_message(await unprepare(self.claims, v1, req))


class DraV1beta1(v1beta1_grpc.DRAPluginBase):
    """``k8s.io.kubelet.pkg.apis.dra.v1beta1.DRAPlugin`` (kubelets before 1.34)."""

    def __init__(self, claims: cl.Claims) -> None:
        self.claims = claims

    async def NodePrepareResources(
        self,
        stream: Stream[v1beta1.NodePrepareResourcesRequest, v1beta1.NodePrepareResourcesResponse],
    ) -> None:
        req = await stream.recv_message()
        assert req is not None
        await stream.send_message(await prepare(self.claims, v1beta1, req))

    async def NodeUnprepareResources(
        self,
        stream: Stream[
            v1beta1.NodeUnprepareResourcesRequest, v1beta1.NodeUnprepareResourcesResponse
        ],
    ) -> None:
        req = await stream.recv_message()
        assert req is not None
        await stream.send_message(await unprepare(self.claims, v1beta1, req))
