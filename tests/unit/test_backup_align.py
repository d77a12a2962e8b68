"""Tests for vcfs.domain.align.align_backup: libvirt's backup disk alignment and store naming."""

from __future__ import annotations

import pytest

from vcfs.domain.align import align_backup
from vcfs.domain.model import (
    FULL,
    INCREMENTAL,
    PULL,
    BackupDef,
    BackupDisk,
    BackupServer,
    BackupStore,
    CheckpointDef,
    DiskRef,
)
from vcfs.errors import InvalidInput, NotFound, NotSupported

VDA = DiskRef("vda", "/img/a.qcow2")
VDB = DiskRef("vdb", "/img/b.qcow2")
VDC = DiskRef("vdc", "/img/c.qcow2")
CDROM = DiskRef("hdc", None, read_only=True, empty=True)
SEED = DiskRef("vdd", "/img/seed.iso", read_only=True)
NETWORK = DiskRef("vde", None)  # media, but no local file (e.g. an NBD or RBD source)
DOMAIN = [VDA, VDB, VDC]


def align(backup: BackupDef, disks: list[DiskRef] = DOMAIN, suffix: str = "S") -> BackupDef:
    return align_backup(backup, disks, suffix)


def listed(*disks: BackupDisk, **fields: object) -> BackupDef:
    return BackupDef(disks=disks, **fields)  # type: ignore[arg-type]


def generated(name: str, source: str, suffix: str = "S", **fields: object) -> BackupDisk:
    """A backed-up disk with the store alignment generates next to its image."""
    fields.setdefault("backupmode", FULL)
    store = BackupStore(f"{source}.{suffix}", "file")
    return BackupDisk(name, type="file", store=store, **fields)  # type: ignore[arg-type]


# --- errors -----------------------------------------------------------------------------------


def test_domain_without_disks():
    with pytest.raises(
        NotSupported, match="^domain must have at least one disk to perform backup$"
    ):
        align(BackupDef(), [])


def test_unknown_disk():
    with pytest.raises(NotFound, match="^no disk named 'vdz'$"):
        align(listed(BackupDisk("vdz")))


def test_paths_are_not_accepted():
    # Unlike checkpoints, a backup disk is named by its target only.
    with pytest.raises(NotFound, match="^no disk named '/img/a.qcow2'$"):
        align(listed(BackupDisk("/img/a.qcow2")))


def test_disk_twice():
    with pytest.raises(InvalidInput, match="^disk 'vda' specified twice$"):
        align(listed(BackupDisk("vda"), BackupDisk("vda", backup=False)))


def test_incremental_mode_needs_a_checkpoint_name():
    message = (
        "^'incremental' backup mode of disk 'vdb' requires setting 'incremental' field for disk "
        "or backup$"
    )
    with pytest.raises(InvalidInput, match=message):
        align(listed(BackupDisk("vda"), BackupDisk("vdb", backupmode=INCREMENTAL)))
    # Either source of the name will do.
    align(listed(BackupDisk("vdb", backupmode=INCREMENTAL, incremental="c1")))
    align(listed(BackupDisk("vdb", backupmode=INCREMENTAL), incremental="c1"))


def test_explicit_store_on_a_disk_without_media():
    disk = BackupDisk("hdc", store=BackupStore("/backup/hdc"))
    with pytest.raises(NotSupported, match="^disk 'hdc' has no media$"):
        align(listed(disk), [VDA, CDROM])
    # Not backed up: the store is never looked at.
    align(listed(BackupDisk("hdc", backup=False, store=BackupStore("/x"))), [VDA, CDROM])


@pytest.mark.parametrize("disk", [NETWORK, CDROM], ids=["no-local-file", "no-media"])
def test_cannot_generate_a_file_name(disk):
    with pytest.raises(
        NotSupported, match=f"^refusing to generate file name for disk '{disk.target}'$"
    ):
        align(listed(BackupDisk(disk.target)), [VDA, disk])


def test_the_first_error_wins_in_listing_order():
    with pytest.raises(NotFound):
        align(listed(BackupDisk("vdz"), BackupDisk("vda"), BackupDisk("vda")))
    with pytest.raises(InvalidInput, match="specified twice"):
        align(listed(BackupDisk("vda"), BackupDisk("vda"), BackupDisk("vdz")))


# --- which disks, in which order --------------------------------------------------------------


@pytest.mark.parametrize("disks", [None, ()], ids=["absent", "empty"])
def test_no_listing_backs_up_every_writable_disk_with_media(disks):
    domain = [VDA, CDROM, SEED, VDB]
    aligned = align(BackupDef(disks=disks), domain)
    assert aligned.disks == (
        generated("vda", "/img/a.qcow2"),
        BackupDisk("hdc", backup=False),
        BackupDisk("vdd", backup=False),
        generated("vdb", "/img/b.qcow2"),
    )


def test_listing_anything_leaves_the_others_out():
    aligned = align(listed(BackupDisk("vdc")))
    assert [(d.name, d.backup) for d in aligned.disks] == [
        ("vdc", True),
        ("vda", False),
        ("vdb", False),
    ]
    # Listing only a backup='no' disk still counts as a listing.
    aligned = align(listed(BackupDisk("vdb", backup=False)))
    assert [d.backup for d in aligned.disks] == [False, False, False]


