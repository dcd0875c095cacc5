"""How deep a JSON text nests, measured before any decoder sees it.

Every JSON document afxdpd reads from outside (the config file, a CNI netconf,
an IPAM plugin's output, the state and attachment journals, the status
document) is refused when it nests deeper than MAX_DEPTH. The decoders cannot
be the judge: msgspec and the stdlib recurse, and meet the interpreter's
recursion limit (``RecursionError``, at a depth that depends on the Python
version, the limit and the stack already in use), so which documents are
refused, and with what exception, would be the interpreter's accident. This
scan is ours: it counts brackets outside strings, without recursion, so the
bound and the error are the same everywhere, and a document within it is far
from any recursion limit for every later walk of it (``json.dumps``, msgspec).

The scan does not validate: on valid JSON it measures exactly what a parser
would; on anything else it may find a depth the parser would never reach, and
either way the document is refused.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

# A netconf with a prevResult, the deepest document afxdpd takes, is about 5
# levels deep; the status document and a journal line about 4.
MAX_DEPTH = 64

# A string (escapes and all: a bracket in one does not count) or one structural
# character. Everything else (numbers, literals, whitespace) is skipped.
_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[][{}:,]', re.DOTALL)


@dataclass(frozen=True)
class TooDeep:
    """Where a document first nests deeper than its bound: the byte offset of
    the bracket that opens the level too many, and that value's JSON path
    (``pools[0].devices[2]``; ``""`` for the document itself)."""

    offset: int
    path: str
    limit: int

    def __str__(self) -> str:
        where = self.path or "the document"
        return f"nests deeper than {self.limit} levels (at {where}, byte {self.offset})"


class _Level:
    """One open object or array: the key or index of the value in it now."""

    __slots__ = ("key", "want_key")

    def __init__(self, in_object: bool) -> None:
        self.key: bytes | int | None = None if in_object else 0
        self.want_key = in_object  # the next string is a key, not a value


def too_deep(data: bytes | str, limit: int = MAX_DEPTH) -> TooDeep | None:
    """Where ``data`` nests deeper than ``limit`` levels; None if it does not.

    The document itself, an object or an array, is level 1. A ``str`` is
    measured as its UTF-8 (lone surrogates kept, so any str can be measured).
    """
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    levels: list[_Level] = []
    for match in _TOKEN.finditer(raw):
        token = match.group()
        if token in (b"{", b"["):
            if len(levels) == limit:
                return TooDeep(match.start(), _path(levels), limit)
            levels.append(_Level(in_object=token == b"{"))
        elif token in (b"}", b"]"):
            if levels:
                levels.pop()
        elif not levels:
            continue
        elif token == b",":
            level = levels[-1]
            if isinstance(level.key, int):
                level.key += 1
            else:
                level.want_key = True
        elif token == b":":
            levels[-1].want_key = False
        elif levels[-1].want_key:  # a string where an object's key goes
            levels[-1].key = token
    return None


def _path(levels: list[_Level]) -> str:
    """The JSON path of the value the innermost open level is at, as config
    errors write it (``a.b[3].c``)."""
    path = ""
    for level in levels:
        if isinstance(level.key, int):
            path += f"[{level.key}]"
        elif level.key is not None:
            name = _key(level.key)
            path = f"{path}.{name}" if path else name
    return path


def _key(token: bytes) -> str:
    """An object key's text (escapes decoded) from its string token."""
    try:
        key = json.loads(token)
    except ValueError:  # not valid UTF-8 or a bad escape: show it as it is
        return token[1:-1].decode(errors="replace")
    return key if isinstance(key, str) else token[1:-1].decode(errors="replace")
