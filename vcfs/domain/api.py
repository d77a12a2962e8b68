"""What the tree asks of a host and its domains: the interfaces every backend implements.

The tree (`vcfs.tree.fstree`) is written against these Protocols only, so that the same tree,
files and errors serve two backends: the QMP one (`vcfs.domain.host.Host` over a directory of QMP
sockets, with `CheckpointService` and `BackupService`) and the libvirt one
(`vcfs.adapters.virt`, over libvirt's own checkpoint and backup API). Each method is exactly
what a node of the tree needs; semantics (errors included, as `vcfs.errors` exceptions) are the
backend's.
Thread rule: trio tasks only.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

import trio

from vcfs.domain.errorlog import ErrorLog
from vcfs.domain.images import Document, Image
from vcfs.domain.model import CheckpointDef


class CheckpointEntry(Protocol):
    """One checkpoint as a directory of the tree: its definition and its parent's name."""

    @property
    def definition(self) -> CheckpointDef: ...

    @property
    def parent(self) -> str | None: ...


class Checkpoints(Protocol):
    """`<dom>/checkpoints/`: the checkpoint tree of one domain."""

    @property
    def current(self) -> str | None:
        """The checkpoint a new one takes as parent, if any."""
        ...

    def names(self) -> list[str]:
        """Every checkpoint's name, sorted."""
        ...

    def get(self, name: str) -> CheckpointEntry | None: ...

    async def xml(self, name: str) -> bytes:
        """Like `virsh checkpoint-dumpxml` (with the `<domain>`)."""
        ...

    async def sizes(self, name: str) -> dict[str, int]:
        """Dirty bytes since the checkpoint, per disk whose bitmap is usable."""
        ...

    async def create(self, document: bytes) -> str:
        """`new`: create the checkpoint a `<domaincheckpoint>` describes; return its name."""
        ...

    async def redefine(self, document: bytes) -> str:
        """`redefine`: re-create metadata for bitmaps that exist (always validated)."""
        ...

    async def create_default(self, name: str) -> None:
        """`mkdir NAME`: every disk that can hold a bitmap gets one."""
        ...

    async def delete(self, name: str, modes: Iterable[str] = ()) -> None:
        """`rmdir` (no modes) or a line written to `<name>/delete`."""
        ...

    def parse_delete_modes(self, line: str) -> set[str]:
        """The modes of a line written to `<name>/delete`, validated (InvalidInput)."""
        ...


class BackupDiskEntry(Protocol):
    """One disk of a backup job, as its directory lists it."""

    @property
    def target(self) -> str: ...


class BackupEntry(Protocol):
    """One backup job as a directory of the tree."""

    @property
    def id(self) -> str: ...

    @property
    def started(self) -> float: ...

    @property
    def disks(self) -> Sequence[BackupDiskEntry]: ...


class DiskFiles(Protocol):
    """The files of one disk of a running pull backup (`views.DiskViews` in both backends)."""

    @property
    def raw(self) -> Image: ...

    async def qcow2(self) -> Image: ...

    @property
    def extent_map(self) -> Document: ...

    @property
    def raw_checksum(self) -> Document: ...

    @property
    def qcow2_checksum(self) -> Document: ...


class Backups(Protocol):
    """`<dom>/backups/`: the backup jobs of one domain."""

    @property
    def latest(self) -> str | None:
        """The id of the most recently begun job, if any."""
        ...

    def names(self) -> list[str]:
        """Job ids, in the order they began."""
        ...

    def get(self, job_id: str) -> BackupEntry | None: ...

    def xml(self, job_id: str) -> bytes:
        """Like `virsh backup-dumpxml`: every default filled in."""
        ...

    async def status(self, job_id: str) -> bytes:
        """The `status` file (`vcfs.domain.status` format)."""
        ...

    def views(self, job_id: str, target: str) -> DiskFiles:
        """The files of one disk of a pull job (NotFound for a push job's disk)."""
        ...

    async def begin(self, document: bytes) -> str:
        """`new`: begin the job a `<domainbackup>` describes; return its id."""
        ...

    async def begin_default(self, job_id: str) -> None:
        """`mkdir ID`: a full pull backup of every eligible disk."""
        ...

    async def end(self, job_id: str) -> None:
        """`rmdir ID`: end the job (abort it if it runs) and clean up."""
        ...


class DomainApi(Protocol):
    """`<dom>/`: one domain of the host."""

    @property
    def name(self) -> str: ...

    @property
    def created(self) -> float:
        """When vcfs first saw it (the directories' mtime)."""
        ...

    @property
    def connected(self) -> bool:
        """Whether its backend can still reach it."""
        ...

    @property
    def errors(self) -> ErrorLog: ...

    @property
    def checkpoints(self) -> Checkpoints: ...

    @property
    def backups(self) -> Backups: ...

    async def xml(self) -> bytes:
        """The `<domain>` document of `<dom>/xml`."""
        ...

    def report(self, path: str, code: str, message: str) -> None:
        """Record a failed request in `errors` and the log."""
        ...


class HostApi(Protocol):
    """The mount's root: the domains of one host."""

    def names(self) -> list[str]:
        """The names of the domains shown now."""
        ...

    def get(self, name: str) -> DomainApi | None: ...

    async def refresh(self, max_age: float = 0.5) -> None:
        """Bring the set of domains up to date unless that was done `max_age` seconds ago."""
        ...


class Backend(HostApi, Protocol):
    """A host as the composition root runs it: in a task of its own, closed at unmount."""

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Find the domains, report ready, then follow the host until cancelled."""
        ...

    async def close(self) -> None:
        """End every backup job and drop every connection. Never raises."""
        ...
