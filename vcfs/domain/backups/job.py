"""A backup job, what it has made, and its intent record.

`BackupJob` is the one description of a job: the tree shows it, the watcher and the release
routine act on it, and `to_record`/`from_record` are the only serialisation of it, so what a
crash leaves behind is rebuilt into the same object a normal end would release.
`made` holds the pieces (`Piece`) that exist in QEMU or on disk for this job; a begin adds each
as its step succeeds, the release routine removes each as it is released.
Thread rule: trio tasks only.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import trio

from vcfs.domain.model import BackupDef, Disk, DomainInfo
from vcfs.domain.ports import BlockJob, CheckpointStore, Codec, NbdAddress
from vcfs.domain.status import CANCELLED, COMPLETED, FAILED, RUNNING
from vcfs.domain.views import DiskViews
from vcfs.errors import VcfsError

log = logging.getLogger(__name__)

STARTING, STARTED = "starting", "started"
"""Phases of a record: `started` once a begin fully succeeded. Only a started push job may keep
its targets after a crash (if QEMU completed them), and only a started job can be adopted."""

# The kinds of piece a begin makes, in the order it makes them (see `plan.steps`).
STORE_FILE = "store file"
FILE_NODE = "file node"
STORE_NODE = "store node"
FLEECE_FILE = "fleecing scratch file"
FLEECE_FILE_NODE = "fleecing scratch file node"
FLEECE_NODE = "fleecing scratch node"
"""Push: the scratch the copy-before-write filter copies into (pull's store is its scratch)."""
CBW_NODE = "copy-before-write node"
TLS = "TLS credentials"
SERVER = "NBD server"
CHECKPOINT_BITMAPS = "checkpoint bitmaps"
BLOCK_JOB = "block job"
SWITCH = "device on copy-before-write"
"""The guest device writes through the copy-before-write filter (undone by switching
it back to the disk's own node)."""
ACCESS_NODE = "snapshot-access node"
EXPORT = "export"
STATUS_EXPORT = "status export"
"""Pull: the scratch overlay exported for vcfs's own block-status requests (see `plan`)."""
NODES = (FILE_NODE, STORE_NODE, FLEECE_FILE_NODE, FLEECE_NODE, CBW_NODE, ACCESS_NODE)
"""The kinds of piece that are one block node each (`DiskJob.node`)."""


@dataclass(frozen=True)
class Piece:
    """One thing a begin makes in QEMU or on disk; `target` names the disk of per-disk pieces."""

    kind: str
    target: str = ""

    def __str__(self) -> str:
        return f"{self.kind} {self.target}".rstrip()


@dataclass
class DiskJob:
    """One disk of a backup job: its QEMU objects and progress."""

    target: str
    disk: Disk
    """The disk as it was when the job began (for a job rebuilt from a record whose disk left
    the domain meanwhile: a stand-in with an empty node)."""
    job_id: str
    store_path: str
    store_node: str
    file_node: str
    driver: str
    incremental: str | None = None
    fleece_path: str = ""
    fleece_node: str = ""
    fleece_file_node: str = ""
    """Push: the scratch image (format and protocol nodes) the copy-before-write filter copies
    into. A pull job's store is its scratch; a push job's store is its target."""
    cbw_node: str = ""
    """The copy-before-write filter between the guest device and the disk's node."""
    access_node: str = ""
    """The snapshot-access node the point in time is read from (pull: by the export; push: by
    the block job)."""
    export_id: str | None = None
    export_name: str | None = None
    export_bitmap: str | None = None
    status_export_id: str | None = None
    status_export_name: str | None = None
    temp_bitmap: str | None = None
    """Push incremental: the merged bitmap the block job copies by, on the scratch node and
    copied onto the snapshot-access node (each goes with its node)."""
    state: str = RUNNING
    outcome: tuple[str, str | None] | None = None
    """How QEMU ended the job, noted before it is dismissed."""
    done: int = 0
    total: int = 0
    error: str | None = None
    views: DiskViews | None = None

    def node(self, kind: str) -> str:
        """The name of this disk's block node of kind `kind` (one of `NODES`)."""
        return {
            FILE_NODE: self.file_node, STORE_NODE: self.store_node,
            FLEECE_FILE_NODE: self.fleece_file_node, FLEECE_NODE: self.fleece_node,
            CBW_NODE: self.cbw_node, ACCESS_NODE: self.access_node,
        }[kind]

    @property
    def scratch_path(self) -> str:
        """The file the copy-before-write filter copies the guest's overwritten data into."""
        return self.fleece_path or self.store_path

    @property
    def scratch_node(self) -> str:
        """The format node of `scratch_path`."""
        return self.fleece_node or self.store_node


@dataclass
class BackupJob:
    """A backup job as the tree shows it."""

    id: str
    mode: str
    definition: BackupDef
    disks: list[DiskJob]
    address: NbdAddress | None = None
    checkpoint: str | None = None
    tls_object: str | None = None
    """The QEMU object holding the NBD server's x509 credentials, when TLS is on."""
    checkpoint_disks: tuple[str, ...] = ()
    """The disks whose bitmap the new checkpoint adds in the begin's transaction."""
    state: str = RUNNING
    error: str | None = None
    phase: str = STARTING
    paused: bool = False
    """The begin has stopped (or is about to stop) the guest's vCPUs: a crash then must
    resume it."""
    ending: bool = False
    """`rmdir` is releasing the job: exports vanishing now are no failure."""
    made: set[Piece] = field(default_factory=set)
    started: float = field(default_factory=time.time)
    finished: trio.Event = field(default_factory=trio.Event)
    lock: trio.Lock = field(default_factory=trio.Lock)
    """Serialises polls and cancels of a push job (see `watcher.PushWatcher.poll`)."""

    def disk(self, target: str) -> DiskJob | None:
        """The job's disk called `target`."""
        return next((d for d in self.disks if d.target == target), None)

    def close_views(self) -> None:
        """Readers of the disks fail at once from now on, instead of hanging."""
        for d in self.disks:
            if d.views:
                d.views.close()

    def fail(self, reason: str) -> None:
        """A running job failed (QEMU is gone, the fleecing snapshot broke): readers fail at
        once from now on."""
        if self.state == RUNNING:
            self.state, self.error = FAILED, reason
            self.close_views()
            self.finished.set()

    @property
    def socket(self) -> str | None:
        """The NBD server's unix socket, which vcfs removes at the end."""
        a = self.address
        return a.path if a is not None and a.transport == "unix" else None

    @property
    def record_key(self) -> str:
        return record_key(self.id)

    def to_record(self, codec: Codec) -> dict[str, Any]:
        """The intent record: everything a crash could leave behind, JSON-serialisable."""
        a = self.address
        return {
            "op": "backup", "id": self.id, "mode": self.mode, "phase": self.phase,
            "checkpoint": self.checkpoint,
            "checkpoint_disks": list(self.checkpoint_disks),
            "socket": self.socket,
            "address": [a.transport, a.path, a.host, a.port] if a else None,
            "definition": codec.format_backup(self.definition).decode(),
            "tls_object": self.tls_object,
            "paused": self.paused,
            "disks": [
                {"target": d.target, "job": d.job_id, "store": d.store_path,
                 "nodes": [d.store_node, d.file_node], "export": d.export_id,
                 "export_name": d.export_name, "export_bitmap": d.export_bitmap,
                 "incremental": d.incremental, "driver": d.driver,
                 "temp_bitmap": d.temp_bitmap, "fleece": [d.cbw_node, d.access_node],
                 "fleece_store": [d.fleece_path, d.fleece_node, d.fleece_file_node],
                 "status_export": [d.status_export_id, d.status_export_name]}
                for d in self.disks
            ],
        }

    @classmethod
    def from_record(cls, r: dict[str, Any], info: DomainInfo, codec: Codec) -> BackupJob:
        """The job a record describes, over the domain as it is now. Nothing is known to exist
        in QEMU yet: `made` is empty until the caller has looked (see `service.recover`)."""
        disks = []
        for d in r["disks"]:
            store_node, file_node = d["nodes"]
            cbw_node, access_node = d.get("fleece", ("", ""))
            status_id, status_name = d.get("status_export", (None, None))
            fleece_path, fleece_node, fleece_file_node = d.get("fleece_store", ("", "", ""))
            disk = info.disk(d["target"]) or Disk(d["target"], "", d["driver"], "", 0)
            disks.append(DiskJob(
                target=d["target"], disk=disk, job_id=d["job"], store_path=d["store"],
                store_node=store_node, file_node=file_node, driver=d["driver"],
                incremental=d["incremental"], export_id=d["export"],
                export_name=d["export_name"], export_bitmap=d["export_bitmap"],
                temp_bitmap=d["temp_bitmap"], cbw_node=cbw_node, access_node=access_node,
                status_export_id=status_id, status_export_name=status_name,
                fleece_path=fleece_path, fleece_node=fleece_node,
                fleece_file_node=fleece_file_node,
            ))
        transport, path, host, port = r["address"] or (None, None, None, None)
        address = NbdAddress(transport, path, host, port) if transport else None
        return cls(
            r["id"], r["mode"], codec.parse_backup(r["definition"].encode()), disks, address,
            r["checkpoint"], r.get("tls_object"), tuple(r.get("checkpoint_disks", ())),
            phase=r["phase"], paused=bool(r.get("paused")),
        )


def forget_record(store: CheckpointStore, domain: str, job: BackupJob) -> None:
    """Drop the job's intent record: it is over or undone. A store that fails is logged."""
    try:
        store.drop_intent(domain, job.record_key)
    except VcfsError as e:
        log.warning("domain %s: backup %s: %s", domain, job.id, e)


def record_key(job_id: str) -> str:
    """The key of a job's intent record in the store."""
    return f"backup-{job_id}"


def outcome(j: BlockJob) -> tuple[str, str | None]:
    """How a concluded QEMU job ended: (completed|cancelled|failed, error)."""
    if j.error is None:
        return COMPLETED, None
    if "cancel" in j.error.lower():
        return CANCELLED, None
    return FAILED, j.error
