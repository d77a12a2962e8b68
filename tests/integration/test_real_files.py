"""Every file of the tree is a real file: its st_size is what a read returns, so the tools that
trust st_size (rsync, tar) copy exactly what `cat` shows.

One small VM per test: vda (qcow2, 16 MiB) and vdc (raw, 8 MiB).
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from tests.conftest import BACKENDS
from tests.integration.helpers import errors_of, wait_for, write_errno
from tests.vm import DiskSpec

MiB = 1 << 20


@pytest.fixture(params=BACKENDS)
def factory(request, vm_factory):
    """`vm_factory`, or that of the private libvirtd's domains: these tests run over both."""
    return vm_factory if request.param == "qmp" else request.getfixturevalue("lv_factory")


def small_vm(vm_factory):
    vm = vm_factory("vm1", [DiskSpec("vda", size=16 * MiB),
                            DiskSpec("vdc", fmt="raw", size=8 * MiB)])
    vm.write("vda", 0, 2 * MiB, 0x5A)
    vm.write("vdc", 3 * MiB, MiB, 0x6B)
    return vm


def regular_files(top: Path) -> list[Path]:
    """Every regular file under `top` (symbolic links are not followed)."""
    found = []
    for root, _dirs, files in os.walk(top):
        for name in files:
            p = Path(root) / name
            if stat.S_ISREG(os.lstat(p).st_mode):
                found.append(p)
    return sorted(found)


