"""The FUSE handlers called directly, without the kernel, over a tree of plain nodes.

The middle tier between the pure logic and the real mounts: what each handler answers, which
errno each failure becomes, which failures reach `<dom>/errors` (the `reports` of the fake
tree), and that nothing but FUSEError ever leaves a handler.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Awaitable, Callable, Iterator

import pyfuse3
import pytest

from tests.unit.treefakes import (
    FakeDir,
    FakeImage,
    FakeTree,
    Renders,
    Submits,
    boom,
    ctx,
    run,
    setattr_fields,
)
from vcfs.domain.reader import Buffer
from vcfs.errors import Busy, InvalidInput, NotFound
from vcfs.fs import ops as ops_module
from vcfs.fs.ops import IMAGE_BLKSIZE, Operations
from vcfs.tree.nodes import MAX_REQUEST, ControlFile, ImageFile, Link, ReadFile

MTIME = 1_700_000_000.0
ROOT = pyfuse3.ROOT_INODE


class World:
    """`dom/` with every kind of node, an Operations over it, and helpers to reach them."""

    def __init__(self, cache_images: bool = False) -> None:
        self.status = Renders(b"state: running\n")
        self.lines = Submits()
        self.documents = Submits()
        self.image = FakeImage(b"\1" * 8192 + bytes(8192) + b"\2" * 4096, holes=[(8192, 16384)])
        self.checkpoints = FakeDir(allow_mkdir=True)
        self.dom = FakeDir(
            {
                "status": ReadFile(self.status, MTIME),
                "sum": ReadFile(Renders(b"abc  vda\n"), MTIME, size=9),
                "delete": ControlFile(self.lines, MTIME),
                "new": ControlFile(self.documents, MTIME, closed_element),
                "vda": ImageFile(self.image, MTIME),
                "current": Link("cp1", MTIME),
                "checkpoints": self.checkpoints,
            }
        )
        self.tree = FakeTree(FakeDir({"dom": self.dom}))
        self.ops = Operations(self.tree, cache_images)

    def lookup(self, *path: str, pid: int = 100) -> pyfuse3.EntryAttributes:
        inode = ROOT
        attr = None
        for name in path:
            attr = run(self.ops.lookup, inode, name.encode(), ctx(pid))
            inode = attr.st_ino
        assert attr is not None
        return attr

    def ino(self, *path: str) -> int:
        return self.lookup(*path).st_ino

    def open(self, *path: str, flags: int = os.O_RDONLY, pid: int = 100) -> int:
        return run(self.ops.open, self.ino(*path), flags, ctx(pid)).fh

    def listing(self, *path: str, start: int = 0, room: int = 100) -> list[tuple[str, int]]:
        """(name, next id) of each entry readdir gives, at most `room` of them."""
        got: list[tuple[str, int]] = []

        def reply(token: object, name: bytes, attr: object, next_id: int) -> bool:
            if len(got) >= room:
                return False
            got.append((name.decode(), next_id))
            return True

        fh = run(self.ops.opendir, self.ino(*path) if path else ROOT, ctx())
        mp = pytest.MonkeyPatch()
        mp.setattr(pyfuse3, "readdir_reply", reply)
        try:
            run(self.ops.readdir, fh, start, object())
        finally:
            mp.undo()
            run(self.ops.releasedir, fh)
        return got


def closed_element(buffer: bytes) -> bool:
    """Whether `buffer` holds a whole (toy) document: `<x/>` or `<x>…</x>`."""
    return buffer.rstrip().endswith(b"/>") or b"</" in buffer


def fuse_errno(fn: Callable[..., Awaitable[object]], *args: object) -> int:
    """The errno a handler call fails with."""
    with pytest.raises(pyfuse3.FUSEError) as info:
        run(fn, *args)
    return info.value.errno


@pytest.fixture
def w() -> World:
    return World()


@pytest.fixture(autouse=True)
def no_unexpected_errors(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """An expected failure is reported, never logged as a traceback: any ERROR fails the test
    unless the test itself inspects the log (and clears it)."""
    with caplog.at_level(logging.WARNING, logger="vcfs"):
        yield
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


# ---- metadata ---------------------------------------------------------------------------------


def test_lookup_gives_each_kind_its_mode_and_size(w: World) -> None:
    status = w.lookup("dom", "status")
    assert status.st_mode == 0o100444 and status.st_size == len(b"state: running\n")
    assert status.st_blocks == 1 and status.st_blksize == 4096
    assert status.attr_timeout == 0 and status.entry_timeout == 0
    assert w.lookup("dom", "sum").st_size == 9
    assert w.lookup("dom", "delete").st_mode == 0o100200
    assert w.lookup("dom", "delete").st_size == 0
    link = w.lookup("dom", "current")
    assert link.st_mode == 0o120777 and link.st_size == len("cp1")
    d = w.lookup("dom", "checkpoints")
    assert d.st_mode == 0o040755 and d.st_nlink == 2
    assert d.st_mtime_ns == int(MTIME * 1e9)


def test_an_image_reports_its_allocation_and_is_cached(w: World) -> None:
    attr = w.lookup("dom", "vda")
    assert attr.st_mode == 0o100400
    assert attr.st_size == 20480
    assert attr.st_blocks == (20480 - 8192) // 512  # the hole is not allocated: cp goes sparse
    assert attr.st_blksize == IMAGE_BLKSIZE
    assert attr.attr_timeout == attr.entry_timeout == ops_module.IMAGE_TIMEOUT


def test_a_file_of_known_size_is_not_rendered_by_stat(w: World) -> None:
    sums = Renders(b"abc  vda\n")
    w.dom.children["sum"] = ReadFile(sums, MTIME, size=9)
    w.lookup("dom", "sum")
    run(w.ops.getattr, w.ino("dom", "sum"), ctx())
    assert sums.calls == 0


def test_inodes_are_stable_and_getattr_agrees_with_lookup(w: World) -> None:
    ino = w.ino("dom", "status")
    assert w.ino("dom", "status") == ino
    assert run(w.ops.getattr, ino, ctx()).st_size == w.lookup("dom", "status").st_size


def test_a_missing_name_is_enoent_and_not_reported(w: World) -> None:
    assert fuse_errno(w.ops.lookup, w.ino("dom"), b"nothing", ctx()) == errno.ENOENT
    assert w.tree.reports == []


def test_an_unknown_inode_is_estale(w: World) -> None:
    assert fuse_errno(w.ops.getattr, 999, ctx()) == errno.ESTALE


def test_a_lookup_failure_becomes_its_errno_and_a_report(w: World) -> None:
    w.dom.fail["status"] = Busy("a backup is running")
    assert fuse_errno(w.ops.lookup, w.ino("dom"), b"status", ctx()) == errno.EBUSY
    assert w.tree.reports == [(("dom", "status"), "EBUSY", "a backup is running")]


def test_a_getattr_failure_is_reported_not_logged_as_a_bug(w: World) -> None:
    """Fixed: getattr had no mapping, so an expected backend error was logged as an
    unexpected traceback (and recorded nowhere)."""
    ino = w.ino("dom", "status")
    w.dom.fail["status"] = boom()
    assert fuse_errno(w.ops.getattr, ino, ctx()) == errno.EIO
    assert w.tree.reports == [(("dom", "status"), "EIO", "nbd connection lost")]


def test_a_rendering_failure_in_stat_is_reported(w: World) -> None:
    w.status.fail = NotFound("no backup '3'")
    assert fuse_errno(w.ops.lookup, w.ino("dom"), b"status", ctx()) == errno.ENOENT
    assert w.tree.reports == [(("dom", "status"), "ENOENT", "no backup '3'")]


def test_readlink(w: World) -> None:
    assert run(w.ops.readlink, w.ino("dom", "current"), ctx()) == b"cp1"
    assert fuse_errno(w.ops.readlink, w.ino("dom", "status"), ctx()) == errno.EINVAL


def test_readlink_failure_is_reported(w: World) -> None:
    ino = w.ino("dom", "current")
    w.dom.fail["current"] = boom()
    assert fuse_errno(w.ops.readlink, ino, ctx()) == errno.EIO
    assert w.tree.reports == [(("dom", "current"), "EIO", "nbd connection lost")]


def test_truncating_a_control_file_to_zero_is_allowed_and_nothing_else(w: World) -> None:
    attr = pyfuse3.EntryAttributes()
    attr.st_size = 0
    truncate = setattr_fields(update_size=True)
    ino = w.ino("dom", "delete")
    assert run(w.ops.setattr, ino, attr, truncate, None, ctx()).st_ino == ino
    chmod = setattr_fields(update_size=True, update_mode=True)
    assert fuse_errno(w.ops.setattr, ino, attr, chmod, None, ctx()) == errno.EPERM
    status = w.ino("dom", "status")
    assert fuse_errno(w.ops.setattr, status, attr, truncate, None, ctx()) == errno.EPERM
    attr.st_size = 5
    assert fuse_errno(w.ops.setattr, ino, attr, truncate, None, ctx()) == errno.EPERM


def test_statfs_and_forget(w: World) -> None:
    assert run(w.ops.statfs, ctx()).f_namemax == 255
    ino = w.ino("dom", "status")
    run(w.ops.forget, [(ino, 1)])


# ---- directories ------------------------------------------------------------------------------


def test_readdir_lists_in_inode_order_and_resumes_after_an_id(w: World) -> None:
    names = list(w.dom.children)
    whole = w.listing("dom")
    assert sorted(n for n, _ in whole) == sorted(names)
    ids = [i for _, i in whole]
    assert ids == sorted(ids)
    first = w.listing("dom", room=3)
    assert first == whole[:3]
    assert w.listing("dom", start=first[-1][1]) == whole[3:]


def test_readdir_offsets_survive_an_entry_vanishing(w: World) -> None:
    whole = w.listing("dom")
    del w.dom.children[whole[0][0]]
    assert w.listing("dom", start=whole[1][1]) == whole[2:]


def test_readdir_skips_a_name_that_vanished_between_names_and_child(w: World) -> None:
    class Stale(FakeDir):
        async def names(self) -> list[str]:
            return ["gone", *self.children]

    w.tree.root.children["stale"] = Stale({"a": Link("x", MTIME)})
    assert [n for n, _ in w.listing("stale")] == ["a"]


def test_a_child_failure_in_readdir_is_reported_at_the_directory(w: World) -> None:
    """Fixed: the child loop had no mapping; a backend error was logged as a traceback."""
    w.dom.fail["vda"] = boom()
    fh = run(w.ops.opendir, w.ino("dom"), ctx())
    assert fuse_errno(w.ops.readdir, fh, 0, object()) == errno.EIO
    assert w.tree.reports == [(("dom",), "EIO", "nbd connection lost")]


def test_a_names_failure_in_readdir_is_reported(w: World) -> None:
    w.dom.fail_names = Busy("busy")
    fh = run(w.ops.opendir, w.ino("dom"), ctx())
    assert fuse_errno(w.ops.readdir, fh, 0, object()) == errno.EBUSY
    assert w.tree.reports == [(("dom",), "EBUSY", "busy")]


def test_opendir_of_a_file_is_enotdir_and_its_failure_reported(w: World) -> None:
    assert fuse_errno(w.ops.opendir, w.ino("dom", "status"), ctx()) == errno.ENOTDIR
    ino = w.ino("dom", "checkpoints")
    w.dom.fail["checkpoints"] = boom()
    assert fuse_errno(w.ops.opendir, ino, ctx()) == errno.EIO
    assert w.tree.reports == [(("dom", "checkpoints"), "EIO", "nbd connection lost")]


def test_mkdir_and_rmdir_are_delegated_to_the_parent(w: World) -> None:
    parent = w.ino("dom", "checkpoints")
    attr = run(w.ops.mkdir, parent, b"mon", 0o755, ctx())
    assert attr.st_mode == 0o040755
    assert w.checkpoints.made == ["mon"]
    run(w.ops.rmdir, parent, b"mon", ctx())
    assert w.checkpoints.removed == ["mon"]
    assert w.tree.reports == []


def test_mkdir_failures_are_reported_at_the_new_name(w: World) -> None:
    parent = w.ino("dom", "checkpoints")
    w.checkpoints.mkdir_error = InvalidInput("bad name")
    assert fuse_errno(w.ops.mkdir, parent, b"a b", 0o755, ctx()) == errno.EINVAL
    assert fuse_errno(w.ops.rmdir, parent, b"none", ctx()) == errno.ENOENT
    assert fuse_errno(w.ops.mkdir, w.ino("dom"), b"x", 0o755, ctx()) == errno.EPERM
    assert fuse_errno(w.ops.mkdir, w.ino("dom", "status"), b"x", 0o755, ctx()) == errno.ENOTDIR
    assert w.tree.reports == [
        (("dom", "checkpoints", "a b"), "EINVAL", "bad name"),
        (("dom", "checkpoints", "none"), "ENOENT", "no 'none'"),
        (("dom", "x"), "EPERM", "cannot create a directory here"),
    ]


# ---- files ------------------------------------------------------------------------------------


def test_open_checks_the_access_mode_per_kind(w: World) -> None:
    status, delete = w.ino("dom", "status"), w.ino("dom", "delete")
    vda, cps = w.ino("dom", "vda"), w.ino("dom", "checkpoints")
    assert fuse_errno(w.ops.open, status, os.O_WRONLY, ctx()) == errno.EACCES
    assert fuse_errno(w.ops.open, delete, os.O_RDWR, ctx()) == errno.EACCES
    assert fuse_errno(w.ops.open, vda, os.O_WRONLY, ctx()) == errno.EACCES
    assert fuse_errno(w.ops.open, cps, os.O_RDONLY, ctx()) == errno.EISDIR
    assert fuse_errno(w.ops.open, w.ino("dom", "current"), os.O_RDONLY, ctx()) == errno.EINVAL
    for ino, flags in ((status, os.O_RDONLY), (delete, os.O_WRONLY), (delete, os.O_RDONLY)):
        assert run(w.ops.open, ino, flags, ctx()).direct_io


def test_images_use_direct_io_unless_caching_is_asked_for() -> None:
    plain, cached = World(), World(cache_images=True)
    assert run(plain.ops.open, plain.ino("dom", "vda"), os.O_RDONLY, ctx()).direct_io
    info = run(cached.ops.open, cached.ino("dom", "vda"), os.O_RDONLY, ctx())
    assert info.keep_cache and not info.direct_io


def test_a_read_file_handle_keeps_its_snapshot(w: World) -> None:
    fh = w.open("dom", "status")
    w.status.content = b"state: finished, with a longer line\n"
    assert run(w.ops.read, fh, 0, 100) == b"state: running\n"
    assert run(w.ops.read, fh, 7, 4) == b"runn"
    assert w.open("dom", "status") != fh
    assert run(w.ops.read, w.open("dom", "status"), 0, 100) == w.status.content


def test_fstat_of_the_opener_sees_its_handles_snapshot_others_a_fresh_one(w: World) -> None:
    ino = w.ino("dom", "status")
    w.open("dom", "status", pid=7)
    before = len(w.status.content)
    w.status.content = b"state: finished\nerror: none at all\n"
    assert run(w.ops.getattr, ino, ctx(7)).st_size == before
    assert run(w.ops.getattr, ino, ctx(8)).st_size == len(w.status.content)


def test_the_newest_handle_of_the_opener_wins(w: World) -> None:
    ino = w.ino("dom", "status")
    w.open("dom", "status", pid=7)
    w.status.content = b"second\n"
    second = w.open("dom", "status", pid=7)
    w.status.content = b"third, longest of all\n"
    assert run(w.ops.getattr, ino, ctx(7)).st_size == len(b"second\n")
    run(w.ops.release, second)
    assert run(w.ops.getattr, ino, ctx(7)).st_size == len(b"state: running\n")


def test_an_open_failure_is_reported(w: World) -> None:
    ino = w.ino("dom", "status")
    w.status.fail = boom()
    assert fuse_errno(w.ops.open, ino, os.O_RDONLY, ctx()) == errno.EIO
    assert w.tree.reports == [(("dom", "status"), "EIO", "nbd connection lost")]


def test_an_image_reads_at_any_offset(w: World) -> None:
    fh = w.open("dom", "vda")
    assert bytes(run(w.ops.read, fh, 8190, 4)) == b"\1\1\0\0"
    assert bytes(run(w.ops.read, fh, 20000, 1000)) == b"\2" * 480


def test_an_image_read_failure_is_eio_and_reported(w: World) -> None:
    fh = w.open("dom", "vda")
    w.image.fail = boom()
    assert fuse_errno(w.ops.read, fh, 0, 4096) == errno.EIO
    assert w.tree.reports == [(("dom", "vda"), "EIO", "nbd connection lost")]


def test_lseek_on_an_image_follows_its_extents(w: World) -> None:
    fh = w.open("dom", "vda")
    assert run(w.ops.lseek, fh, 0, os.SEEK_DATA, ctx()) == 0
    assert run(w.ops.lseek, fh, 100, os.SEEK_HOLE, ctx()) == 8192
    assert run(w.ops.lseek, fh, 9000, os.SEEK_DATA, ctx()) == 16384
    assert run(w.ops.lseek, fh, 16384, os.SEEK_HOLE, ctx()) == 20480
    assert fuse_errno(w.ops.lseek, fh, 20480, os.SEEK_DATA, ctx()) == errno.ENXIO
    assert fuse_errno(w.ops.lseek, fh, 0, os.SEEK_SET, ctx()) == errno.EINVAL
    assert w.tree.reports == []
    w.image.fail = boom()
    assert fuse_errno(w.ops.lseek, fh, 0, os.SEEK_DATA, ctx()) == errno.EIO
    assert w.tree.reports == [(("dom", "vda"), "EIO", "nbd connection lost")]


def test_lseek_on_a_read_file_finds_all_data(w: World) -> None:
    fh = w.open("dom", "status")
    size = len(w.status.content)
    assert run(w.ops.lseek, fh, 3, os.SEEK_DATA, ctx()) == 3
    assert run(w.ops.lseek, fh, 3, os.SEEK_HOLE, ctx()) == size
    assert fuse_errno(w.ops.lseek, fh, size, os.SEEK_DATA, ctx()) == errno.ENXIO


def test_a_line_framed_control_file_submits_each_complete_line(w: World) -> None:
    fh = w.open("dom", "delete", flags=os.O_WRONLY)
    assert run(w.ops.write, fh, 0, b"metadata") == 8
    assert w.lines.requests == []
    run(w.ops.write, fh, 8, b"-only\nchildren\npart")
    assert w.lines.requests == [b"metadata-only", b"children"]
    assert fuse_errno(w.ops.flush, fh) == errno.EINVAL  # "part" never ended
    assert w.tree.reports == [
        (("dom", "delete"), "EINVAL",
         "incomplete request at close (no complete document or line)")
    ]
    run(w.ops.flush, fh)  # the rest was dropped: a second close is clean
    run(w.ops.release, fh)


def test_a_document_control_file_submits_the_whole_document(w: World) -> None:
    fh = w.open("dom", "new", flags=os.O_WRONLY)
    run(w.ops.write, fh, 0, b"<a>\n")
    run(w.ops.write, fh, 4, b"</a>\n")
    assert w.documents.requests == [b"<a>\n</a>\n"]
    run(w.ops.flush, fh)
    assert w.tree.reports == []


def test_a_failed_request_is_reported_and_the_buffer_moves_on(w: World) -> None:
    fh = w.open("dom", "delete", flags=os.O_WRONLY)
    w.lines.fail = InvalidInput("unknown mode 'x'")
    assert fuse_errno(w.ops.write, fh, 0, b"x\n") == errno.EINVAL
    assert w.tree.reports == [(("dom", "delete"), "EINVAL", "unknown mode 'x'")]
    w.lines.fail = None
    run(w.ops.write, fh, 2, b"ok\n")
    assert w.lines.requests == [b"ok"]


def test_a_too_large_request_is_efbig_and_dropped(w: World) -> None:
    fh = w.open("dom", "new", flags=os.O_WRONLY)
    chunk = b"x" * (1 << 16)
    for off in range(0, MAX_REQUEST, len(chunk)):
        run(w.ops.write, fh, off, chunk)
    assert fuse_errno(w.ops.write, fh, MAX_REQUEST, b"y") == errno.EFBIG
    assert w.tree.reports[0][:2] == (("dom", "new"), "EFBIG")
    run(w.ops.flush, fh)  # nothing left to complain about
    assert len(w.tree.reports) == 1


def test_a_malformed_document_is_dropped_whole(w: World) -> None:
    def complete(buffer: bytes) -> bool:
        if buffer.startswith(b"<!"):
            raise InvalidInput("malformed XML")
        return closed_element(buffer)

    w.dom.children["new"] = ControlFile(w.documents, MTIME, complete)
    fh = w.open("dom", "new", flags=os.O_WRONLY)
    assert fuse_errno(w.ops.write, fh, 0, b"<!x") == errno.EINVAL
    run(w.ops.write, fh, 3, b"<a/>")
    assert w.documents.requests == [b"<a/>"]


# ---- the mapping itself -----------------------------------------------------------------------


def test_an_unexpected_exception_is_eio_and_logged(
    w: World, caplog: pytest.LogCaptureFixture
) -> None:
    ino = w.ino("dom", "status")
    w.status.fail = RuntimeError("a bug")  # type: ignore[assignment]
    w.status.content = b""
    assert fuse_errno(w.ops.getattr, ino, ctx()) == errno.EIO
    assert "unexpected error in getattr" in caplog.text
    assert w.tree.reports == []
    caplog.clear()


def test_a_failure_whose_handle_is_gone_is_still_mapped(w: World) -> None:
    """`where` cannot name the path of a released handle: the error is mapped all the same."""
    class ReleasedWhileRead(FakeImage):
        async def read(self, offset: int, size: int) -> Buffer:
            await w.ops.release(fh)
            raise boom()

    w.dom.children["vda"] = ImageFile(ReleasedWhileRead(bytes(4096)), MTIME)
    fh = w.open("dom", "vda")
    assert fuse_errno(w.ops.read, fh, 0, 1) == errno.EIO
    assert w.tree.reports == [((), "EIO", "nbd connection lost")]


@pytest.mark.parametrize(
    "name", ["lookup", "getattr", "setattr", "readlink", "opendir", "readdir", "mkdir", "rmdir",
             "open", "read", "lseek", "write", "flush", "forget", "statfs", "release",
             "releasedir"]
)
def test_every_handler_is_guarded(name: str) -> None:
    assert getattr(Operations, name).__wrapped__ is not None
