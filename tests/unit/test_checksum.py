"""StreamDigest: the sha256 of a view from the reads that stream it, or read afresh."""

from __future__ import annotations

import hashlib
import random

import pytest
import trio

from vcfs import sha256sum
from vcfs.domain import checksum
from vcfs.domain.checksum import QUEUE, StreamDigest

MiB = 1 << 20


class View:
    """An image of bytes with holes; `read` counts what it serves, as a reader would."""

    def __init__(
        self, data: bytes, digest: StreamDigest | None = None, yields: bool = True
    ) -> None:
        self.data = data
        self.digest = digest
        self.yields = yields
        """Whether other tasks run between reads, as between two FUSE requests."""
        self.served = 0

    async def read(self, offset: int, length: int) -> bytes:
        if self.yields:
            await trio.lowlevel.checkpoint()
        chunk = self.data[offset : offset + length]
        self.served += len(chunk)
        if self.digest is not None:
            self.digest.observe(offset, chunk)
        return chunk

    def zero(self, start: int, end: int) -> bool:
        return not self.data[start:end].strip(b"\0")

    async def next_data(self, pos: int) -> int | None:
        rest = self.data[pos:].lstrip(b"\0")
        return None if not rest else len(self.data) - len(rest)


def sparse_image(rng: random.Random, size: int) -> bytes:
    data = bytearray(size)
    for _ in range(8):
        o = rng.randrange(0, size - 4096)
        data[o : o + rng.randrange(1, 4096)] = rng.randbytes(4096)[: rng.randrange(1, 4096)]
    return bytes(data[:size])


def test_a_sequential_reader_makes_the_digest_without_another_read():
    data = random.Random(1).randbytes(3 * MiB + 123)

    async def go() -> None:
        async with trio.open_nursery() as nursery:
            d = StreamDigest(len(data), nursery.start_soon)
            view = View(data, d)
            for off in range(0, len(data), 128 << 10):
                await view.read(off, 128 << 10)
            served = view.served
            assert await d.digest(view.read) == hashlib.sha256(data).hexdigest()
            assert view.served == served  # nothing read again
            d.close()

    trio.run(go)


def test_holes_skipped_like_cp_with_seek_data_count_as_zeros():
    rng = random.Random(2)
    data = sparse_image(rng, 2 * MiB)

    async def go() -> None:
        async with trio.open_nursery() as nursery:
            view = View(data)
            d = StreamDigest(len(data), nursery.start_soon, view.zero, view.next_data)
            view.digest = d
            pos = 0
            while (start := await view.next_data(pos)) is not None:  # cp's walk
                end = start
                while end < len(data) and data[end]:
                    end += 1
                await view.read(start, end - start)
                pos = end
            served = view.served
            assert served < len(data) // 4
            assert await d.digest(view.read) == hashlib.sha256(data).hexdigest()
            assert view.served == served
            d.close()

    trio.run(go)


def test_a_jump_over_unseen_data_breaks_the_stream_and_the_digest_is_read_afresh():
    data = random.Random(3).randbytes(MiB)

    async def go() -> None:
        async with trio.open_nursery() as nursery:
            d = StreamDigest(len(data), nursery.start_soon)
            view = View(data, d)
            await view.read(0, 4096)
            await view.read(8192, 4096)  # 4 KiB of data went by unseen
            await view.read(0, len(data))  # a later reader starts over: too late
            assert d.hexdigest is None
            assert await d.digest(view.read) == hashlib.sha256(data).hexdigest()
            d.close()

    trio.run(go)


def test_an_unread_view_is_read_once_for_its_digest_holes_not_at_all():
    rng = random.Random(4)
    data = sparse_image(rng, 4 * MiB)

    async def go() -> None:
        async with trio.open_nursery() as nursery:
            view = View(data)
            d = StreamDigest(len(data), nursery.start_soon, view.zero, view.next_data)
            view.digest = d
            assert await d.digest(view.read) == hashlib.sha256(data).hexdigest()
            assert view.served < len(data)  # the holes were hashed, not read
            empty = StreamDigest(0, nursery.start_soon)
            assert await empty.digest(view.read) == hashlib.sha256(b"").hexdigest()
            d.close()

    trio.run(go)


def test_a_reader_faster_than_the_hash_gives_the_stream_up_never_waits():
    data = random.Random(5).randbytes(QUEUE + 8 * 4096)

    async def go() -> None:
        async with trio.open_nursery() as nursery:
            d = StreamDigest(len(data), nursery.start_soon)
            view = View(data, d, yields=False)
            for off in range(0, len(data), 4096):  # no checkpoint between: hashing never runs
                await view.read(off, 4096)
            assert d._broken or d.hexdigest  # given up, never waited for
            view.yields = True
            assert await d.digest(view.read) == hashlib.sha256(data).hexdigest()
            d.close()

    trio.run(go)


def test_the_line_is_sha256sum_s_and_its_size_known_before_the_digest():
    line = sha256sum.line("ab" * 32, "vda-mon.qcow2")
    assert line == "ab" * 32 + "  vda-mon.qcow2\n"
    assert sha256sum.line_size("vda-mon.qcow2") == len(line.encode())
    assert sha256sum.parse(line) == ("ab" * 32, "vda-mon.qcow2")
    assert sha256sum.parse("ab" * 32 + " *vda.qcow2\n") == ("ab" * 32, "vda.qcow2")
    for bad in ("", "ab  x\n", "AB" * 32 + "  x\n", "ab" * 32 + "  x\nab\n", "ab" * 32):
        with pytest.raises(ValueError):
            sha256sum.parse(bad)
def test_a_stream_gives_up_rather_than_hash_more_zeros_than_its_budget(monkeypatch):
    monkeypatch.setattr(checksum, "ZERO_BUDGET", MiB)
    data = bytearray(8 * MiB)
    data[:4096] = b"\1" * 4096
    data[-4096:] = b"\2" * 4096
    data = bytes(data)

    async def go() -> None:
        async with trio.open_nursery() as nursery:
            view = View(data)
            d = StreamDigest(len(data), nursery.start_soon, view.zero, view.next_data)
            view.digest = d
            await view.read(0, 4096)  # cp: the first extent, SEEK_DATA, the last one
            await view.read(len(data) - 4096, 4096)
            await trio.sleep(0.05)
            assert d.hexdigest is None  # 8 MiB of zeros were not hashed behind cp's back
            assert await d.digest(view.read) == hashlib.sha256(data).hexdigest()  # when asked
            # It read from each data start (a chunk at a time), never through the long hole.
            assert view.served <= 2 * 4096 + 2 * checksum.CHUNK
            d.close()

    trio.run(go)