def read_all(path: Path) -> tuple[bytes, int]:
    """The whole content, read as `cat` does, and the st_size `fstat` gave the open file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks), size
    finally:
        os.close(fd)


def cat(path: Path) -> bytes:
    """What `cat` shows (another process: no handle of this one is involved)."""
    return subprocess.run(["cat", str(path)], capture_output=True, check=True).stdout


def begin(backups: Path, doc: str) -> Path:
    assert write_errno(backups / "new", doc.encode()) == 0, errors_of(backups.parent)[-1:]
    return backups / os.readlink(backups / "latest")


def state_of(job: Path) -> str:
    return (job / "status").read_text().splitlines()[0]


def test_every_regular_file_reports_the_size_a_read_returns(factory, vcfs_mount, tmp_path):
    vm = small_vm(factory)
    mnt = vcfs_mount(vm.host_dir)
    dom = mnt.path / "vm1"
    cps, backups = dom / "checkpoints", dom / "backups"
    os.mkdir(cps / "c1")
    vm.write("vda", 4 * MiB, MiB, 0x11)
    assert write_errno(cps / "new", b"<domaincheckpoint><name>c2</name></domaincheckpoint>") != 0
    assert errors_of(dom)  # a failure (vdc is raw) fills `errors`
    doc = "<domaincheckpoint><name>c2</name><disks><disk name='vda'/></disks></domaincheckpoint>"
    assert write_errno(cps / "new", doc.encode()) == 0
    # a finished push backup, then a running pull backup beside it
    push = begin(backups, "<domainbackup><disks><disk name='vda'>"
                          f"<target file='{tmp_path}/p.qcow2'/></disk></disks></domainbackup>")
    wait_for(lambda: state_of(push) != "state: running", 20.0, "the push job to finish")
    assert state_of(push) == "state: completed"
    pull = begin(backups, "<domainbackup mode='pull'><incremental>c1</incremental>"
                          "<disks><disk name='vda'/></disks></domainbackup>")
    files = regular_files(dom)
    names = {str(p.relative_to(dom)) for p in files}
    # at least these (every regular file found is checked, whatever the tree adds)
    expected = {
        "xml", "errors", "checkpoints/new", "checkpoints/redefine",
        *(f"checkpoints/{c}/{f}" for c in ("c1", "c2") for f in ("xml", "size", "delete")),
        "backups/new",
        *(f"backups/{j.name}/{f}" for j in (push, pull) for f in ("xml", "status")),
        *(f"backups/{pull.name}/disks/vda{s}" for s in ("", ".qcow2", ".map")),
    }
    assert expected <= names, expected - names
    control = {"checkpoints/new", "checkpoints/redefine", "checkpoints/c1/delete",
               "checkpoints/c2/delete", "backups/new"}
    for p in files:
        rel = str(p.relative_to(dom))
        st = os.stat(p)
        data, fstat_size = read_all(p)
        assert (st.st_size, fstat_size) == (len(data), len(data)), rel
        assert (stat.S_IMODE(st.st_mode) == 0o200) == (rel in control), rel
        if rel in control:
            assert data == b"", rel  # write-only: reads as empty
        else:
            assert data, rel  # every generated file has content, and now a size
    # the incremental image holds the changed MiB, not the disk
    assert os.stat(pull / "disks/vda.qcow2").st_size < 4 * MiB


def test_a_handle_reads_one_snapshot_and_its_fstat_agrees(factory, vcfs_mount, sh):
    vm = small_vm(factory)
    mnt = vcfs_mount(vm.host_dir)
    dom = mnt.path / "vm1"
    errors = dom / "errors"
    assert write_errno(dom / "checkpoints/new", b"<one/>") != 0
    with open(errors, "rb", buffering=0) as f:
        first = f.read(10)
        # the file grows while the handle is open: others see it grown, at its new size ...
        assert write_errno(dom / "checkpoints/new", b"<two/>") != 0
        grown = cat(errors)
        assert len(grown.splitlines()) == 2
        assert int(sh(f"stat -c %s {errors}").stdout) == len(grown)
        # ... this handle keeps reading, and sizing, the snapshot it opened
        snapshot = first + f.read()
        assert len(snapshot.splitlines()) == 1 and grown.startswith(snapshot)
        assert os.fstat(f.fileno()).st_size == len(snapshot)


@pytest.mark.skipif(shutil.which("rsync") is None, reason="rsync is not installed")
def test_rsync_cp_and_tar_of_a_backup_copy_what_cat_shows(factory, vcfs_mount, sh, tmp_path):
    vm = small_vm(factory)
    mnt = vcfs_mount(vm.host_dir)
    dom = mnt.path / "vm1"
    os.mkdir(dom / "checkpoints/c1")
    vm.write("vda", 6 * MiB, MiB, 0x22)
    job = begin(dom / "backups", "<domainbackup mode='pull'><incremental>c1</incremental>"
                                 "<disks><disk name='vda'/></disks></domainbackup>")
    files = [p.relative_to(job) for p in regular_files(job)]
    assert {"xml", "status", "disks/vda", "disks/vda.qcow2", "disks/vda.map"} <= {
        str(f) for f in files}
    copies = {"rsync": tmp_path / "rsync", "cp": tmp_path / "cp", "tar": tmp_path / "tar"}
    copies["tar"].mkdir()
    tarball = tmp_path / "b.tar"
    for cmd in (f"rsync -a {job}/ {copies['rsync']}/",
                f"cp -a {job} {copies['cp']}",
                f"tar -C {job} -cf {tarball} . && tar -C {copies['tar']} -xf {tarball}"):
        r = sh(cmd)
        assert (r.returncode, r.stderr) == (0, ""), cmd
    for f in files:
        shown = cat(job / f)
        mode = stat.S_IMODE(os.stat(job / f).st_mode)
        for tool, copy in copies.items():
            got = (copy / f).read_bytes()
            assert stat.S_IMODE(os.stat(copy / f).st_mode) == mode, (tool, f)
            if str(f) == "status":
                # Progress moves while the images are read: the copy is some whole status.
                lines = got.decode().splitlines()
                assert got.endswith(b"\n") and len(lines) == 5, (tool, got)
                assert lines[:2] == ["state: running", "mode: pull"], (tool, got)
                assert lines[2].startswith("disk vda: ") and lines[3].startswith("nbd-read: ")
                assert lines[4].startswith("scratch vda: ")
            else:
                assert got == shown, (tool, f)


def test_rsync_of_a_whole_domain_copies_control_files_as_empty_files(factory, vcfs_mount, sh,
                                                                     tmp_path):
    vm = small_vm(factory)
    mnt = vcfs_mount(vm.host_dir)
    dom = mnt.path / "vm1"
    os.mkdir(dom / "checkpoints/c1")
    r = sh(f"rsync -a {dom}/ {tmp_path}/copy/")
    assert (r.returncode, r.stderr) == (0, "")
    copy = tmp_path / "copy"
    assert os.readlink(copy / "checkpoints/current") == "c1"
    for name in ("checkpoints/new", "checkpoints/redefine", "checkpoints/c1/delete",
                 "backups/new"):
        assert (copy / name).read_bytes() == b""
        assert stat.S_IMODE(os.stat(copy / name).st_mode) == 0o200
    assert (copy / "checkpoints/c1/xml").read_bytes() == (dom / "checkpoints/c1/xml").read_bytes()
    assert (copy / "xml").read_bytes() == (dom / "xml").read_bytes()
