"""FAKE API server: ResourceClaims over HTTP (no API server can run here).

The stdlib's HTTP server in a thread of its own, so afxdpd's small HTTP client
is checked against an independent implementation. Every object a test puts
in is first checked against the official JSON schema of ``resource.k8s.io/v1``
ResourceClaim (kubernetes-validate's, strict: an unknown field is an error),
as the real API server would refuse it; GET answers it as the real one does,
or a ``Status`` 404. ``down`` makes it answer 503 (an API server that cannot
serve); stopping it makes it unreachable.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]

SCHEMA_VERSION = "1.34.0"  # the first with resource.k8s.io/v1 (DRA GA)
PREFIX = "/apis/resource.k8s.io/v1/namespaces/"


def resource_claim(
    namespace: str,
    name: str,
    uid: str,
    results: list[dict[str, str]] | None = None,
    *,
    pods: tuple[str, ...] = (),
    node: str = "node1",
) -> dict[str, Any]:
    """A ResourceClaim as the scheduler leaves it: one request, allocated
    ``results`` (None: not allocated yet), reserved for ``pods``."""
    claim: dict[str, Any] = {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceClaim",
        "metadata": {"namespace": namespace, "name": name, "uid": uid},
        "spec": {"devices": {"requests": [
            {"name": "nic", "exactly": {"deviceClassName": "afxdp.dev", "count": 1}}
        ]}},
    }  # fmt: skip
    if results is not None:
        claim["status"] = {
            "allocation": {
                "devices": {"results": results},
                "nodeSelector": {"nodeSelectorTerms": [{"matchFields": [
                    {"key": "metadata.name", "operator": "In", "values": [node]}
                ]}]},
            },
            "reservedFor": [
                {"resource": "pods", "name": p, "uid": f"uid-{p}"} for p in pods
            ],
        }  # fmt: skip
    return claim


def result(
    device: str, pool: str, *, driver: str = "afxdp.dev", request: str = "nic"
) -> dict[str, str]:
    return {"request": request, "driver": driver, "pool": pool, "device": device}


class FakeApiServer:
    """Serves ``/apis/resource.k8s.io/v1/namespaces/NS/resourceclaims/NAME``."""

    def __init__(self) -> None:
        self.claims: dict[tuple[str, str], dict[str, Any]] = {}
        self.gets = 0
        self.down = False
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body go in two writes: without this, a client that keeps
            # the connection (as real ones do) waits out a delayed ACK, 40 ms a GET.
            disable_nagle_algorithm = True

            def do_GET(self) -> None:
                fake.gets += 1
                if fake.down:
                    return self._answer(503, _status(503, "ServiceUnavailable", "told to be down"))
                parts = self.path.removeprefix(PREFIX).split("/")
                if (
                    not self.path.startswith(PREFIX)
                    or len(parts) != 3
                    or parts[1] != "resourceclaims"
                ):
                    return self._answer(
                        404,
                        _status(
                            404, "NotFound", "the server could not find the requested resource"
                        ),
                    )
                claim = fake.claims.get((parts[0], parts[2]))
                if claim is None:
                    return self._answer(
                        404, _status(404, "NotFound", f'resourceclaims "{parts[2]}" not found')
                    )
                self._answer(200, claim)

            def _answer(self, code: int, doc: dict[str, Any]) -> None:
                body = json.dumps(doc).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def put(self, claim: dict[str, Any]) -> None:
        """Store ``claim``, refused (kubernetes_validate.ValidationError) as the
        real API server would refuse it."""
        kubernetes_validate.validate(claim, SCHEMA_VERSION, strict=True)
        meta = claim["metadata"]
        self.claims[(meta["namespace"], meta["name"])] = claim

    def delete(self, namespace: str, name: str) -> None:
        del self.claims[(namespace, name)]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message,
            "reason": reason, "code": code}  # fmt: skip
