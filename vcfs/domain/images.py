"""What the tree may ask of a backup's disk views: images and the small files beside them.

The tree shows these, and knows nothing else of how they are made (NBD reads, block caches,
qcow2 synthesis, checksum streams): `views.DiskViews` provides them, tests provide fakes.
Thread rule: trio tasks only.
"""

from __future__ import annotations

from typing import Protocol

from vcfs.domain.reader import Buffer


class Image(Protocol):
    """A read-only disk image of fixed size, read at any offset, with its extents."""

    @property
    def size(self) -> int:
        """The image's length in bytes; it never changes."""
        ...

    def allocated(self) -> int:
        """Bytes that hold data (for `st_blocks`), without I/O: exact or an estimate."""
        ...

    async def read(self, offset: int, size: int) -> Buffer:
        """Up to `size` bytes at `offset` (fewer only at the end)."""
        ...

    async def seek(self, offset: int, data: bool) -> int | None:
        """lseek's SEEK_DATA (`data`) / SEEK_HOLE: the first offset at or after `offset`
        holding data or reading as zeros (the end counts as zeros); None past the end or when
        no data follows."""
        ...


class Document(Protocol):
    """A small read-only file rendered whole (an extent map, a checksum line)."""

    @property
    def size(self) -> int | None:
        """The length every rendering has, when known before the content (a checksum line,
        whose content may need a whole image read); None: only the content tells."""
        ...

    async def content(self) -> bytes:
        """The file's bytes."""
        ...


class AllData:
    """An image with no holes: `seek` of an `Image` whose extents are not known."""

    def __init__(self, size: int) -> None:
        self.size = size

    async def seek(self, offset: int, data: bool) -> int | None:
        """All data to the end, then nothing."""
        if offset >= self.size:
            return None
        return offset if data else self.size
