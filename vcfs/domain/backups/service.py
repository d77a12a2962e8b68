"""The backup jobs of one domain: begin, read, end, abandon, and recover after a crash.

A thin service over the other modules of the package: `plan` decides what a request means and
which steps begin it, `start` runs the steps (recording the job's intent first and registering
each piece as it is made), `release` undoes them on failure and at the end, `watcher` follows
push jobs and pull jobs' snapshots. Nothing is left half-made: no node, export, bitmap, job,
file or checkpoint metadata. This module keeps the jobs, adopts what a crash left, and keeps a
guest that shuts down during a backup (`--preserve-shutdown`).
The service reaches QEMU through a `DomainContext` and the checkpoint service it is given.
Thread rule: trio tasks only; mutations hold the domain lock.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import trio

from vcfs.domain.backups.job import (
    CHECKPOINT_BITMAPS,
    FLEECE_FILE,
    STARTED,
    STORE_FILE,
    BackupJob,
    Piece,
    forget_record,
)
from vcfs.domain.backups.plan import (
    Facts,
    pieces,
    plan_job,
)
from vcfs.domain.backups.release import release
from vcfs.domain.backups.start import Starter, qemu_call
from vcfs.domain.backups.watcher import PullWatcher, PushWatcher, ScratchLimits
from vcfs.domain.checkpoints import CheckpointService, PreparedCheckpoint
from vcfs.domain.context import DomainContext
from vcfs.domain.faults import fault_point
from vcfs.domain.model import PULL, PUSH, BackupDef, CheckpointDef, DomainInfo
from vcfs.domain.names import check_checkpoint_name, check_job_name
from vcfs.domain.ports import BlockJob, CheckpointStore, Codec, Export, NbdAddress
from vcfs.domain.reader import BlockCache, ExportSource
from vcfs.domain.status import COMPLETED, RUNNING, DiskProgress, JobStatus
from vcfs.domain.status import render as render_status
from vcfs.domain.views import DiskViews
from vcfs.errors import AlreadyExists, Busy, NotFound, VcfsError

log = logging.getLogger(__name__)

ExportOpener = Callable[[NbdAddress, str, str | None, str | None, str | None], Export]
"""(address, export name, dirty bitmap or None, TLS directory or None, the name of the export
answering block-status requests or None) -> Export"""
Reporter = Callable[[str, str, str], None]
"""(path, code, message): one line in `<dom>/errors`."""

CBW_TIMEOUT = 5
"""Seconds a copy-before-write may hold a guest write before the backup breaks instead.
A healthy copy of one cluster into a local scratch takes milliseconds (tens on a busy disk), so
5 s means a stalled scratch, not a slow one; yet it is far below what guests treat as a failing
disk (Linux SCSI command timeout 30 s, hung-task warning 120 s, Windows disk timeout 60 s).
The guest pays it once: a broken snapshot copies nothing more. `--cbw-timeout` changes it."""


class BackupService:
    """The backup jobs of one domain."""

    def __init__(
        self,
        ctx: DomainContext,
        checkpoints: CheckpointService,
        store: CheckpointStore,
        codec: Codec,
        runtime_dir: Path,
        scratch_dir: Path,
        open_export: ExportOpener,
        tls_dir: Path | None = None,
        cache: BlockCache | None = None,
        report: Reporter | None = None,
        cbw_timeout: int = CBW_TIMEOUT,
        scratch_limit: int | None = None,
        preserve_shutdown: bool = False,
    ) -> None:
        self._ctx = ctx
        self._report: Reporter = report or (lambda path, code, message: None)
        self._limits = ScratchLimits(cbw_timeout, scratch_limit)
        self._starter = Starter(ctx, checkpoints, store, codec, tls_dir, self._limits)
        self._preserve_shutdown = preserve_shutdown
        self._checkpoints = checkpoints
        self._cache = cache or BlockCache()
        self._tls_dir = tls_dir
        self._store = store
        self._codec = codec
        self._runtime_dir = runtime_dir
        self._scratch_dir = scratch_dir
        self._open_export = open_export
        self._jobs: dict[str, BackupJob] = {}
        self._watchers: dict[str, PushWatcher] = {}
        self._probes: dict[str, PullWatcher] = {}
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
        """The `status` file (format: `vcfs.domain.status`): state, mode, progress, error."""
        job = self.require(job_id)
        watcher = self._watchers.get(job_id)
        if job.state == RUNNING and watcher is not None:
            await watcher.poll()
        probe = self._probes.get(job_id)
        if job.state == RUNNING and probe is not None:
            await probe.check()  # a broken snapshot shows at once, not at the next probe
        disks = []
        for d in job.disks:
            if job.mode == PULL:
                done = d.views.bytes_served if d.views else 0
                disks.append(DiskProgress(d.target, min(done, d.disk.size), d.disk.size))
            else:
                disks.append(DiskProgress(d.target, d.done, d.total or d.disk.size))
        nbd = (sum(d.views.nbd_bytes for d in job.disks if d.views)
               if job.mode == PULL else None)
        # What the guest's writes have made the filters copy so far: the host's own count of
        # the scratch file's blocks (QEMU's node statistics do not count a filter's copies).
        kind = STORE_FILE if job.mode == PULL else FLEECE_FILE
        scratch = {d.target: self._ctx.system.disk_usage(d.scratch_path)[0] for d in job.disks
                   if Piece(kind, d.target) in job.made}
        guest = None
        if (self._preserve_shutdown and job.state == RUNNING and not self._ctx.qemu.closed
                and await self._ctx.qemu.shut_down()):
            guest = ("shut down; QEMU waits, paused, until no backup runs (rmdir completes "
                     "the shutdown)")
        return render_status(
            JobStatus(job.state, job.mode, disks, nbd, job.error, scratch, guest)).encode()

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
        async with self._ctx.lock:
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
        async with self._ctx.lock:
            if job_id in self._jobs:
                raise AlreadyExists(f"backup '{job_id}' already exists")
            await self._begin(job_id, BackupDef(mode=PULL))

    async def _begin(self, job_id: str, backup: BackupDef) -> None:
        if (running := self.active()) is not None:
            raise Busy(f"backup '{running.id}' is already running on domain {self._ctx.name}")
        info = await self._ctx.info(max_age=0)
        prepared: PreparedCheckpoint | None = None
        if backup.checkpoint is not None:
            name = backup.checkpoint.name or str(int(time.time()))
            check_checkpoint_name(name)
            prepared = await self._checkpoints.prepare(backup.checkpoint.with_(name=name), info)
        self._serial += 1
        facts = Facts(
            self._ctx.name, info, self._checkpoint_def, self._scratch_dir, self._runtime_dir,
            self._tls_dir is not None, self._serial, int(time.time()),
            self._ctx.system.free_tcp_port,
        )
        job = plan_job(job_id, backup, facts, prepared)
        started = time.monotonic()
        try:
            if self._preserve_shutdown:
                # Before the point in time: a guest shutting down from then on stays.
                await qemu_call(self._ctx.qemu.preserve_shutdown(True))
            await self._starter.start(job, prepared, info)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._settle_shutdown()
            raise
        self._adopt(job)
        log.info("domain %s: began %s backup %s of %s in %.1f ms", self._ctx.name, job.mode,
                 job_id, ", ".join(d.target for d in job.disks),
                 (time.monotonic() - started) * 1e3)

    def _checkpoint_def(self, name: str) -> CheckpointDef | None:
        cp = self._checkpoints.get(name)
        return cp.definition if cp else None

    def _adopt(self, job: BackupJob) -> None:
        """Show a begun job and set it going: views for pull, a watcher for push."""
        self._jobs[job.id] = job
        self.latest = job.id
        if job.mode == PUSH:
            watcher = PushWatcher(self._ctx, job, self._push_ended, self._limits)
            self._watchers[job.id] = watcher
            self._ctx.spawn(watcher.run)
        else:
            self._open_views(job)
            probe = PullWatcher(self._ctx, job, self._probe_openers(job), self._report,
                                self._limits)
            self._probes[job.id] = probe
            self._ctx.spawn(probe.run)

    def _probe_openers(self, job: BackupJob) -> list[Callable[[], Export]]:
        tls_dir = str(self._tls_dir) if job.tls_object and self._tls_dir else None
        assert job.address
        # The probe asks the snapshot-access export itself: the status export never fails.
        return [_opener(self._open_export, job.address, d.export_name or "", d.export_bitmap,
                        tls_dir, None) for d in job.disks]

    def _open_views(self, job: BackupJob) -> None:
        tls_dir = str(self._tls_dir) if job.tls_object and self._tls_dir else None
        for d in job.disks:
            assert job.address and d.export_name
            source = ExportSource(
                d.disk.size, _opener(self._open_export, job.address, d.export_name,
                                     d.export_bitmap, tls_dir, d.status_export_name)
            )
            # Naming convention of incremental images: the base's image is saved next to it
            # as <disk>-<checkpoint>.qcow2 (README, scripts/vcfs-backup).
            backing = f"{d.target}-{d.incremental}.qcow2" if d.incremental else None
            # ... and the image of the backup that creates checkpoint X as <disk>-X.qcow2.
            saved = f"{d.target}-{job.checkpoint}.qcow2" if job.checkpoint else None
            d.views = DiskViews(
                d.disk, source, self._ctx.spawn, bool(d.incremental), backing, self._cache,
                saved,
            )

    def _push_ended(self, job: BackupJob) -> None:
        self._forget_record(job)
        self._ctx.spawn(self._settle_shutdown)

    async def _settle_shutdown(self) -> None:
        """`--preserve-shutdown`: QEMU pauses a guest that shuts down while a backup runs. Once
        none runs, QEMU's default action (exit) is back, and a guest that shut down meanwhile
        is let go: QEMU quits, as its shutdown would have made it."""
        qemu = self._ctx.qemu
        if not self._preserve_shutdown or qemu.closed or self.active() is not None:
            return
        try:
            await qemu.preserve_shutdown(False)
            if await qemu.shut_down():
                log.info("domain %s: the guest shut down during a backup; QEMU quits now",
                         self._ctx.name)
                await qemu.quit()
        except VcfsError as e:
            log.warning("domain %s: completing the guest's shutdown: %s", self._ctx.name, e)

    def _forget_record(self, job: BackupJob) -> None:
        forget_record(self._store, self._ctx.name, job)

    # ---- recovering -------------------------------------------------------------------------

    async def recover(self, info: DomainInfo) -> list[tuple[str, str]]:
        """Adopt the backups a crashed vcfs left running; release what the others left.

        A job whose begin had completed and whose QEMU jobs (and, for pull, exports) are all
        still there reappears in `backups/` as it was: a pull backup stays readable, a push
        backup is watched to its end. Anything else is released like a failed begin, except
        that any piece may be gone already: push targets are kept only if QEMU completed a
        begun job, the new checkpoint's bitmaps go only if the checkpoint was not committed.
        """
        done = []
        for key, r in self._store.intents(self._ctx.name).items():
            if r.get("op") != "backup":
                continue
            job = BackupJob.from_record(r, info, self._codec)
            if job.paused:
                # Killed between stopping the guest and letting it run again.
                with trio.CancelScope(shield=True):
                    try:
                        await self._ctx.qemu.resume()
                    except VcfsError as e:
                        log.warning("domain %s: resuming the guest: %s", self._ctx.name, e)
            jobs = {j.id: j for j in await self._ctx.qemu.jobs()}
            job.made = set(pieces(job))
            if job.checkpoint and self._checkpoints.get(job.checkpoint) is not None:
                job.made.discard(Piece(CHECKPOINT_BITMAPS))  # committed: the checkpoint's now
            if job.phase == STARTED and await self._intact(job, jobs, info):
                if job.id.isdigit():
                    self._next_id = max(self._next_id, int(job.id) + 1)
                self._adopt(job)
                done.append((f"backups/{job.id}",
                             f"adopted {job.mode} backup {job.id} left running by a crash"))
                continue
            kept = await release(self._ctx, job, info, uncertain=True,
                                 keep_completed=job.mode == PUSH and job.phase == STARTED)
            self._store.drop_intent(self._ctx.name, key)
            note = f" (kept completed targets {', '.join(kept)})" if kept else ""
            done.append((f"backups/{job.id}",
                         f"cleaned up {job.mode} backup {job.id} interrupted by a crash{note}"))
        if self._preserve_shutdown and self.active() is not None:
            await qemu_call(self._ctx.qemu.preserve_shutdown(True))
        elif done:
            # A guest a crashed vcfs left waiting is let go; one that waits for another
            # reason (QEMU started with -no-shutdown, no backup ever) is none of vcfs's business.
            await self._settle_shutdown()
            if self._ctx.qemu.closed:
                done.append((".", "completed the guest's shutdown, which waited for a backup "
                                  "a crash interrupted"))
        return done

    async def _intact(self, job: BackupJob, jobs: dict[str, BlockJob], info: DomainInfo) -> bool:
        """Whether QEMU still holds every piece of a begun job that a reader or watcher needs."""
        exports = await self._ctx.qemu.export_ids()
        for d in job.disks:
            if info.disk(d.target) is None:
                return False
            # Pull: the export stands on the snapshot-access node, which stands on the filter;
            # the views ask the status export for block status.
            needed = ({d.export_id, d.status_export_id} - {None} if job.mode == PULL
                      else set())
            if not needed <= exports or (job.mode == PUSH and d.job_id not in jobs):
                return False
        return True

    # ---- ending -----------------------------------------------------------------------------

    async def end(self, job_id: str) -> None:
        """`rmdir backups/ID`: abort if running, release everything, forget the job."""
        job = self.require(job_id)
        watcher = self._watchers.get(job_id)
        if watcher is not None:
            if job.state == RUNNING:
                await watcher.cancel()
            watcher.stop()
            del self._watchers[job_id]
        elif job.made:
            job.ending = True
            if (probe := self._probes.pop(job_id, None)) is not None:
                await probe.stop()
            await self._end_pull(job)
        self._forget_record(job)
        del self._jobs[job_id]
        if self.latest == job_id:
            self.latest = next(reversed(self._jobs), None) if self._jobs else None
        log.info("domain %s: ended backup %s", self._ctx.name, job_id)
        await self._settle_shutdown()

    async def _end_pull(self, job: BackupJob) -> None:
        """Stop readers, then release exports, jobs, the NBD server, scratch nodes and files."""
        job.close_views()
        fault_point("backup.end.start")
        await release(self._ctx, job)
        fault_point("backup.end.done")
        if job.state == RUNNING:
            job.state = COMPLETED  # libvirt: an aborted pull backup counts as completed
            job.finished.set()
        for d in job.disks:
            d.views = None

    async def abandon(self) -> None:
        """The mount ends or QEMU went away: end every job, releasing what can be released."""
        for job_id in list(self._jobs):
            try:
                await self.end(job_id)
            except VcfsError as e:
                log.warning("domain %s: ending backup %s: %s", self._ctx.name, job_id, e)
                job = self._jobs.pop(job_id)
                job.close_views()
                if (watcher := self._watchers.pop(job_id, None)) is not None:
                    watcher.stop()
                if (probe := self._probes.pop(job_id, None)) is not None:
                    probe.abandon()
                if job.mode == PULL:
                    await release(self._ctx, job, local_only=True)

    def _gone_reason(self) -> str:
        hint = ("" if self._preserve_shutdown else "; mount with --preserve-shutdown to keep a "
                "guest that shuts down until its backup ends")
        return f"QEMU is gone (the guest shut down, or QEMU was stopped){hint}"

    def qemu_gone(self) -> None:
        """QEMU died: every running job failed; readers fail at once instead of hanging."""
        for job in self._jobs.values():
            job.fail(self._gone_reason())


def _opener(
    open_export: ExportOpener, address: NbdAddress, name: str, bitmap: str | None,
    tls_dir: str | None, status_name: str | None,
) -> Callable[[], Export]:
    return lambda: open_export(address, name, bitmap, tls_dir, status_name)

