"""Backup jobs of one domain: begin, watch and end pull and push backups over QMP.

Pull mode is image fleecing, as libvirt does it: per disk a qcow2 scratch overlay whose backing
is the live disk, one `transaction` holding the new checkpoint's bitmap adds, the temporary
merged bitmap of each incremental disk and `blockdev-backup sync=none`, then a read-only NBD
export per disk. Reads of the export show the disk as it was at the transaction. Push mode
copies into a target file with `blockdev-backup sync=full|incremental`; a watcher task follows
the jobs, releases the targets when they end, and removes targets of failed or cancelled jobs.

Every step of a begin registers its undo; any failure runs them in reverse, so nothing is left
half-made (no node, export, bitmap, job, file or checkpoint metadata).
Thread rule: trio tasks only; mutations hold the domain lock.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from vcfs.domain.align import align_backup
from vcfs.domain.checkpoints import PreparedCheckpoint
from vcfs.domain.faults import fault_point
from vcfs.domain.model import (
    FULL,
    INCREMENTAL,
    PULL,
    PUSH,
    BackupDef,
    BackupDisk,
    BackupServer,
    BackupStore,
    Disk,
    DomainInfo,
)
from vcfs.domain.names import check_checkpoint_name, check_job_name
from vcfs.domain.ports import (
    Action,
    AddBitmap,
    BlockdevBackup,
    BlockJob,
    CheckpointStore,
    Codec,
    Export,
    MergeBitmaps,
    NbdAddress,
    RemoveBitmap,
)
from vcfs.domain.reader import BlockCache, ExportSource
from vcfs.domain.views import DiskViews
from vcfs.errors import (
    AlreadyExists,
    BackendError,
    Busy,
    InvalidInput,
    NotFound,
    NotSupported,
    QmpCommandError,
    VcfsError,
)

if TYPE_CHECKING:
    from vcfs.domain.host import Domain

log = logging.getLogger(__name__)

RUNNING, COMPLETED, FAILED, CANCELLED = "running", "completed", "failed", "cancelled"
WATCH_INTERVAL = 0.1
CANCEL_TIMEOUT = 10.0


ExportOpener = Callable[[NbdAddress, str, str | None, str | None], Export]
"""(address, export name, dirty bitmap or None, TLS directory or None) -> Export"""


@dataclass
class DiskJob:
    """One disk of a backup job: its QEMU objects and progress."""

    target: str
    disk: Disk
    job_id: str
    store_path: str
    store_node: str
    file_node: str
    driver: str
    incremental: str | None = None
    export_id: str | None = None
    export_name: str | None = None
    export_bitmap: str | None = None
    temp_bitmap: str | None = None
    """Push incremental: the merged bitmap on the disk's own node, removed at the end."""
    created_store: bool = False
    state: str = RUNNING
    outcome: tuple[str, str | None] | None = None
    """How QEMU ended the job, noted before it is dismissed."""
    done: int = 0
    total: int = 0
    error: str | None = None
    views: DiskViews | None = None


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
    state: str = RUNNING
    error: str | None = None
    started: float = field(default_factory=time.time)
    finished: trio.Event = field(default_factory=trio.Event)
    lock: trio.Lock = field(default_factory=trio.Lock)

    def disk(self, target: str) -> DiskJob | None:
        """The job's disk called `target`."""
        return next((d for d in self.disks if d.target == target), None)


