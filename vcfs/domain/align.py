"""Disk alignment of a checkpoint definition against a domain, exactly as libvirt does it.

`virDomainCheckpointAlignDisks`: resolve listed disks by target or unambiguous source path,
reject duplicates and impossible requests, default the unlisted disks, order by the domain, and
name every bitmap after the checkpoint. Pure functions.
"""

from __future__ import annotations

from collections.abc import Sequence

from vcfs.domain.model import BITMAP, NO, CheckpointDef, CheckpointDisk, DiskRef
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
        entry = chosen.get(disk.target)
        if entry is None:
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
