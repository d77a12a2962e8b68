"""The plan of a backup: request + domain facts → the job, the steps that begin it, their undos.

Pure functions, no I/O: validation and every default vcfs fills in (`plan_job`), the ordered
steps of a begin with the fault point before each and the pieces each makes (`steps`), and the
one QMP transaction (`transaction`). The undo of a step is the release of the pieces it made;
`release.release` walks `pieces(job)` backwards, so a rollback, an end and a crash recovery undo
things in one order: exports, block jobs, bitmaps, NBD server, TLS, nodes, files.

Pull mode is image fleecing that spares the guest (DESIGN.md §2, issue 11): per disk a qcow2
scratch and a `copy-before-write` filter over the disk's node copying into it, with
`on-cbw-error=break-snapshot` and a `cbw-timeout`, so a full, failing or stalled scratch breaks
the backup and never a guest write (libvirt's `blockdev-backup sync=none` fails the guest's
write instead). The point in time: with the guest's vCPUs stopped (I/O drained) one
`transaction` adds the new checkpoint's bitmaps and each incremental disk's temporary merged
bitmap (on the scratch node), and each guest device is switched onto its filter; then the guest
runs again. A `snapshot-access` node over each filter is exported read-only over NBD: its
reads fail once the snapshot broke. QEMU 7.2's snapshot-access reports clusters the filter
copied as data even when they were zeros (measured), so vcfs asks its block status of a second
export, the scratch node overlaying the disk (as libvirt's fleecing image does): exact, and read
by vcfs alone.
Push mode fleeces the same way (so a full target or scratch fails the job, never a guest
write: QEMU's own backup job would fail the guest's write when its target fills), and copies the
point in time from the snapshot-access node into the target file with `blockdev-backup
sync=full|incremental`.
Thread rule: any thread (pure).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from vcfs.domain.align import align_backup
from vcfs.domain.backups.job import (
    ACCESS_NODE,
    BLOCK_JOB,
    CBW_NODE,
    CHECKPOINT_BITMAPS,
    EXPORT,
    FILE_NODE,
    FLEECE_FILE,
    FLEECE_FILE_NODE,
    FLEECE_NODE,
    SERVER,
    STATUS_EXPORT,
    STORE_FILE,
    STORE_NODE,
    SWITCH,
    TLS,
    BackupJob,
    DiskJob,
    Piece,
)
from vcfs.domain.checkpoints import PreparedCheckpoint
from vcfs.domain.model import (
    FULL,
    INCREMENTAL,
    PULL,
    BackupDef,
    BackupDisk,
    BackupServer,
    BackupStore,
    CheckpointDef,
    Disk,
    DomainInfo,
)
from vcfs.domain.ports import Action, AddBitmap, BlockdevBackup, MergeBitmaps, NbdAddress
from vcfs.errors import InvalidInput, NotFound, NotSupported

# The steps of a begin, in order.
CREATE_STORE = "create store"
ADD_STORE_NODE = "add store node"
CREATE_FLEECE = "create fleecing scratch"
ADD_FLEECE_NODE = "add fleecing scratch node"
ADD_CBW_NODE = "add copy-before-write node"
ADD_TLS = "add TLS credentials"
START_SERVER = "start NBD server"
TRANSACTION = "transaction"
ADD_ACCESS_NODE = "add snapshot-access node"
ADD_STATUS_EXPORT = "add status export"
ADD_EXPORT = "add export"
START_JOBS = "start block jobs"
COMMIT = "commit checkpoint"


@dataclass(frozen=True)
class Facts:
    """What planning needs to know of the domain and the mount, gathered by the service."""

    domain: str
    info: DomainInfo
    """Fetched under the domain lock, fresh."""
    checkpoints: Callable[[str], CheckpointDef | None]
    """The definition of an existing checkpoint, by name."""
    scratch_dir: Path
    runtime_dir: Path
    tls_configured: bool
    serial: int
    """Makes QEMU object names unique across jobs and restarts."""
    now: int
    free_tcp_port: Callable[[str], int]


@dataclass(frozen=True)
class Step:
    """One effect of a begin: the fault point just before it and the pieces it makes."""

    action: str
    point: str | None
    makes: tuple[Piece, ...] = ()
    target: str = ""


def plan_job(
    job_id: str, backup: BackupDef, facts: Facts, prepared: PreparedCheckpoint | None
) -> BackupJob:
    """Validate the request and fill every default; the job as it will be begun."""
    suffix = prepared.definition.name if prepared else str(facts.now)
    assert suffix
    info = facts.info
    aligned = align_backup(backup, [d.ref() for d in info.disks], suffix)
    if not aligned.backed_up():
        raise InvalidInput("no disks selected for backup")
    given = {d.name: d for d in backup.disks or ()}
    disk_jobs, disks_out = [], []
    for index, entry in enumerate(aligned.disks or ()):
        if not entry.backup:
            disks_out.append(entry)
            continue
        disk = info.disk(entry.name)
        assert disk is not None
        entry, disk_job = _plan_disk(facts, job_id, index, aligned.mode, entry, disk, given)
        disk_jobs.append(disk_job)
        disks_out.append(entry)
    server = None
    address = None
    if aligned.mode == PULL:
        server, address = _plan_server(facts, job_id, aligned.server)
    definition = aligned.with_(disks=tuple(disks_out), server=server, checkpoint=None)
    cp = prepared.definition if prepared else None
    job = BackupJob(
        job_id, aligned.mode, definition, disk_jobs, address, cp.name if cp else None,
        checkpoint_disks=tuple(d.name for d in cp.bitmap_disks()) if cp else (),
    )
    if server is not None and server.tls == "yes":
        job.tls_object = f"vcfs{facts.serial}-tls"
    return job


def _plan_disk(
    facts: Facts,
    job_id: str,
    index: int,
    mode: str,
    entry: BackupDisk,
    disk: Disk,
    given: dict[str, BackupDisk],
) -> tuple[BackupDisk, DiskJob]:
    """Validate one disk and fill every default; return the shown entry and its job."""
    if entry.backupmode == INCREMENTAL:
        _check_base(facts, entry, disk)
    driver = entry.driver or "qcow2"
    if mode == PULL and driver != "qcow2":
        raise InvalidInput(f"pull mode backup for disk '{entry.name}' requires qcow2 driver")
    if driver not in ("qcow2", "raw"):
        raise NotSupported(f"target format '{driver}' is not supported (use qcow2 or raw)")
    store = entry.store
    assert store is not None
    if mode == PULL and (given.get(entry.name) is None or given[entry.name].store is None):
        # libvirt puts scratch files next to the disk image; vcfs keeps them in its own
        # directory, so a backup never litters the VM's image directory.
        store = BackupStore(str(facts.scratch_dir / f"{facts.domain}-{job_id}-"
                                f"{entry.name}.qcow2"))
    if store.kind != "file":
        raise NotSupported(f"disk '{entry.name}': block device stores are not supported")
    tag = f"vcfs{facts.serial}-{index}"
    job = DiskJob(
        target=entry.name, disk=disk, job_id=tag, store_path=store.path,
        store_node=f"{tag}s", file_node=f"{tag}f", driver=driver,
        incremental=entry.incremental if entry.backupmode == INCREMENTAL else None,
    )
    fields = {"store": store, "driver": driver, "type": "file"}
    job.cbw_node, job.access_node = f"{tag}c", f"{tag}a"
    if mode == PULL:
        job.export_id = tag
        job.export_name = entry.exportname or entry.name
        job.status_export_id = f"{tag}z"
        job.status_export_name = f"{job.export_name}.vcfs-status"
        if job.incremental:
            job.export_bitmap = entry.exportbitmap or f"backup-{entry.name}"
        fields.update(exportname=job.export_name, exportbitmap=job.export_bitmap)
    else:
        job.fleece_path = str(facts.scratch_dir / f"{facts.domain}-{job_id}-{entry.name}.qcow2")
        job.fleece_node, job.fleece_file_node = f"{tag}t", f"{tag}u"
        if job.incremental:
            job.temp_bitmap = f"backup-{entry.name}"
    return replace(entry, **fields), job  # type: ignore[arg-type]


def _check_base(facts: Facts, entry: BackupDisk, disk: Disk) -> None:
    base = entry.incremental
    assert base
    covered = facts.checkpoints(base)
    if covered is None:
        raise NotFound(
            f"Checkpoint '{base}' for incremental backup of disk '{entry.name}' not found"
        )
    if entry.name not in {d.name for d in covered.bitmap_disks()}:
        raise InvalidInput(
            f"checkpoint '{base}' does not cover disk '{entry.name}': back it up in full "
            f"(<disk name='{entry.name}' backupmode='full'/>) or leave it out"
        )
    bitmap = disk.bitmap(base)
    problem = "is missing" if bitmap is None else bitmap.usable_problem()
    if problem:
        raise InvalidInput(
            f"checkpoint '{base}' is broken on disk '{entry.name}' (its bitmap {problem}): "
            "an incremental backup from it is impossible; take a full backup"
        )


def _plan_server(
    facts: Facts, job_id: str, server: BackupServer | None
) -> tuple[BackupServer, NbdAddress]:
    """The NBD server's address: given, or a unix socket in the 0700 runtime directory."""
    if server is None:
        path = facts.runtime_dir / f"{facts.domain}-backup-{job_id}.sock"
        server = BackupServer(transport="unix", socket=str(path))
    if server.tls == "yes" and not facts.tls_configured:
        raise NotSupported("backup TLS directory not configured (mount with --tls-x509-dir)")
    if server.transport == "unix":
        assert server.socket
        return server, NbdAddress("unix", path=server.socket)
    if server.transport != "tcp":
        raise NotSupported(f"transport {server.transport} is not supported for <server>")
    host = server.name or "localhost"
    port = server.port or facts.free_tcp_port(host)
    server = BackupServer("tcp", name=host, port=port, tls=server.tls)
    return server, NbdAddress("tcp", host=host, port=port)


