"""The begin of a backup job in QEMU: the plan's steps run one by one, each piece registered
as its step succeeds, and everything made so far released when one fails.

The steps themselves (which, in what order, making what) are `plan.steps`; this module only
runs them, recording the job's intent first so that a crash at any step can be finished or
undone (`service.recover`). The point in time is `_fleece`: with the guest's vCPUs stopped, the
one transaction and every device's switch onto its copy-before-write filter.
Thread rule: trio tasks only; the caller holds the domain lock.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from pathlib import Path

import trio

from vcfs.domain.backups.job import (
    CHECKPOINT_BITMAPS,
    SERVER,
    STARTED,
    SWITCH,
    BackupJob,
    Piece,
    forget_record,
)
from vcfs.domain.backups.plan import (
    ADD_ACCESS_NODE,
    ADD_CBW_NODE,
    ADD_EXPORT,
    ADD_FLEECE_NODE,
    ADD_STATUS_EXPORT,
    ADD_STORE_NODE,
    ADD_TLS,
    COMMIT,
    CREATE_FLEECE,
    CREATE_STORE,
    START_JOBS,
    START_SERVER,
    TRANSACTION,
    Step,
    block_jobs,
    steps,
    transaction,
)
from vcfs.domain.backups.release import release
from vcfs.domain.backups.watcher import ScratchLimits
from vcfs.domain.checkpoints import CheckpointService, PreparedCheckpoint
from vcfs.domain.context import DomainContext
from vcfs.domain.faults import fault_point
from vcfs.domain.model import PULL, DomainInfo
from vcfs.domain.ports import Action, CheckpointStore, Codec
from vcfs.errors import BackendError, QmpCommandError

log = logging.getLogger(__name__)


class Starter:
    """Begins planned jobs of one domain (see the module docstring)."""

    def __init__(
        self,
        ctx: DomainContext,
        checkpoints: CheckpointService,
        store: CheckpointStore,
        codec: Codec,
        tls_dir: Path | None,
        limits: ScratchLimits,
    ) -> None:
        self._ctx = ctx
        self._checkpoints = checkpoints
        self._store = store
        self._codec = codec
        self._tls_dir = tls_dir
        self._limits = limits

    async def start(
        self, job: BackupJob, prepared: PreparedCheckpoint | None, info: DomainInfo
    ) -> None:
        """Record the intent, then run the plan's steps, registering each piece as it is made;
        any failure releases every piece made so far."""
        self._store.put_intent(self._ctx.name, job.record_key, job.to_record(self._codec))
        try:
            for step in steps(job):
                if step.point:
                    fault_point(step.point)
                await self._run_step(step, job, prepared)
                job.made.update(step.makes)
        except BaseException:
            await release(self._ctx, job, info)
            forget_record(self._store, self._ctx.name, job)
            raise
        job.phase = STARTED
        job.paused = False
        self._store.put_intent(self._ctx.name, job.record_key, job.to_record(self._codec))

    async def _run_step(
        self, step: Step, job: BackupJob, prepared: PreparedCheckpoint | None
    ) -> None:
        qemu = self._ctx.qemu
        d = job.disk(step.target) if step.target else None
        if step.action == CREATE_STORE:
            assert d is not None
            # Pull: the scratch overlay gets the live disk's node as its backing when its format
            # node is added (fleecing); a qcow2 incremental push target names the disk's file.
            base = ((d.disk.source, d.disk.driver) if d.incremental and d.driver == "qcow2"
                    else None)
            await qemu_call(qemu.create_image(
                d.store_path, d.file_node, d.driver, d.disk.size, d.disk.cluster_size,
                backing=base if job.mode != PULL else None,
            ))
        elif step.action == ADD_STORE_NODE:
            assert d is not None
            # Pull: the scratch overlays the disk, for the status export (see `plan`); the
            # snapshot-access node reads only what the filter copied from it.
            if job.mode == PULL:  # the store is the scratch
                await qemu_call(qemu.add_format_node(d.store_node, d.file_node, d.driver,
                                                 d.disk.node, self._limits.scratch_limit))
            else:
                await qemu_call(qemu.add_format_node(d.store_node, d.file_node, d.driver))
        elif step.action == CREATE_FLEECE:
            assert d is not None
            await qemu_call(qemu.create_image(d.fleece_path, d.fleece_file_node, "qcow2",
                                          d.disk.size, d.disk.cluster_size))
        elif step.action == ADD_FLEECE_NODE:
            assert d is not None
            await qemu_call(qemu.add_format_node(d.fleece_node, d.fleece_file_node, "qcow2",
                                             d.disk.node, self._limits.scratch_limit))
        elif step.action == ADD_CBW_NODE:
            assert d is not None
            # The filter copies nothing until the device writes through it (TRANSACTION).
            await qemu_call(qemu.add_cbw_node(d.cbw_node, d.disk.node, d.scratch_node,
                                          self._limits.cbw_timeout))
        elif step.action == ADD_TLS:
            assert job.tls_object and self._tls_dir
            await qemu_call(qemu.tls_creds_add(job.tls_object, str(self._tls_dir)))
        elif step.action == START_SERVER:
            assert job.address
            await qemu_call(qemu.nbd_server_start(job.address, job.tls_object))
            job.made.add(Piece(SERVER))  # made even if the chmod below fails
            if job.socket:
                # QEMU creates the socket with its own umask: only the owner may read backups.
                self._ctx.system.restrict(job.socket)
        elif step.action == TRANSACTION:
            actions = transaction(job, prepared.actions if prepared else [])
            try:
                await self._fleece(job, actions)
            finally:
                self._ctx.invalidate()
        elif step.action == ADD_ACCESS_NODE:
            assert d is not None
            await qemu_call(qemu.add_snapshot_access_node(d.access_node, d.cbw_node))
        elif step.action == ADD_EXPORT:
            assert d is not None and d.export_id and d.export_name
            # The temporary merged bitmap lives on the scratch node, not below the exported
            # snapshot-access node: name its node (the context stays qemu:dirty-bitmap:NAME).
            await qemu_call(qemu.export_add(d.export_id, d.access_node, d.export_name,
                                        d.export_bitmap,
                                        d.store_node if d.export_bitmap else None))
        elif step.action == ADD_STATUS_EXPORT:
            assert d is not None and d.status_export_id and d.status_export_name
            # Without the bitmap: QEMU lets one export publish a bitmap (the one above).
            await qemu_call(qemu.export_add(d.status_export_id, d.store_node, d.status_export_name,
                                        None))
        elif step.action == START_JOBS:
            # QEMU reports a failing read of the snapshot (it broke) or write of the target as
            # the job's error: the job fails, the guest never sees it.
            await qemu_call(qemu.transaction(block_jobs(job)))
        elif step.action == COMMIT:
            if prepared:
                # The checkpoint owns its bitmaps from here on; a failing commit has already
                # removed them itself (`CheckpointService.commit`), so the rollback must not.
                job.made.discard(Piece(CHECKPOINT_BITMAPS))
                await self._checkpoints.commit(prepared)

    async def _fleece(self, job: BackupJob, actions: list[Action]) -> None:
        """The point in time of a backup: with the guest's vCPUs stopped (its I/O drained)
        the transaction and every device's switch onto its copy-before-write filter, so the
        bitmaps and the snapshot agree to the write. QEMU cannot switch a device inside a
        transaction; the guest stops for a few milliseconds instead."""
        qemu = self._ctx.qemu
        # Recorded before the stop: a vcfs killed while the guest is stopped must resume it.
        job.paused = True
        self._store.put_intent(self._ctx.name, job.record_key, job.to_record(self._codec))
        stopped = False
        try:
            stopped = await qemu.pause()
            await qemu_call(qemu.transaction(actions))
            if job.checkpoint_disks:
                job.made.add(Piece(CHECKPOINT_BITMAPS))
            fault_point("backup.switch-device")
            for d in job.disks:
                await qemu_call(qemu.set_drive(d.disk.qdev, d.cbw_node))
                job.made.add(Piece(SWITCH, d.target))
        finally:
            if stopped:
                with trio.CancelScope(shield=True):
                    await qemu.resume()
            job.paused = False


async def qemu_call(coro: Awaitable[None]) -> None:
    """A step of a begin: QEMU's refusal is a backend failure of the request."""
    try:
        await coro
    except QmpCommandError as e:
        raise BackendError(str(e)) from None
