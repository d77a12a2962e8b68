"""vcfs SIGKILLed at every named step of every operation: after a restart each operation has
completed or left no trace, and QEMU carries no debris (issue 5's crash walk)."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from tests.faultpoints import PULL_POINTS, PUSH_POINTS
from tests.integration.helpers import listing, wait_for, write_errno
from tests.vm import DiskSpec, QmpError

CREATE_POINTS = {  # point -> does the checkpoint exist after recovery?
    "checkpoint.create.transaction": False,
    "checkpoint.create.commit": False,
    "checkpoint.create.done": True,
}
DELETE_POINTS = {  # point -> is the checkpoint gone after recovery?
    "checkpoint.delete.transaction": False,
    "checkpoint.delete.metadata": True,
    "checkpoint.delete.done": True,
}


def qcow2_vm(vm_factory):
    return vm_factory("vm1", [DiskSpec("vda", size=32 << 20), DiskSpec("vdb", size=16 << 20)])


def crash(mnt, point: str, action, setup=None) -> None:
    """Run `action` (after `setup`) on a vcfs that kills itself at `point`, then start a
    clean vcfs."""
    mnt.close()
    mnt.env = {"VCFS_KILL": point}
    mnt.start()
    if setup:
        setup()
    action()
    wait_for(lambda: mnt.returncode is not None, what="vcfs to die")
    assert mnt.returncode == -9, mnt.log_text()
    subprocess.run(["fusermount3", "-uz", str(mnt.path)], capture_output=True)
    mnt.env = {}
    mnt.start()
    assert "vm1" in listing(mnt.path)


def kill_and_restart(mnt, between=None) -> None:
    """SIGKILL vcfs, clear its dead mount, (run `between`,) start it again."""
    os.kill(mnt.proc.pid, 9)
    wait_for(lambda: mnt.returncode is not None)
    subprocess.run(["fusermount3", "-uz", str(mnt.path)], capture_output=True)
    if between:
        between()
    mnt.start()


def debris(vm, mnt) -> dict:
    """Everything a backup could leave in QEMU or on disk."""
    nodes = sorted(n["node-name"] for n in vm.block_nodes())
    server_free = True
    try:
        vm.qmp("nbd-server-start", addr={"type": "unix",
                                         "data": {"path": str(vm.work_dir / "probe.sock")}})
        vm.qmp("nbd-server-stop")
    except Exception:  # noqa: BLE001 - a running NBD server refuses a second one
        server_free = False
    return {
        "nodes": nodes,
        # killed at backup.switch-device, vcfs had stopped the guest: recovery resumes it
        "guest": vm.qmp("query-status")["status"],
        "devices": sorted((d["qdev"], d["inserted"]["node-name"]) for d in vm.qmp("query-block")
                          if d.get("inserted")),
        "jobs": vm.qmp("query-jobs"),
        "exports": vm.qmp("query-block-exports"),
        "nbd server free": server_free,
        "scratch": listing(mnt.state_dir / "scratch"),
        "sockets": [n for n in listing(mnt.runtime_dir) if n.endswith(".sock")],
        "intents": listing(mnt.state_dir / "domains/vm1/intents"),
        "unnamed or temporary bitmaps": [
            b for n in vm.block_nodes() for b in n.get("dirty-bitmaps", [])
            if not b.get("name") or b["name"].startswith("backup-")
        ],
    }


CLEAN = {"jobs": [], "exports": [], "nbd server free": True, "scratch": [], "sockets": [],
         "intents": [], "unnamed or temporary bitmaps": []}


def assert_no_debris(vm, mnt, nodes_before: list[str]) -> None:
    """QEMU holds exactly the block nodes it had, each device on its disk's own node, the guest
    runs, and nothing else a backup leaves behind."""
    state = debris(vm, mnt)
    assert state.pop("nodes") == nodes_before
    assert state.pop("guest") == "running"
    assert all(node == f"{qdev.split('/')[3]}-format" for qdev, node in state.pop("devices"))
    assert state == CLEAN


@pytest.mark.parametrize("point", list(CREATE_POINTS))
def test_checkpoint_create_killed(vm_factory, vcfs_mount, point):
    vm = qcow2_vm(vm_factory)
    mnt = vcfs_mount(vm.host_dir)
    cps = mnt.path / "vm1/checkpoints"
    os.mkdir(cps / "a")
    crash(mnt, point, lambda: write_errno(cps / "new", b"<domaincheckpoint><name>c</name>"
                                          b"</domaincheckpoint>"))
    exists = CREATE_POINTS[point]
    assert ("c" in listing(cps)) == exists
    assert ("c" in vm.bitmaps("vda")) == exists and ("c" in vm.bitmaps("vdb")) == exists
    assert os.readlink(cps / "current") == ("c" if exists else "a")
    assert listing(mnt.state_dir / "domains/vm1/intents") == []
    assert "RECOVER" in (mnt.path / "vm1/errors").read_text()


@pytest.mark.parametrize("point", list(DELETE_POINTS))
def test_checkpoint_delete_killed(vm_factory, vcfs_mount, point):
    vm = qcow2_vm(vm_factory)
    mnt = vcfs_mount(vm.host_dir)
    cps = mnt.path / "vm1/checkpoints"
    for n in "abc":
        os.mkdir(cps / n)
    crash(mnt, point, lambda: subprocess.run(["rmdir", str(cps / "b")], capture_output=True))
    gone = DELETE_POINTS[point]
    assert ("b" in listing(cps)) != gone
    assert ("b" in vm.bitmaps("vda")) != gone
    assert os.readlink(cps / "c/parent") == ("../a" if gone else "../b")
    assert listing(mnt.state_dir / "domains/vm1/intents") == []


@pytest.mark.parametrize(("point", "mode"), [
    # push backups have no NBD server and no export, pull backups no scratch of their own
    # beside the store and no block job
    *((point, "pull") for point in PULL_POINTS), *((point, "push") for point in PUSH_POINTS)
])
def test_backup_begin_killed_leaves_nothing(vm_factory, vcfs_mount, tmp_path, point, mode):
    vm = qcow2_vm(vm_factory)
    mnt = vcfs_mount(vm.host_dir)
    dom = mnt.path / "vm1"
    os.mkdir(dom / "checkpoints/base")
    vm.write("vda", 0, 1 << 20, 0x11)
    before_nodes = sorted(n["node-name"] for n in vm.block_nodes())
    target = tmp_path / "push-vda.qcow2"
    disks = f"<disks><disk name='vda'><target file='{target}'/></disk></disks>"
    doc = (f"<domainbackup mode='{mode}'><incremental>base</incremental>"
           + (disks if mode == "push" else "")
           + "<domaincheckpoint><name>c2</name><disks><disk name='vda'/></disks>"
           "</domaincheckpoint></domainbackup>")
    crash(mnt, point, lambda: write_errno(dom / "backups/new", doc.encode()))
    assert_no_debris(vm, mnt, before_nodes)
    assert listing(dom / "checkpoints") == ["base", "current", "new", "redefine"]
    assert set(vm.bitmaps("vda")) == {"base"}
    assert not target.exists()
    # and the next backup works
    assert write_errno(dom / "backups/new", doc.encode()) == 0


def test_running_pull_backup_survives_a_crash(vm_factory, vcfs_mount):
    """A pull backup running when vcfs dies reappears after the restart and stays readable;
    ending it then leaves nothing behind."""
    vm = qcow2_vm(vm_factory)
    mnt = vcfs_mount(vm.host_dir)
    dom = mnt.path / "vm1"
    before_nodes = sorted(n["node-name"] for n in vm.block_nodes())
    vm.write("vda", 0, 1 << 20, 0x21)
    os.mkdir(dom / "backups/b")
    vm.write("vda", 0, 1 << 20, 0x22)  # after the backup began: must not show
    xml = (dom / "backups/b/xml").read_text()
    kill_and_restart(mnt)
    assert listing(dom / "backups") == ["b", "latest", "new"]
    assert (dom / "backups/b/xml").read_text() == xml
    with open(dom / "backups/b/disks/vda", "rb") as f:
        assert f.read(1 << 20) == b"\x21" * (1 << 20)
    assert "adopted pull backup b" in (dom / "errors").read_text()
    os.rmdir(dom / "backups/b")
    assert_no_debris(vm, mnt, before_nodes)


def test_pull_backup_gone_from_qemu_after_a_crash_is_cleaned_up(vm_factory, vcfs_mount):
    """If the backup's QEMU objects did not survive (here: its export was removed behind
    vcfs's back while vcfs was dead), recovery removes the rest instead of adopting it."""
    vm = qcow2_vm(vm_factory)
    mnt = vcfs_mount(vm.host_dir)
    dom = mnt.path / "vm1"
    before_nodes = sorted(n["node-name"] for n in vm.block_nodes())
    os.mkdir(dom / "backups/b")

    def remove_exports() -> None:
        for export in vm.qmp("query-block-exports"):
            vm.qmp("block-export-del", id=export["id"], mode="hard")
        time.sleep(0.1)

    kill_and_restart(mnt, between=remove_exports)
    assert_no_debris(vm, mnt, before_nodes)
    assert listing(dom / "backups") == ["new"]