def steps(job: BackupJob) -> list[Step]:
    """The steps that begin `job`, in order: per disk its store (pull: the scratch; push: the
    target, then its scratch) and copy-before-write filter; (pull) TLS and NBD server; the one
    transaction, with the devices switched onto their filters; snapshot-access nodes, then
    (pull) exports or (push) the block jobs; the checkpoint's commit last."""
    pull = job.mode == PULL
    out: list[Step] = []
    for d in job.disks:
        t = d.target
        out.append(Step(CREATE_STORE, "backup.create-store",
                        (Piece(STORE_FILE, t), Piece(FILE_NODE, t)), t))
        out.append(Step(ADD_STORE_NODE, "backup.add-store-node", (Piece(STORE_NODE, t),), t))
        if not pull:
            out.append(Step(CREATE_FLEECE, "backup.create-fleece",
                            (Piece(FLEECE_FILE, t), Piece(FLEECE_FILE_NODE, t)), t))
            out.append(Step(ADD_FLEECE_NODE, "backup.add-fleece-node",
                            (Piece(FLEECE_NODE, t),), t))
        out.append(Step(ADD_CBW_NODE, "backup.add-cbw-node", (Piece(CBW_NODE, t),), t))
    if pull:
        if job.tls_object:
            out.append(Step(ADD_TLS, None, (Piece(TLS),)))
        out.append(Step(START_SERVER, "backup.nbd-server-start", (Piece(SERVER),)))
    # Released in reverse: the devices leave their filters before the checkpoint's bitmaps go.
    made = [Piece(CHECKPOINT_BITMAPS)] if job.checkpoint_disks else []
    made += [Piece(SWITCH, d.target) for d in job.disks]
    out.append(Step(TRANSACTION, "backup.transaction", tuple(made)))
    # A snapshot-access node makes its filter refuse writers beside it: only after the switch.
    for d in job.disks:
        out.append(Step(ADD_ACCESS_NODE, "backup.add-access-node",
                        (Piece(ACCESS_NODE, d.target),), d.target))
        if pull:
            out.append(Step(ADD_EXPORT, "backup.export-add", (Piece(EXPORT, d.target),),
                            d.target))
            out.append(Step(ADD_STATUS_EXPORT, "backup.status-export-add",
                            (Piece(STATUS_EXPORT, d.target),), d.target))
    if not pull:
        # Released first: the jobs are cancelled before anything they read or write goes.
        out.append(Step(START_JOBS, "backup.start-jobs",
                        tuple(Piece(BLOCK_JOB, d.target) for d in job.disks)))
    out.append(Step(COMMIT, "backup.commit"))
    return out


