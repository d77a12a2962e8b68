"""Issue 5's reliability checks that need a real mount: libvirt's crash sequence, hostile
input on every control file, who may see what, and a full state directory."""

from __future__ import annotations

import errno
import os
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.integration.helpers import errors_of, listing, write_errno
from tests.vm import DiskSpec


def qcow2_vm(vm_factory):
    return vm_factory("vm1", [DiskSpec("vda", size=32 << 20), DiskSpec("vdb", size=16 << 20)])


def snapshot(vm, mnt):
    dom = mnt.path / "vm1"
    return (
        listing(dom / "checkpoints"), listing(dom / "backups"),
        {t: sorted(vm.bitmaps(t)) for t in ("vda", "vdb")},
        sorted(n["node-name"] for n in vm.block_nodes()), vm.qmp("query-jobs"),
        sorted(str(p.relative_to(mnt.state_dir)) for p in mnt.state_dir.rglob("*")),
    )


def test_libvirt_crash_sequence_leaves_a_consistent_tree(vm_factory, vcfs_mount):
    """libvirt 9.0 segfaults on: children-only delete failing part-way, then children."""
    vm = qcow2_vm(vm_factory)
    mnt = vcfs_mount(vm.host_dir)
    cps = mnt.path / "vm1/checkpoints"
    for n in ("a", "b", "c", "d"):
        os.mkdir(cps / n)
    vm.qmp("block-dirty-bitmap-remove", node="vda-format", name="c")  # one bitmap gone
    before = snapshot(vm, mnt)
    assert write_errno(cps / "a/delete", b"children-only\n") == errno.ENOENT
    assert "bitmap 'c' not found on disk 'vda'" in errors_of(mnt.path / "vm1")[-1]
    assert snapshot(vm, mnt) == before
    assert write_errno(cps / "a/delete", b"children\n") == errno.ENOENT
    assert snapshot(vm, mnt) == before
    # every checkpoint fully there: its metadata and its other bitmaps
    assert [os.readlink(cps / n / "parent") for n in ("b", "c", "d")] == ["../a", "../b", "../c"]
    # the way out: drop the broken one's metadata, then delete the rest
    assert write_errno(cps / "c/delete", b"metadata-only\n") == 0
    assert write_errno(cps / "a/delete", b"children\n") == 0
    assert listing(cps) == ["new", "redefine"]
    assert vm.bitmaps("vda") == {} and sorted(vm.bitmaps("vdb")) == ["c"]


CONTROL_FILES = ["checkpoints/new", "checkpoints/redefine", "backups/new",
                 "checkpoints/a/delete"]

hostile = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=200).map(str.encode),
    st.sampled_from([
        b"<domaincheckpoint><name>x\x00y</name></domaincheckpoint>",
        b"<domaincheckpoint><name>\xff\xfe</name></domaincheckpoint>",
        b"<!DOCTYPE x [<!ENTITY e SYSTEM 'file:///etc/passwd'>]><domaincheckpoint>"
        b"<name>&e;</name></domaincheckpoint>",
        b"<domainbackup>" + b"<a>" * 5000 + b"</a>" * 5000 + b"</domainbackup>",
        b"<domainbackup mode='pull'><disks><disk name='../../x'/></disks></domainbackup>",
        b"<domaincheckpoint><name>" + b"n" * 300 + b"</name></domaincheckpoint>",
        b"children children-only\n", b"\n", b"metadata-only,bogus\n",
        b"<domaincheckpoint>", b"<domainbackup mode='pull'", b"\x00" * 64,
    ]),
)


def test_hostile_input_on_every_control_file_changes_nothing(vm_factory, vcfs_mount):
    vm = qcow2_vm(vm_factory)
    mnt = vcfs_mount(vm.host_dir)
    dom = mnt.path / "vm1"
    os.mkdir(dom / "checkpoints/a")
    before = snapshot(vm, mnt)
    cases = 0

    @settings(max_examples=200, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(data=hostile, target=st.sampled_from(CONTROL_FILES))
    def attack(data: bytes, target: str) -> None:
        nonlocal cases
        cases += 1
        code = write_errno(dom / target, data)
        # Anything a request does not complete is refused at close, logged, and harmless.
        assert code in (0, errno.EINVAL, errno.ENOENT, errno.EEXIST, errno.EOPNOTSUPP,
                        errno.EFBIG), (target, data, code)
        assert snapshot(vm, mnt) == before, (target, data)

    attack()
    assert cases >= 200
    assert listing(mnt.path) == ["vm1"]  # the mount is alive


def open_path_to(path) -> None:
    """Let everyone traverse the directories above `path` (pytest makes them 0700)."""
    for parent in path.parents:
        os.chmod(parent, os.stat(parent).st_mode | 0o005)


def run_as_nobody(cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                           "sh", "-c", cmd], capture_output=True, text=True)


def test_other_users_see_nothing_by_default(vm_factory, vcfs_mount, tmp_path):
    vm = qcow2_vm(vm_factory)
    mnt = vcfs_mount(vm.host_dir)
    open_path_to(mnt.path)
    assert run_as_nobody(f"ls {mnt.path.parent}").returncode == 0
    r = run_as_nobody(f"ls {mnt.path}")
    assert r.returncode != 0 and "Permission denied" in r.stderr
    assert oct(mnt.state_dir.stat().st_mode & 0o777) == oct(0o700)