def test_listed_first_in_input_order_then_domain_order():
    aligned = align(listed(BackupDisk("vdc"), BackupDisk("vda", backup=False)), [VDA, VDB, VDC])
    assert [d.name for d in aligned.disks] == ["vdc", "vda", "vdb"]


def test_a_listed_read_only_disk_is_backed_up():
    # libvirt only skips read-only disks when choosing defaults, not when the user asks.
    aligned = align(listed(BackupDisk("vdd")), [VDA, SEED])
    assert aligned.disks[0] == generated("vdd", "/img/seed.iso")


def test_backup_no_disks_carry_nothing():
    aligned = align(listed(BackupDisk("vda", backup=False, backupmode=FULL)))
    assert aligned.disks[0] == BackupDisk("vda", backup=False)


# --- stores -----------------------------------------------------------------------------------


def test_generated_store_is_a_file_next_to_the_image():
    aligned = align(listed(BackupDisk("vda")), suffix="1700000000")
    assert aligned.disks[0].store == BackupStore("/img/a.qcow2.1700000000", "file")
    assert aligned.disks[0].type == "file"


def test_generated_store_overrides_a_requested_type():
    # With no device given, libvirt can only generate a file.
    aligned = align(listed(BackupDisk("vda", type="block")))
    assert aligned.disks[0].type == "file" and aligned.disks[0].store.kind == "file"


def test_explicit_store_is_kept_and_sets_the_type():
    extra = b"<seclabel model='dac' relabel='no'/>\n"
    store = BackupStore("/dev/backup", "block", extra)
    aligned = align(listed(BackupDisk("vda", store=store)))
    assert aligned.disks[0].store == store
    assert aligned.disks[0].type == "block"
    # An explicit type is left alone.
    aligned = align(listed(BackupDisk("vda", type="file", store=BackupStore("/b", "file"))))
    assert aligned.disks[0].type == "file"


def test_pull_scratch_is_named_the_same_way():
    backup = BackupDef(mode=PULL, server=BackupServer("unix", socket="/s"), disks=None)
    aligned = align(backup, [VDA])
    # The same store: the formatter writes it as <scratch> because the mode is pull.
    assert aligned.disks == (generated("vda", "/img/a.qcow2"),)
    assert aligned.mode == PULL and aligned.server == backup.server


# --- modes ------------------------------------------------------------------------------------


def test_mode_defaults_to_full_without_any_checkpoint():
    aligned = align(listed(BackupDisk("vda")))
    assert (aligned.disks[0].backupmode, aligned.disks[0].incremental) == (FULL, None)


def test_backup_incremental_makes_every_disk_incremental():
    aligned = align(BackupDef(incremental="c1"), [VDA, VDB])
    assert [(d.backupmode, d.incremental) for d in aligned.disks] == [
        (INCREMENTAL, "c1"),
        (INCREMENTAL, "c1"),
    ]


def test_disk_incremental_makes_that_disk_incremental_and_wins():
    aligned = align(
        listed(BackupDisk("vda", incremental="mine"), BackupDisk("vdb"), incremental="c1")
    )
    assert [(d.backupmode, d.incremental) for d in aligned.disks[:2]] == [
        (INCREMENTAL, "mine"),
        (INCREMENTAL, "c1"),
    ]
    aligned = align(listed(BackupDisk("vda", incremental="mine"), BackupDisk("vdb")))
    assert [(d.backupmode, d.incremental) for d in aligned.disks[:2]] == [
        (INCREMENTAL, "mine"),
        (FULL, None),
    ]


def test_explicit_incremental_inherits_the_backup_checkpoint():
    aligned = align(listed(BackupDisk("vda", backupmode=INCREMENTAL), incremental="c1"))
    assert (aligned.disks[0].backupmode, aligned.disks[0].incremental) == (INCREMENTAL, "c1")


def test_explicit_full_drops_every_checkpoint_name():
    aligned = align(
        listed(BackupDisk("vda", backupmode=FULL, incremental="mine"), incremental="c1")
    )
    assert (aligned.disks[0].backupmode, aligned.disks[0].incremental) == (FULL, None)
    assert aligned.incremental == "c1"  # the backup's own field is untouched


# --- what alignment leaves alone ---------------------------------------------------------------


def test_driver_defaults_are_not_filled():
    aligned = align(BackupDef(mode=PULL, incremental="c1"), [VDA])
    disk = aligned.disks[0]
    assert disk.driver is None and disk.exportname is None and disk.exportbitmap is None
    assert disk.index is None


def test_other_fields_are_kept():
    checkpoint = CheckpointDef(name="c2")
    disk = BackupDisk(
        "vda",
        exportname="e",
        exportbitmap="b",
        index=4,
        state="running",
        driver="qcow2",
        store=BackupStore("/s"),
    )
    backup = BackupDef(PULL, "c1", BackupServer(), (disk,), checkpoint, b"<privateData/>")
    aligned = align(backup)
    assert aligned.with_(disks=None) == backup.with_(disks=None)
    assert aligned.disks[0] == BackupDisk(
        "vda",
        type="file",
        backupmode=INCREMENTAL,
        incremental="c1",
        exportname="e",
        exportbitmap="b",
        index=4,
        state="running",
        driver="qcow2",
        store=BackupStore("/s"),
    )
