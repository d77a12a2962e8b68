"""Pure rules: checkpoint names, alignment, the errno table, the inode table."""

from __future__ import annotations

import errno

import pytest

from vcfs import errors
from vcfs.domain.align import align_checkpoint
from vcfs.domain.model import CheckpointDef, CheckpointDisk, DiskRef
from vcfs.domain.names import check_checkpoint_name
from vcfs.fs.errnos import errno_for, errno_name
from vcfs.fs.inodes import ROOT_INODE, InodeTable


@pytest.mark.parametrize("name", ["a", "c1", "_x", "-y", "a.b", "9" * 255, "1525889631"])
def test_good_names(name):
    assert check_checkpoint_name(name) == name


@pytest.mark.parametrize(
    "name", ["", ".", "..", ".hidden", "a/b", "../escape", "a b", "x\n", "é", "9" * 256,
             "new", "redefine", "current", "latest", "a\0b"]
)
def test_bad_names(name):
    with pytest.raises(errors.InvalidInput):
        check_checkpoint_name(name)


DISKS = [DiskRef("vda", "/img/a"), DiskRef("vdb", "/img/b"), DiskRef("hdc", None, True, True)]


def cp(*disks):
    return CheckpointDef(name="c", disks=disks if disks else None)


def test_alignment_defaults_follow_libvirt():
    out = align_checkpoint(cp(), DISKS)
    assert [(d.name, d.checkpoint, d.bitmap) for d in out.disks] == [
        ("vda", "bitmap", "c"), ("vdb", "bitmap", "c"), ("hdc", "no", None)]
    out = align_checkpoint(cp(CheckpointDisk("/img/b")), DISKS)
    assert [(d.name, d.checkpoint) for d in out.disks] == [
        ("vda", "no"), ("vdb", "bitmap"), ("hdc", "no")]


@pytest.mark.parametrize(
    ("disks", "error"),
    [
        ((CheckpointDisk("vdz"),), errors.NotFound),
        ((CheckpointDisk("vda"), CheckpointDisk("/img/a")), errors.InvalidInput),
        ((CheckpointDisk("hdc"),), errors.NotSupported),
        (tuple(CheckpointDisk(n) for n in ("vda", "vdb", "hdc", "x")), errors.InvalidInput),
    ],
)
def test_alignment_errors(disks, error):
    with pytest.raises(error):
        align_checkpoint(cp(*disks), DISKS)


def test_alignment_needs_disks():
    with pytest.raises(errors.NotSupported):
        align_checkpoint(cp(), [])


def test_errno_table_matches_design():
    table = {
        errors.InvalidInput: errno.EINVAL, errors.AlreadyExists: errno.EEXIST,
        errors.NotFound: errno.ENOENT, errors.NotSupported: errno.EOPNOTSUPP,
        errors.Busy: errno.EBUSY, errors.BackendError: errno.EIO,
        errors.Disconnected: errno.EIO, errors.TooLarge: errno.EFBIG,
        errors.NoSpace: errno.ENOSPC, errors.NotPermitted: errno.EPERM,
    }
    for cls, code in table.items():
        assert errno_for(cls("x")) == code
    assert errno_for(errors.QmpCommandError("c", "GenericError", "d")) == errno.EIO
    assert errno_name(errno.EOPNOTSUPP) == "EOPNOTSUPP"
    assert errno_name(errno.EINVAL) == "EINVAL"


def test_inode_table_follows_lookup_counts():
    t = InodeTable()
    assert t.inode(()) == ROOT_INODE
    a = t.inode(("vm1",))
    assert t.inode(("vm1",)) == a and t.path(a) == ("vm1",)
    t.remember(a)
    t.remember(a)
    t.forget(a, 1)
    assert t.path(a) == ("vm1",)
    t.forget(a, 1)
    assert t.path(a) is None
    assert t.inode(("vm1",)) != a  # numbers are never reused
    t.forget(ROOT_INODE, 5)
    assert t.path(ROOT_INODE) == ()
