"""The watchers of a backup: a push job's QEMU jobs, a pull job's fleecing snapshot.

`PullWatcher`: a pull backup has no QEMU job; what can go wrong while it runs is its
copy-before-write filter breaking the snapshot (scratch full, scratch I/O error, a copy slower
than `cbw-timeout`). QEMU 7.2 sends no event for that; from then on the snapshot-access node
fails every read and block-status. The watcher asks each export for the block status of its
first cluster twice a second (one small NBD request over its own connection) and fails the job,
with the reason, at the first error.

`PushWatcher`: a push job copies into target files inside QEMU; nobody reads it through vcfs,
so a background task polls it. When a disk's QEMU job ends, the device leaves its filter and
the disk's nodes and scratch are released at once, so the target is usable; when every disk has
ended, the targets of a job that did not complete are removed and the job's record is dropped.
A snapshot that broke fails the block job's reads, a full target its writes: either way QEMU
fails the job, and the watcher says why.
Thread rule: trio tasks only; `poll` and `cancel` are serialised by the job's lock, so a disk's
end state is published only after QEMU has let go of its target.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import trio

from vcfs.domain.backups.job import (
    ACCESS_NODE,
    BLOCK_JOB,
    CBW_NODE,
    FILE_NODE,
    FLEECE_FILE,
    FLEECE_FILE_NODE,
    FLEECE_NODE,
    STORE_FILE,
    STORE_NODE,
    SWITCH,
    BackupJob,
    DiskJob,
    Piece,
    outcome,
)
from vcfs.domain.backups.release import CANCEL_TIMEOUT, cancel_jobs, release
from vcfs.domain.context import DomainContext
from vcfs.domain.ports import Export, LocalSystem
from vcfs.domain.status import CANCELLED, COMPLETED, FAILED, RUNNING
from vcfs.errors import BackendError, VcfsError

log = logging.getLogger(__name__)

WATCH_INTERVAL = 0.1
PROBE_INTERVAL = 0.5
"""How often a pull job's snapshot is checked: a break shows in `status` within a second."""
PROBE_TIMEOUT = 5.0
"""A probe QEMU does not answer in this time proves nothing (QEMU busy): tried again later."""
PROBE_BYTES = 65536


DISK_PIECES = (SWITCH, ACCESS_NODE, CBW_NODE, FLEECE_NODE, FLEECE_FILE_NODE, FLEECE_FILE,
               STORE_NODE, FILE_NODE)
"""What a push disk holds in QEMU until its block job ends (the target file stays)."""