@pytest.mark.parametrize("point", ["checkpoint.delete.transaction", "checkpoint.delete.metadata"])
def test_children_only_delete_killed(vm_factory, vcfs_mount, point):
    vm = qcow2_vm(vm_factory)
    mnt = vcfs_mount(vm.host_dir)
    cps = mnt.path / "vm1/checkpoints"
    for n in "abc":
        os.mkdir(cps / n)
    crash(mnt, point, lambda: write_errno(cps / "a/delete", b"children-only\n"))
    done = point.endswith("metadata")
    assert listing(cps) == (["a", "current", "new", "redefine"] if done
                            else ["a", "b", "c", "current", "new", "redefine"])
    assert sorted(vm.bitmaps("vda")) == (["a"] if done else ["a", "b", "c"])
    assert os.readlink(cps / "current") == ("a" if done else "c")


@pytest.mark.parametrize("point", ["backup.end.start", "backup.end.done"])
def test_backup_end_killed(vm_factory, vcfs_mount, point):
    vm = qcow2_vm(vm_factory)
    mnt = vcfs_mount(vm.host_dir)
    dom = mnt.path / "vm1"
    before_nodes = sorted(n["node-name"] for n in vm.block_nodes())
    vm.write("vda", 0, 1 << 20, 0x31)
    crash(mnt, point, lambda: subprocess.run(["rmdir", str(dom / "backups/b")],
                                             capture_output=True),
          setup=lambda: os.mkdir(dom / "backups/b"))
    if point.endswith("start"):  # the rmdir never happened: the backup is still there
        with open(dom / "backups/b/disks/vda", "rb") as f:
            assert f.read(4) == b"\x31" * 4
        os.rmdir(dom / "backups/b")
    assert_no_debris(vm, mnt, before_nodes)
    assert listing(dom / "backups") == ["new"]


