"""The files of one disk of a pull backup: the raw image, a synthesized qcow2, the extent map.

All three read the same NBD export. The qcow2 view's layout needs the whole extent map, so it
is computed on first use (a few block-status round trips), then fixed for the job's life.
Thread rule: trio tasks only.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import trio

from vcfs.domain import qcow2
from vcfs.domain.model import Disk
from vcfs.domain.reader import BlockCache, BlockReader, ExportSource
from vcfs.errors import BackendError

DEFAULT_CLUSTER = 65536


class DiskViews:
    """Raw, qcow2 and map views of one disk's point-in-time image."""

    def __init__(
        self,
        disk: Disk,
        source: ExportSource,
        spawn: Callable[..., None],
        incremental: bool,
        backing: str | None,
        cache: BlockCache,
    ) -> None:
        self.disk = disk
        self.source = source
        self.incremental = incremental
        self.backing = backing
        """File name an incremental image names as its backing file (the base's image)."""
        self._spawn = spawn
        self._cache = cache
        self.raw = BlockReader(disk.size, source.load_raw, spawn, lambda: source.closed, cache)
        self._qcow2: tuple[qcow2.Layout, BlockReader] | None = None
        self._lock = trio.Lock()

    async def qcow2(self) -> tuple[qcow2.Layout, BlockReader]:
        """The synthesized image's layout and reader (computed once)."""
        async with self._lock:
            if self._qcow2 is None:
                cs = self.disk.cluster_size or DEFAULT_CLUSTER
                backing = (self.backing, "qcow2") if self.incremental and self.backing else None
                lay = qcow2.layout(
                    await self.source.extents.all(), self.disk.size, cs, self.incremental, backing
                )

                async def load(start: int, end: int) -> bytes:
                    return await qcow2.read(lay, start, end - start, self.source.read_ranges)

                reader = BlockReader(
                    lay.file_size, load, self._spawn, lambda: self.source.closed, self._cache
                )
                self._qcow2 = (lay, reader)
            return self._qcow2

    async def map_json(self) -> bytes:
        """The extent map in ovirt-imageio's schema, adjacent equal extents merged.

        Rendered once per job: the point-in-time image never changes, and `stat` (for the
        file's exact size) asks for it as often as `cat` does.
        """
        cached: bytes | None = getattr(self, "_map_json", None)
        if cached is not None:
            return cached
        extents = [
            {"start": e.start, "length": e.length, "zero": e.zero, "dirty": e.dirty}
            for e in await self.source.extents.all()
        ]
        merged: list[dict[str, object]] = []
        for e in extents:
            last = merged[-1] if merged else None
            if last and (last["zero"], last["dirty"]) == (e["zero"], e["dirty"]):
                last["length"] = int(last["length"]) + int(e["length"])  # type: ignore[call-overload]
            else:
                merged.append(e)
        self._map_json = (json.dumps(merged, indent=None) + "\n").encode()
        return self._map_json

    async def seek_raw(self, offset: int, data: bool) -> int | None:
        """lseek's SEEK_DATA (`data`) / SEEK_HOLE on the raw image, from the extent map."""
        if self.source.closed:
            raise BackendError("the backup has ended")
        return await self.source.extents.seek(offset, data)

    def allocated(self) -> int:
        """Bytes of the raw image that hold data: exact once the map is known, else estimated."""
        known = self.source.extents.known()
        if known is None:
            return min(self.disk.allocated, self.disk.size)
        return sum(e.length for e in known if not e.zero)

    @property
    def bytes_served(self) -> int:
        """Bytes read through any view (the pull job's progress)."""
        return self.raw.bytes_served + (self._qcow2[1].bytes_served if self._qcow2 else 0)

    def close(self) -> None:
        """End all reading: every waiting or later read fails with EIO."""
        self.source.close()
        self.raw.close()
        if self._qcow2:
            self._qcow2[1].close()
