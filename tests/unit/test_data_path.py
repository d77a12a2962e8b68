"""The data path without NBD or FUSE: extent maps fetched in windows, the block reader."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest
import trio

from vcfs.domain.extents import MAX_FETCH, Extent, ExtentMap, merge_adjacent
from vcfs.domain.reader import BLOCK, BlockCache, BlockReader, ExportSource, Pieces
from vcfs.errors import BackendError

MiB = 1 << 20


class FakeExport:
    """An export over bytes, describing extents in pieces of at most `piece` bytes."""

    def __init__(self, data: bytes, piece: int = 3 * MiB) -> None:
        self.data = data
        self.size = len(data)
        self.piece = piece
        self.reads: list[tuple[int, int]] = []
        self.status_calls: list[tuple[int, int]] = []
        self.closed = False

    def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        if self.closed:
            raise BackendError("closed")
        self.reads.extend(ranges)
        return [self.data[o : o + n] for o, n in ranges]

    def block_status(self, offset: int, length: int) -> list[Extent]:
        self.status_calls.append((offset, length))
        end = min(offset + length, offset + self.piece, self.size)
        out, pos = [], offset
        while pos < end:  # runs of zero / non-zero 64 KiB units
            nxt = min(end, (pos // 65536 + 1) * 65536)
            zero = not self.data[pos:nxt].strip(b"\0")
            out.append(Extent(pos, nxt - pos, zero, not zero))
            pos = nxt
        return merge_adjacent(out)

    def close(self) -> None:
        self.closed = True


def image(size: int, written: dict[int, int]) -> bytes:
    data = bytearray(size)
    for off, pattern in written.items():
        data[off : off + 65536] = bytes([pattern]) * 65536
    return bytes(data)


def test_extent_map_fetches_only_the_windows_it_needs():
    data = image(64 * MiB, {0: 1, 40 * MiB: 2})
    export = FakeExport(data)

    async def fetch(off: int, n: int) -> list[Extent]:
        return export.block_status(off, n)

    async def go() -> None:
        m = ExtentMap(len(data), fetch, window=16 * MiB)
        got = await m.range(40 * MiB, 40 * MiB + 65536)
        assert got == [Extent(40 * MiB, 65536, False, True)]
        assert {o // (16 * MiB) for o, _ in export.status_calls} == {2}  # one window only
        assert m.known() is None
        everything = await m.all()
        assert sum(e.length for e in everything) == len(data) and m.known() == everything
        assert [e for e in everything if not e.zero] == [
            Extent(0, 65536, False, True), Extent(40 * MiB, 65536, False, True)]

    trio.run(go)


def test_block_reader_reads_data_and_answers_zeros_without_nbd():
    data = image(32 * MiB, {MiB: 7, 20 * MiB: 9})
    export = FakeExport(data)

    async def go() -> None:
        async with trio.open_nursery() as nursery:
            source = ExportSource(len(data), lambda: export)
            reader = BlockReader(len(data), source.load_raw, nursery.start_soon,
                                 lambda: source.closed, BlockCache())
            out = bytearray()
            for off in range(0, len(data), 300_000):  # unaligned, crossing blocks
                out += await reader.read(off, 300_000)
            assert bytes(out) == data
            # only the two written units went over "NBD", never a zero range
            assert sum(n for _, n in export.reads) == source.nbd_bytes == 2 * 65536
            source.close()
            reader.close()
            with pytest.raises(BackendError):
                await reader.read(0, 4096)

    trio.run(go)


def test_block_reader_prefetches_ahead_of_a_sequential_reader():
    data = image(8 * BLOCK, {k * BLOCK: k + 1 for k in range(8)})
    export = FakeExport(data)

    async def go() -> None:
        async with trio.open_nursery() as nursery:
            source = ExportSource(len(data), lambda: export)
            reader = BlockReader(len(data), source.load_raw, nursery.start_soon,
                                 lambda: source.closed, BlockCache())
            await reader.read(0, 4096)
            # Nothing else reads: whatever arrives was prefetched (waited for, not timed).
            with trio.move_on_after(5):
                while not {o // BLOCK for o, _ in export.reads} >= {0, 1, 2, 3, 4}:
                    await trio.sleep(0.01)
            assert {o // BLOCK for o, _ in export.reads} >= {0, 1, 2, 3, 4}
            source.close()
            reader.close()

    trio.run(go)


class ListedExport:
    """Block status over an extent list (no bytes: disks of any size), answering at most
    `max_extents` extents per call, as a server with a reply limit does."""

    def __init__(self, size: int, data: Sequence[tuple[int, int]], max_extents: int = 10**9):
        self.size = size
        self.data = sorted(data)
        self.max_extents = max_extents
        self.calls: list[tuple[int, int]] = []

    async def fetch(self, offset: int, length: int) -> list[Extent]:
        self.calls.append((offset, length))
        end = min(offset + length, self.size)
        out, pos = [], offset
        for s, n in self.data:
            if s + n <= pos:
                continue
            if s >= end:
                break
            if s > pos:
                out.append(Extent(pos, s - pos, True, False))
            out.append(Extent(max(s, pos), min(s + n, end) - max(s, pos), False, True))
            pos = min(s + n, end)
        if pos < end:
            out.append(Extent(pos, end - pos, True, False))
        return out[: self.max_extents]


GiB, TiB = 1 << 30, 1 << 40


@pytest.mark.parametrize("max_extents", [10**9, 1])
def test_seek_data_and_hole_follow_the_extents(max_extents: int):
    size = 64 * MiB
    export = ListedExport(size, [(0, 65536), (40 * MiB, 65536), (size - 65536, 65536)],
                          max_extents)

    async def go() -> None:
        m = ExtentMap(size, export.fetch, window=16 * MiB)
        assert await m.seek(0, True) == 0
        assert await m.seek(0, False) == 65536
        assert await m.seek(100, False) == 65536
        assert await m.seek(65536, True) == 40 * MiB
        assert await m.seek(40 * MiB + 100, True) == 40 * MiB + 100
        assert await m.seek(40 * MiB + 100, False) == 40 * MiB + 65536
        assert await m.seek(40 * MiB + 65536, True) == size - 65536
        assert await m.seek(size - 1, True) == size - 1
        assert await m.seek(size - 1, False) == size  # the end counts as a hole
        assert await m.seek(size, True) is None  # ENXIO at and past the end
        assert await m.seek(size, False) is None
        assert await m.seek(size + 1, False) is None

    trio.run(go)


def test_seek_on_a_disk_that_is_all_hole():
    export = ListedExport(TiB, [])

    async def go() -> None:
        m = ExtentMap(TiB, export.fetch)
        assert await m.seek(0, True) is None
        assert await m.seek(0, False) == 0
        assert await m.seek(TiB - 1, False) == TiB - 1

    trio.run(go)


def test_sparse_answers_grow_the_fetch_so_a_16_tib_disk_takes_few_round_trips():
    size = 16 * TiB
    data = [(k * 8 * GiB + 12345 * 65536, 65536) for k in range(2000)]
    export = ListedExport(size, data)

    async def go() -> None:
        m = ExtentMap(size, export.fetch)
        everything = await m.all()
        assert [(e.start, e.length) for e in everything if not e.zero] == data
        assert m.known() == everything
        # Lengths double up to the NBD limit: ~4 GiB per answer, not the first 128 MiB.
        assert len(export.calls) <= size // MAX_FETCH + 10
        assert max(n for _, n in export.calls) == MAX_FETCH

    trio.run(go)


def test_dense_answers_shrink_the_fetch_and_short_answers_are_continued():
    size = 4 * GiB
    data = [(k * 256 * 1024, 65536) for k in range(size // (256 * 1024))]  # 16,384 extents
    export = ListedExport(size, data, max_extents=5000)

    async def go() -> None:
        m = ExtentMap(size, export.fetch, window=128 * MiB)
        everything = await m.all()
        assert [(e.start, e.length) for e in everything if not e.zero] == data
        assert max(n for _, n in export.calls) <= 256 * MiB  # never grew past one doubling

    trio.run(go)


def test_block_cache_keeps_to_its_budget_and_evicts_consumed_blocks_first():
    cache = BlockCache(capacity=4 * BLOCK)
    a, b = cache.owner(), cache.owner()
    for k in range(3):
        cache.put((a, k), bytes(BLOCK))
    cache.put((b, 0), bytes(BLOCK))
    cache.consumed((a, 2))  # a streamed past its newest block: it goes before older ones
    cache.put((b, 1), bytes(BLOCK))
    assert (a, 2) not in cache and (a, 0) in cache and (a, 1) in cache
    assert cache.size <= cache.capacity
    for k in range(1000):  # holes cost an entry each, not nothing: bounded all the same
        cache.put((b, 100 + k), None)
    assert cache.size <= cache.capacity
    cache.drop(b)
    assert not any((b, k) in cache for k in range(1100))
    assert cache.get((b, 1)) == (False, None)


def test_readers_sharing_a_small_cache_read_right_and_stay_within_it():
    images = [image(12 * BLOCK, {k * BLOCK + 4096 * n: n + k + 1 for k in range(12)})
              for n in range(3)]
    exports = [FakeExport(d) for d in images]
    cache = BlockCache(capacity=6 * BLOCK, loading=4)
    peak = 0

    async def go() -> None:
        nonlocal peak
        async with trio.open_nursery() as nursery:
            sources = [ExportSource(len(d), lambda e=e: e)
                       for d, e in zip(images, exports, strict=True)]
            readers = [BlockReader(len(d), s.load_raw, nursery.start_soon,
                                   lambda s=s: s.closed, cache)
                       for d, s in zip(images, sources, strict=True)]

            async def read_all(n: int) -> None:
                nonlocal peak
                out = bytearray()
                for off in range(0, len(images[n]), 1 << 20):
                    out += await readers[n].read(off, 1 << 20)
                    peak = max(peak, cache.size)
                assert bytes(out) == images[n]

            async with trio.open_nursery() as inner:
                for n in range(3):
                    inner.start_soon(read_all, n)
            for s, r in zip(sources, readers, strict=True):
                s.close()
                r.close()
        assert cache.size == 0

    trio.run(go)
    assert peak <= 6 * BLOCK


def test_pieces_read_like_the_block_they_stand_for():
    rng = random.Random(7)
    for _ in range(200):
        size = rng.randrange(1, 4096)
        starts = sorted(rng.sample(range(size), rng.randrange(0, min(size, 6) + 1)))
        block, pieces, kept = bytearray(size), [], []
        for i, s in enumerate(starts):  # non-overlapping pieces, maybe touching
            end = starts[i + 1] if i + 1 < len(starts) else size
            n = rng.randrange(1, end - s + 1)
            piece = bytes(rng.randrange(1, 256) for _ in range(n))
            block[s : s + n] = piece
            pieces.append(piece)
            kept.append(s)
        p = Pieces(kept, pieces)
        assert p.nbytes == sum(len(x) for x in pieces)
        for _ in range(20):
            lo = rng.randrange(0, size)
            hi = rng.randrange(lo + 1, size + 1)
            assert bytes(p.slice(lo, hi)) == block[lo:hi]