def free_tcp_port(host: str) -> int:
    """A port nobody listens on now (QEMU binds it a few milliseconds later)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class Undo:
    """A stack of compensating actions, run in reverse on failure."""

    def __init__(self, what: str) -> None:
        self._what = what
        self._steps: list[tuple[str, Callable[[], Awaitable[None]]]] = []

    def push(self, name: str, step: Callable[[], Awaitable[None]]) -> None:
        self._steps.append((name, step))

    async def run(self) -> None:
        """Undo everything, best effort: one failing step must not strand the others."""
        with trio.CancelScope(shield=True):
            while self._steps:
                name, step = self._steps.pop()
                try:
                    await step()
                except (VcfsError, OSError) as e:
                    log.error("%s: rollback step %s failed: %s", self._what, name, e)


class BackupService:
    """The backup jobs of one domain."""

    def __init__(
        self,
        domain: Domain,
        store: CheckpointStore,
        codec: Codec,
        runtime_dir: Path,
        scratch_dir: Path,
        open_export: ExportOpener,
        tls_dir: Path | None = None,
        cache: BlockCache | None = None,
    ) -> None:
        self._domain = domain
        self._cache = cache or BlockCache()
        self._tls_dir = tls_dir
        self._store = store
        self._codec = codec
        self._runtime_dir = runtime_dir
        self._scratch_dir = scratch_dir
        self._open_export = open_export
        self._jobs: dict[str, BackupJob] = {}
        self._next_id = 1
        self._serial = int(time.time() * 10) % 10**8
        self.latest: str | None = None

    # ---- reading ----------------------------------------------------------------------------

    def names(self) -> list[str]:
        """Job ids, in the order they began."""
        return list(self._jobs)

    def get(self, job_id: str) -> BackupJob | None:
        """The job with this id, if any."""
        return self._jobs.get(job_id)

    def require(self, job_id: str) -> BackupJob:
        """The job with this id, or NotFound."""
        job = self._jobs.get(job_id)
        if job is None:
            raise NotFound(f"no backup '{job_id}'")
        return job

    def active(self) -> BackupJob | None:
        """The running job, if any (a finished push job does not count)."""
        return next((j for j in self._jobs.values() if j.state == RUNNING), None)

    def xml(self, job_id: str) -> bytes:
        """Like `virsh backup-dumpxml`: every default vcfs chose, filled in."""
        return self._codec.format_backup(self.require(job_id).definition)

    async def status(self, job_id: str) -> bytes:
        """Machine-readable `key: value` lines: state, mode, per-disk progress, error."""
        job = self.require(job_id)
        if job.state == RUNNING and job.mode == PUSH:
            await self._poll_push(job)
        lines = [f"state: {job.state}", f"mode: {job.mode}"]
        for d in job.disks:
            if job.mode == PULL:
                done = d.views.bytes_served if d.views else 0
                lines.append(f"disk {d.target}: {min(done, d.disk.size)}/{d.disk.size}")
            else:
                lines.append(f"disk {d.target}: {d.done}/{d.total or d.disk.size}")
        if job.mode == PULL:
            nbd = sum(d.views.source.nbd_bytes for d in job.disks if d.views)
            lines.append(f"nbd-read: {nbd}")
        if job.error:
            lines.append(f"error: {job.error}")
        return ("\n".join(lines) + "\n").encode()

    def views(self, job_id: str, target: str) -> DiskViews:
        """The files of one disk of a running pull backup."""
        job = self.require(job_id)
        d = job.disk(target)
        if d is None or d.views is None:
            raise NotFound(f"backup '{job_id}' exports no disk '{target}'")
        return d.views

    # ---- beginning --------------------------------------------------------------------------

    async def begin(self, document: bytes) -> str:
        """`backups/new`: begin the job a `<domainbackup>` document describes; return its id."""
        backup = self._codec.parse_backup(document)
        async with self._domain.lock:
            job_id = str(self._next_id)
            while job_id in self._jobs:
                self._next_id += 1
                job_id = str(self._next_id)
            await self._begin(job_id, backup)
            self._next_id += 1
        return job_id

    async def begin_default(self, job_id: str) -> None:
        """`mkdir backups/ID`: a full pull backup of every eligible disk, all defaults."""
        check_job_name(job_id)
        async with self._domain.lock:
            if job_id in self._jobs:
                raise AlreadyExists(f"backup '{job_id}' already exists")
            await self._begin(job_id, BackupDef(mode=PULL))

    async def _begin(self, job_id: str, backup: BackupDef) -> None:
        if (running := self.active()) is not None:
            raise Busy(f"backup '{running.id}' is already running on domain {self._domain.name}")
        info = await self._domain.info(max_age=0)
        cps = self._domain.checkpoints
        prepared: PreparedCheckpoint | None = None
        if backup.checkpoint is not None:
            name = backup.checkpoint.name or str(int(time.time()))
            check_checkpoint_name(name)
            prepared = await cps.prepare(backup.checkpoint.with_(name=name), info)
        suffix = prepared.definition.name if prepared else str(int(time.time()))
        assert suffix
        aligned = align_backup(backup, [d.ref() for d in info.disks], suffix)
        if not aligned.backed_up():
            raise InvalidInput("no disks selected for backup")
        self._serial += 1
        given = {d.name: d for d in backup.disks or ()}
        jobs, disks_out = [], []
        for index, entry in enumerate(aligned.disks or ()):
            if not entry.backup:
                disks_out.append(entry)
                continue
            disk = info.disk(entry.name)
            assert disk is not None
            entry, job = self._plan_disk(job_id, index, aligned.mode, entry, disk, given)
            jobs.append(job)
            disks_out.append(entry)
        server = None
        address = None
        if aligned.mode == PULL:
            server, address = self._plan_server(job_id, aligned.server)
        definition = aligned.with_(disks=tuple(disks_out), server=server, checkpoint=None)
        job = BackupJob(job_id, aligned.mode, definition, jobs, address,
                        prepared.definition.name if prepared else None)
        if server is not None and server.tls == "yes":
            job.tls_object = f"vcfs{self._serial}-tls"
        started = time.monotonic()
        await self._start(job, prepared)
        self._jobs[job_id] = job
        self.latest = job_id
        log.info("domain %s: began %s backup %s of %s in %.1f ms", self._domain.name, job.mode,
                 job_id, ", ".join(d.target for d in jobs), (time.monotonic() - started) * 1e3)

    def _plan_disk(
        self,
        job_id: str,
        index: int,
        mode: str,
        entry: BackupDisk,
        disk: Disk,
        given: dict[str, BackupDisk],
    ) -> tuple[BackupDisk, DiskJob]:
        """Validate one disk and fill every default; return the shown entry and its job."""
        if entry.backupmode == INCREMENTAL:
            self._check_base(entry, disk)
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
            store = BackupStore(str(self._scratch_dir / f"{self._domain.name}-{job_id}-"
                                    f"{entry.name}.qcow2"))
        if store.kind != "file":
            raise NotSupported(f"disk '{entry.name}': block device stores are not supported")
        tag = f"vcfs{self._serial}-{index}"
        job = DiskJob(
            target=entry.name, disk=disk, job_id=tag, store_path=store.path,
            store_node=f"{tag}s", file_node=f"{tag}f", driver=driver,
            incremental=entry.incremental if entry.backupmode == INCREMENTAL else None,
        )
        fields = {"store": store, "driver": driver, "type": "file"}
        if mode == PULL:
            job.export_id = tag
            job.export_name = entry.exportname or entry.name
            if job.incremental:
                job.export_bitmap = entry.exportbitmap or f"backup-{entry.name}"
            fields.update(exportname=job.export_name, exportbitmap=job.export_bitmap)
        elif job.incremental:
            job.temp_bitmap = f"backup-{entry.name}"
        return _replace_disk(entry, **fields), job

    def _check_base(self, entry: BackupDisk, disk: Disk) -> None:
        base = entry.incremental
        assert base
        if self._domain.checkpoints.get(base) is None:
            raise NotFound(
                f"Checkpoint '{base}' for incremental backup of disk '{entry.name}' not found"
            )
        covered = self._domain.checkpoints.get(base)
        assert covered is not None
        if entry.name not in {d.name for d in covered.definition.bitmap_disks()}:
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
        self, job_id: str, server: BackupServer | None
    ) -> tuple[BackupServer, NbdAddress]:
        """The NBD server's address: given, or a unix socket in the 0700 runtime directory."""
        if server is None:
            path = self._runtime_dir / f"{self._domain.name}-backup-{job_id}.sock"
            server = BackupServer(transport="unix", socket=str(path))
        if server.tls == "yes" and self._tls_dir is None:
            raise NotSupported("backup TLS directory not configured (mount with --tls-x509-dir)")
        if server.transport == "unix":
            assert server.socket
            return server, NbdAddress("unix", path=server.socket)
        if server.transport != "tcp":
            raise NotSupported(f"transport {server.transport} is not supported for <server>")
        host = server.name or "localhost"
        port = server.port or free_tcp_port(host)
        server = BackupServer("tcp", name=host, port=port, tls=server.tls)
        return server, NbdAddress("tcp", host=host, port=port)

    async def _start(self, job: BackupJob, prepared: PreparedCheckpoint | None) -> None:
        """Create stores, (pull) start the NBD server, run the one transaction, (pull) export;
        commit the checkpoint last. Any failure undoes every step done so far."""
        qemu = self._domain.qemu
        pull = job.mode == PULL
        undo = Undo(f"domain {self._domain.name}: backup {job.id}")
        self._record(job, prepared)
        try:
            for d in job.disks:
                # Pull: the scratch overlay reads through to the live disk (fleecing).
                await self._attach_store(d, undo, backing=d.disk.node if pull else None)
            if pull:
                await self._start_server(job, undo)
            fault_point("backup.transaction")
            await self._call(qemu.transaction(self._transaction(job, prepared)))
            self._domain.invalidate()
            if prepared:
                undo.push("checkpoint bitmaps", lambda: self._remove_bitmaps(prepared))
            # Undone in reverse: the jobs are cancelled before the bitmaps they use go.
            for d in job.disks:
                if d.temp_bitmap:
                    undo.push("temporary bitmap", _bind(self._remove_temp_bitmap, d))
            undo.push("block jobs", lambda: self._cancel_jobs(job))
            for d in job.disks if pull else ():
                assert d.export_id and d.export_name
                fault_point("backup.export-add")
                await self._call(qemu.export_add(d.export_id, d.store_node, d.export_name,
                                                 d.export_bitmap))
                undo.push(f"export {d.export_id}", _bind(qemu.export_del, d.export_id))
            fault_point("backup.commit")
            if prepared:
                await self._domain.checkpoints.commit(prepared)
        except BaseException:
            await undo.run()
            self._domain.invalidate()
            self._forget_record(job)
            raise
        self._record(job, prepared, phase="started")
        if pull:
            self._open_views(job)
        else:
            self._domain.spawn(self._watch_push, job)

    def _record(
        self, job: BackupJob, prepared: PreparedCheckpoint | None, phase: str = "starting"
    ) -> None:
        """Write down, before QEMU is touched, everything a crash could leave behind.

        `phase` is `starting` until the begin has fully succeeded, then `started`: only a
        started push job may keep its target after a crash (if QEMU completed it).
        """
        cp = prepared.definition if prepared else None
        self._store.put_intent(self._domain.name, f"backup-{job.id}", {
            "op": "backup", "id": job.id, "mode": job.mode, "phase": phase,
            "checkpoint": cp.name if cp else None,
            "checkpoint_disks": [d.name for d in cp.bitmap_disks()] if cp else [],
            "socket": job.address.path if job.address and job.address.transport == "unix"
            else None,
            "address": [job.address.transport, job.address.path, job.address.host,
                        job.address.port] if job.address else None,
            "definition": self._codec.format_backup(job.definition).decode(),
            "tls_object": job.tls_object,
            "disks": [
                {"target": d.target, "job": d.job_id, "store": d.store_path,
                 "nodes": [d.store_node, d.file_node], "export": d.export_id,
                 "export_name": d.export_name, "export_bitmap": d.export_bitmap,
                 "incremental": d.incremental, "driver": d.driver,
                 "temp_bitmap": d.temp_bitmap}
                for d in job.disks
            ],
        })

    def _forget_record(self, job: BackupJob) -> None:
        try:
            self._store.drop_intent(self._domain.name, f"backup-{job.id}")
        except VcfsError as e:
            log.warning("domain %s: backup %s: %s", self._domain.name, job.id, e)

    async def recover(self, info: DomainInfo) -> list[tuple[str, str]]:
        """Adopt the backups a crashed vcfs left running; remove what the others left.

        A job whose begin had completed and whose QEMU jobs (and, for pull, exports) are all
        still there reappears in `backups/` as it was: a pull backup stays readable, a push
        backup is watched to its end. Anything else is undone: exports, jobs, nodes, the NBD
        server, scratch files, push targets (kept only if QEMU completed a begun job), and the
        new checkpoint's bitmaps unless the checkpoint was committed.
        """
        done = []
        qemu = self._domain.qemu
        dom = self._domain.name
        for key, r in self._store.intents(dom).items():
            if r.get("op") != "backup":
                continue
            jobs = {j.id: j for j in await qemu.jobs()}
            if r["phase"] == "started" and await self._adopt(r, jobs, info):
                done.append((f"backups/{r['id']}",
                             f"adopted {r['mode']} backup {r['id']} left running by a crash"))
                continue
            exports = {d["export"] for d in r["disks"] if d["export"]}
            for export_id in exports:
                await _quietly(qemu.export_del(export_id))
            kept = []
            for d in r["disks"]:
                j = jobs.get(d["job"])
                completed = j is not None and j.status == "concluded" and j.error is None
                if j is not None and j.status not in ("concluded", "null"):
                    await _quietly(qemu.job_cancel(d["job"]))
                    with trio.move_on_after(CANCEL_TIMEOUT):
                        while any(x.id == d["job"] and x.status != "concluded"
                                  for x in await qemu.jobs()):
                            await trio.sleep(0.005)
                if j is not None:
                    await _quietly(qemu.job_dismiss(d["job"]))
                for node in d["nodes"]:
                    await _quietly(qemu.delete_node(node))
                disk = info.disk(d["target"])
                if d["temp_bitmap"] and disk is not None and disk.bitmap(d["temp_bitmap"]):
                    await _quietly(qemu.transaction([RemoveBitmap(disk.node, d["temp_bitmap"])]))
                if r["mode"] == PUSH and completed and r["phase"] == "started":
                    kept.append(d["store"])
                else:
                    await _unlink(d["store"])
            if r["mode"] == PULL:
                await _quietly(qemu.nbd_server_stop())
                if r["socket"]:
                    await _unlink(r["socket"])
                if r.get("tls_object"):
                    await _quietly(qemu.object_del(r["tls_object"]))
            name = r["checkpoint"]
            if name and self._domain.checkpoints.get(name) is None:
                stray = [RemoveBitmap(disk.node, name) for t in r["checkpoint_disks"]
                         if (disk := info.disk(t)) is not None and disk.bitmap(name)]
                await _quietly(qemu.transaction(stray))
            self._store.drop_intent(dom, key)
            self._domain.invalidate()
            note = f" (kept completed targets {', '.join(kept)})" if kept else ""
            done.append((f"backups/{r['id']}",
                         f"cleaned up {r['mode']} backup {r['id']} interrupted by a crash{note}"))
        return done

    async def _adopt(self, r: dict[str, Any], jobs: dict[str, BlockJob], info: DomainInfo) -> bool:
        """Rebuild a running job from its record, if QEMU still holds every piece of it."""
        exports = await self._domain.qemu.export_ids()
        disks = []
        for d in r["disks"]:
            disk = info.disk(d["target"])
            if disk is None or d["job"] not in jobs:
                return False
            if r["mode"] == PULL and (d["export"] not in exports
                                      or jobs[d["job"]].status == "concluded"):
                return False
            store_node, file_node = d["nodes"]
            disks.append(DiskJob(
                target=d["target"], disk=disk, job_id=d["job"], store_path=d["store"],
                store_node=store_node, file_node=file_node, driver=d["driver"],
                incremental=d["incremental"], export_id=d["export"],
                export_name=d["export_name"], export_bitmap=d["export_bitmap"],
                temp_bitmap=d["temp_bitmap"], created_store=True,
            ))
        transport, path, host, port = r["address"] or (None, None, None, None)
        address = NbdAddress(transport, path, host, port) if transport else None
        definition = self._codec.parse_backup(r["definition"].encode())
        job = BackupJob(r["id"], r["mode"], definition, disks, address, r["checkpoint"],
                        r.get("tls_object"))
        self._jobs[job.id] = job
        self.latest = job.id
        if job.id.isdigit():
            self._next_id = max(self._next_id, int(job.id) + 1)
        if job.mode == PUSH:
            self._domain.spawn(self._watch_push, job)
        else:
            self._open_views(job)
        return True

    def _open_views(self, job: BackupJob) -> None:
        tls_dir = str(self._tls_dir) if job.tls_object and self._tls_dir else None
        for d in job.disks:
            source = ExportSource(
                d.disk.size, _opener(self._open_export, job.address, d, tls_dir)
            )
            # Naming convention of incremental images: the base's image is saved next to it
            # as <disk>-<checkpoint>.qcow2 (README, scripts/vcfs-backup).
            backing = f"{d.target}-{d.incremental}.qcow2" if d.incremental else None
            # ... and the image of the backup that creates checkpoint X as <disk>-X.qcow2.
            saved = f"{d.target}-{job.checkpoint}.qcow2" if job.checkpoint else None
            d.views = DiskViews(
                d.disk, source, self._domain.spawn, bool(d.incremental), backing, self._cache,
                saved,
            )

    async def _start_server(self, job: BackupJob, undo: Undo) -> None:
        assert job.address
        qemu = self._domain.qemu
        if job.tls_object:
            assert self._tls_dir
            await self._call(qemu.tls_creds_add(job.tls_object, str(self._tls_dir)))
            undo.push("TLS credentials", _bind(qemu.object_del, job.tls_object))
        fault_point("backup.nbd-server-start")
        await self._call(qemu.nbd_server_start(job.address, job.tls_object))
        undo.push("nbd-server-stop", lambda: self._stop_server(job))
        if job.address.transport == "unix" and job.address.path:
            # QEMU creates the socket with its own umask: only the owner may read backups.
            os.chmod(job.address.path, 0o600)

    def _transaction(self, job: BackupJob, prepared: PreparedCheckpoint | None) -> list[Action]:
        """The new checkpoint's bitmaps, each incremental disk's temporary bitmap (on the
        scratch node for pull, on the disk for push) and the backup jobs: one atomic point."""
        actions: list[Action] = list(prepared.actions) if prepared else []
        for d in job.disks:
            if job.mode == PULL:
                if d.incremental:
                    assert d.export_bitmap
                    actions += self._merge_actions(d, d.store_node, d.export_bitmap)
                actions.append(BlockdevBackup(d.disk.node, d.job_id, d.store_node, "none"))
                continue
            if d.temp_bitmap:
                actions += self._merge_actions(d, d.disk.node, d.temp_bitmap)
            sync = INCREMENTAL if d.temp_bitmap else FULL
            actions.append(
                BlockdevBackup(d.disk.node, d.job_id, d.store_node, sync, d.temp_bitmap)
            )
        return actions

    async def _attach_store(self, d: DiskJob, undo: Undo, backing: str | None) -> None:
        """Create the store file and its nodes; register their removal."""
        qemu = self._domain.qemu
        fault_point("backup.create-store")
        base = (d.disk.source, d.disk.driver) if d.incremental and d.driver == "qcow2" else None
        await self._call(qemu.create_image(
            d.store_path, d.file_node, d.driver, d.disk.size, d.disk.cluster_size,
            backing=base if backing is None else None,
        ))
        d.created_store = True
        undo.push(f"store file {d.store_path}", _bind(_unlink, d.store_path))
        undo.push(f"node {d.file_node}", _bind(qemu.delete_node, d.file_node))
        fault_point("backup.add-store-node")
        await self._call(qemu.add_format_node(d.store_node, d.file_node, d.driver, backing))
        undo.push(f"node {d.store_node}", _bind(qemu.delete_node, d.store_node))

    @staticmethod
    def _merge_actions(d: DiskJob, node: str, name: str) -> list[Action]:
        """The temporary bitmap `name` on `node`, holding what changed since the base."""
        assert d.incremental
        base = d.disk.bitmap(d.incremental)
        assert base is not None
        return [
            AddBitmap(node, name, persistent=False, disabled=True, granularity=base.granularity),
            MergeBitmaps(node, name, ((d.disk.node, d.incremental),)),
        ]

    async def _call(self, coro: Awaitable[None]) -> None:
        try:
            await coro
        except QmpCommandError as e:
            raise BackendError(str(e)) from None

    async def _remove_bitmaps(self, prepared: PreparedCheckpoint) -> None:
        await self._domain.qemu.transaction(
            [RemoveBitmap(a.node, a.name) for a in prepared.actions]
        )

    async def _remove_temp_bitmap(self, d: DiskJob) -> None:
        assert d.temp_bitmap
        await self._domain.qemu.transaction([RemoveBitmap(d.disk.node, d.temp_bitmap)])

    async def _stop_server(self, job: BackupJob) -> None:
        try:
            await self._domain.qemu.nbd_server_stop()
        finally:
            if job.address and job.address.transport == "unix" and job.address.path:
                await _unlink(job.address.path)

    async def _cancel_jobs(self, job: BackupJob) -> None:
        """Cancel and dismiss the QEMU jobs of `job` that still exist."""
        qemu = self._domain.qemu
        ids = {d.job_id for d in job.disks}
        for j in await qemu.jobs():
            if j.id in ids and j.status not in ("concluded", "null"):
                await qemu.job_cancel(j.id)
        with trio.move_on_after(CANCEL_TIMEOUT):
            while True:
                left = [j for j in await qemu.jobs() if j.id in ids]
                for j in left:
                    if j.status == "concluded":
                        await qemu.job_dismiss(j.id)
                if not left:
                    return
                await trio.sleep(0.005)
        raise BackendError(f"jobs of backup {job.id} did not stop in {CANCEL_TIMEOUT:.0f} s")

    # ---- push jobs --------------------------------------------------------------------------

    async def _poll_push(self, job: BackupJob) -> None:
        """Update progress from QEMU; release every disk whose job has ended.

        Serialised per job: a disk's end state is published only after QEMU has let go of its
        target, so nobody reads `completed` while the target is still locked.
        """
        async with job.lock:
            if job.state != RUNNING:
                return
            qemu = self._domain.qemu
            jobs = {j.id: j for j in await qemu.jobs()}
            for d in job.disks:
                if d.state != RUNNING:
                    continue
                j = jobs.get(d.job_id)
                if j is None:
                    # Dismissed by an earlier poll that failed before it could finish: its
                    # outcome was noted first.
                    state, error = d.outcome or (FAILED, "the block job vanished")
                else:
                    d.done, d.total = j.current, j.total
                    if j.status != "concluded":
                        continue
                    if j.error is None:
                        state, error = COMPLETED, None
                    elif "cancel" in j.error.lower():
                        state, error = CANCELLED, None
                    else:
                        state, error = FAILED, j.error
                    d.outcome = (state, error)
                    await qemu.job_dismiss(d.job_id)
                await self._release_push_disk(d)
                d.state, d.error = state, error
            if all(d.state != RUNNING for d in job.disks):
                await self._finish_push(job)

    async def _release_push_disk(self, d: DiskJob) -> None:
        """QEMU lets go of the target (and of the temporary bitmap)."""
        qemu = self._domain.qemu
        for node in (d.store_node, d.file_node):
            try:
                await qemu.delete_node(node)
            except VcfsError as e:
                log.warning("domain %s: cannot release node %s: %s", self._domain.name, node, e)
        if d.temp_bitmap:
            try:
                await self._remove_temp_bitmap(d)
            except VcfsError as e:
                log.warning("domain %s: cannot remove bitmap %s: %s", self._domain.name,
                            d.temp_bitmap, e)
        self._domain.invalidate()

    async def _finish_push(self, job: BackupJob) -> None:
        states = {d.state for d in job.disks}
        job.state = FAILED if FAILED in states else CANCELLED if CANCELLED in states else COMPLETED
        job.error = next((f"disk {d.target}: {d.error}" for d in job.disks if d.error), None)
        if job.state != COMPLETED:
            for d in job.disks:
                if d.created_store:
                    await _unlink(d.store_path)
        job.finished.set()
        self._forget_record(job)
        log.info("domain %s: push backup %s %s", self._domain.name, job.id, job.state)

    async def _watch_push(self, job: BackupJob) -> None:
        """Follow a push job until it ends, so its targets are released promptly."""
        while job.state == RUNNING:
            try:
                await self._poll_push(job)
            except VcfsError as e:
                if self._domain.qemu.closed:
                    self._fail(job, f"QEMU is gone: {e}")
                    return
                log.warning("domain %s: watching backup %s: %s", self._domain.name, job.id, e)
            await trio.sleep(WATCH_INTERVAL)

    def _fail(self, job: BackupJob, reason: str) -> None:
        if job.state == RUNNING:
            job.state, job.error = FAILED, reason
            for d in job.disks:
                if d.views:
                    d.views.close()
            job.finished.set()

    # ---- ending -----------------------------------------------------------------------------

    async def end(self, job_id: str) -> None:
        """`rmdir backups/ID`: abort if running, release everything, forget the job."""
        job = self.require(job_id)
        if job.mode == PUSH:
            if job.state == RUNNING:
                await self._cancel_push(job)
        elif job.state == RUNNING or job.disks[0].views is not None:
            await self._end_pull(job)
        self._forget_record(job)
        del self._jobs[job_id]
        if self.latest == job_id:
            self.latest = next(reversed(self._jobs), None) if self._jobs else None
        log.info("domain %s: ended backup %s", self._domain.name, job_id)

    async def _cancel_push(self, job: BackupJob) -> None:
        qemu = self._domain.qemu
        for d in job.disks:
            if d.state == RUNNING:
                try:
                    await qemu.job_cancel(d.job_id)
                except QmpCommandError:
                    pass  # it ended meanwhile: the watcher sees that
        with trio.move_on_after(CANCEL_TIMEOUT):
            while job.state == RUNNING:
                await self._poll_push(job)
                await trio.sleep(0.005)
        if job.state == RUNNING:
            raise BackendError(f"backup {job.id} did not stop in {CANCEL_TIMEOUT:.0f} s")

    async def _end_pull(self, job: BackupJob) -> None:
        """Stop readers, exports, jobs and the NBD server; delete scratch nodes and files."""
        for d in job.disks:
            if d.views:
                d.views.close()
        qemu = self._domain.qemu
        undo = Undo(f"domain {self._domain.name}: end of backup {job.id}")
        for d in reversed(job.disks):
            undo.push(f"store file {d.store_path}", _bind(_unlink, d.store_path))
            undo.push(f"node {d.file_node}", _bind(qemu.delete_node, d.file_node))
            undo.push(f"node {d.store_node}", _bind(qemu.delete_node, d.store_node))
        if job.tls_object:
            undo.push("TLS credentials", _bind(qemu.object_del, job.tls_object))
        undo.push("nbd-server-stop", lambda: self._stop_server(job))
        undo.push("block jobs", lambda: self._cancel_jobs(job))
        for d in job.disks:
            if d.export_id:
                undo.push(f"export {d.export_id}", _bind(qemu.export_del, d.export_id))
        fault_point("backup.end.start")
        if qemu.closed:
            # Nothing left in QEMU to release: only our own files.
            await self._unlink_scratch(job)
        else:
            await undo.run()
        fault_point("backup.end.done")
        self._domain.invalidate()
        if job.state == RUNNING:
            job.state = COMPLETED  # libvirt: an aborted pull backup counts as completed
            job.finished.set()
        for d in job.disks:
            d.views = None

    async def _unlink_scratch(self, job: BackupJob) -> None:
        """QEMU is gone: only our own files are left to remove (scratch, socket)."""
        for d in job.disks:
            await _unlink(d.store_path)
        if job.address and job.address.transport == "unix" and job.address.path:
            await _unlink(job.address.path)

    async def abandon(self) -> None:
        """The mount ends or QEMU went away: end every job, releasing what can be released."""
        for job_id in list(self._jobs):
            try:
                await self.end(job_id)
            except VcfsError as e:
                log.warning("domain %s: ending backup %s: %s", self._domain.name, job_id, e)
                for d in self._jobs[job_id].disks:
                    if d.views:
                        d.views.close()
                if self._jobs[job_id].mode == PULL:
                    await self._unlink_scratch(self._jobs[job_id])
                del self._jobs[job_id]

    def qemu_gone(self) -> None:
        """QEMU died: every running job failed; readers fail at once instead of hanging."""
        for job in self._jobs.values():
            self._fail(job, "QEMU is gone")


def _replace_disk(entry: BackupDisk, **fields: object) -> BackupDisk:
    return replace(entry, **fields)  # type: ignore[arg-type]


def _bind(fn: Callable[..., Awaitable[None]], *args: object) -> Callable[[], Awaitable[None]]:
    async def call() -> None:
        await fn(*args)

    return call


async def _quietly(call: Awaitable[object]) -> None:
    """A recovery step whose object may well be gone already."""
    try:
        await call
    except VcfsError as e:
        log.debug("recovery step: %s", e)


async def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _opener(
    open_export: ExportOpener, address: NbdAddress | None, d: DiskJob, tls_dir: str | None
) -> Callable[[], Export]:
    assert address and d.export_name
    name, bitmap = d.export_name, d.export_bitmap
    return lambda: open_export(address, name, bitmap, tls_dir)