class PushWatcher:
    """Follows one push job until it ends (`run`), or until told to stop (`stop`)."""

    def __init__(
        self, ctx: DomainContext, job: BackupJob, ended: Callable[[BackupJob], None],
        limits: ScratchLimits,
    ) -> None:
        self._ctx = ctx
        self.job = job
        self._ended = ended
        """Called once when every disk has ended (drops the job's record)."""
        self._limits = limits
        self._scope: trio.CancelScope | None = None
        self._stopped = False

    async def run(self) -> None:
        """Poll until the job ends; a QEMU that went away fails the job."""
        job = self.job
        with trio.CancelScope() as self._scope:
            while job.state == RUNNING and not self._stopped:
                try:
                    await self.poll()
                except VcfsError as e:
                    if self._ctx.qemu.closed:
                        job.fail(f"QEMU is gone: {e}")
                        return
                    log.warning("domain %s: watching backup %s: %s", self._ctx.name, job.id, e)
                await trio.sleep(WATCH_INTERVAL)

    def stop(self) -> None:
        """End `run` (the job is being forgotten)."""
        self._stopped = True
        if self._scope is not None:
            self._scope.cancel()

    async def poll(self) -> None:
        """Update progress from QEMU; release every disk whose QEMU job has ended."""
        job = self.job
        async with job.lock:
            if job.state != RUNNING:
                return
            qemu = self._ctx.qemu
            jobs = {j.id: j for j in await qemu.jobs()}
            for d in job.disks:
                if d.state != RUNNING:
                    continue
                j = jobs.get(d.job_id)
                if j is not None:
                    d.done, d.total = j.current, j.total
                    if j.status != "concluded":
                        continue
                    # Noted before the dismiss: a poll failing after it still knows.
                    d.outcome = outcome(j)
                    await qemu.job_dismiss(d.job_id)
                await self._conclude(d)
            if all(d.state != RUNNING for d in job.disks):
                await self._finish()

    async def cancel(self) -> None:
        """Cancel the QEMU jobs still running, wait for them, release as they end."""
        job = self.job
        async with job.lock:
            if job.state != RUNNING:
                return
            running = [d for d in job.disks if d.state == RUNNING]
            try:
                outcomes = await cancel_jobs(self._ctx.qemu, {d.job_id for d in running})
            except BackendError:
                raise BackendError(
                    f"backup {job.id} did not stop in {CANCEL_TIMEOUT:.0f} s"
                ) from None
            for d in running:
                d.outcome = outcomes.get(d.job_id, d.outcome)
                await self._conclude(d)
            await self._finish()

    async def _conclude(self, d: DiskJob) -> None:
        """The device leaves its filter, QEMU lets go of the target and the scratch; then the
        end shows."""
        # A job gone without a noted outcome was dismissed behind vcfs's back.
        state, error = d.outcome or (FAILED, "the block job vanished")
        if state == FAILED and d.outcome is not None:
            error = push_failure(self._ctx.system, d, error or "", self._limits)
        self.job.made.discard(Piece(BLOCK_JOB, d.target))
        await release(
            self._ctx, self.job,
            only={Piece(k, d.target) for k in DISK_PIECES},
            level=logging.WARNING,
        )
        d.state, d.error = state, error

    async def _finish(self) -> None:
        job = self.job
        states = {d.state for d in job.disks}
        job.state = (FAILED if FAILED in states else CANCELLED if CANCELLED in states
                     else COMPLETED)
        job.error = next((f"disk {d.target}: {d.error}" for d in job.disks if d.error), None)
        if job.state != COMPLETED:
            await release(self._ctx, job, only={Piece(STORE_FILE, d.target) for d in job.disks})
        job.finished.set()
        self._ended(job)
        log.info("domain %s: push backup %s %s", self._ctx.name, job.id, job.state)


class PullWatcher:
    """Checks a pull job's snapshots until the job ends; fails the job when one broke."""

    def __init__(
        self,
        ctx: DomainContext,
        job: BackupJob,
        openers: Sequence[Callable[[], Export]],
        report: Callable[[str, str, str], None],
        limits: ScratchLimits,
    ) -> None:
        self._ctx = ctx
        self.job = job
        self._openers = list(openers)
        """Per disk, in the job's order: a new connection to its export."""
        self._exports: list[Export | None] = [None] * len(self._openers)
        self._report = report
        self._limits = limits
        self._stopped = False
        self._wake = trio.Event()
        self._done = trio.Event()
        self._busy = trio.Lock()
        """Held while a probe is in flight: `stop` waits for it (see there)."""

    async def run(self) -> None:
        """Check twice a second until the job is no longer running or `stop` is called."""
        try:
            while not self._stopped and self.job.state == RUNNING:
                await self.check()
                with trio.move_on_after(PROBE_INTERVAL):
                    await self._wake.wait()
        finally:
            self._done.set()

    async def stop(self) -> None:
        """The job is ending: stop checking, wait for a probe in flight, drop the probe
        connections. Before the exports go: an NBD connection still being set up while QEMU
        7.2 stops its NBD server hangs QEMU (measured with TCP), so none may be left behind."""
        self._stopped = True
        self._wake.set()
        with trio.move_on_after(PROBE_TIMEOUT + 1):
            async with self._busy:
                pass
        self._close()

    def abandon(self) -> None:
        """Stop at once (QEMU is gone: nothing to wait for)."""
        self._stopped = True
        self._wake.set()
        self._close()

    def _close(self) -> None:
        for i, e in enumerate(self._exports):
            if e is not None:
                e.close()
            self._exports[i] = None

    async def check(self) -> None:
        """Probe each disk's export once; a failing one fails the job (once, with the reason,
        and one line in `<dom>/errors`)."""
        job = self.job
        for i, d in enumerate(job.disks):
            if self._stopped or job.state != RUNNING or job.ending:
                return
            error = await self._probe(i)
            if error is None or self._stopped or job.state != RUNNING or job.ending:
                continue
            if not await self._qemu_answers():
                # QEMU exited (the host's scan fails the job saying so) or hangs: an export
                # that does not answer then proves nothing about the snapshot.
                continue
            cause = pull_failure(self._ctx.system, d, error, self._limits)
            reason = f"disk {d.target}: {cause}"
            log.warning("domain %s: backup %s failed: %s", self._ctx.name, job.id, reason)
            job.fail(reason)
            self._report(f"backups/{job.id}", "FAILED", reason)
            self._stopped = True
            self._close()
            return

    async def _qemu_answers(self) -> bool:
        try:
            with trio.fail_after(PROBE_TIMEOUT):
                await self._ctx.qemu.export_ids()
        except (VcfsError, trio.TooSlowError):
            return False
        return True

    async def _probe(self, i: int) -> str | None:
        """None if the export answers a block-status request, else QEMU's error."""
        size = self.job.disks[i].disk.size
        try:
            async with self._busy:
                if self._stopped:
                    return None
                with trio.fail_after(PROBE_TIMEOUT):
                    export = self._exports[i]
                    if export is None:
                        export = await trio.to_thread.run_sync(
                            self._openers[i], abandon_on_cancel=True)
                        self._exports[i] = export
                    await trio.to_thread.run_sync(
                        export.block_status, 0, min(size, PROBE_BYTES), abandon_on_cancel=True)
        except trio.TooSlowError:
            return None
        except VcfsError as e:
            if self._exports[i] is None:
                # Not even connected: the server is busy or going away; nothing is known yet.
                log.debug("backup %s: probe connection failed: %s", self.job.id, e)
                return None
            return str(e)
        return None



