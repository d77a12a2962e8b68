"""The ports the domain services depend on, and the typed QMP actions they issue.

Adapters implement these Protocols; unit tests implement them with fakes. Every method is a trio
coroutine unless it says otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from vcfs.domain.extents import Extent
from vcfs.domain.model import BackupDef, CheckpointDef, DiskRef, DomainInfo


@dataclass(frozen=True)
class AddBitmap:
    """`block-dirty-bitmap-add` as a transaction action."""

    node: str
    name: str
    persistent: bool = True
    disabled: bool = False
    granularity: int | None = None


@dataclass(frozen=True)
class RemoveBitmap:
    """`block-dirty-bitmap-remove` as a transaction action."""

    node: str
    name: str


@dataclass(frozen=True)
class MergeBitmaps:
    """`block-dirty-bitmap-merge` of bitmaps (node, name) into `node`/`target`."""

    node: str
    target: str
    sources: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class BlockdevBackup:
    """`blockdev-backup` as a transaction action (auto-finalize, never auto-dismiss)."""

    device: str
    job_id: str
    target: str
    sync: str
    """`none` (pull: fleecing), `full` or `incremental` (push)."""
    bitmap: str | None = None
    workers: int | None = None
    """Copies in flight at most (QEMU's default: 64)."""


Action = AddBitmap | RemoveBitmap | MergeBitmaps | BlockdevBackup


@dataclass(frozen=True)
class BlockJob:
    """A job as `query-jobs` reports it."""

    id: str
    status: str
    """QEMU's job status: created, running, paused, ready, concluded, null, …"""
    current: int = 0
    total: int = 0
    error: str | None = None


@dataclass(frozen=True)
class NbdAddress:
    """Where QEMU's NBD server listens: a unix socket or a TCP address."""

    transport: str
    """`unix` or `tcp`."""
    path: str | None = None
    host: str | None = None
    port: int | None = None


class Qemu(Protocol):
    """One running QEMU, reached over its QMP monitor."""

    @property
    def closed(self) -> bool:
        """True once the connection is gone (QEMU quit or the socket closed)."""
        ...

    async def domain_info(self, name: str) -> DomainInfo:
        """The domain's identity, disks and bitmaps, fresh from QEMU."""
        ...

    async def transaction(self, actions: Sequence[Action]) -> None:
        """Run the actions atomically; raise QmpCommandError if QEMU refuses them."""
        ...

    async def close(self) -> None:
        """Drop the connection. Never raises."""
        ...

    async def create_image(
        self,
        path: str,
        file_node: str,
        fmt: str,
        size: int,
        cluster_size: int | None = None,
        backing: tuple[str, str] | None = None,
    ) -> None:
        """Create a new image file (AlreadyExists if the path exists) and attach its protocol
        node `file_node`; for qcow2, format it to `size` (recording `backing` = (file, format)
        in its header when given). The caller adds the format node with `add_format_node`."""
        ...

    async def add_format_node(
        self, node: str, file_node: str, fmt: str, backing: str | None = None,
        limit: int | None = None,
    ) -> None:
        """`blockdev-add` a format node over `file_node`, with `backing` node when given; with
        `limit`, the image's file cannot grow past `limit` bytes (writes past it fail as on a
        full file system)."""
        ...

    async def delete_node(self, node: str) -> None:
        """`blockdev-del`."""
        ...

    async def add_cbw_node(self, node: str, file: str, target: str, timeout: int) -> None:
        """A `copy-before-write` filter over `file` copying into `target`, which breaks the
        snapshot (never the guest's write) when a copy fails or takes over `timeout` seconds."""
        ...

    async def add_snapshot_access_node(self, node: str, cbw_node: str) -> None:
        """A `snapshot-access` node reading the point in time a copy-before-write filter keeps."""
        ...

    async def set_drive(self, qdev: str, node: str) -> None:
        """Make the guest device `qdev` (query-block's `qdev`) write through `node`; nothing
        when it already does."""
        ...

    async def pause(self) -> bool:
        """Stop the guest's vCPUs (draining its I/O) if it runs; whether it did."""
        ...

    async def resume(self) -> None:
        """Let a guest stopped by `pause` run again."""
        ...

    async def preserve_shutdown(self, on: bool) -> None:
        """Whether a guest that shuts down leaves QEMU paused (`set-action shutdown=pause`)
        rather than exiting (QEMU's default, `poweroff`)."""
        ...

    async def shut_down(self) -> bool:
        """Whether the guest has shut down and QEMU waits, paused (see `preserve_shutdown`)."""
        ...

    async def quit(self) -> None:
        """End QEMU (as its guest's shutdown would have); returns once it is going."""
        ...

    async def nbd_server_start(self, address: NbdAddress, tls_creds: str | None = None) -> None:
        """Start QEMU's NBD server, with TLS when `tls_creds` names a credentials object."""
        ...

    async def tls_creds_add(self, object_id: str, directory: str) -> None:
        """x509 server credentials from `directory` (ca-cert.pem, server-cert.pem, …)."""
        ...

    async def object_del(self, object_id: str) -> None: ...

    async def nbd_server_stop(self) -> None: ...

    async def export_add(
        self, export_id: str, node: str, name: str, bitmap: str | None,
        bitmap_node: str | None = None,
    ) -> None:
        """A read-only NBD export of `node`, publishing `bitmap` (on `bitmap_node`, else found
        below `node`) as the context `qemu:dirty-bitmap:<bitmap>`."""
        ...

    async def export_del(self, export_id: str) -> None:
        """Remove an export, disconnecting its clients; return once it is gone (or after a few
        seconds: its node may then still be in use)."""
        ...

    async def export_ids(self) -> set[str]:
        """The ids of the block exports QEMU serves."""
        ...

    async def jobs(self) -> list[BlockJob]: ...

    async def job_cancel(self, job_id: str) -> None: ...

    async def job_dismiss(self, job_id: str) -> None: ...


class CheckpointStore(Protocol):
    """Crash-safe persistence of checkpoint metadata, per domain. Synchronous: small files."""

    def load(self, domain: str) -> tuple[list[CheckpointDef], str | None]:
        """Every stored checkpoint of the domain, and the stored current checkpoint's name."""
        ...

    def save(self, domain: str, checkpoint: CheckpointDef) -> None:
        """Write (or replace) one checkpoint's metadata; durable when this returns."""
        ...

    def remove(self, domain: str, name: str) -> None:
        """Forget one checkpoint's metadata; durable when this returns."""
        ...

    def set_current(self, domain: str, name: str | None) -> None:
        """Record which checkpoint is current (None: no current)."""
        ...

    def put_intent(self, domain: str, key: str, intent: dict[str, Any]) -> None:
        """Durably record that an operation is about to act (JSON-serialisable)."""
        ...

    def intents(self, domain: str) -> dict[str, dict[str, Any]]:
        """Every recorded intent of the domain, by key."""
        ...

    def drop_intent(self, domain: str, key: str) -> None:
        """The operation is complete or undone."""
        ...


class Codec(Protocol):
    """The XML codec: documents in and out. Pure functions, any thread."""

    def document_complete(self, data: bytes) -> bool: ...

    def parse_checkpoint(self, data: bytes, *, redefine: bool) -> CheckpointDef: ...

    def format_checkpoint(
        self, cp: CheckpointDef, *, include_domain: bool = True, comment: str | None = None
    ) -> bytes: ...

    def format_domain(self, info: DomainInfo) -> bytes: ...

    def parse_domain(self, domain_xml: bytes) -> tuple[str | None, list[DiskRef]]: ...

    def parse_backup(self, data: bytes, *, internal: bool = False) -> BackupDef: ...

    def format_backup(self, backup: BackupDef, *, internal: bool = False) -> bytes: ...


class Export(Protocol):
    """A read-only NBD export, read from worker threads (libnbd's calls block).

    Methods here are plain blocking functions: callers run them with `trio.to_thread`.
    Implementations keep a pool of connections so several calls can be in flight.
    """

    size: int

    def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        """The bytes of each (offset, length) range, in order."""
        ...

    def block_status(self, offset: int, length: int) -> list[Extent]:
        """Extents from `offset` (possibly covering less than `length`)."""
        ...

    def close(self) -> None:
        """Disconnect; calls in flight or later fail with BackendError."""
        ...


class LocalSystem(Protocol):
    """The few host-OS effects of the domain services: files they own, sockets, ports.

    Plain blocking functions on small metadata (no data I/O): safe to call from trio tasks.
    """

    def remove(self, path: str) -> None:
        """Delete a file vcfs made (a scratch image, a push target, a socket); a missing file
        is no error."""
        ...

    def restrict(self, path: str) -> None:
        """Make a file only its owner may open (mode 0600)."""
        ...

    def free_tcp_port(self, host: str) -> int:
        """A TCP port nobody listens on now on `host`."""
        ...

    def sockets(self, directory: str) -> dict[str, int]:
        """The unix sockets in `directory` (not hidden) by file name, with their inode numbers;
        empty when the directory cannot be listed."""
        ...

    def disk_usage(self, path: str) -> tuple[int, int]:
        """(bytes the file occupies on disk, bytes free for it on its file system); (0, 0) when
        it cannot be looked at."""
        ...
