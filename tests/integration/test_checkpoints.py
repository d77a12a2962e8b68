"""Checkpoints through a real mount of real QEMU VMs, driven the way users drive them.

After every operation the test looks at QEMU's own view of the bitmaps (over a second monitor,
or libvirt's monitor pass-through), never only at what vcfs says. Tests marked `both` run over
QMP sockets and over libvirt (tests.libvirtd): the same tree must behave the same.
"""

from __future__ import annotations

import errno
import os
import subprocess
import threading
import time

import pytest

from tests.conftest import BACKENDS
from tests.integration.helpers import errors_of, listing, wait_for, write_errno
from tests.vm import DiskSpec

both = pytest.mark.parametrize("vm", BACKENDS, indirect=True)


@pytest.fixture
def mnt(vm, vcfs_mount):
    m = vcfs_mount(vm.host_dir)
    return m


def test_root_lists_domains_and_domain_xml(vm, mnt, sh):
    assert listing(mnt.path) == ["vm1"]
    assert listing(mnt.path / "vm1") == ["backups", "checkpoints", "errors", "xml"]
    xml = sh(f"cat {mnt.path}/vm1/xml").stdout
    assert f"<uuid>{vm.uuid}</uuid>" in xml
    assert "<target dev='vda' bus='virtio'/>" in xml and "<target dev='vdc' bus='virtio'/>" in xml
    assert "<driver name='qemu' type='raw'/>" in xml
    assert f"<source file='{vm.image('vdb')}'/>" in xml
    assert f"<capacity unit='bytes'>{32 << 20}</capacity>" in xml
    assert listing(mnt.path / "vm1/checkpoints") == ["new", "redefine"]


@both
def test_mkdir_creates_recording_persistent_bitmaps(vm, mnt, sh):
    cps = mnt.path / "vm1/checkpoints"
    assert sh(f"mkdir {cps}/c1").returncode == 0
    for target in ("vda", "vdb"):
        b = vm.bitmaps(target)["c1"]
        assert b["persistent"] and b["recording"] and not b.get("inconsistent")
    assert os.readlink(cps / "current") == "c1"
    assert not (cps / "c1/parent").exists()
    xml = sh(f"cat {cps}/c1/xml").stdout
    assert "<disk name='vda' checkpoint='bitmap' bitmap='c1'/>" in xml
    assert "<disk name='vdc' checkpoint='no'/>" in xml
    assert "<domain type=" in xml and "<creationTime>" in xml
    assert sh(f"mkdir {cps}/c2").returncode == 0
    assert os.readlink(cps / "c2/parent") == "../c1"
    assert os.readlink(cps / "current") == "c2"
    # Creating c2 did not disable c1: both record.
    assert set(vm.bitmaps("vda")) == {"c1", "c2"}
    assert all(b["recording"] for b in vm.bitmaps("vda").values())


@both
def test_size_counts_guest_writes(vm, mnt, sh):
    cps = mnt.path / "vm1/checkpoints"
    sh(f"mkdir {cps}/c1")
    vm.write("vda", 0, 1 << 20, 0xAB)
    vm.write("vda", 8 << 20, 2 << 20, 0xCD)
    sh(f"mkdir {cps}/c2")
    vm.write("vdb", 0, 64 << 10, 0x11)
    assert sh(f"cat {cps}/c1/size").stdout == f"vda {3 << 20}\nvdb {64 << 10}\n"
    assert sh(f"cat {cps}/c2/size").stdout == f"vda 0\nvdb {64 << 10}\n"


@both
def test_new_with_document(vm, mnt, sh):
    cps = mnt.path / "vm1/checkpoints"
    doc = ("<domaincheckpoint><name>mon</name><description>weekly</description>"
           "<disks><disk name='vdb'/></disks></domaincheckpoint>")
    r = sh(f"echo \"{doc}\" > {cps}/new")
    assert r.returncode == 0, r.stderr
    assert "mon" in vm.bitmaps("vdb") and "mon" not in vm.bitmaps("vda")
    xml = (cps / "mon/xml").read_text()
    assert "<description>weekly</description>" in xml
    assert "<disk name='vda' checkpoint='no'/>" in xml
    # A document without a name gets the current Unix time.
    before = int(time.time())
    r = sh(f"echo \"<domaincheckpoint><disks><disk name='vda'/></disks></domaincheckpoint>\""
           f" > {cps}/new")
    assert r.returncode == 0, r.stderr
    names = [n for n in listing(cps) if n.isdigit()]
    assert len(names) == 1 and before <= int(names[0]) <= int(time.time())
    # A document written in pieces acts at the write that completes it.
    fd = os.open(cps / "new", os.O_WRONLY)
    os.write(fd, b"<domaincheckpoint><name>pieces</name>")
    assert "pieces" not in listing(cps)
    os.write(fd, b"<disks><disk name='vda'/></disks></domaincheckpoint>\n")
    assert "pieces" in listing(cps)
    os.close(fd)


