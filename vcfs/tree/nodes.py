"""Generic node kinds of the vcfs tree.

Nodes are cheap, short-lived views built on each lookup from the services' state; the FUSE
layer resolves a path from the root for every request, so nothing here caches or goes stale.
Thread rule: trio tasks only.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from vcfs.domain.images import Image
from vcfs.errors import NotPermitted

MAX_REQUEST = 1 << 20
"""A control-file request larger than this fails with EFBIG."""


class Kind(enum.Enum):
    """What a node is to the kernel."""

    DIR = "dir"
    FILE = "file"
    LINK = "link"


@dataclass
class Node:
    """Base of every node: its kind, permission bits and modification time."""

    kind: Kind
    mode: int
    mtime: float


class Dir(Node):
    """A directory. Subclasses list and look up children, and may allow mkdir/rmdir."""

    def __init__(self, mtime: float) -> None:
        super().__init__(Kind.DIR, 0o755, mtime)

    async def names(self) -> list[str]:
        """The children's names."""
        raise NotImplementedError

    async def child(self, name: str) -> Node | None:
        """The child called `name`, or None."""
        raise NotImplementedError

    async def mkdir(self, name: str) -> None:
        """Create a child directory; refused unless a subclass allows it."""
        raise NotPermitted("cannot create a directory here")

    async def rmdir(self, name: str) -> None:
        """Remove a child directory; refused unless a subclass allows it."""
        raise NotPermitted("cannot remove this directory")


class ReadFile(Node):
    """A read-only file whose content is rendered when it is opened.

    `size`, when given, is the length every rendering has: `stat` then need not render (a
    checksum file whose rendering may read a whole disk image).
    """

    def __init__(
        self,
        render: Callable[[], Awaitable[bytes]],
        mtime: float,
        mode: int = 0o444,
        size: int | None = None,
    ):
        super().__init__(Kind.FILE, mode, mtime)
        self.render = render
        self.size = size


class ControlFile(Node):
    """A write-only file that acts on each complete request written to it.

    `complete(buffer)` says whether the buffer holds a whole request (a complete XML document)
    and may raise on malformed input; line-framed files treat each newline-terminated line as
    one request.
    """

    def __init__(
        self,
        submit: Callable[[bytes], Awaitable[object]],
        mtime: float,
        complete: Callable[[bytes], bool] | None = None,
    ) -> None:
        super().__init__(Kind.FILE, 0o200, mtime)
        self.submit = submit
        self._complete = complete

    def split(self, buffer: bytes) -> tuple[list[bytes], bytes]:
        """The complete requests in `buffer`, and what remains incomplete."""
        if self._complete is not None:
            return ([buffer], b"") if self._complete(buffer) else ([], buffer)
        *lines, rest = buffer.split(b"\n")
        return lines, rest


class Link(Node):
    """A symbolic link."""

    def __init__(self, target: str, mtime: float) -> None:
        super().__init__(Kind.LINK, 0o777, mtime)
        self.target = target


class ImageFile(Node):
    """A read-only disk image of known size, read at any offset (immutable: cacheable)."""

    def __init__(self, image: Image, mtime: float) -> None:
        super().__init__(Kind.FILE, 0o400, mtime)
        self.image = image
