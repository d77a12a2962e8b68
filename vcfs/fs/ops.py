"""pyfuse3 Operations over the tree: a thin, typed protocol adapter.

Each request resolves its path from the root and asks the node. Every handler is
`errnos.guarded`, the one place where a domain error becomes its errno, recorded in the domain's
`errors` against the path the request is about (`at_inode`, `at_entry`, `at_handle`); any other
exception is logged and becomes EIO, since a handler must never take the mount down.
Thread rule: trio tasks on the pyfuse3 main loop.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import pyfuse3
import trio

from vcfs.errors import InvalidInput, TooLarge, VcfsError
from vcfs.fs.errnos import guarded
from vcfs.fs.inodes import InodeTable
from vcfs.tree.nodes import MAX_REQUEST, ControlFile, Dir, ImageFile, Kind, Link, Node, ReadFile

log = logging.getLogger(__name__)

# Nothing is cached by the kernel: lookups are in-memory and cheap, and checkpoints, `current`
# and domains change under the kernel's feet.
ENTRY_TIMEOUT = 0.0
ATTR_TIMEOUT = 0.0
IMAGE_TIMEOUT = 3600.0
IMAGE_BLKSIZE = 1 << 20

KIND_BITS = {Kind.DIR: 0o040000, Kind.FILE: 0o100000, Kind.LINK: 0o120000}


class Tree(Protocol):
    """What the handlers ask of the tree (`fstree.Tree`; a fake in the handler tests)."""

    async def resolve(self, path: Sequence[str]) -> Node | None:
        """The node at `path`, or None."""
        ...

    def report(self, path: Sequence[str], code: str, message: str) -> None:
        """Record a failed request about `path` in its domain's `errors`."""
        ...


def at_inode(ops: Operations, inode: int, *_: Any) -> Sequence[str]:
    """A request about an inode (getattr, open, opendir, …)."""
    return ops._path(inode)


def at_entry(ops: Operations, parent_inode: int, name: bytes, *_: Any) -> Sequence[str]:
    """A request about a name in a directory (lookup, mkdir, rmdir)."""
    return (*ops._path(parent_inode), os.fsdecode(name))


def at_handle(ops: Operations, fh: int, *_: Any) -> Sequence[str]:
    """A request about an open handle (read, write, readdir, …)."""
    return ops._handles[fh].path


@dataclass
class Handle:
    """An open file: the rendered content of a ReadFile, or a control file's request buffer."""

    path: tuple[str, ...]
    node: Node
    content: bytes = b""
    buffer: bytearray = field(default_factory=bytearray)
    pid: int = 0
    """The process that opened a ReadFile: its `fstat` reports this handle's content."""


