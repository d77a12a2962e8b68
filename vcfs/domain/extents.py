"""Extent maps of point-in-time images, fetched lazily in windows and searched by bisection.

An extent says whether a range reads as zeros (`zero`) and whether it changed since the
backup's base (`dirty`; in a full backup every non-zero extent is dirty). The map never scans a
whole disk up front: the first lookup in a window fetches that window only.
Thread rule: trio tasks only; `fetch` may run anywhere.
"""

from __future__ import annotations

import bisect
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

import trio

WINDOW = 128 << 20
"""Small enough that the first lookup of a fragmented image answers quickly, large enough that
sequential readers ask for few windows."""


@dataclass(frozen=True)
class Extent:
    """A run of bytes that all read alike: zeros or data, changed or not."""

    start: int
    length: int
    zero: bool
    dirty: bool
    hole: bool = False
    """Unallocated in the image (reads as zero); a zero extent may also be allocated zeros."""

    @property
    def end(self) -> int:
        return self.start + self.length


def merge_adjacent(extents: Iterable[Extent]) -> list[Extent]:
    """Join neighbours with equal flags (the map's JSON form and the qcow2 layout use this)."""
    out: list[Extent] = []
    for e in extents:
        if e.length <= 0:
            continue
        last = out[-1] if out else None
        if last and last.end == e.start and (last.zero, last.dirty, last.hole) == (
            e.zero, e.dirty, e.hole
        ):
            out[-1] = Extent(last.start, last.length + e.length, e.zero, e.dirty, e.hole)
        else:
            out.append(e)
    return out


def clip(extents: Iterable[Extent], start: int, end: int) -> list[Extent]:
    """The parts of `extents` inside [start, end)."""
    out = []
    for e in extents:
        s, t = max(e.start, start), min(e.end, end)
        if s < t:
            out.append(Extent(s, t - s, e.zero, e.dirty, e.hole))
    return out


Fetch = Callable[[int, int], Awaitable[list[Extent]]]


class ExtentMap:
    """The extents of an image of `size` bytes, fetched per window on first use."""

    def __init__(self, size: int, fetch: Fetch, window: int = WINDOW) -> None:
        self.size = size
        self._fetch = fetch
        self._window = window
        self._windows: dict[int, tuple[list[int], list[Extent]]] = {}
        self._locks: dict[int, trio.Lock] = {}

    async def _load(self, w: int) -> tuple[list[int], list[Extent]]:
        loaded = self._windows.get(w)
        if loaded is not None:
            return loaded
        lock = self._locks.setdefault(w, trio.Lock())
        async with lock:
            loaded = self._windows.get(w)
            if loaded is not None:
                return loaded
            start = w * self._window
            end = min(start + self._window, self.size)
            extents: list[Extent] = []
            pos = start
            # A server may describe less than it was asked for: ask again from where it stopped.
            while pos < end:
                got = clip(await self._fetch(pos, end - pos), pos, end)
                if not got or got[0].start != pos:
                    raise ValueError(f"extent fetch at {pos} returned no extent starting there")
                extents.extend(got)
                pos = got[-1].end
            extents = merge_adjacent(extents)
            loaded = ([e.start for e in extents], extents)
            self._windows[w] = loaded
            return loaded

    async def range(self, start: int, end: int) -> list[Extent]:
        """The extents covering [start, end), clipped to it."""
        end = min(end, self.size)
        out: list[Extent] = []
        pos = start
        while pos < end:
            starts, extents = await self._load(pos // self._window)
            i = bisect.bisect_right(starts, pos) - 1
            while i < len(extents) and pos < end:
                e = extents[i]
                take_end = min(e.end, end)
                out.append(Extent(pos, take_end - pos, e.zero, e.dirty, e.hole))
                pos = take_end
                i += 1
        return merge_adjacent(out)

    def known(self) -> list[Extent] | None:
        """Every extent, if every window has been fetched; else None."""
        count = -(-self.size // self._window)
        if len(self._windows) < count:
            return None
        return merge_adjacent(e for w in range(count) for e in self._windows[w][1])

    async def all(self) -> list[Extent]:
        """Every extent of the image (fetching what is missing)."""
        return await self.range(0, self.size)
