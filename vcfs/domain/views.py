"""The files of one disk of a pull backup: the raw image, a synthesized qcow2, the extent map,
and a sha256 of each image.

All read the same NBD export. The qcow2 view's layout needs the whole extent map, so it is
computed on first use (a few block-status round trips), then fixed for the job's life. Each
image's checksum is taken while a reader streams it (see `checksum.StreamDigest`).
The tree sees only the `images.Image` and `images.Document` interfaces `DiskViews` hands out.
Thread rule: trio tasks only.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

import trio

from vcfs import sha256sum
from vcfs.domain import qcow2
from vcfs.domain.checksum import StreamDigest
from vcfs.domain.images import Document, Image
from vcfs.domain.model import Disk
from vcfs.domain.qcow2 import Layout
from vcfs.domain.reader import BlockCache, BlockReader, Buffer, ExportSource
from vcfs.errors import BackendError

DEFAULT_CLUSTER = 65536


class RawImage:
    """The disk as the guest saw it at the backup's point in time; holes from the extent map."""

    def __init__(self, disk: Disk, source: ExportSource, reader: BlockReader) -> None:
        self._disk = disk
        self._source = source
        self._reader = reader

    @property
    def size(self) -> int:
        return self._disk.size

    def allocated(self) -> int:
        """Exact once the extent map is known; until then QEMU's figure for the image file,
        so that a `stat` never waits for the map."""
        known = self._source.extents.known()
        if known is None:
            return min(self._disk.allocated, self._disk.size)
        return sum(e.length for e in known if not e.zero)

    async def read(self, offset: int, size: int) -> Buffer:
        return await self._reader.read(offset, size)

    async def seek(self, offset: int, data: bool) -> int | None:
        if self._source.closed:
            raise BackendError("the backup has ended")
        return await self._source.extents.seek(offset, data)


class Qcow2Image:
    """The synthesized qcow2 file: every byte of it is data (its holes are in its tables)."""

    def __init__(self, layout: Layout, reader: BlockReader) -> None:
        self._layout = layout
        self._reader = reader

    @property
    def size(self) -> int:
        return self._layout.file_size

    def allocated(self) -> int:
        return self._layout.file_size

    async def read(self, offset: int, size: int) -> Buffer:
        return await self._reader.read(offset, size)

    async def seek(self, offset: int, data: bool) -> int | None:
        if offset >= self.size:
            return None
        return offset if data else self.size


class RenderedDocument:
    """A `Document` rendered by a coroutine function, of a size known in advance or not."""

    def __init__(self, render: Callable[[], Awaitable[bytes]], size: int | None = None) -> None:
        self._render = render
        self._size = size

    @property
    def size(self) -> int | None:
        return self._size

    async def content(self) -> bytes:
        return await self._render()


