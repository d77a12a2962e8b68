"""Costs that follow the data: holes answered by lseek, sparse copies, TiB-sized qcow2 views.

A raw view answers SEEK_DATA/SEEK_HOLE from the backup's extents, so `cp` copies only the data
and leaves a sparse file; the synthesized qcow2 of a 1 TiB or 16 TiB disk is built from its
extents and reads back, through stock qemu-img, as the disk at the instant of the backup.
Guest writes made after the backup began prove that both views are the point in time.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Mount
from tests.vm import VM, DiskSpec, scattered_image

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
UNIT = 64 * KiB
SIZE = 64 * MiB


def data_runs(path: Path) -> list[tuple[int, int]]:
    """(start, end) of every data run of a file, walked with SEEK_DATA/SEEK_HOLE."""
    runs = []
    fd = os.open(path, os.O_RDONLY)
    try:
        pos = 0
        while True:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                assert e.errno == errno.ENXIO
                return runs
            pos = os.lseek(fd, start, os.SEEK_HOLE)
            runs.append((start, pos))
    finally:
        os.close(fd)


def seek(path: Path, offset: int, whence: int) -> int:
    """lseek's answer, or minus the errno."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, offset, whence)
    except OSError as e:
        return -e.errno
    finally:
        os.close(fd)


def test_seek_data_and_hole_follow_the_extents_at_the_instant_of_the_backup(
    vm_factory: Callable[..., VM], vcfs_mount: Callable[..., Mount], tmp_path: Path
):
    vm = vm_factory("vm1", [DiskSpec("vda", size=SIZE), DiskSpec("vdb", size=32 * MiB)])
    model = bytearray(SIZE)

    def write(offset: int, length: int, pattern: int) -> None:
        vm.write("vda", offset, length, pattern)
        model[offset : offset + length] = bytes([pattern]) * length

    write(0, UNIT, 0x11)                       # data at the very start
    write(10 * MiB, MiB, 0x22)                 # in the middle
    vm.hmp('qemu-io -d /machine/peripheral/vda/virtio-backend "write -z 20M 64k"')
    write(SIZE - UNIT, UNIT, 0x33)             # up to the very end
    dom = vcfs_mount(vm.host_dir).path / "vm1"
    os.mkdir(dom / "backups/b")
    write(30 * MiB, MiB, 0x44)                 # after the backup began: not in it
    model[30 * MiB : 31 * MiB] = bytes(MiB)
    raw, empty = dom / "backups/b/disks/vda", dom / "backups/b/disks/vdb"

    # Allocated zeros are a hole too: they read as zeros, and cp need not read them.
    assert data_runs(raw) == [(0, UNIT), (10 * MiB, 11 * MiB), (SIZE - UNIT, SIZE)]
    assert seek(raw, 10 * MiB + 4096, os.SEEK_DATA) == 10 * MiB + 4096  # inside an extent
    assert seek(raw, 10 * MiB + 4096, os.SEEK_HOLE) == 11 * MiB
    assert seek(raw, 11 * MiB, os.SEEK_DATA) == SIZE - UNIT  # over the zeros and the new write
    assert seek(raw, 20 * MiB, os.SEEK_HOLE) == 20 * MiB
    assert seek(raw, SIZE - 1, os.SEEK_HOLE) == SIZE          # the end counts as a hole
    for whence in (os.SEEK_DATA, os.SEEK_HOLE):                # at and past the end: ENXIO
        assert seek(raw, SIZE, whence) == -errno.ENXIO
        assert seek(raw, SIZE + GiB, whence) == -errno.ENXIO
    assert data_runs(empty) == []                              # a disk that is all hole
    assert seek(empty, 0, os.SEEK_HOLE) == 0
    assert seek(empty, 0, os.SEEK_DATA) == -errno.ENXIO
    # Files without holes are all data: the qcow2 view is packed, rendered files are text.
    qcow2 = dom / "backups/b/disks/vda.qcow2"
    assert data_runs(qcow2) == [(0, qcow2.stat().st_size)]
    xml_size = len((dom / "xml").read_bytes())
    assert seek(dom / "xml", 0, os.SEEK_HOLE) == xml_size
    assert seek(dom / "xml", 1, os.SEEK_DATA) == 1

    # cp skips the holes without reading them and writes a sparse copy of the point in time.
    for flags in ([], ["--sparse=always"]):
        copy = tmp_path / "copy.raw"
        subprocess.run(["cp", *flags, str(raw), str(copy)], check=True)
        assert copy.read_bytes() == model
        allocated = copy.stat().st_blocks * 512
        assert UNIT + MiB + UNIT <= allocated <= UNIT + MiB + UNIT + 256 * KiB, allocated
        copy.unlink()
    served = int(next(line.split()[-1] for line in (dom / "backups/b/status").read_text()
                      .splitlines() if line.startswith("nbd-read:")))
    assert served <= 2 * (UNIT + MiB + UNIT)  # two copies: only the data went over NBD
    # tar --sparse stores the holes as holes, and restores the same bytes.
    subprocess.run(["tar", "-C", str(raw.parent), "--sparse", "-cf", str(tmp_path / "t.tar"),
                    "vda"], check=True)
    assert (tmp_path / "t.tar").stat().st_size < 4 * MiB
    subprocess.run(["tar", "-C", str(tmp_path), "-xf", str(tmp_path / "t.tar")], check=True)
    assert (tmp_path / "vda").read_bytes() == model


@pytest.mark.parametrize("size", [TiB, 16 * TiB], ids=["1TiB", "16TiB"])
def test_qcow2_view_of_a_huge_sparse_disk_restores_the_point_in_time(
    size: int, vm_factory: Callable[..., VM], vcfs_mount: Callable[..., Mount], tmp_path: Path
):
    vm = vm_factory("vm1", [DiskSpec("vda", size=size)], start=False)
    vm.work_dir.mkdir(parents=True, exist_ok=True)
    extents = scattered_image(vm.image("vda"), size, 2000, seed=size)
    reference = tmp_path / "reference.qcow2"  # the disk as it is when the backup begins
    subprocess.run(["cp", "--sparse=always", str(vm.image("vda")), str(reference)], check=True)
    vm.start()
    dom = vcfs_mount(vm.host_dir).path / "vm1"
    os.mkdir(dom / "backups/b")
    for offset, _ in extents[::200]:  # the guest overwrites ten extents and writes anew
        vm.write("vda", offset, UNIT, 0xEE)
    vm.write("vda", size - MiB, MiB, 0xEE)
    disks = dom / "backups/b/disks"

    view = disks / "vda.qcow2"
    copy = tmp_path / "vda.qcow2"
    subprocess.run(["cp", str(view), str(copy)], check=True)
    assert copy.stat().st_size == view.stat().st_size
    # Packed: data clusters plus at most one L2 table per extent and a few metadata clusters.
    assert view.stat().st_size <= 2 * 2000 * UNIT + 64 * MiB
    check = subprocess.run(["qemu-img", "check", str(copy)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    same = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", str(reference),
                           str(copy)], capture_output=True, text=True, timeout=120)
    assert same.returncode == 0, same.stdout + same.stderr

    # The raw view: its data runs are the extents, found without reading the holes.
    runs = data_runs(disks / "vda")
    assert runs == [(o, o + n) for o, n in _merged(extents)]


def _merged(extents: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Adjacent 64 KiB extents as one run: (start, length)."""
    out: list[list[int]] = []
    for offset, _ in extents:
        if out and out[-1][0] + out[-1][1] == offset:
            out[-1][1] += UNIT
        else:
            out.append([offset, UNIT])
    return [(o, n) for o, n in out]
