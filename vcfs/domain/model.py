"""Value types shared by the services, the codecs and the tree.

Plain frozen dataclasses: no behaviour beyond lookups, no I/O. Safe to use from any thread.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class Bitmap:
    """A dirty bitmap as QEMU reports it. QEMU 7.2 can report unnamed ones during a backup."""

    name: str | None
    recording: bool = True
    persistent: bool = True
    busy: bool = False
    inconsistent: bool = False
    granularity: int = 65536
    count: int = 0

    def usable_problem(self) -> str | None:
        """Why this bitmap cannot back a checkpoint, or None when it can."""
        if self.inconsistent:
            return "is inconsistent (QEMU did not shut down cleanly)"
        if not self.persistent:
            return "is not persistent"
        if not self.recording:
            return "is not recording"
        return None


@dataclass(frozen=True)
class DiskRef:
    """What disk alignment needs to know about a domain disk (live or from embedded XML)."""

    target: str
    source: str | None = None
    read_only: bool = False
    empty: bool = False


@dataclass(frozen=True)
class Disk:
    """A block device of a running domain, as learned over QMP."""

    target: str
    """The device id (`vda`): the disk's name everywhere in vcfs."""
    node: str
    """The top format node: where checkpoint bitmaps live."""
    driver: str
    source: str
    size: int
    read_only: bool = False
    qdev: str = ""
    qcow2_v3: bool = False
    cluster_size: int | None = None
    allocated: int = 0
    """Bytes the image file occupies on the host (QEMU's actual-size)."""
    bitmaps: tuple[Bitmap, ...] = ()

    @property
    def bitmap_capable(self) -> bool:
        """Whether this disk can hold a persistent dirty bitmap."""
        return self.driver == "qcow2" and self.qcow2_v3 and not self.read_only

    def bitmap_problem(self) -> str | None:
        """Why a checkpoint bitmap cannot be put on this disk, or None."""
        if self.read_only:
            return f"disk '{self.target}' is read-only"
        if self.driver != "qcow2":
            return f"disk '{self.target}' is {self.driver}: only qcow2 can hold a bitmap"
        if not self.qcow2_v3:
            return f"disk '{self.target}' is qcow2 v2 (compat=0.10): it cannot hold a bitmap"
        return None

    def bitmap(self, name: str) -> Bitmap | None:
        """The named bitmap on the top node, if any."""
        for b in self.bitmaps:
            if b.name == name:
                return b
        return None

    def ref(self) -> DiskRef:
        """This disk as alignment sees it."""
        return DiskRef(self.target, self.source, self.read_only, empty=not self.source)


@dataclass(frozen=True)
class DomainInfo:
    """A running domain: identity and disks, in QEMU's order."""

    name: str
    uuid: str | None
    disks: tuple[Disk, ...] = ()

    def disk(self, target: str) -> Disk | None:
        """The disk with this target name, if present."""
        for d in self.disks:
            if d.target == target:
                return d
        return None


BITMAP = "bitmap"
NO = "no"


@dataclass(frozen=True)
class CheckpointDisk:
    """One `<disk>` of a `<domaincheckpoint>`."""

    name: str
    checkpoint: str = BITMAP
    """`bitmap` or `no`."""
    bitmap: str | None = None
    size: int | None = None
    """Output only: dirty bytes since the checkpoint."""


@dataclass(frozen=True)
class CheckpointDef:
    """A `<domaincheckpoint>` document, parsed or about to be formatted.

    `disks is None` means the document had no `<disks>` element; an empty tuple means it had an
    empty one (libvirt treats both as "every disk"). `domain_xml` is the embedded `<domain>`
    element, serialized, kept verbatim so that an export and re-import is lossless.
    """

    name: str | None = None
    description: str | None = None
    parent: str | None = None
    creation_time: int | None = None
    disks: tuple[CheckpointDisk, ...] | None = None
    domain_xml: bytes | None = None

    def with_(self, **changes: object) -> CheckpointDef:
        """A copy with some fields changed."""
        return replace(self, **changes)  # type: ignore[arg-type]

    def bitmap_disks(self) -> list[CheckpointDisk]:
        """The disks that carry a bitmap for this checkpoint."""
        return [d for d in self.disks or () if d.checkpoint == BITMAP]


@dataclass
class Checkpoint:
    """A checkpoint known to vcfs: its definition plus what reconciliation found."""

    definition: CheckpointDef
    broken: list[str] = field(default_factory=list)
    """Reasons this checkpoint's bitmaps cannot be trusted; empty when healthy."""

    @property
    def name(self) -> str:
        assert self.definition.name is not None
        return self.definition.name

    @property
    def parent(self) -> str | None:
        return self.definition.parent


PUSH = "push"
PULL = "pull"
FULL = "full"
INCREMENTAL = "incremental"


@dataclass(frozen=True)
class BackupServer:
    """The `<server>` of a pull backup: where QEMU's NBD server listens."""

    transport: str = "tcp"
    """`tcp`, `unix` or `fd`."""
    name: str | None = None
    port: int | None = None
    socket: str | None = None
    fdgroup: str | None = None
    tls: str | None = None
    """`yes`, `no` or None (unset)."""


@dataclass(frozen=True)
class BackupStore:
    """A push `<target>` or pull `<scratch>`: a file or a block device.

    `extra` holds the store's child elements (`<seclabel>`, `<encryption>`) serialized, kept
    verbatim so that they round-trip; vcfs itself does not act on them.
    """

    path: str
    kind: str = "file"
    """`file` (the `file` attribute) or `block` (the `dev` attribute)."""
    extra: bytes | None = None


@dataclass(frozen=True)
class BackupDisk:
    """One `<disk>` of a `<domainbackup>`."""

    name: str
    backup: bool = True
    type: str | None = None
    """`file` or `block`; the store's kind."""
    backupmode: str | None = None
    """`full` or `incremental`; None until aligned."""
    incremental: str | None = None
    exportname: str | None = None
    exportbitmap: str | None = None
    index: int | None = None
    state: str | None = None
    """Internal status-XML only: running, complete, failed, cancelling, cancelled."""
    driver: str | None = None
    """The store's format (`<driver type>`)."""
    store: BackupStore | None = None
    """`<target>` in push mode, `<scratch>` in pull mode."""


@dataclass(frozen=True)
class BackupDef:
    """A `<domainbackup>` document. `disks is None` when it had no `<disks>` element.

    `checkpoint` is vcfs's combined form: a `<domaincheckpoint>` child, parsed in create mode,
    that is created in the same transaction as the backup.
    """

    mode: str = PUSH
    incremental: str | None = None
    server: BackupServer | None = None
    disks: tuple[BackupDisk, ...] | None = None
    checkpoint: CheckpointDef | None = None
    private_data: bytes | None = None
    """Internal status-XML `<privateData>`, serialized verbatim (parsed only when internal)."""

    def with_(self, **changes: object) -> BackupDef:
        """A copy with some fields changed."""
        return replace(self, **changes)  # type: ignore[arg-type]

    def backed_up(self) -> list[BackupDisk]:
        """The disks this backup copies."""
        return [d for d in self.disks or () if d.backup]
