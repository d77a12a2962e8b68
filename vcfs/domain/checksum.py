"""sha256 of an image view, taken from the reads that stream it, at no extra read.

A `StreamDigest` watches every read a view serves. While the reads continue where the last one
ended — or skip only bytes known to read as zeros, as `cp` does with SEEK_DATA — their bytes
go to the hash; once the whole image has gone by, the digest is known, and a copy made by that
one `cp` can be checked with `sha256sum -c`. Until then, asking for the digest reads the rest
of the view through the same reader (holes are hashed as zeros, never read). A reader that
jumps elsewhere leaves the stream where it was; one that jumps past bytes not known to be zero
breaks it, and the digest is then computed afresh when asked for.

Hashing never slows a read: the bytes are queued to one task that hashes them in a worker
thread (hashlib releases the GIL), and a stream whose queue is full is given up instead.
Thread rule: trio tasks; only `_update` runs in a worker thread.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Awaitable, Callable

import trio

from vcfs.domain.reader import Buffer
from vcfs.errors import BackendError

QUEUE = 32 << 20
"""Bytes of reads waiting to be hashed: 30 ms of reading at 1 GB/s, what a stream may hold in
memory beyond the block cache. The hash (1.7 GB/s here) outpaces the reads it follows."""
ZERO_BUDGET = 1 << 30
"""Zeros a stream hashes on its own: 0.6 s of one core at 1.7 GB/s. Hashing zeros competes
with the copy it follows for the same two cores (four raw 1 TiB views copied at once with a
16 GiB budget: 21 s instead of 5), and a hole-aware copy of a sparse multi-TiB raw view would
leave hours of it behind. Past this the stream is given up, and the digest is computed only
when its file is read. qcow2 views have no holes: their streams never hash zeros."""
CHUNK = 1 << 20
"""How much the digest reads at a time when it must read the view itself."""
_ZEROS = bytes(CHUNK)

Item = tuple[int, Buffer | None, int]
"""(generation, bytes or None for zeros, length)."""


class StreamDigest:
    """The sha256 of one view of `size` bytes, from the reads that stream it."""

    def __init__(
        self,
        size: int,
        spawn: Callable[..., None],
        known_zero: Callable[[int, int], bool] = lambda start, end: False,
        next_data: Callable[[int], Awaitable[int | None]] | None = None,
    ) -> None:
        self.size = size
        self._spawn = spawn
        self._known_zero = known_zero
        """Whether [start, end) is known, without I/O, to read as zeros (a skipped hole)."""
        self._next_data = next_data
        """Where the next data at or after an offset starts (None: zeros to the end)."""
        self._generation = 0
        self._pos = 0
        """Bytes queued so far, in order, for this generation."""
        self._broken = False
        self._items: deque[Item] = deque()
        self._queued = 0
        """Bytes of data in `_items`."""
        self._running = False
        self._closed = False
        self._wake = trio.Event()
        self._zeros = 0
        """Zeros queued so far (see ZERO_BUDGET)."""
        self._asked = False
        """Someone reads the digest: it is computed whatever it costs."""
        self._hash = hashlib.sha256()
        self._hashed = 0
        self.hexdigest: str | None = None
        self._done = trio.Event()
        self._drained = trio.Event()
        self._lock = trio.Lock()

    def observe(self, offset: int, data: Buffer) -> None:
        """A read served `data` at `offset` (called by the reader, never awaits)."""
        end = offset + len(data)
        if self._broken or self.hexdigest is not None or end <= self._pos:
            return
        if offset > self._pos:
            gap = offset - self._pos
            if not self._known_zero(self._pos, offset) or (
                not self._asked and self._zeros + gap > ZERO_BUDGET
            ):
                self._broken = True  # bytes went by unseen: the digest is read afresh
                return
            self._zeros += gap
            self._queue(None, gap)
        if not self._broken:
            view = memoryview(data)[self._pos - offset :] if self._pos > offset else data
            self._queue(view, len(view))

    def _queue(self, data: Buffer | None, length: int) -> None:
        if data is not None and self._queued + length > QUEUE:
            self._broken = True  # hashing fell behind: never make the reader wait
            return
        if not self._running:
            self._running = True
            self._spawn(self._run)
        self._items.append((self._generation, data, length))
        self._queued += 0 if data is None else length
        self._pos += length
        self._wake.set()

    async def _run(self) -> None:
        while not self._closed:
            if not self._items:
                await self._wake.wait()
                self._wake = trio.Event()
                continue
            batch = list(self._items)
            self._items.clear()
            generation = self._generation
            current = [b for b in batch if b[0] == generation]
            if current:
                await trio.to_thread.run_sync(self._update, self._hash, current, self._stopped)
            self._queued -= sum(n for _, data, n in batch if data is not None)
            if generation == self._generation:  # not restarted meanwhile
                self._hashed += sum(n for _, _, n in current)
                if self._hashed >= self.size and not self._broken and self.hexdigest is None:
                    self.hexdigest = self._hash.hexdigest()
                    self._done.set()
            self._drained.set()
            self._drained = trio.Event()

    def close(self) -> None:
        """The view is gone: end the hashing task (waiting digests fail with the reader)."""
        self._broken = self._closed = True
        self._items.clear()
        self._wake.set()
        self._done.set()
        self._drained.set()

    def _stopped(self) -> bool:
        return self._closed

    @staticmethod
    def _update(h: hashlib._Hash, batch: list[Item], stopped: Callable[[], bool]) -> None:
        for _, data, length in batch:
            if data is not None:
                h.update(data)
                continue
            while length > 0:
                if stopped():  # a long run of zeros must not hold up an unmount
                    return
                h.update(_ZEROS[: min(length, CHUNK)])
                length -= CHUNK

    async def digest(self, read: Callable[[int, int], Awaitable[Buffer]]) -> str:
        """The hex digest: at once if a reader streamed the whole view, else by reading the
        rest of it with `read` (whose reads this stream observes)."""
        if self.hexdigest is not None:
            return self.hexdigest
        self._asked = True
        async with self._lock:
            if self._broken:  # start again from the first byte
                self._generation += 1
                self._hash, self._hashed, self._pos, self._broken = hashlib.sha256(), 0, 0, False
            while self.hexdigest is None and self._pos < self.size and not self._broken:
                while self._queued > QUEUE // 2:
                    await self._drained.wait()  # let the hashing keep up
                pos = self._pos
                if self._next_data is not None:
                    start = await self._next_data(pos)
                    if start is None:  # zeros to the end: hashed without reading them
                        self._queue(None, self.size - pos)
                        break
                    if start > pos:
                        self._queue(None, start - pos)
                    pos = start
                self.observe(pos, await read(pos, min(CHUNK, self.size - pos)))
            if self._broken:
                raise BackendError("another reader broke the checksum stream: read it again")
            if self.size == 0 and self.hexdigest is None:
                self.hexdigest = self._hash.hexdigest()
                self._done.set()
            await self._done.wait()
        if self.hexdigest is None:
            raise BackendError("the backup has ended")
        return self.hexdigest