BAD_REQUESTS = [
    # (document, errno, a word of the message)
    ("<domaincheckpoint><name>c1</name></domaincheckpoint>", errno.EEXIST, "exists"),
    ("<domaincheckpoint><name>x</name><disks><disk name='vdz'/></disks></domaincheckpoint>",
     errno.ENOENT, "vdz"),
    ("<domaincheckpoint><name>x</name></domaincheckpoint>", errno.EOPNOTSUPP, "raw"),
    ("<domaincheckpoint><name>x</name><disks><disk name='vdc'/></disks></domaincheckpoint>",
     errno.EOPNOTSUPP, "raw"),
    ("<domaincheckpoint><name>x</name><bogus/></domaincheckpoint>", errno.EINVAL, "bogus"),
    ("<domaincheckpoint><name>../escape</name></domaincheckpoint>", errno.EINVAL, "name"),
    ("<domaincheckpoint><name>new</name><disks><disk name='vda'/></disks></domaincheckpoint>",
     errno.EINVAL, "reserved"),
    (f"<domaincheckpoint><name>{'n' * 256}</name></domaincheckpoint>", errno.EINVAL, "255"),
    ("<domaincheckpoint><name>x</name><disks><disk name='vda' bitmap='y'/></disks>"
     "</domaincheckpoint>", errno.EINVAL, "must match"),
    ("<domaincheckpoint><name>x</name></domain>", errno.EINVAL, "XML"),
    ("<!DOCTYPE d [<!ENTITY a 'aaaa'><!ENTITY b '&a;&a;&a;&a;'>]><domaincheckpoint>"
     "<name>&b;</name></domaincheckpoint>", errno.EINVAL, "DOCTYPE"),
]


@pytest.mark.parametrize(("doc", "code", "word"), BAD_REQUESTS)
def test_bad_new_requests_fail_precisely_and_change_nothing(vm, mnt, doc, code, word):
    dom = mnt.path / "vm1"
    cps = dom / "checkpoints"
    os.mkdir(cps / "c1")
    before = (listing(cps), vm.bitmaps("vda"), vm.bitmaps("vdb"), list(mnt.state_dir.rglob("*")))
    assert write_errno(cps / "new", doc.encode()) == code
    after = (listing(cps), vm.bitmaps("vda"), vm.bitmaps("vdb"), list(mnt.state_dir.rglob("*")))
    assert after == before
    last = errors_of(dom)[-1]
    name = "EOPNOTSUPP" if code == errno.EOPNOTSUPP else errno.errorcode[code]
    assert f"checkpoints/new {name}" in last
    assert word.lower() in last.lower()


def test_oversized_request_is_efbig(vm, mnt):
    cps = mnt.path / "vm1/checkpoints"
    fd = os.open(cps / "new", os.O_WRONLY)
    os.write(fd, b"<domaincheckpoint><description>")
    chunk = b"x" * (256 << 10)
    with pytest.raises(OSError) as e:
        for _ in range(5):
            os.write(fd, chunk)
    assert e.value.errno == errno.EFBIG
    os.close(fd)
    assert listing(cps) == ["new", "redefine"]
    assert "EFBIG" in errors_of(mnt.path / "vm1")[-1]


@both
def test_bad_mkdir_names(vm, mnt, sh):
    cps = mnt.path / "vm1/checkpoints"
    for name in ["a b", ".x", "é"]:
        with pytest.raises(OSError) as e:
            os.mkdir(cps / name)
        assert e.value.errno == errno.EINVAL, name
    assert listing(cps) == ["new", "redefine"]
    assert vm.bitmaps("vda") == {}
    assert "EINVAL" in errors_of(mnt.path / "vm1")[-1]


