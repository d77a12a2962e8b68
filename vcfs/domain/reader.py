"""The data path of a backup disk: kernel reads served from large, prefetched NBD reads.

The kernel asks for 128 KiB–1 MiB at a time and Python's cost is per request, so reads are
served from blocks of BLOCK bytes fetched in worker threads, several in flight ahead of a
sequential reader. Zero extents never touch NBD: they are answered from the extent map. Within
a block only the data extents are read (small gaps are read through to save round trips).
The images are immutable, so blocks never go stale.
Thread rule: trio tasks; NBD calls run in worker threads bounded by a CapacityLimiter.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable

import trio

from vcfs.domain.extents import Extent, ExtentMap
from vcfs.domain.ports import Export
from vcfs.errors import BackendError, VcfsError

log = logging.getLogger(__name__)

BLOCK = 4 << 20
PREFETCH = 4
CACHE_BLOCKS = 16
THREADS = 4
GAP = 64 << 10
"""Zero gaps shorter than this inside a block are read rather than split around."""

_zeros: dict[int, bytes] = {}


def zeros(n: int) -> bytes:
    """A shared buffer of n zero bytes (kernel requests come in a few sizes)."""
    z = _zeros.get(n)
    if z is None:
        z = bytes(n)
        if len(_zeros) < 64:
            _zeros[n] = z
    return z


class ImageReader:
    """Reads of one point-in-time image, shared by every open file of it."""

    def __init__(
        self, size: int, open_export: Callable[[], Export], spawn: Callable[..., None]
    ) -> None:
        self.size = size
        self.extents = ExtentMap(size, self._block_status)
        self._open_export = open_export
        self._spawn = spawn
        self._export: Export | None = None
        self._limiter = trio.CapacityLimiter(THREADS)
        self._blocks: OrderedDict[int, bytes | None] = OrderedDict()
        self._pending: dict[int, trio.Event] = {}
        self._failures: dict[int, VcfsError] = {}
        self._closed = False
        self.bytes_served = 0
        self.nbd_bytes = 0

    async def _export_handle(self) -> Export:
        if self._closed:
            raise BackendError("the backup has ended")
        if self._export is None:
            self._export = await trio.to_thread.run_sync(self._open_export, limiter=self._limiter)
            if self._closed:  # ended while connecting
                self._export.close()
                raise BackendError("the backup has ended")
        return self._export

    async def _block_status(self, offset: int, length: int) -> list[Extent]:
        export = await self._export_handle()
        return await trio.to_thread.run_sync(
            export.block_status, offset, length, limiter=self._limiter
        )

    async def read(self, offset: int, length: int) -> bytes:
        """Up to `length` bytes at `offset` (short only at the end of the image)."""
        if self._closed:
            raise BackendError("the backup has ended")
        end = min(offset + length, self.size)
        if offset >= end:
            return b""
        first, last = offset // BLOCK, (end - 1) // BLOCK
        for b in range(last + 1, min(last + 1 + PREFETCH, -(-self.size // BLOCK))):
            if b not in self._blocks and b not in self._pending:
                self._start(b)
        parts = []
        for b in range(first, last + 1):
            block = await self._block(b)
            lo = max(offset, b * BLOCK) - b * BLOCK
            hi = min(end, (b + 1) * BLOCK) - b * BLOCK
            parts.append(zeros(hi - lo) if block is None else block[lo:hi])
        self.bytes_served += end - offset
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _start(self, b: int) -> trio.Event:
        self._failures.pop(b, None)  # a new attempt: forget the last failure
        event = self._pending[b] = trio.Event()
        self._spawn(self._fetch, b)
        return event

    async def _block(self, b: int) -> bytes | None:
        # A block can be evicted between its arrival and this task waking up (many readers):
        # then it is simply fetched again.
        for _ in range(4):
            if b in self._blocks:
                self._blocks.move_to_end(b)
                return self._blocks[b]
            if self._closed:
                break
            event = self._pending.get(b)
            if event is None:
                event = self._start(b)
            await event.wait()
            if b in self._failures:
                raise self._failures[b]
        raise BackendError("the backup has ended")

    async def _fetch(self, b: int) -> None:
        try:
            data = await self._load(b)
            if not self._closed:
                self._blocks[b] = data
                while len(self._blocks) > CACHE_BLOCKS:
                    self._blocks.popitem(last=False)
        except VcfsError as e:
            self._failures[b] = e
        except Exception as e:  # noqa: BLE001 - a reader must see EIO, never a dead mount
            log.exception("reading block %d failed", b)
            self._failures[b] = BackendError(f"read failed: {e}")
        finally:
            self._pending.pop(b).set()

    async def _load(self, b: int) -> bytes | None:
        start, end = b * BLOCK, min((b + 1) * BLOCK, self.size)
        ranges: list[list[int]] = []
        for e in await self.extents.range(start, end):
            if e.zero:
                continue
            if ranges and e.start - ranges[-1][1] < GAP:
                ranges[-1][1] = e.end
            else:
                ranges.append([e.start, e.end])
        if not ranges:
            return None
        export = await self._export_handle()
        wanted = [(s, t - s) for s, t in ranges]
        pieces = await trio.to_thread.run_sync(export.read_ranges, wanted, limiter=self._limiter)
        self.nbd_bytes += sum(n for _, n in wanted)
        if len(wanted) == 1 and wanted[0] == (start, end - start):
            return pieces[0]
        block = bytearray(end - start)
        for (s, n), piece in zip(wanted, pieces, strict=True):
            block[s - start : s - start + n] = piece
        return bytes(block)

    def close(self) -> None:
        """End all reading: later and waiting reads fail with BackendError (EIO)."""
        self._closed = True
        self._blocks.clear()
        for event in self._pending.values():
            event.set()
        if self._export is not None:
            self._export.close()
            self._export = None
