"""A minimal AF_XDP socket for Python pod apps: UMEM, fill, completion, RX and TX
rings, copy mode, need-wakeup.

It is enough to receive and send frames through the XSKMAP that the UDS
handshake hands over (insert ``sock.fileno()`` at ``queue`` with
``afxdp.bpf.libbpf.map_update_u32``). It is not a fast path: a C or DPDK app is.

Ring indexes are shared with the kernel through mmap. Descriptors are written
before the producer index with separate stores, which x86's ordering (TSO)
keeps in order; on weakly ordered CPUs this module would need barriers.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import select
import socket
import struct
from collections.abc import Iterable
from contextlib import suppress
from dataclasses import dataclass

AF_XDP = 44
SOL_XDP = 283
XDP_MMAP_OFFSETS, XDP_RX_RING, XDP_TX_RING, XDP_UMEM_REG = 1, 2, 3, 4
XDP_UMEM_FILL_RING, XDP_UMEM_COMPLETION_RING, XDP_STATISTICS = 5, 6, 7
XDP_PGOFF_RX_RING, XDP_PGOFF_TX_RING = 0, 0x80000000
XDP_UMEM_PGOFF_FILL_RING, XDP_UMEM_PGOFF_COMPLETION_RING = 0x100000000, 0x180000000
XDP_COPY, XDP_USE_NEED_WAKEUP = 1 << 1, 1 << 3
XDP_RING_NEED_WAKEUP = 1

_U32 = struct.Struct("<I")
_XDP_DESC = struct.Struct("<QII")  # addr, len, options
_ADDR = struct.Struct("<Q")
_RING_OFFSET = struct.Struct("<QQQQ")  # producer, consumer, desc, flags
_STATS = struct.Struct("<6Q")
_SOCKADDR_XDP = struct.Struct("<HHIII")


class XskError(OSError):
    """An AF_XDP setup step failed."""


@dataclass(frozen=True)
class XskStats:
    rx_dropped: int
    rx_invalid_descs: int
    tx_invalid_descs: int
    rx_ring_full: int
    rx_fill_ring_empty_descs: int
    tx_ring_empty_descs: int


class _Ring:
    """One single-producer/single-consumer ring shared with the kernel."""

    def __init__(self, fd: int, pgoff: int, offsets: bytes, size: int, desc_size: int) -> None:
        self.producer_off, self.consumer_off, self.desc_off, self.flags_off = _RING_OFFSET.unpack(
            offsets
        )
        self.size = size
        self.mask = size - 1
        self.desc_size = desc_size
        self.map = mmap.mmap(
            fd,
            self.desc_off + size * desc_size,
            mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
            mmap.PROT_READ | mmap.PROT_WRITE,
            offset=pgoff,
        )

    def _get(self, off: int) -> int:
        value: int = _U32.unpack_from(self.map, off)[0]
        return value

    @property
    def producer(self) -> int:
        return self._get(self.producer_off)

    @producer.setter
    def producer(self, value: int) -> None:
        _U32.pack_into(self.map, self.producer_off, value & 0xFFFFFFFF)

    @property
    def consumer(self) -> int:
        return self._get(self.consumer_off)

    @consumer.setter
    def consumer(self, value: int) -> None:
        _U32.pack_into(self.map, self.consumer_off, value & 0xFFFFFFFF)

    @property
    def needs_wakeup(self) -> bool:
        return bool(self._get(self.flags_off) & XDP_RING_NEED_WAKEUP)

    def slot(self, index: int) -> int:
        offset: int = self.desc_off + (index & self.mask) * self.desc_size
        return offset

    def ready(self) -> int:
        """Entries produced and not yet consumed."""
        return (self.producer - self.consumer) & 0xFFFFFFFF

    def close(self) -> None:
        self.map.close()


class XskSocket:
    """An AF_XDP socket bound to ``queue`` of ``ifname`` in copy mode.

    Half of the UMEM frames feed the RX fill ring, the other half are for TX.
    """

    def __init__(
        self, ifname: str, queue: int = 0, *, frames: int = 4096, frame_size: int = 2048,
        ring_size: int = 2048,
    ) -> None:  # fmt: skip
        if ring_size < 1 or ring_size & (ring_size - 1) or frames < 2:
            raise ValueError("ring_size must be a power of two and frames at least 2")
        self.ifname, self.queue = ifname, queue
        self.frame_size = frame_size
        self.sock = socket.socket(AF_XDP, socket.SOCK_RAW, 0)
        self._rings: list[_Ring] = []
        try:
            self._setup(frames, ring_size)
        except BaseException:
            self.close()
            raise

    def _setup(self, frames: int, ring_size: int) -> None:
        fd = self.sock.fileno()
        self.umem = mmap.mmap(-1, frames * self.frame_size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._umem_ref = ctypes.c_char.from_buffer(self.umem)
        reg = struct.pack(
            "<QQII", ctypes.addressof(self._umem_ref), len(self.umem), self.frame_size, 0
        )
        self.sock.setsockopt(SOL_XDP, XDP_UMEM_REG, reg)
        for opt in (XDP_UMEM_FILL_RING, XDP_UMEM_COMPLETION_RING, XDP_RX_RING, XDP_TX_RING):
            self.sock.setsockopt(SOL_XDP, opt, ring_size)
        offs = self.sock.getsockopt(SOL_XDP, XDP_MMAP_OFFSETS, 4 * _RING_OFFSET.size)
        rx, tx, fr, cr = (offs[i * 32 : (i + 1) * 32] for i in range(4))
        self.rx = _Ring(fd, XDP_PGOFF_RX_RING, rx, ring_size, _XDP_DESC.size)
        self.tx = _Ring(fd, XDP_PGOFF_TX_RING, tx, ring_size, _XDP_DESC.size)
        self.fill = _Ring(fd, XDP_UMEM_PGOFF_FILL_RING, fr, ring_size, _ADDR.size)
        self.comp = _Ring(fd, XDP_UMEM_PGOFF_COMPLETION_RING, cr, ring_size, _ADDR.size)
        self._rings = [self.rx, self.tx, self.fill, self.comp]
        half = frames // 2
        self._free_tx = [i * self.frame_size for i in range(half, frames)]
        self._refill(i * self.frame_size for i in range(min(half, ring_size)))
        self._bind()

    def _bind(self) -> None:
        ifindex = socket.if_nametoindex(self.ifname)
        addr = _SOCKADDR_XDP.pack(AF_XDP, XDP_COPY | XDP_USE_NEED_WAKEUP, ifindex, self.queue, 0)
        # socket.bind() cannot encode an AF_XDP address; libc can.
        libc = ctypes.CDLL(None, use_errno=True)
        buf = ctypes.create_string_buffer(addr, len(addr))
        if libc.bind(self.sock.fileno(), buf, len(addr)) != 0:
            err = ctypes.get_errno()
            raise XskError(err, f"bind AF_XDP {self.ifname} queue {self.queue}: {os.strerror(err)}")

    def fileno(self) -> int:
        return self.sock.fileno()

    def _refill(self, addrs: Iterable[int]) -> None:
        prod = self.fill.producer
        n = 0
        for n, addr in enumerate(addrs, 1):
            _ADDR.pack_into(self.fill.map, self.fill.slot(prod + n - 1), addr)
        self.fill.producer = prod + n

    def wait(self, timeout: float) -> bool:
        """Block up to ``timeout`` seconds for received frames; True if there are some."""
        if self.rx.ready():
            return True
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLIN)
        return bool(poller.poll(int(timeout * 1000))) and self.rx.ready() > 0

    def recv(self, limit: int = 64) -> list[bytes]:
        """Take up to ``limit`` received frames, giving their buffers back to the kernel."""
        cons = self.rx.consumer
        n = min(self.rx.ready(), limit)
        frames, bases = [], []
        for i in range(n):
            addr, length, _ = _XDP_DESC.unpack_from(self.rx.map, self.rx.slot(cons + i))
            frames.append(bytes(self.umem[addr : addr + length]))
            bases.append(addr - addr % self.frame_size)
        self.rx.consumer = cons + n
        self._refill(bases)
        if n and self.fill.needs_wakeup:
            self._kick_rx()
        return frames

    def _kick_rx(self) -> None:
        with suppress(BlockingIOError, InterruptedError):
            self.sock.recv(0, socket.MSG_DONTWAIT)

    def send(self, frames: Iterable[bytes]) -> int:
        """Queue frames for transmission and have the kernel send them; returns how many
        were queued (all queued frames are sent unless the kernel keeps refusing)."""
        self._reclaim()
        prod = self.tx.producer
        n = 0
        for frame in frames:
            if not self._free_tx or len(frame) > self.frame_size:
                break
            addr = self._free_tx.pop()
            self.umem[addr : addr + len(frame)] = frame
            _XDP_DESC.pack_into(self.tx.map, self.tx.slot(prod + n), addr, len(frame), 0)
            n += 1
        self.tx.producer = prod + n
        self.flush()
        return n

    def flush(self, attempts: int = 1000) -> None:
        """Kick the kernel until the TX ring is empty. In copy mode each kick sends
        at most a small batch (32 frames), so one kick per call is not enough."""
        for _ in range(attempts):
            if not self.tx.ready():
                break
            # EAGAIN/EBUSY: a batch went out or the device is busy; kick again.
            with suppress(BlockingIOError, InterruptedError, OSError):
                self.sock.send(b"", socket.MSG_DONTWAIT)
        self._reclaim()

    def _reclaim(self) -> None:
        cons = self.comp.consumer
        n = self.comp.ready()
        for i in range(n):
            addr: int = _ADDR.unpack_from(self.comp.map, self.comp.slot(cons + i))[0]
            self._free_tx.append(addr)
        self.comp.consumer = cons + n

    def stats(self) -> XskStats:
        return XskStats(*_STATS.unpack(self.sock.getsockopt(SOL_XDP, XDP_STATISTICS, _STATS.size)))

    def close(self) -> None:
        for ring in self._rings:
            ring.close()
        self._rings = []
        self.sock.close()
        if hasattr(self, "_umem_ref"):
            del self._umem_ref
            self.umem.close()

    def __enter__(self) -> XskSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