def pieces(job: BackupJob) -> list[Piece]:
    """Everything a begin of `job` makes, in the order it makes it."""
    return [p for s in steps(job) for p in s.makes]


def transaction(job: BackupJob, checkpoint: list[AddBitmap]) -> list[Action]:
    """The new checkpoint's bitmaps and each incremental disk's temporary merged bitmap, on its
    scratch node: one atomic point. (The devices' switch onto their filters belongs to the same
    point; the service does it with the guest stopped, as no transaction action can.)"""
    actions: list[Action] = list(checkpoint)
    for d in job.disks:
        name = d.export_bitmap if job.mode == PULL else d.temp_bitmap
        if d.incremental:
            assert name
            actions += _merge_actions(d, d.scratch_node, name, ((d.disk.node, d.incremental),))
    return actions


JOB_WORKERS = 16
"""Copies a push job keeps in flight, all its disks together. QEMU's file I/O goes through
one pool of 64 threads per VM, the guest's included; a block job copies with 64 workers by
default, so a job whose target stalls (a hung NFS server, a frozen file system) took every
thread and held the guest's writes with them (measured: over 10 s with the target's file
system frozen; 0.1 s with 60 workers). Copying a 1 GiB disk into a local file took the same
time with 8, 16 and 64 workers (measured). QEMU takes it as `x-perf.max-workers`, marked
experimental since 6.0: a QEMU that drops it refuses the job, which the begin reports."""


def block_jobs(job: BackupJob) -> list[Action]:
    """Push: each disk's block job, copying the point in time from its snapshot-access node
    into its target; an incremental job by a copy of the merged bitmap on that node (where
    QEMU looks for it), which goes with the node."""
    actions: list[Action] = []
    workers = max(2, JOB_WORKERS // len(job.disks))
    for d in job.disks:
        if d.temp_bitmap:
            actions += _merge_actions(d, d.access_node, d.temp_bitmap,
                                      ((d.scratch_node, d.temp_bitmap),))
        actions.append(BlockdevBackup(d.access_node, d.job_id, d.store_node,
                                      INCREMENTAL if d.temp_bitmap else FULL, d.temp_bitmap,
                                      workers))
    return actions


def _merge_actions(
    d: DiskJob, node: str, name: str, sources: tuple[tuple[str, str], ...]
) -> list[Action]:
    """The temporary bitmap `name` on `node`, holding what changed since the base."""
    assert d.incremental
    base = d.disk.bitmap(d.incremental)
    assert base is not None
    return [
        AddBitmap(node, name, persistent=False, disabled=True, granularity=base.granularity),
        MergeBitmaps(node, name, sources),
    ]
