"""Checksum files of the image views: one `cp` proves its own copy, at no extra read (over QMP
sockets and over libvirt alike).

`disks/<disk>.sha256` and `disks/<disk>.qcow2.sha256` are `sha256sum` lines, taken while a
reader streams the view (cp with SEEK_DATA hops over holes: they count as zeros). The tests
copy views the ways users do (cp, cp --sparse, rsync), check the copies with `sha256sum -c`,
and watch the backup's `nbd-read` counter to show that the checksum cost no read of its own;
a view nobody read is read once when its checksum is asked for.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import BACKENDS, Mount
from tests.vm import VM, DiskSpec

MiB = 1 << 20


@pytest.fixture(params=BACKENDS)
def factory(request: pytest.FixtureRequest, vm_factory: Callable[..., VM]) -> Callable[..., VM]:
    """`vm_factory`, or that of the private libvirtd's domains: these tests run over both."""
    if request.param == "qmp":
        return vm_factory
    return request.getfixturevalue("lv_factory")


def nbd_read(backup: Path) -> int:
    return int(re.search(r"nbd-read: (\d+)", (backup / "status").read_text())[1])


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def begin(dom: Path, xml: str) -> Path:
    (dom / "backups/new").write_text(xml)
    return dom / "backups" / os.readlink(dom / "backups/latest")


def test_a_copy_proves_itself_with_sha256sum_and_the_checksum_costs_no_read(
    factory: Callable[..., VM], vcfs_mount: Callable[..., Mount], tmp_path: Path
):
    vm = factory("vm1", [DiskSpec("vda", size=64 * MiB)])
    vm.write("vda", 0, MiB, 0x11)
    vm.write("vda", 40 * MiB, 3 * MiB, 0x22)
    dom = vcfs_mount(vm.host_dir).path / "vm1"
    b = begin(dom, "<domainbackup mode='pull'><domaincheckpoint><name>mon</name>"
                   "</domaincheckpoint></domainbackup>")
    vm.write("vda", 50 * MiB, MiB, 0x33)  # after the backup began: in no view
    disks = b / "disks"
    assert {"vda.sha256", "vda.qcow2.sha256"} <= set(os.listdir(disks))
    # The size is known before the digest: stat reads nothing.
    before = nbd_read(b)
    assert (disks / "vda.qcow2.sha256").stat().st_size == 64 + 2 + len("vda-mon.qcow2") + 1
    assert (disks / "vda.sha256").stat().st_size == 64 + 2 + len("vda") + 1
    assert nbd_read(b) == before

    store = tmp_path / "store"
    store.mkdir()
    subprocess.run(["cp", str(disks / "vda"), str(store / "vda")], check=True)  # hops holes
    subprocess.run(["cp", str(disks / "vda.qcow2"), str(store / "vda-mon.qcow2")], check=True)
    copied = nbd_read(b)
    assert copied <= 2 * 4 * MiB  # each view read the data once, never the holes
    for name in ("vda.sha256", "vda.qcow2.sha256"):
        subprocess.run(["cp", str(disks / name), str(store / name)], check=True)
    assert nbd_read(b) == copied  # the checksums were taken during the copies
    assert (store / "vda.sha256").read_text() == f"{sha256(store / 'vda')}  vda\n"
    assert (store / "vda.qcow2.sha256").read_text() == \
        f"{sha256(store / 'vda-mon.qcow2')}  vda-mon.qcow2\n"
    check = subprocess.run("sha256sum -c vda.sha256 vda.qcow2.sha256", shell=True, cwd=store,
                           capture_output=True, text=True)
    assert check.returncode == 0 and check.stdout.count(": OK") == 2, check.stdout + check.stderr
    # A copy that differs by one byte is caught.
    with open(store / "vda-mon.qcow2", "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 1]))
    bad = subprocess.run(["sha256sum", "-c", "vda.qcow2.sha256"], cwd=store,
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "FAILED" in bad.stdout
    os.rmdir(b)

    # Incremental, copied with rsync: the qcow2 view's checksum names the incremental image.
    vm.write("vda", 10 * MiB, 2 * MiB, 0x44)
    inc = begin(dom, "<domainbackup mode='pull'><incremental>mon</incremental>"
                     "<domaincheckpoint><name>tue</name></domaincheckpoint></domainbackup>")
    subprocess.run(["rsync", str(inc / "disks/vda.qcow2"), str(store / "vda-tue.qcow2")],
                   check=True)
    line = (inc / "disks/vda.qcow2.sha256").read_text()
    assert line == f"{sha256(store / 'vda-tue.qcow2')}  vda-tue.qcow2\n"
    os.rmdir(inc)


def test_an_unread_view_is_read_once_for_its_checksum(
    factory: Callable[..., VM], vcfs_mount: Callable[..., Mount], tmp_path: Path
):
    vm = factory("vm1", [DiskSpec("vda", size=64 * MiB)])
    vm.write("vda", 4 * MiB, 2 * MiB, 0x55)
    dom = vcfs_mount(vm.host_dir).path / "vm1"
    b = begin(dom, "<domainbackup mode='pull'/>")
    raw_line = (b / "disks/vda.sha256").read_text()  # nobody read the view: it is read now
    after_raw = nbd_read(b)
    assert after_raw <= 4 * MiB  # the data once, the holes hashed as zeros without reading
    qcow2_line = (b / "disks/vda.qcow2.sha256").read_text()
    assert (b / "disks/vda.qcow2.sha256").read_text() == qcow2_line  # computed once
    subprocess.run(["cp", "--sparse=always", str(b / "disks/vda"), str(tmp_path / "vda")],
                   check=True)
    subprocess.run(["cp", str(b / "disks/vda.qcow2"), str(tmp_path / "vda.qcow2")], check=True)
    assert raw_line == f"{sha256(tmp_path / 'vda')}  vda\n"
    assert qcow2_line == f"{sha256(tmp_path / 'vda.qcow2')}  vda.qcow2\n"
    os.rmdir(b)