def test_checkpoint_of_no_disk_through_new_and_mkdir_on_a_raw_only_vm(vm_factory, vcfs_mount, sh):
    # libvirt accepts a checkpoint that selects no disk: it records no bitmap.
    vm = vm_factory("vm1", [DiskSpec("vda", fmt="raw", size=8 << 20),
                            DiskSpec("vdb", fmt="raw", size=8 << 20)])
    mnt = vcfs_mount(vm.host_dir)
    dom = mnt.path / "vm1"
    cps = dom / "checkpoints"
    # Every disk by default: a raw disk cannot hold a bitmap, so that is still refused.
    default = b"<domaincheckpoint><name>x</name></domaincheckpoint>"
    assert write_errno(cps / "new", default) == errno.EOPNOTSUPP
    assert "checkpoints/new EOPNOTSUPP" in errors_of(dom)[-1]
    none = ("<domaincheckpoint><name>a</name><disks><disk name='vda' checkpoint='no'/>"
            "<disk name='vdb' checkpoint='no'/></disks></domaincheckpoint>")
    r = sh(f'echo "{none}" > {cps}/new')
    assert r.returncode == 0, r.stderr
    assert sh(f"mkdir {cps}/b").returncode == 0
    assert listing(cps) == ["a", "b", "current", "new", "redefine"]
    assert os.readlink(cps / "current") == "b" and os.readlink(cps / "b/parent") == "../a"
    for name in ("a", "b"):
        xml = (cps / name / "xml").read_text()
        assert "<disk name='vda' checkpoint='no'/>" in xml, xml
        assert "<disk name='vdb' checkpoint='no'/>" in xml and "broken" not in xml, xml
        assert (cps / name / "size").read_bytes() == b""
    assert [n.get("dirty-bitmaps") for n in vm.block_nodes() if n.get("dirty-bitmaps")] == []
    # Reconciled at the next start as sound (no bitmap to miss), then deleted like any other.
    mnt.restart()
    assert listing(cps) == ["a", "b", "current", "new", "redefine"]
    assert "broken" not in (cps / "a/xml").read_text()
    assert errors_of(dom) == []  # reconciliation found nothing to report
    os.rmdir(cps / "a")
    assert listing(cps) == ["b", "current", "new", "redefine"]
    assert not (cps / "b/parent").exists()
    assert sh(f"echo metadata-only > {cps}/b/delete").returncode == 0
    assert listing(cps) == ["new", "redefine"]


@both
def test_control_files_read_as_empty_files_and_read_only_files_refuse_writes(vm, mnt):
    dom = mnt.path / "vm1"
    # Write-only, yet readable as empty files (st_size 0): rsync -a or tar of a whole domain
    # copies them instead of failing. Reading never acts, and read-write stays refused.
    new = dom / "checkpoints/new"
    assert open(new, "rb").read() == b"" and os.stat(new).st_size == 0
    with pytest.raises(PermissionError):
        os.open(new, os.O_RDWR)
    assert listing(dom / "checkpoints") == ["new", "redefine"]
    assert write_errno(dom / "xml", b"x") == errno.EACCES


@both
def test_rmdir_and_delete_modes(vm, mnt, sh):
    cps = mnt.path / "vm1/checkpoints"
    for n in ("a", "b", "c", "d"):
        os.mkdir(cps / n)
    # a <- b <- c <- d ; delete b: c re-parents to a, bitmaps of b go, no merge.
    vm.write("vda", 0, 65536, 0x01)
    os.rmdir(cps / "b")
    assert set(vm.bitmaps("vda")) == {"a", "c", "d"}
    assert os.readlink(cps / "c/parent") == "../a"
    assert vm.bitmaps("vda")["a"]["count"] == 65536  # untouched by the delete
    # children-only on a: c and d go, a stays and becomes current.
    assert sh(f"echo children-only > {cps}/a/delete").returncode == 0
    assert listing(cps) == ["a", "current", "new", "redefine"]
    assert set(vm.bitmaps("vda")) == {"a"} and set(vm.bitmaps("vdb")) == {"a"}
    assert os.readlink(cps / "current") == "a"
    # metadata-only keeps bitmaps.
    assert sh(f"echo metadata-only > {cps}/a/delete").returncode == 0
    assert listing(cps) == ["new", "redefine"]
    assert set(vm.bitmaps("vda")) == {"a"}
    # bad mode lines
    os.mkdir(cps / "e")
    for line in (b"bogus\n", b"children children-only\n", b"\n"):
        assert write_errno(cps / "e/delete", line) == errno.EINVAL
    assert "e" in listing(cps)
    os.mkdir(cps / "f")
    assert sh(f"echo children > {cps}/e/delete").returncode == 0
    assert listing(cps) == ["new", "redefine"]
    assert set(vm.bitmaps("vda")) == {"a"}


