"""The vcfs tree of DESIGN.md §1, over a host and its domains' services.

    /<dom>/xml, errors, checkpoints/{new, redefine, current, <name>/{xml, size, parent, delete}}

Each class maps names to nodes and operations to service calls; all semantics live in the
services, which the tree knows only through `vcfs.domain.api`'s Protocols: the QMP backend and
the libvirt one serve the same tree. Thread rule: trio tasks only.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from vcfs.domain.api import BackupEntry, Backups, Checkpoints, DiskFiles, DomainApi, HostApi
from vcfs.domain.ports import Codec
from vcfs.errors import NotFound
from vcfs.tree.nodes import ControlFile, Dir, ImageFile, Link, Node, ReadFile


class Tree:
    """Entry point for the FUSE layer: path resolution and failure reporting."""

    def __init__(self, host: HostApi, codec: Codec) -> None:
        self.host = host
        self.root = RootDir(host, codec, time.time())

    async def resolve(self, path: Sequence[str]) -> Node | None:
        """The node at `path` (a tuple of names from the root), or None."""
        node: Node | None = self.root
        for name in path:
            if not isinstance(node, Dir):
                return None
            node = await node.child(name)
        return node

    def report(self, path: Sequence[str], code: str, message: str) -> None:
        """Record a failed request in its domain's `errors` (requests at the root have none)."""
        if path and (dom := self.host.get(path[0])) is not None:
            dom.report("/".join(path[1:]) or ".", code, message)


class RootDir(Dir):
    """The mount's root: one directory per connected domain."""

    def __init__(self, host: HostApi, codec: Codec, mtime: float) -> None:
        super().__init__(mtime)
        self.host = host
        self.codec = codec

    async def names(self) -> list[str]:
        await self.host.refresh()
        return self.host.names()

    async def child(self, name: str) -> Node | None:
        dom = self.host.get(name)
        if dom is None or not dom.connected:
            # A VM that just appeared, or restarted: connect now rather than at the next scan.
            await self.host.refresh(max_age=0 if dom else 0.5)
            dom = self.host.get(name)
        return DomainDir(dom, self.codec) if dom else None


class DomainDir(Dir):
    """`<dom>/`: the domain XML, its error log, its checkpoints."""

    def __init__(self, dom: DomainApi, codec: Codec) -> None:
        super().__init__(dom.created)
        self.dom = dom
        self.codec = codec

    async def names(self) -> list[str]:
        return ["xml", "errors", "checkpoints", "backups"]

    async def child(self, name: str) -> Node | None:
        dom = self.dom
        if name == "xml":
            return ReadFile(dom.xml, self.mtime)
        if name == "errors":
            return ReadFile(lambda: _value(dom.errors.render()), self.mtime)
        if name == "checkpoints":
            return CheckpointsDir(dom, self.codec)
        if name == "backups":
            return BackupsDir(dom, self.codec)
        return None


class CheckpointsDir(Dir):
    """`<dom>/checkpoints/`: `mkdir` creates with defaults, `rmdir` deletes."""

    def __init__(self, dom: DomainApi, codec: Codec) -> None:
        super().__init__(dom.created)
        self.cps: Checkpoints = dom.checkpoints
        self.codec = codec

    async def names(self) -> list[str]:
        fixed = ["new", "redefine"] + (["current"] if self.cps.current else [])
        return fixed + self.cps.names()

    async def child(self, name: str) -> Node | None:
        if name == "new":
            return ControlFile(self.cps.create, self.mtime, self.codec.document_complete)
        if name == "redefine":
            return ControlFile(self.cps.redefine, self.mtime, self.codec.document_complete)
        if name == "current":
            return Link(self.cps.current, self.mtime) if self.cps.current else None
        cp = self.cps.get(name)
        if cp is None:
            return None
        return CheckpointDir(self.cps, name, float(cp.definition.creation_time or self.mtime))

    async def mkdir(self, name: str) -> None:
        await self.cps.create_default(name)

    async def rmdir(self, name: str) -> None:
        await self.cps.delete(name)


