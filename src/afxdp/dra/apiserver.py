"""ResourceClaims from the API server: a ``claims.ClaimSource`` over plain HTTP.

A stop-gap until a maintained Kubernetes client comes (issue 21, item 3): the
node lock has no HTTP client, so this is a small HTTP/1.1 GET of our own, one
connection per claim (``Connection: close``: the answer ends at EOF), over TCP
(``http://HOST:PORT``) or a unix socket (``unix:///PATH``, an API server
proxy such as ``kubectl proxy --unix-socket``). No TLS yet: point it at a
local proxy. The body is decoded into the few fields Prepare needs, typed, so
a claim of another shape is an error, not a KeyError.
"""

from __future__ import annotations

import logging
from urllib.parse import quote, urlsplit

import anyio
import msgspec
from anyio.abc import ByteStream

from afxdp.dra.claims import Allocated, ClaimUnavailable, Result

log = logging.getLogger(__name__)

TIMEOUT = 5.0  # s for one GET, connect to last byte
MAX_RESPONSE = 4 * 1024 * 1024  # a ResourceClaim is a few KiB


class HttpError(Exception):
    """The API server could not be asked, or its answer is not HTTP/1.1."""


# -- the few fields of a resource.k8s.io/v1 ResourceClaim Prepare reads ---------


class _Meta(msgspec.Struct):
    uid: str = ""


class _Consumer(msgspec.Struct):
    resource: str = ""
    name: str = ""


class _Devices(msgspec.Struct):
    results: list[Result] = []


class _Allocation(msgspec.Struct):
    devices: _Devices = msgspec.field(default_factory=_Devices)


class _Status(msgspec.Struct, rename="camel"):
    allocation: _Allocation | None = None
    reserved_for: list[_Consumer] = []


class _Claim(msgspec.Struct):
    metadata: _Meta = msgspec.field(default_factory=_Meta)
    status: _Status = msgspec.field(default_factory=_Status)


class ApiServerClaims:
    """Reads claims at ``/apis/resource.k8s.io/v1/namespaces/NS/resourceclaims/NAME``."""

    def __init__(self, url: str, *, token: str | None = None, timeout: float = TIMEOUT) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "unix") or (parts.scheme == "http" and not parts.port):
            raise ValueError(f"{url!r}: want http://HOST:PORT or unix:///PATH")
        self.url, self.parts, self.token, self.timeout = url, parts, token, timeout
        self.gets = 0  # status and tests

    async def get(self, namespace: str, name: str, uid: str) -> Allocated:
        path = (f"/apis/resource.k8s.io/v1/namespaces/{quote(namespace, safe='')}"
                f"/resourceclaims/{quote(name, safe='')}")  # fmt: skip
        self.gets += 1
        try:
            status, body = await self.request(path)
        except HttpError as exc:
            raise ClaimUnavailable(f"the API server at {self.url}: {exc}") from None
        if status == 404:
            raise ClaimUnavailable("no such ResourceClaim (deleted?)")
        if status != 200:
            raise ClaimUnavailable(f"the API server answered HTTP {status}: {body[:200]!r}")
        try:
            claim = msgspec.json.decode(body, type=_Claim)
        except msgspec.MsgspecError as exc:
            raise ClaimUnavailable(f"not a ResourceClaim: {exc}") from None
        if claim.metadata.uid != uid:
            raise ClaimUnavailable(f"its uid is {claim.metadata.uid or 'none'}, not {uid} "
                                   "(deleted and made again?)")  # fmt: skip
        if claim.status.allocation is None:
            raise ClaimUnavailable("not allocated")
        pods = tuple(f"{namespace}/{c.name}" for c in claim.status.reserved_for
                     if c.resource == "pods")  # fmt: skip
        return Allocated(results=tuple(claim.status.allocation.devices.results), pods=pods)

    async def request(self, path: str) -> tuple[int, bytes]:
        """GET ``path``: (status, body). HttpError when that cannot be had."""
        host = self.parts.hostname or "localhost"
        head = [f"GET {path} HTTP/1.1", f"Host: {host}", "Accept: application/json",
                "Connection: close", "User-Agent: afxdpd"]  # fmt: skip
        if self.token:
            head.append(f"Authorization: Bearer {self.token}")
        try:
            with anyio.fail_after(self.timeout):
                stream: ByteStream
                if self.parts.scheme == "unix":
                    stream = await anyio.connect_unix(self.parts.path)
                else:
                    stream = await anyio.connect_tcp(host, self.parts.port or 80)
                async with stream:
                    await stream.send(("\r\n".join(head) + "\r\n\r\n").encode())
                    data = bytearray()
                    while True:
                        try:
                            data += await stream.receive()
                        except (anyio.EndOfStream, anyio.BrokenResourceError):
                            break
                        if len(data) > MAX_RESPONSE:
                            raise HttpError(f"answer longer than {MAX_RESPONSE} bytes")
        except TimeoutError:
            raise HttpError(f"no answer within {self.timeout} s") from None
        except OSError as exc:
            raise HttpError(str(exc) or type(exc).__name__) from None
        return parse_response(bytes(data))


def parse_response(data: bytes) -> tuple[int, bytes]:
    """(status, body) of a whole HTTP/1.1 response read to EOF; HttpError if it is not one."""
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        raise HttpError("the answer ended inside its header")
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise HttpError(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
    headers = {}
    for line in lines[1:]:
        key, colon, value = line.partition(b":")
        if not colon:
            raise HttpError(f"not a header line: {line[:80]!r}")
        headers[key.strip().lower()] = value.strip()
    if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        body = _unchunk(body)
    elif (length := headers.get(b"content-length")) is not None:
        if not length.isdigit() or int(length) > len(body):
            raise HttpError(f"the body is cut short ({len(body)} of {length!r} bytes)")
        body = body[: int(length)]
    return int(parts[1]), body


def _unchunk(data: bytes) -> bytes:
    out, pos = bytearray(), 0
    while True:
        end = data.find(b"\r\n", pos)
        if end < 0:
            raise HttpError("a chunked body cut short")
        try:
            size = int(data[pos:end].split(b";", 1)[0], 16)
        except ValueError:
            raise HttpError(f"not a chunk size: {data[pos:end][:20]!r}") from None
        if size == 0:
            return bytes(out)
        start, pos = end + 2, end + 2 + size
        if pos + 2 > len(data) or data[pos : pos + 2] != b"\r\n":
            raise HttpError("a chunked body cut short")
        out += data[start:pos]
        pos += 2