@both
def test_redefine_restores_metadata_and_validates(vm, mnt, sh):
    cps = mnt.path / "vm1/checkpoints"
    os.mkdir(cps / "a")
    os.mkdir(cps / "b")
    saved = {n: (cps / n / "xml").read_bytes() for n in ("a", "b")}
    sh(f"echo metadata-only > {cps}/b/delete")
    sh(f"echo metadata-only > {cps}/a/delete")
    assert listing(cps) == ["new", "redefine"]
    # parents first, as in libvirt
    assert write_errno(cps / "redefine", saved["b"]) == errno.ENOENT
    assert write_errno(cps / "redefine", saved["a"]) == 0
    assert write_errno(cps / "redefine", saved["b"]) == 0
    assert (cps / "a/xml").read_bytes() == saved["a"]
    assert (cps / "b/xml").read_bytes() == saved["b"]
    assert os.readlink(cps / "current") == "b"
    # A bitmap that does not exist cannot be redefined.
    ghost = saved["b"].replace(b"<name>b</name>", b"<name>ghost</name>", 1)
    ghost = ghost.replace(b"bitmap='b'", b"bitmap='ghost'")
    assert write_errno(cps / "redefine", ghost) == errno.EINVAL
    assert "missing or broken bitmap 'ghost'" in errors_of(mnt.path / "vm1")[-1]
    assert "ghost" not in listing(cps)


def test_libvirt_redefine_fixture_with_a_foreign_uuid_is_refused(vm, mnt, libvirt_data):
    cps = mnt.path / "vm1/checkpoints"
    fixture = (libvirt_data / "qemudomaincheckpointxml2xmlout/redefine.xml").read_bytes()
    assert write_errno(cps / "redefine", fixture) == errno.EINVAL
    assert "must use uuid" in errors_of(mnt.path / "vm1")[-1]
    assert listing(cps) == ["new", "redefine"]


def test_checkpoints_survive_restarts_of_vcfs_qemu_and_both(vm, mnt, sh):
    cps = mnt.path / "vm1/checkpoints"
    os.mkdir(cps / "a")
    os.mkdir(cps / "b")
    xml_a = (cps / "a/xml").read_bytes()
    mnt.restart()
    assert listing(cps) == ["a", "b", "current", "new", "redefine"]
    assert (cps / "a/xml").read_bytes() == xml_a
    vm.write("vda", 0, 1 << 20, 0x22)
    vm.restart()  # clean QEMU restart: bitmaps are saved into the qcow2 images
    assert (cps / "a/size").read_text() == f"vda {1 << 20}\nvdb 0\n"
    assert os.readlink(cps / "current") == "b"
    vm.restart()
    mnt.restart()
    assert listing(cps) == ["a", "b", "current", "new", "redefine"]
    assert "broken" not in (cps / "b/xml").read_text()
    assert set(vm.bitmaps("vda")) == {"a", "b"}


def test_reconcile_reports_missing_and_orphan_bitmaps(vm, mnt, sh):
    dom = mnt.path / "vm1"
    cps = dom / "checkpoints"
    os.mkdir(cps / "a")
    os.mkdir(cps / "b")
    mnt.unmount()
    vm.qmp("block-dirty-bitmap-remove", node="vda-format", name="b")
    vm.qmp("block-dirty-bitmap-add", node="vdb-format", name="stray", persistent=True)
    mnt.start()
    xml = (cps / "b/xml").read_text()
    assert "<!-- broken: bitmap 'b' is missing on disk 'vda' -->" in xml
    log = "\n".join(errors_of(dom))
    assert "checkpoint 'b' is broken" in log
    assert "bitmap 'stray' on disk 'vdb' has no checkpoint metadata" in log
    assert "broken" not in (cps / "a/xml").read_text()
    assert (cps / "b/size").read_text() == "vdb 0\n"  # the broken disk is left out
    # A plain delete refuses (a bitmap is gone) and changes nothing; metadata-only works.
    with pytest.raises(OSError) as e:
        os.rmdir(cps / "b")
    assert e.value.errno == errno.ENOENT
    assert "metadata-only" in errors_of(dom)[-1]
    assert set(vm.bitmaps("vdb")) == {"a", "b", "stray"}
    assert write_errno(cps / "b/delete", b"metadata-only\n") == 0
    assert set(vm.bitmaps("vdb")) == {"a", "b", "stray"}  # left alone, as asked
    assert listing(cps) == ["a", "current", "new", "redefine"]