class DiskViews:
    """Raw, qcow2 and map views of one disk's point-in-time image.

    What the tree shows: `raw`, `qcow2()`, `extent_map`, `raw_checksum`, `qcow2_checksum`.
    What the backup job reads and does: `bytes_served`, `nbd_bytes`, `close()`.
    """

    def __init__(
        self,
        disk: Disk,
        source: ExportSource,
        spawn: Callable[..., None],
        incremental: bool,
        backing: str | None,
        cache: BlockCache,
        saved_name: str | None = None,
    ) -> None:
        self._disk = disk
        self._source = source
        self._incremental = incremental
        self._backing = backing
        """File name an incremental image names as its backing file (the base's image)."""
        self._spawn = spawn
        self._cache = cache
        self._raw = BlockReader(disk.size, source.load_raw, spawn, lambda: source.closed, cache)
        self._raw_digest = StreamDigest(
            disk.size, spawn, source.extents.known_zero,
            lambda pos: source.extents.seek(pos, True),
        )
        self._raw.observe = self._raw_digest.observe
        self._qcow2_name = saved_name or f"{disk.target}.qcow2"
        """The qcow2 image's name as saved (the naming convention), in its checksum line."""
        self._qcow2: tuple[Layout, BlockReader, StreamDigest] | None = None
        self._lock = trio.Lock()
        self._map_cache: bytes | None = None
        self.raw: Image = RawImage(disk, source, self._raw)
        """The raw point-in-time image (`<disk>`)."""
        self.extent_map: Document = RenderedDocument(self._render_map)
        """`<disk>.map`: the extents, JSON."""
        # A checksum line's length is known before its digest: `stat` must not read a disk.
        self.raw_checksum: Document = RenderedDocument(
            self._raw_sha256, sha256sum.line_size(disk.target)
        )
        """`<disk>.sha256`."""
        self.qcow2_checksum: Document = RenderedDocument(
            self._qcow2_sha256, sha256sum.line_size(self._qcow2_name)
        )
        """`<disk>.qcow2.sha256`."""

    async def qcow2(self) -> Image:
        """The synthesized qcow2 image (`<disk>.qcow2`; its layout computed on first use)."""
        lay, reader, _ = await self._qcow2_views()
        return Qcow2Image(lay, reader)

    async def _qcow2_views(self) -> tuple[Layout, BlockReader, StreamDigest]:
        async with self._lock:
            if self._qcow2 is None:
                cs = self._disk.cluster_size or DEFAULT_CLUSTER
                backing = (self._backing, "qcow2") if self._incremental and self._backing else None
                extents = await self._source.extents.all()
                lay = qcow2.layout(extents, self._disk.size, cs, self._incremental, backing)

                async def load(start: int, end: int) -> Buffer:
                    return await qcow2.read(lay, start, end - start, self._source.read_ranges)

                reader = BlockReader(
                    lay.file_size, load, self._spawn, lambda: self._source.closed, self._cache
                )
                digest = StreamDigest(lay.file_size, self._spawn)  # no holes: all read
                reader.observe = digest.observe
                self._qcow2 = (lay, reader, digest)
            return self._qcow2

    async def _raw_sha256(self) -> bytes:
        """`sha256sum` of the raw image: at once after one whole sequential read (holes
        skipped by SEEK_DATA count as zeros), else by reading the rest of it now."""
        digest = await self._raw_digest.digest(self._raw.read)
        return sha256sum.line(digest, self._disk.target).encode()

    async def _qcow2_sha256(self) -> bytes:
        """`sha256sum` of the qcow2 image, named as saved (see `_raw_sha256`)."""
        _, reader, stream = await self._qcow2_views()
        return sha256sum.line(await stream.digest(reader.read), self._qcow2_name).encode()

    async def _render_map(self) -> bytes:
        """The extent map in ovirt-imageio's schema, adjacent equal extents merged.

        Rendered once per job: the point-in-time image never changes, and `stat` (for the
        file's exact size) asks for it as often as `cat` does.
        """
        if self._map_cache is not None:
            return self._map_cache
        merged: list[dict[str, int | bool]] = []
        for e in await self._source.extents.all():
            last = merged[-1] if merged else None
            if last and (last["zero"], last["dirty"]) == (e.zero, e.dirty):
                last["length"] += e.length
            else:
                merged.append(
                    {"start": e.start, "length": e.length, "zero": e.zero, "dirty": e.dirty}
                )
        self._map_cache = (json.dumps(merged, indent=None) + "\n").encode()
        return self._map_cache

    @property
    def nbd_bytes(self) -> int:
        """Bytes read from NBD for any view (zeros and cached blocks cost none)."""
        return self._source.nbd_bytes

    @property
    def bytes_served(self) -> int:
        """Bytes read through any view (the pull job's progress)."""
        return self._raw.bytes_served + (self._qcow2[1].bytes_served if self._qcow2 else 0)

    def close(self) -> None:
        """End all reading: every waiting or later read fails with EIO."""
        self._source.close()
        self._raw.close()
        self._raw_digest.close()
        if self._qcow2:
            self._qcow2[1].close()
            self._qcow2[2].close()
