"""The watcher of one push backup: follows its QEMU jobs, releases each target when it ends.

A push job copies into target files inside QEMU; nobody reads it through vcfs, so a background
task polls it. When a disk's QEMU job ends, its nodes (and temporary bitmap) are released at
once so the target is usable; when every disk has ended, the targets of a job that did not
complete are removed and the job's record is dropped.
Thread rule: trio tasks only; `poll` and `cancel` are serialised by the job's lock, so a disk's
end state is published only after QEMU has let go of its target.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from vcfs.domain.backups.job import (
    BLOCK_JOB,
    FILE_NODE,
    STORE_FILE,
    STORE_NODE,
    TEMP_BITMAP,
    BackupJob,
    DiskJob,
    Piece,
    outcome,
)
from vcfs.domain.backups.release import CANCEL_TIMEOUT, cancel_jobs, release
from vcfs.domain.context import DomainContext
from vcfs.domain.status import CANCELLED, COMPLETED, FAILED, RUNNING
from vcfs.errors import BackendError, VcfsError

log = logging.getLogger(__name__)

WATCH_INTERVAL = 0.1


class PushWatcher:
    """Follows one push job until it ends (`run`), or until told to stop (`stop`)."""

    def __init__(
        self, ctx: DomainContext, job: BackupJob, ended: Callable[[BackupJob], None]
    ) -> None:
        self._ctx = ctx
        self.job = job
        self._ended = ended
        """Called once when every disk has ended (drops the job's record)."""
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
        """QEMU lets go of the target (and of the temporary bitmap); then the end shows."""
        # A job gone without a noted outcome was dismissed behind vcfs's back.
        state, error = d.outcome or (FAILED, "the block job vanished")
        self.job.made.discard(Piece(BLOCK_JOB, d.target))
        await release(
            self._ctx, self.job,
            only={Piece(k, d.target) for k in (STORE_NODE, FILE_NODE, TEMP_BITMAP)},
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