@pytest.mark.parametrize("point", ["checkpoint.redefine.metadata", "checkpoint.redefine.current"])
def test_redefine_killed(vm_factory, vcfs_mount, point):
    vm = qcow2_vm(vm_factory)
    mnt = vcfs_mount(vm.host_dir)
    cps = mnt.path / "vm1/checkpoints"
    os.mkdir(cps / "a")
    saved = (cps / "a/xml").read_bytes()
    assert write_errno(cps / "a/delete", b"metadata-only\n") == 0
    crash(mnt, point, lambda: write_errno(cps / "redefine", saved))
    if point.endswith("metadata"):  # killed before writing anything: no trace
        assert listing(cps) == ["new", "redefine"]
    else:  # the metadata was written: the redefine is completed, current included
        assert listing(cps) == ["a", "current", "new", "redefine"]
        assert os.readlink(cps / "current") == "a"
        assert (cps / "a/xml").read_bytes() == saved
    assert listing(mnt.state_dir / "domains/vm1/intents") == []


def test_running_push_backup_survives_a_crash_and_finishes(vm_factory, vcfs_mount, tmp_path):
    """A push job (fleecing since issue 11: filter, scratch, snapshot-access, block job) running
    when vcfs dies is adopted, watched to its end, and then nothing of it is left but its
    target, which holds the disk as it was at the begin."""
    vm = vm_factory("vm1", [DiskSpec("vda", size=1 << 30)])
    mnt = vcfs_mount(vm.host_dir)
    dom = mnt.path / "vm1"
    before_nodes = sorted(n["node-name"] for n in vm.block_nodes())
    vm.write("vda", 0, 512 << 20, 0x31)
    target = tmp_path / "push.qcow2"
    doc = (f"<domainbackup mode='push'><disks><disk name='vda'><target file='{target}'/>"
           "</disk></disks></domainbackup>").encode()
    # Slowed to 1 MiB/s with at least 16 MiB left, so that it certainly runs through the
    # crash; a job that copied too much before it could be slowed is ended and begun again.
    for _ in range(5):
        assert write_errno(dom / "backups/new", doc) == 0
        job_id = os.readlink(dom / "backups/latest")
        job = dom / "backups" / job_id
        (qemu_job,) = vm.qmp("query-jobs")
        try:
            vm.qmp("block-job-set-speed", device=qemu_job["id"], speed=1 << 20)
        except QmpError as e:
            assert "concluded" in str(e), e
            wait_for(lambda j=job: not (j / "status").read_text().startswith("state: running"),
                     20)
            os.rmdir(job)
            target.unlink()
            continue
        (progress,) = vm.qmp("query-jobs")
        if progress["total-progress"] - progress["current-progress"] >= 16 << 20:
            break
        os.rmdir(job)  # cancels it and removes its target
    else:
        raise AssertionError("every push job copied too much before it could be slowed down")
    vm.write("vda", 0, 1 << 20, 0x32)  # after the point in time: must not reach the target
    kill_and_restart(mnt)
    assert "adopted push backup" in (dom / "errors").read_text()
    assert (job / "status").read_text().startswith("state: running\n")
    vm.qmp("block-job-set-speed", device=qemu_job["id"], speed=0)
    wait_for(lambda: not (job / "status").read_text().startswith("state: running"), 20,
             "the adopted push job to end")
    assert (job / "status").read_text().startswith("state: completed\n")
    assert_no_debris(vm, mnt, before_nodes)
    read = subprocess.run(["qemu-io", "-f", "qcow2", "-r", "-c", "read -P 0x31 0 1M",
                           str(target)], capture_output=True, text=True, check=True).stdout
    assert "Pattern verification failed" not in read and "read 1048576/1048576" in read
    os.rmdir(job)
    assert target.exists()