def test_allow_other_applies_the_modes(vm_factory, vcfs_mount, tmp_path):
    vm = qcow2_vm(vm_factory)
    mnt = vcfs_mount(vm.host_dir, "-o", "allow_other")
    open_path_to(mnt.path)
    dom = mnt.path / "vm1"
    os.mkdir(dom / "backups/b")
    assert run_as_nobody(f"ls {dom}/backups/b/disks").returncode == 0  # dirs 0755
    assert run_as_nobody(f"cat {dom}/xml").returncode == 0  # XML 0444
    r = run_as_nobody(f"head -c 1 {dom}/backups/b/disks/vda")  # images 0400
    assert r.returncode != 0 and "Permission denied" in r.stderr
    r = run_as_nobody(f"mkdir {dom}/checkpoints/x")
    assert r.returncode != 0 and "x" not in listing(dom / "checkpoints")
    r = run_as_nobody(f"echo children > {dom}/checkpoints/new")  # control files 0200
    assert r.returncode != 0
    run_dir = mnt.runtime_dir
    assert oct(run_dir.stat().st_mode & 0o777) == oct(0o700)
    sockets = [p for p in run_dir.iterdir() if p.suffix == ".sock"]
    assert sockets and all(oct(p.stat().st_mode & 0o777) == oct(0o600) for p in sockets)


@pytest.fixture
def tiny_fs(tmp_path):
    """A 1 MiB tmpfs to fill up."""
    path = tmp_path / "tiny"
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(path)], check=True)
    yield path
    subprocess.run(["umount", "-l", str(path)], check=False)


def test_full_state_directory_is_enospc_and_changes_nothing(vm_factory, vcfs_mount, tiny_fs):
    vm = qcow2_vm(vm_factory)
    state = tiny_fs / "state"
    mnt = vcfs_mount(vm.host_dir, "--state-dir", str(state))
    cps = mnt.path / "vm1/checkpoints"
    os.mkdir(cps / "a")
    filler = tiny_fs / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as full:
            assert full.errno == errno.ENOSPC
    before = (listing(cps), {t: sorted(vm.bitmaps(t)) for t in ("vda", "vdb")})
    with pytest.raises(OSError) as e:
        os.mkdir(cps / "b")
    assert e.value.errno == errno.ENOSPC
    assert (listing(cps), {t: sorted(vm.bitmaps(t)) for t in ("vda", "vdb")}) == before
    assert "ENOSPC" in errors_of(mnt.path / "vm1")[-1]
    # a pull backup whose scratch file cannot be written is refused just as cleanly
    nodes = sorted(n["node-name"] for n in vm.block_nodes())
    assert write_errno(mnt.path / "vm1/backups/new", b"<domainbackup mode='pull'/>") in (
        errno.ENOSPC, errno.EIO)
    assert sorted(n["node-name"] for n in vm.block_nodes()) == nodes
    assert vm.qmp("query-jobs") == [] and listing(mnt.path / "vm1/backups") == ["new"]
    filler.unlink()
    os.mkdir(cps / "b")


def test_a_stalled_qemu_stalls_only_its_own_domain(vm_factory, vcfs_mount):
    """Every QMP call has a deadline: a frozen QEMU costs its own requests an EIO after the
    deadline, while the other domains keep answering at once."""
    import signal
    import threading
    import time

    vm1 = qcow2_vm(vm_factory)
    vm2 = vm_factory("vm2", [DiskSpec("vda", size=16 << 20)])
    mnt = vcfs_mount(vm1.host_dir)
    assert listing(mnt.path) == ["vm1", "vm2"]
    os.kill(vm2.pid, signal.SIGSTOP)
    try:
        outcome: dict[str, object] = {}

        def stalled_read() -> None:
            started = time.monotonic()
            try:
                (mnt.path / "vm2/xml").read_text()
                outcome["error"] = None
            except OSError as e:
                outcome["error"] = e.errno
            outcome["seconds"] = time.monotonic() - started

        time.sleep(1.0)  # past the half-second vcfs may reuse the domain's info
        t = threading.Thread(target=stalled_read)
        t.start()
        time.sleep(0.5)
        started = time.monotonic()
        os.mkdir(mnt.path / "vm1/checkpoints/during")
        assert "vm1" in listing(mnt.path)
        assert time.monotonic() - started < 2.0
        t.join(30)
        assert not t.is_alive()
        assert outcome["error"] == errno.EIO and outcome["seconds"] < 15, outcome
    finally:
        os.kill(vm2.pid, signal.SIGCONT)
    assert "<name>vm2</name>" in (mnt.path / "vm2/xml").read_text()


def test_tcp_nbd_server_binds_only_where_the_server_name_says(vm_factory, vcfs_mount):
    import re

    vm = qcow2_vm(vm_factory)
    mnt = vcfs_mount(vm.host_dir)
    dom = mnt.path / "vm1"
    doc = b"<domainbackup mode='pull'><server transport='tcp' name='127.0.0.1'/></domainbackup>"
    assert write_errno(dom / "backups/new", doc) == 0
    port = re.search(r"port='(\d+)'", (dom / "backups/1/xml").read_text())[1]
    listening = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True).stdout
    local = [line.split()[3] for line in listening.splitlines() if line.split()[3].endswith(
        f":{port}")]
    assert local == [f"127.0.0.1:{port}"]
    os.rmdir(dom / "backups/1")
