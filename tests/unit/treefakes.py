"""Fakes for the middle tier: the node tree without services, and services without QEMU.

`FakeTree` stands where `fstree.Tree` stands for `fs.ops.Operations`: a root of plain nodes,
and the failures reported to it. `FakeHost` and its `FakeDomain`s stand where the domain's
services stand for `fstree`: they answer what the tree asks and record what it asked for.
Thread rule: trio tasks only, like the code they stand in for.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import trio

from vcfs.domain.errorlog import ErrorLog
from vcfs.domain.reader import Buffer
from vcfs.errors import AlreadyExists, BackendError, NotFound, VcfsError
from vcfs.tree.nodes import Dir, Node


def run(fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
    """Run one coroutine function to its end in a fresh trio loop."""
    return trio.run(fn, *args)


def ctx(pid: int = 100) -> Any:
    """A pyfuse3 RequestContext (its fields are read-only in pyfuse3's own class)."""
    return SimpleNamespace(pid=pid, uid=0, gid=0, umask=0o022)


def setattr_fields(**set_: bool) -> Any:
    """A pyfuse3 SetattrFields with the given `update_*` flags on."""
    names = ("update_atime", "update_mtime", "update_ctime", "update_mode", "update_uid",
             "update_gid", "update_size")
    return SimpleNamespace(**{n: set_.get(n, False) for n in names})


# ---- images --------------------------------------------------------------------------------


class FakeImage:
    """An `images.Image` over bytes in memory; `holes` are [start, end) ranges of zeros."""

    def __init__(self, data: bytes, holes: Sequence[tuple[int, int]] = ()) -> None:
        self.data = data
        self.holes = sorted(holes)
        self.fail: VcfsError | None = None
        """Raised by every read and seek (the backup ended, NBD broke)."""
        self.reads: list[tuple[int, int]] = []

    @property
    def size(self) -> int:
        return len(self.data)

    def allocated(self) -> int:
        return self.size - sum(end - start for start, end in self.holes)

    async def read(self, offset: int, size: int) -> Buffer:
        if self.fail:
            raise self.fail
        self.reads.append((offset, size))
        return memoryview(self.data)[offset : offset + size]

    async def seek(self, offset: int, data: bool) -> int | None:
        if self.fail:
            raise self.fail
        if offset >= self.size:
            return None
        hole = next(((s, e) for s, e in self.holes if s <= offset < e), None)
        if data:
            if hole is None:
                return offset
            return hole[1] if hole[1] < self.size else None
        if hole is not None:
            return offset
        return min((s for s, _ in self.holes if s > offset), default=self.size)


@dataclass
class FakeDocument:
    """An `images.Document`: fixed content, its size known in advance or not."""

    data: bytes
    known_size: bool = False
    renders: int = 0

    @property
    def size(self) -> int | None:
        return len(self.data) if self.known_size else None

    async def content(self) -> bytes:
        self.renders += 1
        return self.data


# ---- a tree of plain nodes, for fs.ops ------------------------------------------------------


class FakeDir(Dir):
    """A directory of given children; `fail` maps a child's name to the error looking it up
    raises; mkdir and rmdir are recorded, or refused when `allow_mkdir` is off."""

    def __init__(self, children: dict[str, Node] | None = None, *, allow_mkdir: bool = False):
        super().__init__(1_700_000_000.0)
        self.children: dict[str, Node] = children or {}
        self.fail: dict[str, VcfsError] = {}
        self.fail_names: VcfsError | None = None
        self.allow_mkdir = allow_mkdir
        self.made: list[str] = []
        self.removed: list[str] = []
        self.mkdir_error: VcfsError | None = None

    async def names(self) -> list[str]:
        if self.fail_names:
            raise self.fail_names
        return list(self.children)

    async def child(self, name: str) -> Node | None:
        if name in self.fail:
            raise self.fail[name]
        return self.children.get(name)

    async def mkdir(self, name: str) -> None:
        if not self.allow_mkdir:
            await super().mkdir(name)
        if self.mkdir_error:
            raise self.mkdir_error
        self.made.append(name)
        self.children[name] = FakeDir()

    async def rmdir(self, name: str) -> None:
        if not self.allow_mkdir:
            await super().rmdir(name)
        if name not in self.children:
            raise NotFound(f"no '{name}'")
        self.removed.append(name)
        del self.children[name]


class FakeTree:
    """What `Operations` needs of a tree: `resolve` and `report`, over a root `FakeDir`."""

    def __init__(self, root: FakeDir) -> None:
        self.root = root
        self.reports: list[tuple[tuple[str, ...], str, str]] = []

    async def resolve(self, path: Sequence[str]) -> Node | None:
        node: Node | None = self.root
        for name in path:
            if not isinstance(node, Dir):
                return None
            node = await node.child(name)
        return node

    def report(self, path: Sequence[str], code: str, message: str) -> None:
        self.reports.append((tuple(path), code, message))


class Renders:
    """A ReadFile's render function whose content the test changes between calls."""

    def __init__(self, content: bytes) -> None:
        self.content = content
        self.fail: VcfsError | None = None
        self.calls = 0

    async def __call__(self) -> bytes:
        self.calls += 1
        if self.fail:
            raise self.fail
        return self.content


class Submits:
    """A ControlFile's submit function: records each request, or raises `fail`."""

    def __init__(self) -> None:
        self.requests: list[bytes] = []
        self.fail: VcfsError | None = None

    async def __call__(self, request: bytes) -> None:
        if self.fail:
            raise self.fail
        self.requests.append(request)


# ---- services, for fstree -------------------------------------------------------------------


@dataclass
class FakeCheckpoint:
    """What the tree reads of a checkpoint: its creation time and parent."""

    name: str
    parent: str | None = None
    creation_time: int | None = 1_700_000_100

    @property
    def definition(self) -> SimpleNamespace:
        return SimpleNamespace(creation_time=self.creation_time)


class FakeCheckpoints:
    """A checkpoint service that records the calls the tree makes."""

    def __init__(self) -> None:
        self.cps: dict[str, FakeCheckpoint] = {}
        self.current: str | None = None
        self.calls: list[tuple[Any, ...]] = []

    def add(self, name: str, parent: str | None = None) -> None:
        self.cps[name] = FakeCheckpoint(name, parent)
        self.current = name

    def names(self) -> list[str]:
        return list(self.cps)

    def get(self, name: str) -> FakeCheckpoint | None:
        return self.cps.get(name)

    async def xml(self, name: str) -> bytes:
        return f"<domaincheckpoint><name>{name}</name></domaincheckpoint>".encode()

    async def sizes(self, name: str) -> dict[str, int]:
        return {"vda": 4096, "vdb": 0}

    async def create(self, document: bytes) -> str:
        self.calls.append(("create", document))
        return "cp"

    async def redefine(self, document: bytes) -> str:
        self.calls.append(("redefine", document))
        return "cp"

    async def create_default(self, name: str) -> None:
        if name in self.cps:
            raise AlreadyExists(f"checkpoint '{name}' already exists")
        self.calls.append(("create_default", name))

    @staticmethod
    def parse_delete_modes(line: str) -> set[str]:
        return set(line.split())

    async def delete(self, name: str, modes: Any = ()) -> None:
        self.calls.append(("delete", name, set(modes)))


class FakeViews:
    """What the tree asks of one disk's views (`views.DiskViews`' public interface)."""

    def __init__(self, data: bytes) -> None:
        self.raw = FakeImage(data)
        self.qcow2_image = FakeImage(b"QFI\xfb" + bytes(1020))
        self.extent_map = FakeDocument(b'[{"start": 0}]\n')
        self.raw_checksum = FakeDocument(b"0" * 64 + b"  vda\n", known_size=True)
        self.qcow2_checksum = FakeDocument(b"1" * 64 + b"  vda.qcow2\n", known_size=True)

    async def qcow2(self) -> FakeImage:
        return self.qcow2_image


@dataclass
class FakeDiskJob:
    target: str


@dataclass
class FakeJob:
    id: str
    disks: list[FakeDiskJob]
    started: float = 1_700_000_200.0


class FakeBackups:
    """A backup service with jobs whose disks may have views (pull) or not (push)."""

    def __init__(self) -> None:
        self.jobs: dict[str, FakeJob] = {}
        self._views: dict[tuple[str, str], FakeViews] = {}
        self.latest: str | None = None
        self.calls: list[tuple[Any, ...]] = []

    def add(self, job_id: str, views: dict[str, FakeViews | None]) -> None:
        self.jobs[job_id] = FakeJob(job_id, [FakeDiskJob(t) for t in views])
        for target, v in views.items():
            if v is not None:
                self._views[job_id, target] = v
        self.latest = job_id

    def names(self) -> list[str]:
        return list(self.jobs)

    def get(self, job_id: str) -> FakeJob | None:
        return self.jobs.get(job_id)

    def xml(self, job_id: str) -> bytes:
        return f"<domainbackup id='{job_id}'/>".encode()

    async def status(self, job_id: str) -> bytes:
        return b"state: running\n"

    def views(self, job_id: str, target: str) -> FakeViews:
        if job_id not in self.jobs or (job_id, target) not in self._views:
            raise NotFound(f"backup '{job_id}' exports no disk '{target}'")
        return self._views[job_id, target]

    async def begin(self, document: bytes) -> str:
        self.calls.append(("begin", document))
        return "1"

    async def begin_default(self, job_id: str) -> None:
        self.calls.append(("begin_default", job_id))

    async def end(self, job_id: str) -> None:
        self.calls.append(("end", job_id))


@dataclass
class FakeDomain:
    """A domain as the tree sees it: its services, error log and whether QMP is up."""

    name: str
    checkpoints: FakeCheckpoints = field(default_factory=FakeCheckpoints)
    backups: FakeBackups = field(default_factory=FakeBackups)
    errors: ErrorLog = field(default_factory=ErrorLog)
    connected: bool = True
    created: float = 1_700_000_000.0

    async def xml(self) -> bytes:
        return f"<domain>info of {self.name}</domain>".encode()

    def report(self, path: str, code: str, message: str) -> None:
        self.errors.add(path, code, message)


class FakeHost:
    """The domains shown; `refresh` records its calls and may bring `pending` domains in."""

    def __init__(self, *domains: FakeDomain) -> None:
        self.domains = {d.name: d for d in domains}
        self.pending: dict[str, FakeDomain] = {}
        self.refreshes: list[float] = []

    def names(self) -> list[str]:
        return sorted(self.domains)

    def get(self, name: str) -> FakeDomain | None:
        return self.domains.get(name)

    async def refresh(self, max_age: float = 0.5) -> None:
        self.refreshes.append(max_age)
        self.domains.update(self.pending)
        self.pending.clear()


class FakeCodec:
    """The codec's members the tree uses."""

    @staticmethod
    def document_complete(buffer: bytes) -> bool:
        return buffer.rstrip().endswith(b">")


def boom() -> BackendError:
    """A backend failure (EIO), as a lost NBD connection raises it."""
    return BackendError("nbd connection lost")

