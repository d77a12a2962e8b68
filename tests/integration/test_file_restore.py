"""Single-file restore, as the README's recipe does it, on a guest disk with a partition table
and an ext4 filesystem holding known files: from running backups (full and incremental) without
copying the disk, and from the saved qcow2 chain (full, full + incremental) through nbdfuse and
qemu-nbd.

The guest changes its filesystem between the two backups by writing, through its virtio disk,
exactly the blocks in which the Tuesday version of the filesystem differs from Monday's.
The test runs over a QMP socket and over libvirt (a domain of the tests' private libvirtd).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import BACKENDS
from tests.integration.helpers import errors_of, wait_for, write_errno
from tests.vm import DiskSpec
from vcfs.demo import MON, TUE

MiB = 1 << 20
DISK = 40 * MiB
PART_START = 2048
"""The partition's first sector (512-byte sectors): 1 MiB, as partitioning tools align it."""
PART_SIZE = 32 * MiB
BLOCK = 4096

TOOLS = ("mkfs.ext4", "debugfs", "e2fsck", "partx", "losetup", "mount", "umount", "nbdfuse",
         "qemu-nbd", "fusermount3")


def _missing() -> list[str]:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if os.geteuid() != 0:
        missing.append("root (loop devices and mount)")
    if not os.path.exists("/dev/loop-control"):
        missing.append("/dev/loop-control")
    return missing


pytestmark = pytest.mark.skipif(bool(_missing()), reason="single-file restore needs "
                                + ", ".join(_missing()))


def run(*cmd: str | os.PathLike[str]) -> str:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))}: {r.stderr or r.stdout}"
    return r.stdout


# --- the guest's disk --------------------------------------------------------------------------


def monday_files() -> dict[str, bytes]:
    return {
        "hello.txt": b"hello from Monday\n",
        "notes/plan.txt": b"1. back up\n2. restore one file\n",
        "data.bin": random.Random(7).randbytes(300 << 10),
    }


def tuesday_files() -> dict[str, bytes]:
    files = monday_files()
    files["hello.txt"] = b"hello from Tuesday, a little longer\n"
    files["tuesday.txt"] = b"written on Tuesday\n"
    return files


def ext4_images(work: Path) -> tuple[bytes, bytes]:
    """Monday's filesystem made by mkfs.ext4 -d; Tuesday's is the same edited by debugfs, so
    that the two differ only in the blocks a guest's edit would touch."""
    src = work / "files"
    for name, data in monday_files().items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
    mon, tue = work / "mon.ext4", work / "tue.ext4"
    run("mkfs.ext4", "-q", "-F", "-b", str(BLOCK), "-L", "guest", "-d", src, mon,
        f"{PART_SIZE // 1024}K")
    shutil.copyfile(mon, tue)
    for name in ("hello.txt", "tuesday.txt"):
        (work / name).write_bytes(tuesday_files()[name])
    run("debugfs", "-w", "-R", "rm /hello.txt", tue)
    for name in ("hello.txt", "tuesday.txt"):
        run("debugfs", "-w", "-R", f"write {work / name} /{name}", tue)
    run("e2fsck", "-fn", tue)  # the edited filesystem is sound
    return mon.read_bytes(), tue.read_bytes()


def disk_with_partition(part: bytes) -> bytes:
    """A DOS partition table with one Linux partition at PART_START holding `part`."""
    mbr = bytearray(512)
    sectors = len(part) // 512
    mbr[446:462] = struct.pack("<B3sB3sII", 0, b"\xfe\xff\xff", 0x83, b"\xfe\xff\xff",
                               PART_START, sectors)
    mbr[510:512] = b"\x55\xaa"
    head = bytes(mbr) + bytes(PART_START * 512 - 512)
    return head + part + bytes(DISK - len(head) - len(part))


def changed_runs(old: bytes, new: bytes) -> list[tuple[int, bytes]]:
    """(offset, bytes) of each run of BLOCK-sized blocks in which `new` differs from `old`."""
    runs: list[tuple[int, bytes]] = []
    for off in range(0, len(new), BLOCK):
        if old[off:off + BLOCK] == new[off:off + BLOCK]:
            continue
        if runs and runs[-1][0] + len(runs[-1][1]) == off:
            runs[-1] = (runs[-1][0], runs[-1][1] + new[off:off + BLOCK])
        else:
            runs.append((off, new[off:off + BLOCK]))
    return runs


# --- the recipe --------------------------------------------------------------------------------


