"""The guest never pays for a backup (issue 11), on real VMs through a real mount.

Every test makes the backup's side fail (a scratch that fills, hits its limit, cannot be
written at all or stalls; a target that fills; a guest that shuts down) while the guest writes,
and checks the same things: every guest write succeeded (qemu-io says so, QEMU logged no failed
write, the disk holds what was written), the backup says why it failed, and removing it leaves
nothing behind in QEMU or on disk.
"""

from __future__ import annotations

import errno
import filecmp
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.helpers import errors_of, listing, wait_for, write_errno
from tests.integration.test_backups import IDLE, begin, idle, qcow2_only, status_of
from tests.vm import VM

MiB = 1 << 20


def mount_tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                   check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs: a scratch or target on it fills long before the guest's writes end."""
    yield from mount_tmpfs(tmp_path / "tiny", "16m")


@pytest.fixture
def freezable_fs(tmp_path: Path) -> Iterator[Path]:
    """An ext4 file system on a loop device, which `fsfreeze` can stall (tmpfs cannot be
    frozen): every write to it then waits until it is thawed."""
    image, path = tmp_path / "ext4.img", tmp_path / "ext4"
    subprocess.run(["truncate", "-s", "2G", str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    path.mkdir()
    subprocess.run(["mount", "-o", "loop", str(image), str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["fsfreeze", "-u", str(path)], capture_output=True, check=False)
        subprocess.run(["umount", "-l", str(path)], check=False)


def freeze(path: Path, frozen: bool) -> None:
    subprocess.run(["fsfreeze", "-f" if frozen else "-u", str(path)], check=True)


def node_names(vm: VM) -> list[str]:
    return sorted(n["node-name"] for n in vm.block_nodes())


def guest_was_never_refused(vm: VM) -> None:
    log = vm.log_text()
    assert "write failed" not in log and "No space" not in log, log
    assert vm.qmp("query-status")["status"] == "running"


def assert_no_debris(vm: VM, mnt, nodes_before: list[str], *dirs: Path) -> None:
    """QEMU holds nothing of a backup; vcfs's directories and `dirs` hold no file (an ext4's
    lost+found aside)."""
    assert idle(vm) == IDLE
    assert node_names(vm) == nodes_before
    assert listing(mnt.runtime_dir) == []
    assert listing(mnt.state_dir / "domains/vm1/intents") == []
    for d in (mnt.state_dir / "scratch", *dirs):
        if d.exists():
            assert [n for n in listing(d) if n != "lost+found"] == [], d


def failed_within_a_second(job: Path) -> dict[str, str]:
    """The job's status once it shows `failed`; it must within a second of the cause."""
    wait_for(lambda: status_of(job)["state"] == "failed", 1.0, f"{job} to show failed")
    return status_of(job)


def reads_fail_with_eio(job: Path) -> None:
    for name in ("vda", "vda.qcow2"):
        with pytest.raises(OSError) as e:
            with open(job / "disks" / name, "rb") as f:
                f.read(MiB)
        assert e.value.errno == errno.EIO


# ---- full scratch ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["full", "incremental"])
def test_a_full_scratch_breaks_the_backup_never_the_guest(vm_factory, vcfs_mount, tiny_fs, mode):
    """libvirt's fleecing (blockdev-backup sync=none) fails the guest's write when the scratch
    is full; vcfs's copy-before-write filter (on-cbw-error=break-snapshot) fails the backup."""
    vm = qcow2_only(vm_factory)
    mnt = vcfs_mount(vm.host_dir)
    dom = mnt.path / "vm1"
    nodes_before = sorted(n["node-name"] for n in vm.block_nodes())
    vm.write("vda", 0, 64 * MiB, 0x11)
    inc = ""
    if mode == "incremental":
        os.mkdir(dom / "checkpoints/mon")
        vm.write("vda", 0, 32 * MiB, 0x12)
        inc = "<incremental>mon</incremental>"
    scratch = tiny_fs / "vda.qcow2"
    job = dom / "backups" / begin(
        dom / "backups", f"<domainbackup mode='pull'>{inc}<disks><disk name='vda'>"
        f"<scratch file='{scratch}'/></disk><disk name='vdb' backup='no'/></disks>"
        "</domainbackup>")
    assert status_of(job)["state"] == "running"
    started = time.monotonic()
    vm.write("vda", 0, 64 * MiB, 0x22)  # 64 MiB of old data to copy into 16 MiB: cannot fit
    took = time.monotonic() - started
    # The guest's write succeeded, all of it, and QEMU logged no failed write.
    assert vm.has_pattern("vda", 0, 64 * MiB, 0x22)
    assert "write failed" not in vm.log_text() and "No space" not in vm.log_text()
    assert took < 5, took
    # The backup is broken: status says so and why, errors has one line, reads fail with EIO.
    st = status_of(job)
    assert st["state"] == "failed", st
    assert st["error"].startswith("disk vda: fleecing snapshot broken: scratch full at "), st
    assert int(st["scratch vda"]) > 8 * MiB, st  # what the filter copied before it broke
    lines = [line for line in errors_of(dom) if f"backups/{job.name} FAILED" in line]
    assert len(lines) == 1, errors_of(dom)
    for name in ("vda", "vda.qcow2"):
        with pytest.raises(OSError) as e:
            with open(job / "disks" / name, "rb") as f:
                f.read(MiB)
        assert e.value.errno == errno.EIO
    time.sleep(1.2)  # the watcher keeps quiet after the first report
    assert len([line for line in errors_of(dom) if f"backups/{job.name} FAILED" in line]) == 1
    # rmdir cleans up as for any other backup.
    os.rmdir(job)
    assert idle(vm) == IDLE
    assert sorted(n["node-name"] for n in vm.block_nodes()) == nodes_before
    assert listing(tiny_fs) == [] and listing(mnt.state_dir / "scratch") == []
    assert listing(mnt.state_dir / "domains/vm1/intents") == []
    assert vm.qmp("query-status")["status"] == "running"
    # and the next backup works
    os.mkdir(dom / "backups/again")
    with open(dom / "backups/again/disks/vda", "rb") as f:
        assert f.read(MiB) == b"\x22" * MiB
    os.rmdir(dom / "backups/again")


# ---- scratch limit --------------------------------------------------------------------------


def test_the_scratch_limit_breaks_the_backup_never_the_guest(vm_factory, vcfs_mount):
    vm = qcow2_only(vm_factory)
    mnt = vcfs_mount(vm.host_dir, "--scratch-limit", "8")
    dom = mnt.path / "vm1"
    nodes_before = node_names(vm)
    vm.write("vda", 0, 64 * MiB, 0x11)
    os.mkdir(dom / "backups/b")
    job = dom / "backups/b"
    vm.write("vda", 0, 64 * MiB, 0x22)  # 64 MiB to copy against a limit of 8 MiB
    assert vm.has_pattern("vda", 0, 64 * MiB, 0x22)
    guest_was_never_refused(vm)
    st = failed_within_a_second(job)
    assert st["error"].startswith("disk vda: fleecing snapshot broken: scratch limit of "
                                  "8388608 bytes reached ("), st
    # The limit held: QEMU wrote nothing past it (the host's own count of the file's blocks),
    # while there was room for far more.
    assert 7 * MiB < int(st["scratch vda"]) <= 8 * MiB, st
    assert int(st["scratch vdb"]) < MiB, st  # the other disk's scratch is untouched
    reads_fail_with_eio(job)
    os.rmdir(job)
    assert_no_debris(vm, mnt, nodes_before)


# ---- scratch that cannot be written ---------------------------------------------------------


def test_a_scratch_that_cannot_take_even_the_first_copy(vm_factory, vcfs_mount, tiny_fs):
    vm = qcow2_only(vm_factory)
    mnt = vcfs_mount(vm.host_dir)
    dom = mnt.path / "vm1"
    nodes_before = node_names(vm)
    vm.write("vda", 0, 8 * MiB, 0x11)
    scratch = tiny_fs / "vda.qcow2"
    job = dom / "backups" / begin(
        dom / "backups", f"<domainbackup mode='pull'><disks><disk name='vda'>"
        f"<scratch file='{scratch}'/></disk><disk name='vdb' backup='no'/></disks>"
        "</domainbackup>")
    # Fill the file system to the last block: the first copy-before-write cannot be written.
    filler = tiny_fs / "filler"
    with open(filler, "wb") as f:
        with pytest.raises(OSError) as e:
            while True:
                f.write(b"\xff" * 65536)
                f.flush()
    assert e.value.errno == errno.ENOSPC
    used_before = status_of(job)["scratch vda"]
    vm.write("vda", 0, MiB, 0x22)
    assert vm.has_pattern("vda", 0, MiB, 0x22) and vm.has_pattern("vda", MiB, 7 * MiB, 0x11)
    guest_was_never_refused(vm)
    st = failed_within_a_second(job)
    assert st["error"].startswith("disk vda: fleecing snapshot broken: scratch full at "), st
    assert st["scratch vda"] == used_before  # not one cluster was copied
    assert len([line for line in errors_of(dom) if f"backups/{job.name} FAILED" in line]) == 1
    reads_fail_with_eio(job)
    os.rmdir(job)
    filler.unlink()
    assert_no_debris(vm, mnt, nodes_before, tiny_fs)


# ---- stalled scratch: cbw-timeout -----------------------------------------------------------


def test_a_stalled_scratch_holds_a_guest_write_at_most_the_cbw_timeout(
    vm_factory, vcfs_mount, freezable_fs
):
    vm = qcow2_only(vm_factory)
    mnt = vcfs_mount(vm.host_dir, "--scratch-dir", str(freezable_fs), "--cbw-timeout", "1")
    dom = mnt.path / "vm1"
    nodes_before = node_names(vm)
    vm.write("vda", 0, 8 * MiB, 0x11)
    os.mkdir(dom / "backups/b")
    job = dom / "backups/b"

    def timed_write(offset: int, pattern: int) -> float:
        started = time.monotonic()
        vm.write("vda", offset, 64 << 10, pattern)
        return time.monotonic() - started

    healthy = timed_write(0, 0x22)  # a copy into a healthy scratch: milliseconds
    assert status_of(job)["state"] == "running"
    freeze(freezable_fs, True)
    try:
        stalled = timed_write(MiB, 0x23)  # its copy cannot be written: held for the timeout
        after = timed_write(2 * MiB, 0x24)  # the snapshot broke: no copy, no wait
        st = failed_within_a_second(job)
    finally:
        freeze(freezable_fs, False)
    assert healthy < 0.5, healthy
    assert 0.9 < stalled < 2.5, stalled
    assert after < 0.5, after
    assert "took over the 1 s cbw-timeout" in st["error"], st
    for offset, pattern in ((0, 0x22), (MiB, 0x23), (2 * MiB, 0x24)):
        assert vm.has_pattern("vda", offset, 64 << 10, pattern)
    guest_was_never_refused(vm)
    reads_fail_with_eio(job)
    os.rmdir(job)
    assert_no_debris(vm, mnt, nodes_before, freezable_fs)


# ---- push -----------------------------------------------------------------------------------


def push_doc(target: Path) -> str:
    return (f"<domainbackup mode='push'><disks><disk name='vda'><target file='{target}'/>"
            "</disk><disk name='vdb' backup='no'/></disks></domainbackup>")


def test_a_push_whose_target_fills_fails_never_the_guest(vm_factory, vcfs_mount, tiny_fs):
    """QEMU's own backup job fails the guest's write when its target cannot take the copy; a
    vcfs push job copies from a fleecing snapshot, so only the job fails."""
    vm = qcow2_only(vm_factory)
    mnt = vcfs_mount(vm.host_dir)
    dom = mnt.path / "vm1"
    nodes_before = node_names(vm)
    vm.write("vda", 0, 64 * MiB, 0x11)
    errors: list[BaseException] = []

    def guest() -> None:
        try:
            for i in range(64):
                vm.write("vda", i * MiB, MiB, 0x22)
        except BaseException as e:  # noqa: BLE001 - reported by the test below
            errors.append(e)

    writer = threading.Thread(target=guest)
    job = dom / "backups" / begin(dom / "backups", push_doc(tiny_fs / "vda.qcow2"))
    writer.start()
    wait_for(lambda: status_of(job)["state"] != "running", 20, "the push job to end")
    writer.join()
    assert errors == []
    assert vm.has_pattern("vda", 0, 64 * MiB, 0x22)
    guest_was_never_refused(vm)
    st = status_of(job)
    assert st["state"] == "failed", st
    assert st["error"].startswith("disk vda: target full at "), st
    assert "the guest's writes went on" in st["error"], st
    # A failed job's target is removed; the scratch and every node went when the job ended.
    assert listing(tiny_fs) == []
    os.rmdir(job)
    assert_no_debris(vm, mnt, nodes_before)


def test_a_push_whose_scratch_fills_fails_never_the_guest(
    vm_factory, vcfs_mount, tmp_path, freezable_fs
):
    """The job stalls on its frozen target while the guest overwrites more than its scratch
    holds: the snapshot breaks, the guest's writes go on, and the thawed job fails saying why."""
    vm = qcow2_only(vm_factory, vda=512 * MiB)
    scratch = tmp_path / "scratch"
    fs = mount_tmpfs(scratch, "16m")
    next(fs)
    try:
        mnt = vcfs_mount(vm.host_dir, "--scratch-dir", str(scratch))
        dom = mnt.path / "vm1"
        nodes_before = node_names(vm)
        vm.write("vda", 0, 512 * MiB, 0x11)
        job = dom / "backups" / begin(dom / "backups", push_doc(freezable_fs / "vda.qcow2"))
        # Frozen mid-copy, with copies in flight (frozen before its first write, a job holds
        # one thread: measured, QEMU's default of 64 copies then held the guest's writes).
        time.sleep(0.1)
        freeze(freezable_fs, True)
        try:
            st = status_of(job)
            assert st["state"] == "running", f"the job ended before it could be stalled: {st}"
            started = time.monotonic()
            vm.write("vda", 0, 64 * MiB, 0x22)  # 64 MiB of old data into a 16 MiB scratch
            # Not held behind the job's stalled copies (QEMU's default of 64 copies in flight
            # took every I/O thread of the VM: this write then waited for the thaw).
            assert time.monotonic() - started < 3
            assert vm.has_pattern("vda", 0, 64 * MiB, 0x22)
            guest_was_never_refused(vm)
            assert status_of(job)["state"] == "running"  # the job waits on its target
        finally:
            freeze(freezable_fs, False)
        wait_for(lambda: status_of(job)["state"] != "running", 20, "the push job to end")
        st = status_of(job)
        assert st["state"] == "failed", st
        assert st["error"].startswith("disk vda: fleecing snapshot broken: scratch full at "), st
        assert listing(freezable_fs) == ["lost+found"]
        os.rmdir(job)
        assert_no_debris(vm, mnt, nodes_before, scratch)
    finally:
        fs.close()


# ---- a guest that shuts down ----------------------------------------------------------------


def test_with_preserve_shutdown_a_guest_that_shuts_down_waits_for_its_backup(
    vm_factory, vcfs_mount, tmp_path
):
    vm = qcow2_only(vm_factory)
    mnt = vcfs_mount(vm.host_dir, "--preserve-shutdown")
    dom = mnt.path / "vm1"
    vm.write("vda", 0, 64 * MiB, 0x11)
    vm.write("vdb", 0, 32 * MiB, 0x12)
    os.mkdir(dom / "backups/b")
    job = dom / "backups/b"
    # The disk at the instant of the backup, copied by QEMU itself for the comparison below.
    instant = tmp_path / "vda-at-begin.raw"
    subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", str(vm.image("vda")),
                    str(instant)], check=True)
    vm.write("vda", 0, 32 * MiB, 0x22)  # after the instant: must not show in the backup
    vm.guest_poweroff()
    vm.wait_status("shutdown")
    assert "guest: shut down; QEMU waits" in (job / "status").read_text()
    copy = tmp_path / "vda.raw"
    subprocess.run(["cp", str(job / "disks/vda"), str(copy)], check=True)
    assert filecmp.cmp(copy, instant, shallow=False)
    assert status_of(job)["state"] == "running"
    os.rmdir(job)
    assert vm.wait_exit(10) == 0  # the shutdown completed once the backup was removed
    wait_for(lambda: not (dom).exists(), 5, "the domain to go")
    assert listing(mnt.state_dir / "scratch") == [] and listing(mnt.runtime_dir) == []


def test_without_preserve_shutdown_a_guest_shutdown_fails_the_backup_cleanly(
    vm_factory, vcfs_mount
):
    vm = qcow2_only(vm_factory)
    mnt = vcfs_mount(vm.host_dir)
    dom = mnt.path / "vm1"
    vm.write("vda", 0, 8 * MiB, 0x11)
    os.mkdir(dom / "backups/b")
    job = dom / "backups/b"
    vm.guest_poweroff()
    assert vm.wait_exit(10) == 0  # QEMU's default: the guest's shutdown ends it
    wait_for(lambda: status_of(job)["state"] == "failed", 2, "the backup to fail")
    st = status_of(job)
    assert st["error"].startswith("QEMU is gone (the guest shut down"), st
    assert "--preserve-shutdown" in st["error"], st
    reads_fail_with_eio(job)
    assert write_errno(dom / "backups/new", b"<domainbackup/>") != 0
    os.rmdir(job)
    assert listing(mnt.state_dir / "scratch") == [] and listing(mnt.runtime_dir) == []
    assert listing(mnt.state_dir / "domains/vm1/intents") == []
