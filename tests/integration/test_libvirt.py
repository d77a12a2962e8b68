"""vcfs over libvirt: a real libvirtd (tests.libvirtd), real QEMU, a real mount of a libvirt URI.

The same tree as over QMP sockets, served through libvirt's checkpoint and backup API. After
each operation the tests look at what libvirt and QEMU themselves report (libvirt's API, and
QEMU's bitmaps through libvirt's monitor pass-through), never only at what vcfs says.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import libvirt
import pytest

from tests.integration.helpers import errors_of, listing, wait_for, write_errno
from tests.integration.test_tls import make_certificates
from tests.libvirtd import Libvirtd, LibvirtVM
from tests.vm import DiskSpec

MiB = 1 << 20


@pytest.fixture
def lv(lv_factory):
    """`lv1`: qcow2 vda (64 MiB) and vdb (32 MiB), raw vdc (16 MiB)."""
    return lv_factory("lv1", [DiskSpec("vda", size=64 * MiB), DiskSpec("vdb", size=32 * MiB),
                              DiskSpec("vdc", fmt="raw", size=16 * MiB)])


@pytest.fixture
def lv_qcow2(lv_factory):
    """`lv1` with one qcow2 disk, vda (64 MiB)."""
    return lv_factory("lv1", [DiskSpec("vda", size=64 * MiB)])


def mount(vcfs_mount, libvirtd):
    return vcfs_mount(libvirtd.uri)


def expected_image(size: int, writes: list[tuple[int, int, int]]) -> bytes:
    """The disk after `writes` of (offset, length, pattern) on zeros."""
    data = bytearray(size)
    for offset, length, pattern in writes:
        data[offset:offset + length] = bytes([pattern]) * length
    return bytes(data)


def compare(expected: Path, image: Path) -> subprocess.CompletedProcess[str]:
    """`qemu-img compare` of a raw file with an image (a qcow2 follows its backing chain)."""
    fmt = "qcow2" if image.suffix == ".qcow2" else "raw"
    return subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", fmt, str(expected),
                           str(image)], capture_output=True, text=True)


def job_type(vm) -> int:
    return vm.dom.jobInfo()[0]


# --- the host: domains of a libvirt connection --------------------------------------------------


def test_domains_appear_and_vanish_with_libvirt(libvirtd, lv_factory, vcfs_mount, sh):
    lv1 = lv_factory("lv1", [DiskSpec("vda", size=16 * MiB)])
    mnt = mount(vcfs_mount, libvirtd)
    assert listing(mnt.path) == ["lv1"]
    assert listing(mnt.path / "lv1") == ["backups", "checkpoints", "errors", "xml"]
    xml = (mnt.path / "lv1/xml").read_text()
    # libvirt's own live document: its uuid, its device aliases.
    assert f"<uuid>{lv1.uuid}</uuid>" in xml and "<alias name='virtio-disk0'/>" in xml

    lv2 = lv_factory("lv2", [DiskSpec("vda", size=16 * MiB)])
    # No listing of the root in between: the lifecycle event makes vcfs rescan.
    wait_for(lambda: "lv2" in os.listdir(mnt.path), 5, "lv2 to appear")
    lv2.destroy()  # a transient domain stops existing
    wait_for(lambda: "lv2" not in os.listdir(mnt.path), 5, "lv2 to vanish")
    assert listing(mnt.path) == ["lv1"]


def test_a_libvirt_uri_that_does_not_answer_fails_the_mount(tmp_path, sh):
    r = sh(f"{sys.executable} -m vcfs mount -f "
           f"--state-dir {tmp_path}/s --runtime-dir {tmp_path}/r "
           f"'qemu:///system?socket={tmp_path}/nothing' {tmp_path}", timeout=60)
    assert r.returncode != 0
    assert "nothing" in r.stderr


# --- checkpoints ----------------------------------------------------------------------------------


def test_checkpoints_through_libvirt(libvirtd, lv, vcfs_mount, sh):
    mnt = mount(vcfs_mount, libvirtd)
    cps = mnt.path / "lv1/checkpoints"
    assert listing(cps) == ["new", "redefine"]

    # mkdir: every disk that can hold a bitmap (not the raw vdc), as libvirt records it.
    assert sh(f"mkdir {cps}/c1").returncode == 0
    assert [c.getName() for c in lv.dom.listAllCheckpoints()] == ["c1"]
    assert set(lv.bitmaps("vda")) == {"c1"} and set(lv.bitmaps("vdb")) == {"c1"}
    assert lv.bitmaps("vda")["c1"]["persistent"] and lv.bitmaps("vda")["c1"]["recording"]
    xml = (cps / "c1/xml").read_text()
    assert "<disk name='vdc' checkpoint='no'/>" in xml and f"<uuid>{lv.uuid}</uuid>" in xml
    assert os.readlink(cps / "current") == "c1"
    assert not (cps / "c1/parent").exists()

    lv.write("vda", 0, MiB, 0xAB)
    assert sh(f"mkdir {cps}/c2").returncode == 0
    lv.write("vdb", 0, 64 << 10, 0x11)
    assert os.readlink(cps / "c2/parent") == "../c1"
    assert os.readlink(cps / "current") == "c2"
    assert (cps / "c1/size").read_text() == f"vda {MiB}\nvdb {64 << 10}\n"
    assert (cps / "c2/size").read_text() == f"vda 0\nvdb {64 << 10}\n"

    # new: the document as given.
    doc = ("<domaincheckpoint><name>c3</name><description>weekly</description>"
           "<disks><disk name='vdb'/><disk name='vda' checkpoint='no'/>"
           "<disk name='vdc' checkpoint='no'/></disks></domaincheckpoint>")
    assert write_errno(cps / "new", doc.encode()) == 0
    assert "c3" in lv.bitmaps("vdb") and "c3" not in lv.bitmaps("vda")
    assert lv.dom.checkpointLookupByName("c3").getParent().getName() == "c2"
    assert "<description>weekly</description>" in (cps / "c3/xml").read_text()

    # redefine: metadata only, for bitmaps that exist (validated).
    saved = lv.dom.checkpointLookupByName("c3").getXMLDesc(0)
    assert write_errno(cps / "c3/delete", b"metadata-only\n") == 0
    assert "c3" not in listing(cps) and "c3" in lv.bitmaps("vdb")
    assert write_errno(cps / "redefine", saved.encode()) == 0
    assert "c3" in listing(cps)
    assert sorted(c.getName() for c in lv.dom.listAllCheckpoints()) == ["c1", "c2", "c3"]

    # rmdir: libvirt deletes the bitmaps; children re-parent.
    assert sh(f"rmdir {cps}/c2").returncode == 0
    assert "c2" not in lv.bitmaps("vda")
    assert os.readlink(cps / "c3/parent") == "../c1"
    assert os.readlink(cps / "current") == "c3"
    assert write_errno(cps / "c1/delete", b"children\n") == 0
    assert listing(cps) == ["new", "redefine"]
    assert lv.bitmaps("vda") == {} and lv.bitmaps("vdb") == {}
    assert lv.dom.listAllCheckpoints() == []


@pytest.mark.parametrize(("doc", "code", "words"), [
    ("<domaincheckpoint><name>x</nam></domaincheckpoint>", errno.EINVAL, "mismatch"),
    ("<domaincheckpoint><nam>x</nam></domaincheckpoint>", errno.EINVAL, "schema"),
    ("<domaincheckpoint><name>x</name><disks><disk name='vdz'/></disks></domaincheckpoint>",
     errno.ENOENT, "no disk named 'vdz'"),
    # libvirt's default is every disk: the raw vdc cannot hold a bitmap.
    ("<domaincheckpoint><name>x</name></domaincheckpoint>", errno.EOPNOTSUPP,
     "unsupported for storage type raw"),
    ("<domaincheckpoint><name>new</name></domaincheckpoint>", errno.EINVAL, "reserved"),
])
def test_refused_checkpoints_carry_libvirts_message(libvirtd, lv, vcfs_mount, doc, code, words):
    mnt = mount(vcfs_mount, libvirtd)
    cps = mnt.path / "lv1/checkpoints"
    assert write_errno(cps / "new", doc.encode()) == code
    last = errors_of(mnt.path / "lv1")[-1]
    assert "checkpoints/new" in last and words in last, last
    assert lv.dom.listAllCheckpoints() == [] and lv.bitmaps("vda") == {}


def test_checkpoint_refusals_for_existing_and_broken(libvirtd, lv, vcfs_mount, sh):
    mnt = mount(vcfs_mount, libvirtd)
    cps = mnt.path / "lv1/checkpoints"
    assert sh(f"mkdir {cps}/c1").returncode == 0
    doc = (b"<domaincheckpoint><name>c1</name><disks><disk name='vda'/>"
           b"<disk name='vdb' checkpoint='no'/><disk name='vdc' checkpoint='no'/></disks>"
           b"</domaincheckpoint>")
    assert write_errno(cps / "new", doc) == errno.EEXIST
    assert "already exists" in errors_of(mnt.path / "lv1")[-1]
    # Redefine validates: a checkpoint whose bitmap does not exist is refused.
    # Only the checkpoint's name and bitmap: "c1" may also occur in the domain's uuid.
    bogus = (lv.dom.checkpointLookupByName("c1").getXMLDesc(0)
             .replace("<name>c1</name>", "<name>cx</name>", 1)
             .replace("bitmap='c1'", "bitmap='cx'"))
    assert write_errno(cps / "redefine", bogus.encode()) == errno.EINVAL
    assert "missing or broken bitmap 'cx'" in errors_of(mnt.path / "lv1")[-1]
    assert write_errno(cps / "c1/delete", b"sideways\n") == errno.EINVAL
    assert [c.getName() for c in lv.dom.listAllCheckpoints()] == ["c1"]


# --- backups ------------------------------------------------------------------------------------
# Most backup cases run over both backends in test_backups.py (a second backup is EBUSY at once,
# mkdir backs up every disk, rmdir of a running push cancels it and libvirt removes the target);
# these are libvirt's own.


def test_full_and_incremental_pull_read_back_equal(libvirtd, lv_qcow2, vcfs_mount, sh, tmp_path):
    lv = lv_qcow2
    mnt = mount(vcfs_mount, libvirtd)
    backups = mnt.path / "lv1/backups"
    size = 64 * MiB
    writes = [(0, MiB, 0x11), (5 * MiB, 3 * MiB, 0x22), (40 * MiB, 64 << 10, 0x33)]
    for w in writes:
        lv.write("vda", *w)

    # Monday: a full pull backup creating checkpoint `mon`, in one backupBegin.
    doc = ("<domainbackup mode='pull'><domaincheckpoint><name>mon</name></domaincheckpoint>"
           "</domainbackup>")
    assert write_errno(backups / "new", doc.encode()) == 0
    assert os.readlink(backups / "latest") == "1"
    assert [c.getName() for c in lv.dom.listAllCheckpoints()] == ["mon"]
    lv.write("vda", 0, 64 << 10, 0xEE)  # after the backup began: not in Monday's image
    xml = (backups / "1/xml").read_text()
    sock = str(mnt.runtime_dir / "lv1-1.sock")
    assert f"<server transport='unix' socket='{sock}'/>" in xml
    assert "backupmode='full'" in xml and "exportname='vda'" in xml
    assert listing(backups / "1/disks") == ["vda", "vda.map", "vda.qcow2", "vda.qcow2.sha256",
                                            "vda.sha256"]
    store = tmp_path / "store"
    store.mkdir()
    r = sh(f"cp {backups}/1/disks/vda.qcow2 {store}/vda-mon.qcow2 && "
           f"cp {backups}/1/disks/vda {store}/mon.raw")
    assert r.returncode == 0, r.stderr
    (tmp_path / "mon.expected").write_bytes(expected_image(size, writes))
    assert compare(tmp_path / "mon.expected", store / "vda-mon.qcow2").returncode == 0
    assert compare(tmp_path / "mon.expected", store / "mon.raw").returncode == 0
    status = (backups / "1/status").read_text()
    assert status.startswith("state: running\nmode: pull\ndisk vda: ")
    done = int(status.split("disk vda: ")[1].split("/")[0])
    assert 4 * MiB <= done <= size  # the data read by the two copies (cp skips the holes)
    assert sh(f"rmdir {backups}/1").returncode == 0
    assert job_type(lv) == libvirt.VIR_DOMAIN_JOB_NONE
    assert not os.path.exists(sock)
    assert listing(backups) == ["new"]

    # Tuesday: what changed since `mon`, saved beside Monday's image, restores as a chain.
    later = [(0, 64 << 10, 0xEE), (10 * MiB, 2 * MiB, 0x44), (63 * MiB, MiB, 0x55)]
    for w in later[1:]:
        lv.write("vda", *w)
    doc = ("<domainbackup mode='pull'><incremental>mon</incremental><domaincheckpoint>"
           "<name>tue</name></domaincheckpoint></domainbackup>")
    assert write_errno(backups / "new", doc.encode()) == 0
    assert os.readlink(backups / "latest") == "2"
    lv.write("vda", 20 * MiB, MiB, 0x66)  # after `new`
    xml = (backups / "2/xml").read_text()
    assert "backupmode='incremental' incremental='mon'" in xml
    # The map flags exactly what changed since `mon` (libvirt's export bitmap).
    dirty = [(e["start"], e["length"]) for e in json.loads((backups / "2/disks/vda.map")
                                                          .read_text()) if e["dirty"]]
    assert dirty == [(0, 64 << 10), (10 * MiB, 2 * MiB), (63 * MiB, MiB)]
    # The raw view's holes are where the disk holds no data, for SEEK_DATA/SEEK_HOLE.
    fd = os.open(backups / "2/disks/vda", os.O_RDONLY)
    try:
        assert os.lseek(fd, 0, os.SEEK_HOLE) == MiB
        assert os.lseek(fd, MiB, os.SEEK_DATA) == 5 * MiB
    finally:
        os.close(fd)
    r = sh(f"cp {backups}/2/disks/vda.qcow2 {store}/vda-tue.qcow2")
    assert r.returncode == 0, r.stderr
    # Only the changed clusters (3 MiB + 64 KiB) are in the incremental image.
    assert os.path.getsize(store / "vda-tue.qcow2") < 4 * MiB
    info = sh(f"qemu-img info --output=json {store}/vda-tue.qcow2").stdout
    assert '"backing-filename": "vda-mon.qcow2"' in info
    (tmp_path / "tue.expected").write_bytes(expected_image(size, writes + later))
    assert compare(tmp_path / "tue.expected", store / "vda-tue.qcow2").returncode == 0
    assert os.readlink(mnt.path / "lv1/checkpoints/tue/parent") == "../mon"
    assert os.readlink(mnt.path / "lv1/checkpoints/current") == "tue"
    assert set(lv.bitmaps("vda")) >= {"mon", "tue"}
    assert sh(f"rmdir {backups}/2").returncode == 0
    assert job_type(lv) == libvirt.VIR_DOMAIN_JOB_NONE
    # libvirt removed the scratch files vcfs named for it.
    assert os.listdir(mnt.state_dir / "scratch") == []


def test_refused_backups_change_nothing(libvirtd, lv, vcfs_mount, sh):
    mnt = mount(vcfs_mount, libvirtd)
    backups = mnt.path / "lv1/backups"
    cases = [
        (b"<domainbackup mode='pull'><incremental>nope</incremental></domainbackup>",
         errno.ENOENT, "not found"),
        (b"<domainbackup mode='pull'><disks></domainbackup>", errno.EINVAL, "malformed"),
        (b"<domainbackup mode='pull'><disks><disk name='vda'><scratch file='/etc/passwd'/>"
         b"</disk></disks></domainbackup>", errno.EEXIST, "exists"),
        # One call: the checkpoint libvirt refuses (a raw disk) takes the backup with it.
        (b"<domainbackup mode='pull'><domaincheckpoint><name>x</name></domaincheckpoint>"
         b"</domainbackup>", errno.EOPNOTSUPP, "storage type raw"),
    ]
    for doc, code, words in cases:
        assert write_errno(backups / "new", doc) == code, doc
        assert words in errors_of(mnt.path / "lv1")[-1], doc
        assert job_type(lv) == libvirt.VIR_DOMAIN_JOB_NONE
        assert lv.dom.listAllCheckpoints() == [] and lv.bitmaps("vda") == {}
    assert listing(backups) == ["new"]
    assert os.listdir(mnt.runtime_dir) == [] and os.listdir(mnt.state_dir / "scratch") == []


def test_a_backup_ended_outside_vcfs_fails_its_readers(libvirtd, lv_qcow2, vcfs_mount, sh):
    lv = lv_qcow2
    mnt = mount(vcfs_mount, libvirtd)
    backups = mnt.path / "lv1/backups"
    assert sh(f"mkdir {backups}/b").returncode == 0
    lv.dom.abortJob()  # virsh domjobabort: libvirt's job-completed event follows
    wait_for(lambda: "state: running" not in (backups / "b/status").read_text(), 5,
             "the job to end")
    with pytest.raises(OSError) as e:
        (backups / "b/disks/vda").read_bytes()
    assert e.value.errno == errno.EIO
    assert sh(f"rmdir {backups}/b").returncode == 0


# --- libvirtd restarts, inactive domains ------------------------------------------------------


def test_libvirtd_restart_during_a_pull_backup(libvirtd, lv_qcow2, vcfs_mount, sh, tmp_path):
    lv = lv_qcow2
    lv.write("vda", 0, MiB, 0x5A)
    mnt = mount(vcfs_mount, libvirtd)
    backups = mnt.path / "lv1/backups"
    assert sh(f"mkdir {backups}/b").returncode == 0
    lv.write("vda", 0, MiB, 0xA5)  # after the backup began

    libvirtd.restart()
    # vcfs notices (keepalive or a failed call), reconnects, and finds the job libvirt kept.
    lv.reconnect()
    assert job_type(lv) != libvirt.VIR_DOMAIN_JOB_NONE
    wait_for(lambda: "reconnected" in mnt.log_text(), 30, "vcfs to reconnect")
    assert listing(backups) == ["b", "latest", "new"]
    data = (backups / "b/disks/vda").read_bytes()
    assert data[:MiB] == b"\x5a" * MiB and data[MiB:] == bytes(len(data) - MiB)
    assert (backups / "b/status").read_text().startswith("state: running\n")
    # And ends through the new connection.
    assert sh(f"rmdir {backups}/b").returncode == 0
    assert job_type(lv) == libvirt.VIR_DOMAIN_JOB_NONE
    assert sh(f"mkdir {mnt.path}/lv1/checkpoints/after").returncode == 0


def test_a_stopped_persistent_domain_keeps_its_checkpoints(libvirtd, lv_factory, vcfs_mount,
                                                            sh):
    lv = lv_factory("lv1", [DiskSpec("vda", size=16 * MiB)], persistent=True)
    mnt = mount(vcfs_mount, libvirtd)
    cps = mnt.path / "lv1/checkpoints"
    assert sh(f"mkdir {cps}/c1").returncode == 0
    lv.dom.destroy()
    assert listing(mnt.path) == ["lv1"]
    assert listing(cps) == ["c1", "current", "new", "redefine"]
    assert "<name>c1</name>" in (cps / "c1/xml").read_text()
    assert (cps / "c1/size").read_text() == ""  # libvirt measures only a running domain
    # What libvirt refuses offline, vcfs refuses (libvirt's "domain is not running").
    assert write_errno(mnt.path / "lv1/backups/new", b"<domainbackup mode='pull'/>") == errno.EIO
    assert "not running" in errors_of(mnt.path / "lv1")[-1]
    # libvirt 9.0 deletes a checkpoint's bitmaps only from a running domain.
    r = sh(f"rmdir {cps}/c1")
    assert r.returncode != 0 and "Operation not supported" in r.stderr
    assert "cannot delete checkpoint for inactive domain" in errors_of(mnt.path / "lv1")[-1]
    assert [c.getName() for c in lv.dom.listAllCheckpoints()] == ["c1"]
    lv.dom.create()  # started again: the checkpoint's bitmap is still in the image
    wait_for(lambda: "c1" in lv.bitmaps("vda"), 10, "the domain to run")
    assert sh(f"rmdir {cps}/c1").returncode == 0
    assert lv.dom.listAllCheckpoints() == [] and lv.bitmaps("vda") == {}


def test_push_backup_completes_and_vcfs_wait_says_so(libvirtd, lv_qcow2, vcfs_mount, sh,
                                                      tmp_path):
    lv = lv_qcow2
    writes = [(MiB, 2 * MiB, 0x77)]
    lv.write("vda", *writes[0])
    mnt = mount(vcfs_mount, libvirtd)
    backups = mnt.path / "lv1/backups"
    target = tmp_path / "push-vda.qcow2"
    doc = (f"<domainbackup mode='push'><disks><disk name='vda' type='file'>"
           f"<driver type='qcow2'/><target file='{target}'/></disk></disks></domainbackup>")
    assert write_errno(backups / "new", doc.encode()) == 0
    r = sh(f"{sys.executable} -m vcfs wait {backups}/1", timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    status = (backups / "1/status").read_text()
    assert status.startswith("state: completed\nmode: push\n")
    assert f"disk vda: {64 * MiB}/{64 * MiB}" in status
    assert listing(backups / "1/disks") == []  # a push job's disks are not views
    (tmp_path / "expected").write_bytes(expected_image(64 * MiB, writes))
    assert compare(tmp_path / "expected", target).returncode == 0
    # A finished push job does not block the next backup; rmdir keeps the target.
    assert sh(f"mkdir {backups}/2").returncode == 0
    assert sh(f"rmdir {backups}/1 {backups}/2").returncode == 0
    assert target.exists()


# --- a remote URI ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(shutil.which("openssl") is None,
                    reason="openssl is needed to make the test certificates")
def test_remote_uri_over_tcp_with_the_export_over_tls(lv_factory, vcfs_mount, sh, tmp_path):
    """A libvirtd listening on loopback TCP only, served as a remote host: the pull export
    must be reached over TCP (a unix socket would be on the hypervisor), with TLS."""
    certs = tmp_path / "pki"
    make_certificates(certs)
    daemon = Libvirtd(tcp_port=free_port(), backup_tls_dir=certs)
    daemon.start()
    try:
        lv = LibvirtVM(daemon, "rv1", tmp_path / "rv", [DiskSpec("vda", size=16 * MiB)])
        lv.start()
        lv.write("vda", 2 * MiB, MiB, 0x3C)
        mnt = vcfs_mount(daemon.tcp_uri, "--tls-x509-dir", str(certs))
        assert listing(mnt.path) == ["rv1"]
        backups = mnt.path / "rv1/backups"
        assert sh(f"mkdir {backups}/b").returncode == 0
        xml = (backups / "b/xml").read_text()
        assert "<server transport='tcp' tls='yes' name='127.0.0.1' port=" in xml, xml
        data = (backups / "b/disks/vda").read_bytes()
        assert data == expected_image(16 * MiB, [(2 * MiB, MiB, 0x3C)])
        # The export is TLS only: a plain NBD client is refused.
        port = re.search(r" port='(\d+)'", xml).group(1)
        r = sh(f"nbdinfo --size nbd://127.0.0.1:{port}/vda", timeout=30)
        assert r.returncode != 0 and "TLS" in r.stderr, r.stderr
        assert sh(f"rmdir {backups}/b").returncode == 0
        assert lv.dom.jobInfo()[0] == libvirt.VIR_DOMAIN_JOB_NONE
        lv.close()
    finally:
        daemon.stop()


# --- the scripts on top ---------------------------------------------------------------------------


SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def test_backup_and_restore_scripts_over_libvirt(libvirtd, lv_factory, vcfs_mount, sh,
                                                 tmp_path):
    lv = lv_factory("lv1", [DiskSpec("vda", size=16 * MiB), DiskSpec("vdb", size=8 * MiB)])
    mnt = mount(vcfs_mount, libvirtd)
    dest = tmp_path / "store"
    writes: dict[str, list[tuple[int, int, int]]] = {"vda": [], "vdb": []}
    expected: dict[str, dict[str, bytes]] = {}
    names = []
    for round_, kind in enumerate(("full", "incremental", "incremental")):
        for disk, size in (("vda", 16 * MiB), ("vdb", 8 * MiB)):
            w = (round_ * 3 * MiB % size, 512 << 10, 0x20 + round_)
            lv.write(disk, *w)
            writes[disk].append(w)
        snapshot = {d: expected_image(s, writes[d]) for d, s in (("vda", 16 * MiB),
                                                                  ("vdb", 8 * MiB))}
        if names:
            time.sleep(1.1)  # restore points are named by UTC second
        r = sh(f"{SCRIPTS}/vcfs-backup {mnt.path} lv1 {dest}", timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        assert r.stdout.startswith(f"{kind} backup "), r.stdout
        name = r.stdout.split()[2]
        names.append(name)
        expected[name] = snapshot
    assert (dest / "chain").read_text().split() == names
    # The scripts ended their backups and kept only the last checkpoint, through libvirt.
    assert listing(mnt.path / "lv1/backups") == ["new"]
    assert [c.getName() for c in lv.dom.listAllCheckpoints()] == [names[-1]]
    for name in names:
        for disk in ("vda", "vdb"):
            out = tmp_path / f"{disk}-{name}.raw"
            r = sh(f"{SCRIPTS}/vcfs-restore {dest} {disk} {name} {out} raw", timeout=120)
            assert r.returncode == 0, r.stdout + r.stderr
            assert out.read_bytes() == expected[name][disk], (disk, name)
    r = sh(f"{sys.executable} -m vcfs status {mnt.path}")
    assert r.returncode == 0 and "lv1" in r.stdout, r.stdout + r.stderr


def test_a_pull_backup_running_when_vcfs_was_killed_reappears(libvirtd, lv_qcow2, vcfs_mount,
                                                               sh):
    lv = lv_qcow2
    lv.write("vda", 3 * MiB, MiB, 0x42)
    mnt = mount(vcfs_mount, libvirtd)
    backups = mnt.path / "lv1/backups"
    assert write_errno(backups / "new", b"<domainbackup mode='pull'/>") == 0
    assert sh(f"rmdir {backups}/1").returncode == 0
    doc = b"<domainbackup mode='pull'><domaincheckpoint><name>k</name></domaincheckpoint>" \
          b"</domainbackup>"
    assert write_errno(backups / "new", doc) == 0
    assert os.readlink(backups / "latest") == "2"
    os.kill(mnt.proc.pid, 9)
    wait_for(lambda: mnt.returncode is not None, what="vcfs to die")
    subprocess.run(["fusermount3", "-uz", str(mnt.path)], capture_output=True)
    lv.write("vda", 3 * MiB, MiB, 0x43)  # after the backup began
    mnt.start()
    # libvirt still runs the job: vcfs shows it again, under its id (from the note it left in
    # the state directory), says so, and it reads as before.
    assert listing(backups) == ["2", "latest", "new"]
    assert "adopted the pull backup libvirt runs as backup 2" in errors_of(mnt.path / "lv1")[-1]
    data = (backups / "2/disks/vda").read_bytes()
    assert data == expected_image(64 * MiB, [(3 * MiB, MiB, 0x42)])
    # The qcow2 image is still named after the checkpoint the backup made.
    assert (backups / "2/disks/vda.qcow2.sha256").read_text().endswith("  vda-k.qcow2\n")
    assert sh(f"rmdir {backups}/2").returncode == 0
    assert job_type(lv) == libvirt.VIR_DOMAIN_JOB_NONE
    assert not list(mnt.state_dir.rglob("libvirt-backup*"))


def test_unmount_ends_the_backups_vcfs_began(libvirtd, lv_qcow2, vcfs_mount, sh):
    lv = lv_qcow2
    mnt = mount(vcfs_mount, libvirtd)
    assert sh(f"mkdir {mnt.path}/lv1/backups/b").returncode == 0
    assert job_type(lv) != libvirt.VIR_DOMAIN_JOB_NONE
    # The abort's job-completed event arrives while the mount ends: no harm (the fixture
    # fails the test on any ERROR or traceback in vcfs's log).
    mnt.unmount()
    assert mnt.returncode == 0, mnt.log_text()
    assert job_type(lv) == libvirt.VIR_DOMAIN_JOB_NONE
    assert os.listdir(mnt.runtime_dir) == []


def test_a_hung_libvirtd_costs_eio_and_vcfs_carries_on_when_it_answers_again(
        libvirtd, lv_qcow2, vcfs_mount, sh):
    """libvirt 9.0's client crashed vcfs when its keepalive closed a connection with two calls
    in flight: vcfs makes one call at a time, notices the closed connection, reconnects."""
    lv = lv_qcow2
    mnt = vcfs_mount(libvirtd.uri, env={"VCFS_LIBVIRT_KEEPALIVE": "1,1"})
    dom = mnt.path / "lv1"
    os.kill(libvirtd.proc.pid, signal.SIGSTOP)
    try:
        # Two requests at once, each needing libvirt: both fail once the keepalive gives up.
        started = time.monotonic()
        r = sh(f"mkdir {dom}/checkpoints/a & sleep 0.5; cat {dom}/xml > /dev/null; wait $!",
               timeout=60)
        assert r.returncode != 0 and "Input/output error" in r.stderr, r.stderr
        assert time.monotonic() - started < 15
    finally:
        os.kill(libvirtd.proc.pid, signal.SIGCONT)
    wait_for(lambda: "reconnected" in mnt.log_text(), 15, "vcfs to reconnect")
    assert mnt.returncode is None  # alive
    assert sh(f"mkdir {dom}/checkpoints/b").returncode == 0
    assert [c.getName() for c in lv.dom.listAllCheckpoints()] == ["b"]