@dataclass(frozen=True)
class ScratchLimits:
    """What the copy-before-write filters were told (mount options): to say why one broke."""

    cbw_timeout: int
    """Seconds a copy may hold a guest write."""
    scratch_limit: int | None = None
    """Bytes each disk's scratch may use."""


def _scratch_cause(system: LocalSystem, d: DiskJob, limits: ScratchLimits) -> tuple[bool, str]:
    """(whether the scratch is full, what the host can tell of why a snapshot broke). QEMU
    does not say whether a copy failed or timed out."""
    used, free = system.disk_usage(d.scratch_path)
    cluster = d.disk.cluster_size or 65536
    limit = limits.scratch_limit
    # A scratch stopped by its limit has allocated nearly all of its window (qcow2 allocates
    # clusters one after the other; a few may be left unused).
    if limit is not None and used >= limit - max(limit // 16, 16 * cluster):
        return True, f"scratch limit of {limit} bytes reached ({used} bytes in use)"
    if free < cluster:
        return True, (f"scratch full at {used} bytes ({d.scratch_path}: no space left on its "
                      "file system)")
    return False, (f"a copy into scratch {d.scratch_path} failed or took over the "
                   f"{limits.cbw_timeout} s cbw-timeout ({used} bytes in use, {free} free)")


def pull_failure(system: LocalSystem, d: DiskJob, error: str, limits: ScratchLimits) -> str:
    """Why a pull backup's export failed: its fleecing snapshot broke."""
    cause = _scratch_cause(system, d, limits)[1]
    return (f"fleecing snapshot broken: {cause}; the guest's writes went on, this backup "
            f"can no longer be read (export: {error})")


def push_failure(system: LocalSystem, d: DiskJob, error: str, limits: ScratchLimits) -> str:
    """Why a push job failed: a full target, else a broken snapshot, else QEMU's word."""
    used, free = system.disk_usage(d.store_path)
    if free < (d.disk.cluster_size or 65536):
        return (f"target full at {used} bytes ({d.store_path}: no space left on its file "
                f"system); the guest's writes went on (QEMU: {error})")
    full, cause = _scratch_cause(system, d, limits)
    if full:
        return (f"fleecing snapshot broken: {cause}; the guest's writes went on (QEMU: "
                f"{error})")
    return f"{error} (the guest's writes went on)"