@contextlib.contextmanager
def partition_mounted(image: Path, where: Path) -> Iterator[str]:
    """Partition 1 of the disk image `image`, mounted read-only at `where`, as the README says:
    `losetup --read-only --partscan` where the kernel makes partition devices, else a loop
    mount at the partition's offset (read with partx). Yields which of the two was used."""
    where.mkdir(exist_ok=True)
    dev = run("losetup", "--read-only", "--partscan", "--find", "--show", image).strip()
    name = Path(dev).name
    if Path(f"/sys/block/{name}/{name}p1").exists():
        wait_for(lambda: Path(f"{dev}p1").exists(), 5.0, f"{dev}p1")
        how, source, opts = "partscan", f"{dev}p1", "ro,noload"
    else:  # this kernel reads no partition table (or no udev): mount at the offset
        run("losetup", "-d", dev)
        dev = None
        start = int(run("partx", "-g", "-o", "START", "-n", "1", image))
        how, source, opts = "offset", str(image), f"ro,noload,loop,offset={start * 512}"
    try:
        run("mount", "-t", "ext4", "-o", opts, source, where)
        try:
            yield how
        finally:
            run("umount", where)
    finally:
        if dev is not None:
            run("losetup", "-d", dev)


@contextlib.contextmanager
def chain_as_file(image: Path, mountpoint: Path) -> Iterator[Path]:
    """A saved qcow2 image (with its backing chain) as a raw file: nbdfuse over qemu-nbd."""
    mountpoint.mkdir(exist_ok=True)
    pidfile = mountpoint.parent / "nbdfuse.pid"
    pidfile.unlink(missing_ok=True)
    raw = mountpoint / "disk.raw"
    proc = subprocess.Popen(["nbdfuse", "-r", "-P", str(pidfile), str(raw),
                             "[", "qemu-nbd", "-r", "-f", "qcow2", str(image), "]"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        # nbdfuse writes its pid file once the file is served
        wait_for(lambda: (pidfile.exists() and pidfile.read_text().strip())
                 or proc.poll() is not None, 30.0, "nbdfuse to serve")
        assert proc.poll() is None, proc.communicate()[0]
        yield raw
    finally:
        subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def files_in(where: Path) -> dict[str, bytes]:
    """Every regular file under `where` (ext4's lost+found left out), by relative path."""
    found = {}
    for root, dirs, files in os.walk(where):
        dirs[:] = [d for d in dirs if not (root == str(where) and d == "lost+found")]
        for name in files:
            p = Path(root) / name
            found[str(p.relative_to(where))] = p.read_bytes()
    return found


def begin(backups: Path, doc: str) -> Path:
    assert write_errno(backups / "new", doc.encode()) == 0, errors_of(backups.parent)[-1:]
    return backups / os.readlink(backups / "latest")


@pytest.fixture(params=BACKENDS)
def factory(request, vm_factory):
    """`vm_factory`, or that of the private libvirtd's domains: this test runs over both."""
    return vm_factory if request.param == "qmp" else request.getfixturevalue("lv_factory")


def test_one_file_back_from_running_backups_and_from_the_saved_chain(factory, vcfs_mount,
                                                                    tmp_path):
    mon_fs, tue_fs = ext4_images(tmp_path)
    assert monday_files() != tuesday_files()
    vm = factory("vm1", [DiskSpec("vda", size=DISK)], start=False)
    vm.work_dir.mkdir(parents=True, exist_ok=True)
    raw = tmp_path / "disk.raw"
    raw.write_bytes(disk_with_partition(mon_fs))
    run("qemu-img", "convert", "-O", "qcow2", raw, vm.image("vda"))
    vm.start()
    mnt = vcfs_mount(vm.host_dir)
    backups = mnt.path / "vm1/backups"
    saved, where = tmp_path / "saved", tmp_path / "restore"
    saved.mkdir()

    # Monday: a full backup; the files straight from the running backup's raw image
    job = begin(backups, MON)
    with partition_mounted(job / "disks/vda", where):
        assert files_in(where) == monday_files()
    shutil.copyfile(job / "disks/vda.qcow2", saved / "vda-mon.qcow2")
    os.rmdir(job)

    # The guest edits its filesystem: Tuesday's blocks, written through its disk.
    runs = changed_runs(mon_fs, tue_fs)
    assert 0 < sum(len(data) for _, data in runs) < MiB
    for offset, data in runs:
        vm.write_bytes("vda", PART_START * 512 + offset, data)

    # Tuesday: an incremental backup; its raw image is still the whole disk
    job = begin(backups, TUE)
    with partition_mounted(job / "disks/vda", where):
        assert files_in(where) == tuesday_files()
    shutil.copyfile(job / "disks/vda.qcow2", saved / "vda-tue.qcow2")
    os.rmdir(job)

    # From the saved chain: Tuesday through its base, and Monday alone
    for image, files in (("vda-tue.qcow2", tuesday_files()), ("vda-mon.qcow2", monday_files())):
        with chain_as_file(saved / image, tmp_path / "chain") as disk:
            with partition_mounted(disk, where):
                assert files_in(where) == files, image