class CheckpointDir(Dir):
    """`<dom>/checkpoints/<name>/`."""

    def __init__(self, cps: Checkpoints, name: str, mtime: float) -> None:
        super().__init__(mtime)
        self.cps = cps
        self.name = name

    async def names(self) -> list[str]:
        cp = self.cps.get(self.name)
        return ["xml", "size", "delete"] + (["parent"] if cp and cp.parent else [])

    async def child(self, name: str) -> Node | None:
        cps, me = self.cps, self.name
        if name == "xml":
            return ReadFile(lambda: cps.xml(me), self.mtime)
        if name == "size":
            return ReadFile(lambda: self._sizes(), self.mtime)
        if name == "delete":
            return ControlFile(self._delete, self.mtime)
        if name == "parent":
            cp = cps.get(me)
            return Link(f"../{cp.parent}", self.mtime) if cp and cp.parent else None
        return None

    async def _sizes(self) -> bytes:
        sizes = await self.cps.sizes(self.name)
        return "".join(f"{disk} {size}\n" for disk, size in sizes.items()).encode()

    async def _delete(self, line: bytes) -> None:
        modes = self.cps.parse_delete_modes(line.decode(errors="replace"))
        await self.cps.delete(self.name, modes)


class BackupsDir(Dir):
    """`<dom>/backups/`: `new` begins a job, `mkdir` a default full pull, `rmdir` ends one."""

    def __init__(self, dom: DomainApi, codec: Codec) -> None:
        super().__init__(dom.created)
        self.backups: Backups = dom.backups
        self.codec = codec

    async def names(self) -> list[str]:
        return ["new"] + (["latest"] if self.backups.latest else []) + self.backups.names()

    async def child(self, name: str) -> Node | None:
        if name == "new":
            return ControlFile(self.backups.begin, self.mtime, self.codec.document_complete)
        if name == "latest":
            latest = self.backups.latest
            return Link(latest, self.mtime) if latest else None
        job = self.backups.get(name)
        return BackupDir(self.backups, job) if job else None

    async def mkdir(self, name: str) -> None:
        await self.backups.begin_default(name)

    async def rmdir(self, name: str) -> None:
        await self.backups.end(name)


class BackupDir(Dir):
    """`<dom>/backups/<id>/`."""

    def __init__(self, backups: Backups, job: BackupEntry) -> None:
        super().__init__(job.started)
        self.backups = backups
        self.job = job

    async def names(self) -> list[str]:
        return ["xml", "status", "disks"]

    async def child(self, name: str) -> Node | None:
        job_id = self.job.id
        if name == "xml":
            return ReadFile(lambda: _value(self.backups.xml(job_id)), self.mtime)
        if name == "status":
            return ReadFile(lambda: self.backups.status(job_id), self.mtime)
        if name == "disks":
            return DisksDir(self.backups, self.job, self.mtime)
        return None


class DisksDir(Dir):
    """`<dom>/backups/<id>/disks/`: per disk of a pull backup, `<disk>` (the raw
    point-in-time image), `<disk>.qcow2` (synthesized), `<disk>.map` (extents, JSON), and
    `<disk>.sha256` / `<disk>.qcow2.sha256` (each image's checksum, sha256sum format)."""

    SUFFIXES = ("", ".qcow2", ".map", ".sha256", ".qcow2.sha256")
    KINDS = ("qcow2.sha256", "sha256", "qcow2", "map")
    """The suffixes of `child`, longest first: `vda.qcow2.sha256` is not a `.sha256` of
    `vda.qcow2`."""

    def __init__(self, backups: Backups, job: BackupEntry, mtime: float) -> None:
        super().__init__(mtime)
        self.backups = backups
        self.job = job

    def _views(self, target: str) -> DiskFiles | None:
        try:
            return self.backups.views(self.job.id, target)
        except NotFound:  # a push job's disk, or the job has ended
            return None

    async def names(self) -> list[str]:
        return [
            f"{d.target}{suffix}"
            for d in self.job.disks
            if self._views(d.target) is not None
            for suffix in self.SUFFIXES
        ]

    async def child(self, name: str) -> Node | None:
        kind = next((k for k in self.KINDS if name.endswith(f".{k}")), "")
        target = name[: -len(kind) - 1] if kind else name
        views = self._views(target)
        if views is None:
            return None
        if kind == "":
            return ImageFile(views.raw, self.mtime)
        if kind == "qcow2":
            return ImageFile(await views.qcow2(), self.mtime)
        document = {
            "map": views.extent_map,
            "sha256": views.raw_checksum,
            "qcow2.sha256": views.qcow2_checksum,
        }[kind]
        return ReadFile(document.content, self.mtime, size=document.size)


async def _value(data: bytes) -> bytes:
    return data
