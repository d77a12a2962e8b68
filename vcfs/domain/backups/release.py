"""The one release routine of a backup job, and the one cancel-and-wait of its QEMU jobs.

Every way a job's pieces go away runs `release`: the rollback of a failed begin, the end of a
pull job, each push disk whose QEMU job ended, `abandon`, and crash recovery over a job rebuilt
from its record. It walks `plan.pieces(job)` backwards and releases those in `job.made` (or the
subset asked for), best effort: one failing piece does not strand the others.
Thread rule: trio tasks only; callers hold the domain lock or the job's lock.
"""

from __future__ import annotations

import logging
from collections.abc import Collection

import trio

from vcfs.domain.backups.job import (
    BLOCK_JOB,
    CHECKPOINT_BITMAPS,
    EXPORT,
    FLEECE_FILE,
    NODES,
    SERVER,
    STATUS_EXPORT,
    STORE_FILE,
    SWITCH,
    TLS,
    BackupJob,
    Piece,
    outcome,
)
from vcfs.domain.backups.plan import pieces as planned_pieces
from vcfs.domain.context import DomainContext
from vcfs.domain.model import DomainInfo
from vcfs.domain.ports import Qemu, RemoveBitmap
from vcfs.domain.status import COMPLETED
from vcfs.errors import BackendError, QmpCommandError, VcfsError

log = logging.getLogger(__name__)

CANCEL_TIMEOUT = 10.0
LOCAL = frozenset({STORE_FILE, FLEECE_FILE, SERVER})
"""Pieces with a part outside QEMU (the files; the server's unix socket): all that is left to
release once QEMU is gone."""


async def cancel_jobs(
    qemu: Qemu, ids: Collection[str], timeout: float = CANCEL_TIMEOUT
) -> dict[str, tuple[str, str | None]]:
    """Cancel the QEMU jobs among `ids` that still run, wait until each has concluded and
    dismiss it; return how each dismissed job ended (see `job.outcome`)."""
    outcomes: dict[str, tuple[str, str | None]] = {}
    for j in await qemu.jobs():
        if j.id in ids and j.status not in ("concluded", "null"):
            try:
                await qemu.job_cancel(j.id)
            except QmpCommandError as e:
                log.debug("job %s ended before its cancel: %s", j.id, e)
    with trio.move_on_after(timeout):
        while True:
            left = [j for j in await qemu.jobs() if j.id in ids]
            for j in left:
                if j.status == "concluded":
                    outcomes[j.id] = outcome(j)
                    await qemu.job_dismiss(j.id)
            if not left:
                return outcomes
            await trio.sleep(0.005)
    raise BackendError(f"jobs {', '.join(sorted(ids))} did not stop in {timeout:.0f} s")


async def release(
    ctx: DomainContext,
    job: BackupJob,
    info: DomainInfo | None = None,
    *,
    only: Collection[Piece] | None = None,
    uncertain: bool = False,
    keep_completed: bool = False,
    local_only: bool = False,
    level: int = logging.ERROR,
) -> list[str]:
    """Release the pieces of `job` that exist (`job.made`, narrowed to `only`), newest first.

    `info`: the domain's disks, to find the nodes of the checkpoint's bitmaps (required when
    those are released). `uncertain`: a crash left the job, so any piece may be gone already;
    bitmaps are removed only where `info` shows them and failures are expected (logged at
    debug). `keep_completed`: a push target whose QEMU job completed is kept (returned).
    `local_only` (implied when QEMU is gone): only vcfs's own files are removed.
    Shielded from cancellation: a release half done would strand what is left.
    """
    if uncertain:
        level = logging.DEBUG
    local_only = local_only or ctx.qemu.closed
    todo = [p for p in reversed(planned_pieces(job))
            if p in job.made and (only is None or p in only)]
    # The QEMU jobs are cancelled together, when the first of them comes up: one wait for all.
    job_ids = {d.job_id for d in job.disks if Piece(BLOCK_JOB, d.target) in todo}
    outcomes: dict[str, tuple[str, str | None]] = {}
    kept = []
    with trio.CancelScope(shield=True):
        for p in todo:
            job.made.discard(p)
            if local_only and p.kind not in LOCAL:
                continue
            d = job.disk(p.target) if p.target else None
            try:
                if p.kind == BLOCK_JOB:
                    if job_ids:
                        ids, job_ids = job_ids, set()
                        outcomes = await cancel_jobs(ctx.qemu, ids)
                elif p.kind == STORE_FILE:
                    assert d is not None
                    if keep_completed and outcomes.get(d.job_id, ("",))[0] == COMPLETED:
                        kept.append(d.store_path)
                    else:
                        ctx.system.remove(d.store_path)
                elif p.kind == FLEECE_FILE:
                    assert d is not None
                    ctx.system.remove(d.fleece_path)
                elif p.kind == SERVER:
                    await _stop_server(ctx, job, local_only)
                else:
                    await _release_in_qemu(ctx, job, p, info, uncertain)
            except (VcfsError, OSError) as e:
                log.log(level, "domain %s: backup %s: rollback step %s failed: %s", ctx.name,
                        job.id, p, e)
    if not local_only:
        ctx.invalidate()
    return kept


async def _stop_server(ctx: DomainContext, job: BackupJob, local_only: bool) -> None:
    try:
        if not local_only:
            await ctx.qemu.nbd_server_stop()
    finally:
        if job.socket:
            ctx.system.remove(job.socket)


async def _release_in_qemu(
    ctx: DomainContext, job: BackupJob, p: Piece, info: DomainInfo | None, uncertain: bool
) -> None:
    qemu = ctx.qemu
    d = job.disk(p.target) if p.target else None
    if p.kind in NODES:
        assert d is not None
        await qemu.delete_node(d.node(p.kind))
    elif p.kind == SWITCH:
        assert d is not None
        # The device back onto the disk's own node, as it was before the backup.
        disk = info.disk(d.target) if info is not None else d.disk
        if disk is None or not disk.node or not disk.qdev:
            return  # the disk left the domain: its device is gone with it
        await qemu.set_drive(disk.qdev, disk.node)
    elif p.kind == EXPORT:
        assert d is not None and d.export_id
        await qemu.export_del(d.export_id)
    elif p.kind == STATUS_EXPORT:
        assert d is not None and d.status_export_id
        await qemu.export_del(d.status_export_id)
    elif p.kind == TLS:
        assert job.tls_object
        await qemu.object_del(job.tls_object)
    elif p.kind == CHECKPOINT_BITMAPS:
        assert info is not None and job.checkpoint
        name = job.checkpoint
        removals = [
            RemoveBitmap(disk.node, name) for t in job.checkpoint_disks
            if (disk := info.disk(t)) is not None and (not uncertain or disk.bitmap(name))
        ]
        if removals:
            await qemu.transaction(removals)
    else:
        raise AssertionError(f"unknown piece {p}")