def test_unclean_qemu_death_marks_checkpoints_broken(vm, mnt):
    cps = mnt.path / "vm1/checkpoints"
    os.mkdir(cps / "stored")
    vm.restart()  # a clean shutdown stores the bitmap in the image
    os.mkdir(cps / "fresh")
    vm.kill(remove_socket=True)
    wait_for(lambda: listing(mnt.path) == [])
    vm.start()
    wait_for(lambda: listing(mnt.path) == ["vm1"])
    # Stored, then QEMU died: QEMU says inconsistent. Never stored: the bitmap is simply gone.
    xml = (cps / "stored/xml").read_text()
    assert "<!-- broken: bitmap 'stored' on disk 'vda' is inconsistent" in xml
    assert "<!-- broken: bitmap 'fresh' is missing on disk 'vda'" in (cps / "fresh/xml").read_text()
    assert (cps / "stored/size").read_text() == ""
    log = (mnt.path / "vm1/errors").read_text()
    assert "checkpoint 'stored' is broken" in log and "checkpoint 'fresh' is broken" in log
    # An incremental backup from a broken checkpoint is refused, never turned into a full one.
    doc = b"<domainbackup mode='pull'><incremental>stored</incremental></domainbackup>"
    assert write_errno(mnt.path / "vm1/backups/new", doc) == errno.EINVAL
    assert "take a full backup" in errors_of(mnt.path / "vm1")[-1]
    assert listing(mnt.path / "vm1/backups") == ["new"]


def test_domains_appear_and_vanish(vm_factory, vcfs_mount):
    vm1 = vm_factory("vm1", [DiskSpec("vda")])
    m = vcfs_mount(vm1.host_dir)
    assert listing(m.path) == ["vm1"]
    vm2 = vm_factory("vm2", [DiskSpec("vda")])
    t0 = time.monotonic()
    while "vm2" not in listing(m.path):
        assert time.monotonic() - t0 < 1.5
        time.sleep(0.05)
    vm2.stop()
    t0 = time.monotonic()
    while "vm2" in listing(m.path):
        assert time.monotonic() - t0 < 1.5
        time.sleep(0.05)
    assert listing(m.path) == ["vm1"]


@both
def test_eight_concurrent_clients_keep_tree_and_bitmaps_consistent(vm, mnt):
    cps = mnt.path / "vm1/checkpoints"
    failures: list[str] = []

    def client(i: int) -> None:
        try:
            for round_ in range(4):
                name = f"k{i}-{round_}"
                os.mkdir(cps / name)
                if round_ % 2:
                    os.rmdir(cps / name)
        except OSError as e:
            failures.append(f"{i}: {e}")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    names = [n for n in listing(cps) if n.startswith("k")]
    assert sorted(names) == sorted(f"k{i}-{r}" for i in range(8) for r in (0, 2))
    assert set(vm.bitmaps("vda")) == set(names) == set(vm.bitmaps("vdb"))
    # Every parent exists and the chain from current reaches a root without cycles.
    parents = {}
    for n in names:
        p = cps / n / "parent"
        parents[n] = os.readlink(p)[3:] if p.is_symlink() else None
        assert parents[n] is None or parents[n] in names
    assert sum(p is None for p in parents.values()) == 1
    seen, n = set(), os.readlink(cps / "current")
    while n is not None:
        assert n not in seen
        seen.add(n)
        n = parents[n]
    assert seen == set(names)  # one chain: every create took the previous as parent


def test_hot_plugged_disk_shows_in_xml_within_a_second(vm, mnt, tmp_path):
    extra = tmp_path / "hot.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(extra), "8M"], check=True)
    xml = mnt.path / "vm1/xml"
    assert "vdh" not in xml.read_text()
    vm.qmp("blockdev-add", driver="qcow2", node_name="vdh-format",
           file={"driver": "file", "filename": str(extra)})
    vm.qmp("device_add", driver="virtio-blk-pci", drive="vdh-format", id="vdh")
    wait_for(lambda: "<target dev='vdh' bus='virtio'/>" in xml.read_text(), timeout=1.0,
             what="the hot-plugged disk in xml")
    # and it takes part in the next checkpoint
    os.mkdir(mnt.path / "vm1/checkpoints/after")
    assert "after" in vm.bitmaps("vdh")