class Operations(pyfuse3.Operations):
    """The FUSE request handlers."""

    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, tree: Tree, cache_images: bool = False) -> None:
        super().__init__()
        self.tree = tree
        self.cache_images = cache_images
        self.inodes = InodeTable()
        self._handles: dict[int, Handle] = {}
        self._next_fh = 1
        self._uid = os.getuid()
        self._gid = os.getgid()
        self.initialized = trio.Event()

    def init(self) -> None:
        """The kernel's INIT request is being answered."""
        self.initialized.set()

    # ---- helpers ----------------------------------------------------------------------------

    def _path(self, inode: int) -> tuple[str, ...]:
        path = self.inodes.path(inode)
        if path is None:
            raise pyfuse3.FUSEError(errno.ESTALE)
        return path

    async def _node(self, path: tuple[str, ...]) -> Node:
        node = await self.tree.resolve(path)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    async def _content(self, path: tuple[str, ...], node: Node, pid: int) -> bytes | None:
        """What a read of `node` returns, for its st_size; None when it is not a ReadFile.

        A process that holds the file open gets its handle's snapshot: rsync and tar size their
        reads by `fstat`, which must agree with what that handle reads even if the content
        (status, errors) changed since. Anyone else gets a fresh rendering, as `open` makes.
        """
        if not isinstance(node, ReadFile) or node.size is not None:
            return None
        for fh in sorted(self._handles, reverse=True):  # the newest handle first
            h = self._handles[fh]
            if h.pid == pid and h.path == path and isinstance(h.node, ReadFile):
                return h.content
        return await node.render()

    def _attr(
        self, path: tuple[str, ...], node: Node, content: bytes | None = None
    ) -> pyfuse3.EntryAttributes:
        """The attributes of `node`; a ReadFile's size is that of `content` (see `_content`)."""
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = self.inodes.inode(path)
        attr.generation = 0
        # Images never change while they exist: without cached attributes the kernel would ask
        # for them again before every read.
        timeout = IMAGE_TIMEOUT if isinstance(node, ImageFile) else ATTR_TIMEOUT
        attr.entry_timeout = timeout
        attr.attr_timeout = timeout
        attr.st_mode = KIND_BITS[node.kind] | node.mode
        attr.st_nlink = 2 if node.kind is Kind.DIR else 1
        attr.st_uid = self._uid
        attr.st_gid = self._gid
        attr.st_rdev = 0
        attr.st_size = 0
        attr.st_blocks = 0
        if isinstance(node, Link):
            attr.st_size = len(node.target.encode())
        elif isinstance(node, ImageFile):
            attr.st_size = node.image.size
            # The allocated size, so that `cp` makes a sparse copy.
            attr.st_blocks = -(-node.image.allocated() // 512)
        elif isinstance(node, ReadFile) and (content is not None or node.size is not None):
            size = node.size if node.size is not None else len(content or b"")
            attr.st_size = size
            attr.st_blocks = -(-size // 512)  # all data: no tool takes it for sparse
        # cp and rsync size their reads by st_blksize: 1 MiB reads cost a quarter of the
        # per-request overhead of 256 KiB ones.
        attr.st_blksize = IMAGE_BLKSIZE if isinstance(node, ImageFile) else 4096
        ns = int(node.mtime * 1e9)
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = ns
        return attr

    def _new_handle(self, handle: Handle) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = handle
        return fh

    # ---- metadata ---------------------------------------------------------------------------

    @guarded(at_entry)
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        path = (*self._path(parent_inode), os.fsdecode(name))
        node = await self._node(path)
        attr = self._attr(path, node, await self._content(path, node, ctx.pid))
        self.inodes.remember(attr.st_ino)
        return attr

    @guarded(at_inode)
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        path = self._path(inode)
        node = await self._node(path)
        return self._attr(path, node, await self._content(path, node, ctx.pid))

    @guarded(at_inode)
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        path = self._path(inode)
        node = await self._node(path)
        # `echo … > new` truncates before writing: truncating a control file is a no-op.
        only_truncate = fields.update_size and not (
            fields.update_mode or fields.update_uid or fields.update_gid
        )
        if not (isinstance(node, ControlFile) and only_truncate and attr.st_size == 0):
            raise pyfuse3.FUSEError(errno.EPERM)
        return self._attr(path, node)

    @guarded(at_inode)
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        node = await self._node(self._path(inode))
        if not isinstance(node, Link):
            raise pyfuse3.FUSEError(errno.EINVAL)
        return os.fsencode(node.target)

    @guarded(None)
    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for inode, count in inode_list:
            self.inodes.forget(inode, count)

    @guarded(None)
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        st = pyfuse3.StatvfsData()
        st.f_bsize = st.f_frsize = 4096
        st.f_namemax = 255
        return st

    # ---- directories ------------------------------------------------------------------------

    @guarded(at_inode)
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        path = self._path(inode)
        node = await self._node(path)
        if not isinstance(node, Dir):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return self._new_handle(Handle(path, node))

    @guarded(at_handle)
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        handle = self._handles[fh]
        node = handle.node
        assert isinstance(node, Dir)
        names = await node.names()
        # Offsets are inode numbers, listed in inode order: stable even when entries come and
        # go between two calls, unlike list positions.
        entries = []
        for name in names:
            path = (*handle.path, name)
            child = await node.child(name)
            if child is not None:
                entries.append((self.inodes.inode(path), name, path, child))
        entries.sort(key=lambda e: e[0])
        for ino, name, path, child in entries:
            if ino <= start_id:
                continue
            # A ReadFile's size is left out here: rendering every file of a listing would cost
            # what `ls` need not pay, and its attributes are never cached (ATTR_TIMEOUT 0), so
            # the kernel asks getattr before anyone sees an st_size.
            if not pyfuse3.readdir_reply(token, os.fsencode(name), self._attr(path, child), ino):
                break
            self.inodes.remember(ino)

    @guarded(None)
    async def releasedir(self, fh: int) -> None:
        self._handles.pop(fh, None)

    async def _parent_dir(self, parent_inode: int, name: bytes) -> tuple[Dir, tuple[str, ...]]:
        parent_path = self._path(parent_inode)
        parent = await self._node(parent_path)
        if not isinstance(parent, Dir):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return parent, (*parent_path, os.fsdecode(name))

    async def _act(self, what: str, path: tuple[str, ...], action: Awaitable[object]) -> None:
        """Run a mutation; log it with its duration, failed or not."""
        started = time.monotonic()
        try:
            await action
        except VcfsError:  # reported by `guarded`
            log.info("%s %s failed (%.1f ms)", what, "/".join(path),
                     (time.monotonic() - started) * 1e3)
            raise
        log.info("%s %s (%.1f ms)", what, "/".join(path), (time.monotonic() - started) * 1e3)

    @guarded(at_entry)
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent, path = await self._parent_dir(parent_inode, name)
        await self._act("mkdir", path, parent.mkdir(path[-1]))
        attr = self._attr(path, await self._node(path))
        self.inodes.remember(attr.st_ino)
        return attr

    @guarded(at_entry)
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        parent, path = await self._parent_dir(parent_inode, name)
        await self._act("rmdir", path, parent.rmdir(path[-1]))

    # ---- files ------------------------------------------------------------------------------

    @guarded(at_inode)
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        path = self._path(inode)
        node = await self._node(path)
        access = flags & os.O_ACCMODE
        handle = Handle(path, node)
        if isinstance(node, ReadFile):
            if access != os.O_RDONLY:
                raise pyfuse3.FUSEError(errno.EACCES)
            # One rendering per handle: every read of it, and its opener's fstat, see one
            # consistent snapshot.
            handle.content = await node.render()
            handle.pid = ctx.pid
        elif isinstance(node, ControlFile):
            # Write-only, but a read-only open reads it as empty (its st_size is 0), so that
            # `rsync -a`, `cp -a` and `tar` of a whole domain copy it instead of failing on it.
            if access == os.O_RDWR:
                raise pyfuse3.FUSEError(errno.EACCES)
        elif isinstance(node, ImageFile):
            if access != os.O_RDONLY:
                raise pyfuse3.FUSEError(errno.EACCES)
            # Point-in-time images never change, so the page cache could keep them; but filling
            # it costs more than the read (343 MB/s against 1.3 GB/s with direct I/O, measured
            # on a 4 GiB image here), and a backup is read once. Caching is a mount option.
            fh = self._new_handle(handle)
            if self.cache_images:
                return pyfuse3.FileInfo(fh=fh, keep_cache=True)
            return pyfuse3.FileInfo(fh=fh, direct_io=True)
        else:
            raise pyfuse3.FUSEError(errno.EISDIR if node.kind is Kind.DIR else errno.EINVAL)
        # Direct I/O: the kernel reads this handle's snapshot to its end, whatever size a stat
        # made before the content changed (status, errors) reported; no stale page cache.
        return pyfuse3.FileInfo(fh=self._new_handle(handle), direct_io=True)

    @guarded(at_handle)
    async def read(self, fh: int, off: int, size: int) -> bytes:
        handle = self._handles[fh]
        if isinstance(handle.node, ImageFile):
            # pyfuse3 sends any buffer (bytes, bytearray, memoryview) without a copy.
            return await handle.node.image.read(off, size)  # type: ignore[return-value]
        return handle.content[off : off + size]

    @guarded(at_handle)
    async def lseek(self, fh: int, offset: int, whence: int, ctx: pyfuse3.RequestContext) -> int:
        # The kernel forwards only SEEK_DATA and SEEK_HOLE (it answers SEEK_SET/CUR/END).
        # Images answer from their extents, so `cp`, `tar --sparse` and `qemu-img convert`
        # skip holes without reading them; other files are all data.
        handle = self._handles[fh]
        node = handle.node
        data = whence == os.SEEK_DATA
        if not data and whence != os.SEEK_HOLE:
            raise pyfuse3.FUSEError(errno.EINVAL)
        if isinstance(node, ImageFile):
            found = await node.image.seek(offset, data)
        else:
            size = len(handle.content)
            found = None if offset >= size else offset if data else size
        if found is None:
            raise pyfuse3.FUSEError(errno.ENXIO)
        return found

    @guarded(at_handle)
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        handle = self._handles[fh]
        node = handle.node
        assert isinstance(node, ControlFile)
        handle.buffer += buf
        try:
            if len(handle.buffer) > MAX_REQUEST:
                raise TooLarge(f"request larger than {MAX_REQUEST} bytes")
            requests, rest = node.split(bytes(handle.buffer))
            handle.buffer[:] = rest
        except VcfsError:
            handle.buffer.clear()  # a malformed request is dropped whole, not retried
            raise
        for request in requests:
            await self._act("write", handle.path, node.submit(request))
        return len(buf)

    @guarded(at_handle)
    async def flush(self, fh: int) -> None:
        handle = self._handles[fh]
        if isinstance(handle.node, ControlFile) and bytes(handle.buffer).strip():
            handle.buffer.clear()
            raise InvalidInput("incomplete request at close (no complete document or line)")

    @guarded(None)
    async def release(self, fh: int) -> None:
        self._handles.pop(fh, None)
