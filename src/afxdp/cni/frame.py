"""The shim's wire format (sans-IO): netstrings, ``<decimal length>:<bytes>,``.

request: netstring(env) netstring(stdin); env is ``KEY=VALUE\\0`` entries,
UTF-8 (anything else is a FrameError, as is any field over MAX_FIELD bytes).
reply:   netstring(exit code) netstring(stdout) netstring(stderr).
The same request bytes are what the shim queues for a DEL afxdpd missed.
"""

from __future__ import annotations

from dataclasses import dataclass

# One field of a request: a netconf with its prevResult is a few KiB, and a
# Multus delegate with runtimeConfig some more; 1 MiB is far above any real one
# and small enough that a peer cannot make afxdpd hold much (see cni/server.py).
MAX_FIELD = 1 << 20


class FrameError(ValueError):
    """Bytes that are not a well-formed request."""


def netstring(data: bytes) -> bytes:
    return b"%d:%s," % (len(data), data)


def parse_netstrings(data: bytes, count: int) -> list[bytes]:
    """Exactly ``count`` netstrings making up all of ``data``."""
    out, pos = [], 0
    for _ in range(count):
        colon = data.find(b":", pos, pos + 10)
        digits = data[pos:colon]
        if colon < 0 or not digits.isdigit():
            raise FrameError("bad netstring length")
        n = int(digits)
        if n > MAX_FIELD:
            raise FrameError(f"a field of {n} bytes is over the limit of {MAX_FIELD}")
        end = colon + 1 + n
        if end >= len(data) or data[end : end + 1] != b",":
            raise FrameError("truncated or unterminated netstring")
        out.append(data[colon + 1 : end])
        pos = end + 1
    if pos != len(data):
        raise FrameError("trailing bytes after the request")
    return out


@dataclass(frozen=True)
class Request:
    env: dict[str, str]
    stdin: bytes

    def encode(self) -> bytes:
        env = b"".join(f"{k}={v}".encode() + b"\0" for k, v in self.env.items())
        return netstring(env) + netstring(self.stdin)

    @classmethod
    def decode(cls, data: bytes) -> Request:
        env_block, stdin = parse_netstrings(data, 2)
        env = {}
        for entry in env_block.split(b"\0"):
            if not entry:
                continue
            key, sep, value = entry.partition(b"=")
            if not sep:
                raise FrameError(f"env entry without '=': {entry[:40]!r}")
            try:
                env[key.decode()] = value.decode()
            except UnicodeDecodeError as exc:
                # Strict, not "replace": a mangled CNI_CONTAINERID or CNI_NETNS
                # would name some other container's state.
                raise FrameError(f"env entry is not valid UTF-8: {entry[:40]!r}") from exc
        return cls(env, stdin)


def encode_reply(code: int, stdout: bytes, stderr: bytes = b"") -> bytes:
    return netstring(str(code).encode()) + netstring(stdout) + netstring(stderr)


def decode_reply(data: bytes) -> tuple[int, bytes, bytes]:
    code, out, err = parse_netstrings(data, 3)
    if not code.isdigit():
        raise FrameError("exit code is not a number")
    return int(code), out, err
