"""A socket file belongs to the server that bound it: nobody else removes it.

Another afxdpd may share a directory with this one (the UDS dir, the kubelet
dir; the run dir is locked, see ``cli/afxdpd.py``), and the next server of a
device may bind where the last one did. So:

- Before bind(), a file at the path is removed only if it is stale: a
  connect() to it is refused (nobody listens; not a socket at all). A socket
  someone answers on is theirs, and binding over it is an error (EADDRINUSE,
  what bind() itself says). The probe is a real connection: the other server
  sees a peer that hangs up at once (and counts it), nothing more.
- Right after bind(), the server notes the file's identity (st_dev, st_ino);
  when it stops, it removes the path only if the file there (lstat: a symlink
  is not followed) is still that one.

Neither check is atomic with the unlink() after it: Linux has no "unlink if
this inode" call, so a socket bound at the path in between (two syscalls) is
removed anyway. The window is kept to those two syscalls (no await, no other
work between them), so it needs two servers starting or stopping at one path
within microseconds. Renaming the path aside first, checking it there
and putting back what is not ours, only moves the window to the putting back.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
from pathlib import Path

log = logging.getLogger(__name__)

FileId = tuple[int, int]

# What connect() says when a server is there, whatever it is: accepted (or
# queued), backlog full, or a socket of another type.
_ANSWERED = frozenset({0, errno.EAGAIN, errno.EINPROGRESS, errno.EPROTOTYPE})


def file_id(path: Path, *, follow_symlinks: bool = False) -> FileId | None:
    """The identity of the file at ``path`` itself (or, with ``follow_symlinks``,
    of what it points to: another's socket we only watch); None when there is none."""
    try:
        st = os.stat(path, follow_symlinks=follow_symlinks)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def clear_stale(path: Path) -> None:
    """Make way for bind() at ``path``: remove a file nobody answers on; raise
    OSError(EADDRINUSE) when a server does (another process's, not ours to take).
    Other errors (not a directory, permission) are left for bind() to report.

    Only a socket file itself is probed: a symlink (or any other file) at the
    path is nobody's server, however live what it points to is; one a pod
    planted in its device directory (mounted read-write into it) to a live
    host socket would otherwise block that device for every later pod."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError:
        return  # left for bind() to report
    if not stat.S_ISSOCK(st.st_mode):
        path.unlink(missing_ok=True)
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.setblocking(False)  # a server with a full backlog says EAGAIN, not wait
        said = probe.connect_ex(str(path))
    if said in _ANSWERED:
        raise OSError(errno.EADDRINUSE, "another server answers on this socket", str(path))
    # Refused: stale, from a previous run (or not a socket); ENOENT: nothing, or
    # a dangling symlink (which bind() would not replace).
    if said in (errno.ECONNREFUSED, errno.ENOENT):
        path.unlink(missing_ok=True)  # (the window: see the module's docstring)


def remove_own(path: Path, ours: FileId | None) -> bool:
    """Remove ``path`` if the file there is still ``ours`` (noted right after
    bind); True if removed. Another file there is left alone, and said so."""
    if ours is None:
        return False
    there = file_id(path)
    if there != ours:
        if there is not None:
            log.warning("%s: not removed: it is no longer the socket this server made", path)
        return False
    try:
        path.unlink()  # (the window: see the module's docstring)
    except FileNotFoundError:
        return False
    return True
