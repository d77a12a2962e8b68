"""Disk alignment of a checkpoint definition against a domain, exactly as libvirt does it.

`virDomainCheckpointAlignDisks`: resolve listed disks by target or unambiguous source path,
reject duplicates and impossible requests, default the unlisted disks, order by the domain, and
name every bitmap after the checkpoint. Pure functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from vcfs.domain.model import (
    BITMAP,
    FULL,
    INCREMENTAL,
    NO,
    BackupDef,
    BackupDisk,
    BackupStore,
    CheckpointDef,
    CheckpointDisk,
    DiskRef,
)
from vcfs.errors import InvalidInput, NotFound, NotSupported


def resolve_disk(name: str, disks: Sequence[DiskRef]) -> DiskRef | None:
    """The domain disk `name` designates: a target, or a source path matching exactly one disk."""
    for d in disks:
        if d.target == name:
            return d
    matches = [d for d in disks if d.source and d.source == name]
    return matches[0] if len(matches) == 1 else None


def align_checkpoint(cp: CheckpointDef, disks: Sequence[DiskRef]) -> CheckpointDef:
    """Return `cp` with one entry per domain disk, in domain order, every default filled in."""
    assert cp.name
    listed = cp.disks or ()
    if len(listed) > len(disks):
        raise InvalidInput("too many disk checkpoint requests for domain")
    if not disks:
        raise NotSupported("domain must have at least one disk to perform checkpoints")
    default = NO if listed else BITMAP
    chosen: dict[str, CheckpointDisk] = {}
    for entry in listed:
        disk = resolve_disk(entry.name, disks)
        if disk is None:
            raise NotFound(f"no disk named '{entry.name}'")
        if disk.target in chosen:
            raise InvalidInput(f"disk '{disk.target}' specified twice")
        if entry.checkpoint != NO and (disk.empty or disk.read_only):
            raise NotSupported(f"disk '{disk.target}' is empty or readonly")
        chosen[disk.target] = CheckpointDisk(disk.target, entry.checkpoint, entry.bitmap)
    aligned = []
    for disk in disks:
        if disk.target in chosen:
            entry = chosen[disk.target]
        else:
            kind = NO if disk.empty or disk.read_only else default
            entry = CheckpointDisk(disk.target, kind)
        if entry.checkpoint == BITMAP and not entry.bitmap:
            entry = CheckpointDisk(entry.name, BITMAP, cp.name)
        aligned.append(entry)
    return cp.with_(disks=tuple(aligned))


def fill_bitmap_names(cp: CheckpointDef) -> CheckpointDef:
    """Without a domain to align against, only the default bitmap names are filled in."""
    assert cp.name
    disks = tuple(
        CheckpointDisk(d.name, d.checkpoint, d.bitmap or cp.name) if d.checkpoint == BITMAP else d
        for d in cp.disks or ()
    )
    return cp.with_(disks=disks)


# --- backups ----------------------------------------------------------------------------------

# Imported here rather than at the top so that the backup section stays a pure append.



def align_backup(backup: BackupDef, disks: Sequence[DiskRef], suffix: str) -> BackupDef:
    """Return `backup` with one entry per domain disk and every store and mode resolved.

    `virDomainBackupAlignDisks` with `virDomainBackupDefAssignStore`: listed disks first, in
    input order, then the others in domain order. A missing store becomes `<source>.<suffix>`;
    whether it is written as `<target>` or `<scratch>` follows `backup.mode`. Driver-time
    defaults (format, export name, export bitmap) are left for the backup driver.
    """
    if not disks:
        raise NotSupported("domain must have at least one disk to perform backup")
    by_target = {d.target: d for d in disks}
    aligned: dict[str, BackupDisk] = {}
    for entry in backup.disks or ():
        # Unlike checkpoints, a backup names disks by target only: no source-path lookup.
        disk = by_target.get(entry.name)
        if disk is None:
            raise NotFound(f"no disk named '{entry.name}'")
        if entry.name in aligned:
            raise InvalidInput(f"disk '{entry.name}' specified twice")
        if entry.backupmode == INCREMENTAL and not (entry.incremental or backup.incremental):
            raise InvalidInput(
                f"'incremental' backup mode of disk '{entry.name}' requires setting "
                "'incremental' field for disk or backup"
            )
        aligned[entry.name] = _assign_store(entry, disk, suffix) if entry.backup else entry
    backup_all = not backup.disks  # absent and empty <disks> both mean "every usable disk"
    for disk in disks:
        if disk.target in aligned:
            continue
        if backup_all and not disk.empty and not disk.read_only:
            aligned[disk.target] = _assign_store(BackupDisk(disk.target), disk, suffix)
        else:
            aligned[disk.target] = BackupDisk(disk.target, backup=False)
    resolved = tuple(_resolve_mode(d, backup.incremental) for d in aligned.values())
    return backup.with_(disks=resolved)


def _assign_store(entry: BackupDisk, disk: DiskRef, suffix: str) -> BackupDisk:
    """Give a backed-up disk its store: the explicit one, or a file next to the disk image."""
    if entry.store is not None:
        if disk.empty:
            raise NotSupported(f"disk '{entry.name}' has no media")
        return replace(entry, type=entry.type or entry.store.kind)
    if disk.empty or not disk.source:
        raise NotSupported(f"refusing to generate file name for disk '{entry.name}'")
    # A generated store is always a file, whatever type the disk asked for (as libvirt does).
    return replace(entry, type="file", store=BackupStore(f"{disk.source}.{suffix}", "file"))


def _resolve_mode(entry: BackupDisk, incremental: str | None) -> BackupDisk:
    """Default a backed-up disk's mode and checkpoint name from its own fields or the backup's."""
    if not entry.backup:
        return BackupDisk(entry.name, backup=False)  # nothing else of it is ever used
    mode = entry.backupmode
    if mode is None:
        mode = INCREMENTAL if entry.incremental or incremental else FULL
    if mode == FULL:
        # An explicit full backup takes no checkpoint, even when <incremental> is set.
        return replace(entry, backupmode=FULL, incremental=None)
    return replace(entry, backupmode=INCREMENTAL, incremental=entry.incremental or incremental)
