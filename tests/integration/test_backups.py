"""Backups through a real mount of real QEMU VMs, driven the way users drive them.

After every operation the test looks at QEMU's own state over the test monitor (block nodes,
jobs, exports, bitmaps, the NBD server) and at the files vcfs keeps (the scratch directory in
the state directory, the sockets in the runtime directory), never only at what vcfs says.
Disk contents are checked against a model: which 64 KiB unit holds which byte pattern.

Tests marked `both` (or taking the `factory` fixture) run over QMP sockets and over libvirt
(a transient domain of the tests' private libvirtd, tests.libvirtd). Over libvirt the same
QEMU state is read through libvirt's monitor pass-through, with libvirt's own job and
checkpoint listing beside it; what only vcfs's QMP backend makes (its node names, its fault
points, its fleecing) is checked over QMP only.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import json
import os
import random
import re
import select
import struct
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import libvirt
import nbd
import pytest

from tests.conftest import BACKENDS
from tests.integration.helpers import errors_of, listing, wait_for, write_errno
from tests.libvirtd import LibvirtVM
from tests.vm import VM, DiskSpec, QmpError

both = pytest.mark.parametrize("vm", BACKENDS, indirect=True)
"""Runs a test taking `vm` over a QMP socket and over libvirt."""
AnyVM = VM | LibvirtVM

UNIT = 64 << 10
MiB = 1 << 20
FAULT_POINTS = [
    "backup.create-store",
    "backup.add-store-node",
    "backup.nbd-server-start",
    "backup.transaction",
    "backup.export-add",
    "backup.commit",
]
PUSH_FAULT_POINTS = {"backup.create-store", "backup.add-store-node", "backup.transaction",
                     "backup.commit"}


# --- helpers -----------------------------------------------------------------------------------


def begin(backups: Path, doc: str) -> str:
    """Write a <domainbackup> to `new`; return the new job's id (from `latest`)."""
    code = write_errno(backups / "new", doc.encode())
    assert code == 0, f"{errno.errorcode.get(code)}: {errors_of(backups.parent)[-1:]}"
    return os.readlink(backups / "latest")


def status_of(job: Path) -> dict[str, str]:
    lines = (job / "status").read_text().splitlines()
    return dict(line.split(": ", 1) for line in lines)


def wait_push_done(job: Path, timeout: float = 20.0) -> dict[str, str]:
    wait_for(lambda: status_of(job)["state"] != "running", timeout, f"{job} to finish")
    return status_of(job)


def backup_xml(job: Path) -> ET.Element:
    return ET.fromstring((job / "xml").read_bytes())


def xml_disk(root: ET.Element, name: str) -> ET.Element:
    found = root.find(f"disks/disk[@name='{name}']")
    assert found is not None, ET.tostring(root)
    return found


# The model of a disk: which 64 KiB unit holds which byte pattern (everything else is zero).
Model = dict[int, int]


def write_units(vm: AnyVM, target: str, model: Model, writes: Model) -> None:
    """Write each unit's pattern through the guest device and record it in `model`."""
    for offset, pattern in writes.items():
        vm.write(target, offset, UNIT, pattern)
        model[offset] = pattern


def image_of(model: Model, size: int) -> bytes:
    """The disk bytes the model describes."""
    data = bytearray(size)
    for offset, pattern in model.items():
        data[offset : offset + UNIT] = bytes([pattern]) * UNIT
    return bytes(data)


def first_difference(a: bytes, b: bytes) -> str:
    if len(a) != len(b):
        return f"sizes differ: {len(a)} != {len(b)}"
    for off in range(0, len(a), UNIT):
        if a[off : off + UNIT] != b[off : off + UNIT]:
            return f"64 KiB unit at {off:#x}: {a[off]:#04x}… != {b[off]:#04x}…"
    return "identical"


def assert_same_image(got: bytes, expected: bytes) -> None:
    if got != expected:  # not `assert ==`: pytest would diff megabytes
        pytest.fail(first_difference(got, expected))


def runs(offsets: set[int]) -> list[tuple[int, int]]:
    """Merge 64 KiB units into (start, length) runs."""
    out: list[list[int]] = []
    for off in sorted(offsets):
        if out and out[-1][0] + out[-1][1] == off:
            out[-1][1] += UNIT
        else:
            out.append([off, UNIT])
    return [(s, n) for s, n in out]


def over_libvirt(vm: AnyVM) -> bool:
    return isinstance(vm, LibvirtVM)


@pytest.fixture(params=BACKENDS)
def factory(request: pytest.FixtureRequest, vm_factory: Any) -> Any:
    """`vm_factory`, or that of the private libvirtd's domains: tests taking it run over both."""
    return vm_factory if request.param == "qmp" else request.getfixturevalue("lv_factory")


def nbd_server_running(vm: AnyVM) -> bool:
    """Ask QEMU itself: starting a second NBD server fails while one runs (over libvirt through
    its monitor pass-through: a probe libvirt does not see, stopped at once)."""
    probe = vm.work_dir / "probe.sock"
    try:
        vm.qmp("nbd-server-start", addr={"type": "unix", "data": {"path": str(probe)}})
    except Exception as e:  # noqa: BLE001 - QmpError: "NBD server already running"
        assert "already running" in str(e), e
        return True
    vm.qmp("nbd-server-stop")
    probe.unlink(missing_ok=True)
    return False


def qemu_state(vm: AnyVM) -> dict[str, Any]:
    """What QEMU holds: nodes, jobs, exports, every bitmap on every node, the NBD server.

    Over libvirt, `jobs` also has libvirt's own job on the domain when there is one."""
    nodes = vm.block_nodes()
    jobs: list[tuple[str, Any]] = sorted((j["id"], j["status"]) for j in vm.qmp("query-jobs"))
    if isinstance(vm, LibvirtVM) and vm.job_type() != libvirt.VIR_DOMAIN_JOB_NONE:
        jobs.append(("libvirt", vm.job_type()))
    return {
        "nodes": sorted(n["node-name"] for n in nodes),
        "files": sorted(n["file"] for n in nodes),
        "jobs": jobs,
        "exports": sorted(e["id"] for e in vm.qmp("query-block-exports")),
        "bitmaps": sorted(
            (
                (n["node-name"], b.get("name"), b.get("persistent"), b.get("recording"))
                for n in nodes
                for b in n.get("dirty-bitmaps", [])
            ),
            key=repr,  # QEMU 7.2 may list an unnamed bitmap: None does not sort with str
        ),
        "nbd-server": nbd_server_running(vm),
    }


def vcfs_files(mnt) -> dict[str, Any]:
    """What vcfs keeps on the host: scratch files, sockets, checkpoint metadata."""
    return {
        "scratch": listing(mnt.state_dir / "scratch"),
        "runtime": listing(mnt.runtime_dir),
        "state": sorted(str(p.relative_to(mnt.state_dir)) for p in mnt.state_dir.rglob("*")),
    }


def everything(vm: AnyVM, mnt, dom: Path) -> dict[str, Any]:
    """The whole observable state, to compare before and after a request that must fail.

    Over libvirt, with the checkpoints libvirt itself lists."""
    state = {
        **qemu_state(vm),
        **vcfs_files(mnt),
        "checkpoints": listing(dom / "checkpoints"),
        "backups": listing(dom / "backups"),
    }
    if isinstance(vm, LibvirtVM):
        state["libvirt checkpoints"] = vm.checkpoint_names()
    return state


def foreign_nodes(vm: AnyVM, nodes: list[str]) -> list[str]:
    """Block nodes that are not the disks' own: vcfs's names over QMP; over libvirt, whose
    node names say nothing of their role (a scratch node is `libvirt-N-format` too), any node
    not named by libvirt (QEMU's own filters) or of a file that is not a disk image."""
    if isinstance(vm, LibvirtVM):
        images = {str(vm.image(d.target)) for d in vm.disks}
        return [n["node-name"] for n in vm.block_nodes()
                if n["file"] not in images
                or not re.fullmatch(r"libvirt-\d+-(storage|format)", n["node-name"])]
    return [n for n in nodes if not re.fullmatch(r"vd[a-z]-(file|format)", n)]


def idle(vm: AnyVM) -> dict[str, Any]:
    """QEMU (and libvirt) hold nothing of any backup."""
    state = qemu_state(vm)
    return {
        "jobs": state["jobs"],
        "exports": state["exports"],
        "nbd-server": state["nbd-server"],
        "foreign nodes": foreign_nodes(vm, state["nodes"]),
        "unnamed or temporary bitmaps": [
            b for b in state["bitmaps"] if b[1] is None or not b[2]
        ],
    }


IDLE = {
    "jobs": [],
    "exports": [],
    "nbd-server": False,
    "foreign nodes": [],
    "unnamed or temporary bitmaps": [],
}


class NbdClient:
    """Our own libnbd connection to a backup's export, with a dirty-bitmap meta context."""

    def __init__(self, socket: str, export: str, bitmap: str | None) -> None:
        self.context = f"qemu:dirty-bitmap:{bitmap}" if bitmap else "base:allocation"
        self.h = nbd.NBD()
        self.h.add_meta_context(self.context)
        self.h.set_export_name(export)
        self.h.connect_unix(socket)
        assert self.h.can_meta_context(self.context), f"export does not offer {self.context}"
        self.size = self.h.get_size()

    def flagged(self, flag: int = 1) -> list[tuple[int, int]]:
        """(start, length) runs whose meta-context flags have `flag` set."""
        out: list[list[int]] = []
        offset = 0
        while offset < self.size:
            got: list[int] = []
            self.h.block_status(min(self.size - offset, 1 << 30), offset,
                                functools.partial(self._collect, got))
            assert got, f"no {self.context} extents at {offset}"
            for i in range(0, len(got) - 1, 2):
                length, flags = got[i], got[i + 1]
                if flags & flag:
                    if out and out[-1][0] + out[-1][1] == offset:
                        out[-1][1] += length
                    else:
                        out.append([offset, length])
                offset += length
        return [(s, n) for s, n in out]

    def _collect(self, got: list[int], meta: str, start: int, entries: list[int],
                 err: object) -> int:
        if meta == self.context:
            got.extend(entries)
        return 0

    def read_all(self) -> bytes:
        return b"".join(
            self.h.pread(min(4 * MiB, self.size - off), off)
            for off in range(0, self.size, 4 * MiB)
        )

    def close(self) -> None:
        self.h.shutdown()
        del self.h


READER = r"""
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
os.pread(fd, 4096, 0)
print("open", flush=True)
for line in sys.stdin:
    try:
        data = os.pread(fd, 65536, int(line))
        print("ok", data[:1].hex(), flush=True)
    except OSError as e:
        print("errno", e.errno, flush=True)
"""


class HeldReader:
    """Another process holding an image open: it reads at the offsets it is sent."""

    def __init__(self, path: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", READER, str(path)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            start_new_session=True,
        )
        assert self._line(10.0) == "open"

    def _line(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, f"the reader hung for {timeout} s"
        return self.proc.stdout.readline().strip()

    def read_at(self, offset: int, timeout: float = 10.0) -> tuple[str, float]:
        """('ok <first byte hex>' or 'errno N', seconds it took)."""
        assert self.proc.stdin is not None
        started = time.monotonic()
        self.proc.stdin.write(f"{offset}\n")
        self.proc.stdin.flush()
        return self._line(timeout), time.monotonic() - started

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def held_by_qemu(path: Path) -> bool:
    """Whether some process (QEMU) holds a lock on the image, as qemu-img without -U sees it.

    QEMU locks bytes of every image it opens (OFD locks); this asks without spawning qemu-img,
    so it can be asked at the very instant `status` says a job is done.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False  # QEMU may still hold it, but no lock can tell: ask QEMU's node list
    try:
        query = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
        answer = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, query)
        return struct.unpack("hhqqi4x", answer)[0] != fcntl.F_UNLCK
    finally:
        os.close(fd)


def push_released(vm: AnyVM, target: Path) -> bool:
    """QEMU has let go of a push target: no lock on it, no node of it, no temporary bitmap."""
    if held_by_qemu(target):
        return False
    nodes = vm.block_nodes()
    return all(n["file"] != str(target) for n in nodes) and not any(
        b.get("name") and not b.get("persistent")
        for n in nodes
        for b in n.get("dirty-bitmaps", [])
    )


def flush(vm: AnyVM, target: str) -> None:
    """Make QEMU write the disk's cached qcow2 metadata to its image file."""
    if isinstance(vm, LibvirtVM):
        vm.flush(target)  # the device's libvirt alias is not the target's name
    else:
        vm.hmp(f'qemu-io -d /machine/peripheral/{target}/virtio-backend "flush"')


def qemu_img(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, timeout=30)


def qcow2_only(vm_factory, name: str = "vm1", vda: int = 64 * MiB,
               vdb: int = 32 * MiB) -> AnyVM:
    """A VM whose disks all can hold bitmaps, so that the issue's documents work as written."""
    return vm_factory(name, [DiskSpec("vda", size=vda), DiskSpec("vdb", size=vdb)])


@pytest.fixture
def mnt(vm, vcfs_mount):
    return vcfs_mount(vm.host_dir)


def pattern_writes(rng: random.Random, size: int, count: int, patterns: range) -> Model:
    units = rng.sample(range(size // UNIT), count)
    return {u * UNIT: rng.choice(patterns) for u in units}


# --- 1. point in time --------------------------------------------------------------------------


@both
def test_pull_image_is_the_disk_at_the_instant_of_new_while_the_guest_writes(vm, mnt, sh, tmp_path):
    dom = mnt.path / "vm1"
    size = 64 * MiB
    rng = random.Random(1)
    model: Model = {}
    # Some lone units, some runs, the first and the last unit.
    writes = pattern_writes(rng, size, 40, range(0x10, 0x80))
    writes.update({0: 0x01, size - UNIT: 0x02})
    writes.update({(100 + i) * UNIT: 0x03 + i for i in range(16)})
    write_units(vm, "vda", model, writes)

    job_id = begin(dom / "backups", "<domainbackup mode='pull'><disks><disk name='vda'/></disks>"
                                    "</domainbackup>")
    expected = image_of(model, size)
    image = dom / "backups" / job_id / "disks/vda"

    # The guest keeps writing: over every unit that holds data, and over zero units.
    later = list(model) + [u * UNIT for u in rng.sample(range(size // UNIT), 60)]
    rng.shuffle(later)
    head_start = threading.Event()
    stop = threading.Event()
    done: list[int] = []
    failures: list[BaseException] = []

    def guest() -> None:
        try:
            for i, offset in enumerate(later * 3):
                if stop.is_set():
                    break
                vm.write("vda", offset, UNIT, 0x80 + i % 0x7F)
                done.append(offset)
                if i == 20:
                    head_start.set()
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            failures.append(e)
        finally:
            head_start.set()

    writer = threading.Thread(target=guest)
    writer.start()
    try:
        head_start.wait(30)
        copy = tmp_path / "vm1-vda.raw"
        before_cp = len(done)
        r = sh(f"cp {image} {copy}")
        during = len(done) - before_cp
    finally:
        stop.set()
        writer.join(60)
    assert not failures, failures
    assert r.returncode == 0, r.stderr
    assert before_cp > 20 and during > 0, (before_cp, during)
    # The guest really did change the disk...
    last_offset = done[-1]
    assert vm.has_pattern("vda", last_offset, UNIT, 0x80 + (len(done) - 1) % 0x7F)
    # ...and the copy is the disk at the instant of `new`, byte for byte.
    assert_same_image(copy.read_bytes(), expected)
    assert os.stat(image).st_size == size
    # cp made a sparse copy: 58 units of data, the rest holes.
    assert os.stat(copy).st_blocks * 512 < size // 8
    # A second read (from the kernel's cache or from NBD) is the same image.
    assert_same_image(image.read_bytes(), expected)
    st = status_of(dom / "backups" / job_id)
    assert st["state"] == "running"
    assert st["disk vda"] == f"{size}/{size}"


# --- 2. incremental, as the issue does it ------------------------------------------------------


def test_incremental_pull_as_in_the_issue(factory, vcfs_mount, sh, tmp_path):
    vm = qcow2_only(factory)
    mnt = vcfs_mount(vm.host_dir)
    dom = mnt.path / "vm1"
    backups = dom / "backups"
    size = 64 * MiB
    rng = random.Random(2)
    model: Model = {}
    write_units(vm, "vda", model, pattern_writes(rng, size, 30, range(0x10, 0x40)))

    # Monday: a full pull backup that also creates checkpoint `mon`.
    r = sh(f"echo \"<domainbackup mode='pull'><domaincheckpoint><name>mon</name>"
           f"</domaincheckpoint></domainbackup>\" > {backups}/new")
    assert r.returncode == 0, r.stderr
    b = sh(f"readlink {backups}/latest").stdout.strip()
    assert b == "1"
    assert set(vm.bitmaps("vda")) == {"mon"} and set(vm.bitmaps("vdb")) == {"mon"}
    assert vm.bitmaps("vda")["mon"]["count"] == 0
    write_units(vm, "vda", {}, {0: 0xEE})  # after `new`: not in Monday's image
    vm.write("vdb", 0, UNIT, 0xEE)
    monday = dict(model)
    model[0] = 0xEE
    r = sh(f"cp {backups}/{b}/disks/vda {tmp_path}/vm1-vda-mon.raw")
    assert r.returncode == 0, r.stderr
    assert_same_image((tmp_path / "vm1-vda-mon.raw").read_bytes(), image_of(monday, size))
    assert sh(f"rmdir {backups}/{b}").returncode == 0
    assert idle(vm) == IDLE
    assert listing(backups) == ["new"]

    # Tuesday's changes: a known set of 64 KiB pieces (the write at 0 above is one of them).
    changes = pattern_writes(rng, size, 25, range(0x40, 0x70))
    changes.update({(200 + i) * UNIT: 0x70 + i for i in range(5)})
    write_units(vm, "vda", model, changes)
    changed = set(changes) | {0}
    r = sh(f"echo \"<domainbackup mode='pull'><incremental>mon</incremental><domaincheckpoint>"
           f"<name>tue</name></domaincheckpoint></domainbackup>\" > {backups}/new")
    assert r.returncode == 0, r.stderr
    b = sh(f"readlink {backups}/latest").stdout.strip()
    assert b == "2"
    tuesday = dict(model)
    write_units(vm, "vda", model, {UNIT * 7: 0x99, max(changed): 0x98})  # after `new`

    root = backup_xml(backups / b)
    server = root.find("server")
    assert server is not None and server.get("transport") == "unix"
    vda = xml_disk(root, "vda")
    assert vda.get("backupmode") == "incremental" and vda.get("incremental") == "mon"
    client = NbdClient(server.get("socket"), vda.get("exportname"), vda.get("exportbitmap"))
    try:
        assert client.size == size
        assert client.flagged() == runs(changed)
        assert_same_image(client.read_all(), image_of(tuesday, size))
    finally:
        client.close()
    assert_same_image((backups / b / "disks/vda").read_bytes(), image_of(tuesday, size))

    cps = dom / "checkpoints"
    assert listing(cps) == ["current", "mon", "new", "redefine", "tue"]
    assert os.readlink(cps / "tue/parent") == "../mon"
    assert os.readlink(cps / "current") == "tue"
    for target in ("vda", "vdb"):
        bitmaps = vm.bitmaps(target)
        assert {"mon", "tue"} <= set(bitmaps)
        assert bitmaps["tue"]["persistent"] and bitmaps["tue"]["recording"]
    assert vm.bitmaps("vda")["tue"]["count"] == 2 * UNIT  # the two writes after `new`
    assert "<disk name='vdb' checkpoint='bitmap' bitmap='tue'/>" in (cps / "tue/xml").read_text()
    assert sh(f"rmdir {backups}/{b}").returncode == 0
    assert idle(vm) == IDLE
    assert vcfs_files(mnt)["scratch"] == [] and vcfs_files(mnt)["runtime"] == []


# --- 3. the live backup's files ----------------------------------------------------------------


@both
def test_live_pull_backup_shows_every_default(vm, mnt, sh):
    dom = mnt.path / "vm1"
    backups = dom / "backups"
    os.mkdir(dom / "checkpoints/mon")
    vm.write("vda", 0, MiB, 0x11)
    job_id = begin(backups, "<domainbackup mode='pull'><incremental>mon</incremental>"
                            "<disks><disk name='vda'/><disk name='vdb' backupmode='full'/></disks>"
                            "</domainbackup>")
    assert job_id == "1"
    scratch = mnt.state_dir / "scratch"
    if over_libvirt(vm):
        sock = mnt.runtime_dir / "vm1-1.sock"
        # vcfs names a scratch file per disk with the job's id and the second it began.
        files = listing(scratch)
        assert [re.sub(r"^vm1-1-\d+-", "vm1-1-T-", f) for f in files] == [
            "vm1-1-T-vda.qcow2", "vm1-1-T-vdb.qcow2"], files
        xml = (backups / "1/xml").read_text()
        # libvirt's own document (its defaults: the disks' `index`, the scratch's driver),
        # with the defaults vcfs filled in: the socket, the scratch files.
        assert xml == vm.dom.backupGetXMLDesc(0)
        index = dict(re.findall(r"<disk name='(vd[ab])' .* index='(\d+)'>", xml))
        assert xml == (
            "<domainbackup mode='pull'>\n"
            "  <incremental>mon</incremental>\n"
            f"  <server transport='unix' socket='{sock}'/>\n"
            "  <disks>\n"
            "    <disk name='vda' backup='yes' type='file' backupmode='incremental' "
            "incremental='mon' exportname='vda' exportbitmap='backup-vda' "
            f"index='{index['vda']}'>\n"
            "      <driver type='qcow2'/>\n"
            f"      <scratch file='{scratch}/{files[0]}'/>\n"
            "    </disk>\n"
            "    <disk name='vdb' backup='yes' type='file' backupmode='full' exportname='vdb' "
            f"index='{index['vdb']}'>\n"
            "      <driver type='qcow2'/>\n"
            f"      <scratch file='{scratch}/{files[1]}'/>\n"
            "    </disk>\n"
            "    <disk name='vdc' backup='no'/>\n"
            "  </disks>\n"
            "</domainbackup>\n"
        )
    else:
        sock = mnt.runtime_dir / "vm1-backup-1.sock"
        assert (backups / "1/xml").read_text() == (
            "<domainbackup mode='pull'>\n"
            "  <incremental>mon</incremental>\n"
            f"  <server transport='unix' socket='{sock}'/>\n"
            "  <disks>\n"
            "    <disk name='vda' backup='yes' type='file' backupmode='incremental' "
            "incremental='mon' exportname='vda' exportbitmap='backup-vda'>\n"
            "      <driver type='qcow2'/>\n"
            f"      <scratch file='{scratch}/vm1-1-vda.qcow2'/>\n"
            "    </disk>\n"
            "    <disk name='vdb' backup='yes' type='file' backupmode='full' exportname='vdb'>\n"
            "      <driver type='qcow2'/>\n"
            f"      <scratch file='{scratch}/vm1-1-vdb.qcow2'/>\n"
            "    </disk>\n"
            "    <disk name='vdc' backup='no'/>\n"
            "  </disks>\n"
            "</domainbackup>\n"
        )
        assert listing(scratch) == ["vm1-1-vda.qcow2", "vm1-1-vdb.qcow2"]
    assert sock.is_socket()
    assert mnt.runtime_dir.stat().st_mode & 0o777 == 0o700
    assert listing(backups) == ["1", "latest", "new"]
    assert listing(backups / "1") == ["disks", "status", "xml"]
    assert listing(backups / "1/disks") == [
        f"{disk}{suffix}"
        for disk in ("vda", "vdb")
        for suffix in ("", ".map", ".qcow2", ".qcow2.sha256", ".sha256")
    ]
    assert os.readlink(backups / "latest") == "1"
    status = (backups / "1/status").read_text().splitlines()
    assert status[:4] == ["state: running", "mode: pull", f"disk vda: 0/{64 * MiB}",
                          f"disk vdb: 0/{32 * MiB}"]
    assert all(re.fullmatch(r"[a-z-]+( [a-z]+)?: \S+", line) for line in status[4:]), status
    assert [line.split(":")[0] for line in status if line.startswith("scratch")] == [
        "scratch vda", "scratch vdb"]
    state = qemu_state(vm)
    assert state["nbd-server"]
    temp = [b for b in state["bitmaps"] if b[1] == "backup-vda"]
    if over_libvirt(vm):
        # libvirt 9.0: a `blockdev-backup sync=none` job per disk into its scratch node
        # (`libvirt-<index>-format`), which it exports, the temporary bitmap on vda's.
        assert [(j[0].split("-libvirt-")[0], j[1]) for j in state["jobs"]] == [
            ("backup-vda", "running"), ("backup-vdb", "running"),
            ("libvirt", libvirt.VIR_DOMAIN_JOB_UNBOUNDED)]
        assert state["exports"] == sorted(f"libvirt-nbd-libvirt-{index[d]}-format"
                                          for d in ("vda", "vdb"))
        assert temp == [(f"libvirt-{index['vda']}-format", "backup-vda", False, False)]
    else:
        # QEMU: one export per disk, with the temporary bitmap on the vda export's scratch
        # node; each device writes through a copy-before-write filter (break-snapshot), no
        # block job. Two exports per disk: the snapshot's, and vcfs's own block-status export
        # of the scratch.
        assert len(state["exports"]) == 4 and state["jobs"] == []
        drivers = {n["node-name"]: n["drv"] for n in vm.block_nodes()}
        for disk in ("vda", "vdb"):
            inserted = next(d["inserted"]["node-name"] for d in vm.qmp("query-block")
                            if d["qdev"].startswith(f"/machine/peripheral/{disk}/"))
            assert drivers[inserted] == "copy-before-write"
        assert sorted(drivers.values()).count("snapshot-access") == 2
        assert len(temp) == 1 and temp[0][0] not in ("vda-format", "vdb-format")
        assert temp[0][2:] == (False, False)  # not persistent, not recording
    data = (backups / "1/disks/vda").read_bytes()
    assert data[:MiB] == b"\x11" * MiB and data[MiB:] == bytes(63 * MiB)
    assert status_of(backups / "1")["disk vda"] == f"{64 * MiB}/{64 * MiB}"
    assert sh(f"rmdir {backups}/1").returncode == 0
    assert idle(vm) == IDLE
    assert listing(backups) == ["new"]
    assert listing(scratch) == [] and listing(mnt.runtime_dir) == []

    # Ids count 1, 2, 3 per domain; `latest` follows.
    for expected in ("2", "3"):
        got = begin(backups, "<domainbackup mode='pull'><disks><disk name='vdb'/></disks>"
                             "</domainbackup>")
        assert got == expected
        assert os.readlink(backups / "latest") == expected
        if expected == "2":
            os.rmdir(backups / "2")
    assert listing(backups) == ["3", "latest", "new"]
    os.rmdir(backups / "3")
    assert listing(backups) == ["new"]

    # mkdir: a full pull backup of every disk, the raw one too (fleecing works for raw).
    vm.write("vdc", 2 * MiB, MiB, 0x33)
    os.mkdir(backups / "now")
    assert os.readlink(backups / "latest") == "now"
    assert [n for n in listing(backups / "now/disks") if "." not in n] == ["vda", "vdb", "vdc"]
    root = backup_xml(backups / "now")
    assert root.get("mode") == "pull" and root.find("incremental") is None
    for target in ("vda", "vdb", "vdc"):
        d = xml_disk(root, target)
        assert d.get("backupmode") == "full" and d.get("exportbitmap") is None
    state = qemu_state(vm)
    if over_libvirt(vm):
        assert len(state["exports"]) == 3
        assert [j[1] for j in state["jobs"]] == ["running"] * 3 + [
            libvirt.VIR_DOMAIN_JOB_UNBOUNDED]
    else:
        assert len(state["exports"]) == 6 and state["jobs"] == []
    vdc = (backups / "now/disks/vdc").read_bytes()
    assert vdc == bytes(2 * MiB) + b"\x33" * MiB + bytes(13 * MiB)
    assert listing(dom / "checkpoints") == ["current", "mon", "new", "redefine"]
    os.rmdir(backups / "now")
    assert idle(vm) == IDLE
    assert listing(scratch) == [] and listing(mnt.runtime_dir) == []


# --- 4. push -----------------------------------------------------------------------------------


def push_doc(target: Path, disk: str = "vda", extra: str = "") -> str:
    return (f"<domainbackup>{extra}<disks><disk name='{disk}'><target file='{target}'/></disk>"
            "</disks></domainbackup>")


@both
def test_push_full_and_incremental(vm, mnt, tmp_path):
    dom = mnt.path / "vm1"
    backups = dom / "backups"
    size = 64 * MiB
    rng = random.Random(4)
    model: Model = {}
    write_units(vm, "vda", model, pattern_writes(rng, size, 30, range(0x10, 0x40)))

    full = tmp_path / "full.qcow2"
    job = backups / begin(backups, push_doc(
        full, extra="<domaincheckpoint><name>mon</name><disks><disk name='vda'/></disks>"
                    "</domaincheckpoint>"))
    st = wait_push_done(job)
    assert st == {"state": "completed", "mode": "push", "disk vda": f"{size}/{size}"}
    # Released: QEMU no longer holds the target, so qemu-img may open it without -U. (That
    # this holds at the very first `completed` is test_completed_push_has_released_its_target.)
    wait_for(lambda: push_released(vm, full), 2.0, "the target to be released")
    assert str(full) not in qemu_state(vm)["files"]
    assert qemu_img("info", str(full)).returncode == 0
    flush(vm, "vda")  # the image file must show what the guest wrote, metadata included
    r = qemu_img("compare", "-U", str(vm.image("vda")), str(full))
    assert r.returncode == 0, r.stdout + r.stderr
    full_raw = tmp_path / "full.raw"
    assert qemu_img("convert", "-O", "raw", str(full), str(full_raw)).returncode == 0
    assert_same_image(full_raw.read_bytes(), image_of(model, size))
    assert idle(vm) == IDLE
    assert set(vm.bitmaps("vda")) == {"mon"}
    assert listing(dom / "checkpoints") == ["current", "mon", "new", "redefine"]

    # A finished push does not block the next backup; rmdir of it keeps the target.
    changes = pattern_writes(rng, size, 20, range(0x40, 0x70))
    write_units(vm, "vda", model, changes)
    inc = tmp_path / "inc.qcow2"
    job2 = backups / begin(backups, push_doc(inc, extra="<incremental>mon</incremental>"))
    assert job2.name == "2"
    vm.write("vda", 0, UNIT, 0xFF)  # after the backup began: not in it
    st = wait_push_done(job2)
    assert st["state"] == "completed", st
    wait_for(lambda: push_released(vm, inc), 2.0, "the target to be released")
    assert idle(vm) == IDLE  # the temporary bitmap is gone too
    assert set(vm.bitmaps("vda")) == {"mon"}
    assert str(inc) not in qemu_state(vm)["files"]
    info = json.loads(qemu_img("info", "--output=json", "-U", str(inc)).stdout)
    assert info["format"] == "qcow2" and info["virtual-size"] == size
    assert info["backing-filename"] == str(vm.image("vda"))
    # Exactly the changed clusters are allocated in the target itself...
    r = qemu_img("map", "--output=json", "-U", str(inc))
    assert r.returncode == 0, r.stderr
    own = [(e["start"], e["length"]) for e in json.loads(r.stdout)
           if e["depth"] == 0 and e["data"]]
    merged: list[tuple[int, int]] = []
    for s, n in own:
        if merged and sum(merged[-1]) == s:
            merged[-1] = (merged[-1][0], merged[-1][1] + n)
        else:
            merged.append((s, n))
    assert merged == runs(set(changes))
    # ...and hold their data (read without the backing file: everything else reads as zero).
    alone = tmp_path / "inc-alone.raw"
    spec = json.dumps({"driver": "qcow2", "backing": None,
                       "file": {"driver": "file", "filename": str(inc)}})
    r = qemu_img("convert", "-O", "raw", f"json:{spec}", str(alone))
    assert r.returncode == 0, r.stderr
    assert_same_image(alone.read_bytes(), image_of(changes, size))

    os.rmdir(job)
    os.rmdir(job2)
    assert full.exists() and inc.exists()
    assert listing(backups) == ["new"]
    assert qemu_img("check", str(full)).returncode == 0


@both
def test_completed_push_has_released_its_target(vm, mnt, tmp_path):
    """The first `state: completed` a user reads means the target is free to open.

    A few readers of `status` run alongside, as several shells polling would: each read polls
    QEMU, and none may show `completed` before the target's nodes are gone.
    """
    backups = mnt.path / "vm1/backups"
    vm.write("vdb", 0, 4 * MiB, 0x21)
    still_held = []
    for i in range(10):
        target = tmp_path / f"t{i}.qcow2"
        job = backups / begin(backups, push_doc(target, "vdb"))
        stop = threading.Event()

        def poll(job: Path = job, stop: threading.Event = stop) -> None:
            while not stop.is_set():
                (job / "status").read_bytes()

        pollers = [threading.Thread(target=poll) for _ in range(3)]
        for t in pollers:
            t.start()
        try:
            deadline = time.monotonic() + 20
            while status_of(job)["state"] == "running":
                assert time.monotonic() < deadline
            if not push_released(vm, target):
                still_held.append(i)
        finally:
            stop.set()
            for t in pollers:
                t.join()
        assert status_of(job)["state"] == "completed"
        os.rmdir(job)
    assert still_held == []


@both
def test_existing_push_target_is_eexist_and_changes_nothing(vm, mnt, tmp_path):
    dom = mnt.path / "vm1"
    target = tmp_path / "taken.qcow2"
    target.write_bytes(b"keep me")
    before = everything(vm, mnt, dom)
    assert write_errno(dom / "backups/new", push_doc(target).encode()) == errno.EEXIST
    assert everything(vm, mnt, dom) == before
    assert target.read_bytes() == b"keep me"
    last = errors_of(dom)[-1]
    assert "backups/new EEXIST" in last and str(target) in last


def test_rmdir_of_a_running_push_cancels_it_and_removes_the_target(factory, vm_factory,
                                                                    vcfs_mount, tmp_path):
    if factory is vm_factory:
        vm = factory("vm1", [DiskSpec("vda", size=512 * MiB)])
        vm.write("vda", 0, 128 * MiB, 0x5A)
        vm.write("vda", 256 * MiB, 128 * MiB, 0xA5)
    else:
        # libvirt's job is usually over before the test can see it (vcfs's begin asks libvirt
        # more, and the test's QMP goes through libvirtd): more data, written before the domain
        # starts (LibvirtVM keeps an image that exists).
        vm = factory("vm1", [DiskSpec("vda", size=1 << 30)], start=False)
        vm.work_dir.mkdir(parents=True, exist_ok=True)
        image = str(vm.image("vda"))
        assert qemu_img("create", "-q", "-f", "qcow2", image, "1G").returncode == 0
        subprocess.run(["qemu-io", "-f", "qcow2", image, "-c", "write -P 0x5a 0 768M"],
                       check=True, capture_output=True)
        vm.start()
    mnt = vcfs_mount(vm.host_dir)
    backups = mnt.path / "vm1/backups"
    # Slow QEMU's job down so that it is certainly still running when rmdir comes. A job can
    # finish its 256 MiB before the test slows it (a fast machine, 16 copies in flight): then
    # that job is removed and another one begun, into a target of its own (rmdir of a finished
    # push keeps its target, and an existing target is refused).
    # QEMU's error, as LibvirtVM.qmp raises it (libvirt's pass-through) or tests.vm.VM's.
    qemu_error: type[Exception] = RuntimeError if over_libvirt(vm) else QmpError
    for attempt in range(5):
        target = tmp_path / f"big-{attempt}.qcow2"
        job = backups / begin(backups, push_doc(target))
        jobs = vm.qmp("query-jobs")
        if jobs or not over_libvirt(vm):  # libvirt dismisses a job as soon as QEMU ends it
            assert len(jobs) == 1, jobs
            try:
                vm.qmp("block-job-set-speed", device=jobs[0]["id"], speed=MiB)
            except qemu_error as e:
                # Ended meanwhile: concluded, or (over libvirt) already dismissed.
                assert "concluded" in str(e) or (over_libvirt(vm) and "not found" in str(e)), e
            else:
                # Slowed in time only if much is left: the copies in flight when it was slowed
                # (up to 64 MiB) finish at full speed.
                progress = vm.qmp("query-jobs")
                left = (progress[0]["total-progress"] - progress[0]["current-progress"]
                        if progress else 0)
                if left > 64 * MiB and status_of(job)["state"] == "running":
                    break
        wait_push_done(job)
        os.rmdir(job)
    else:
        raise AssertionError("every push job finished before it could be slowed down")
    assert status_of(job)["state"] == "running"
    assert target.exists()
    os.rmdir(job)
    assert not target.exists()
    assert listing(backups) == ["new"]
    if over_libvirt(vm):  # libvirt's own record of the job says so
        assert vm.dom.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)["type"] == \
            libvirt.VIR_DOMAIN_JOB_CANCELLED
    # QEMU lets go of it too. (At once, strictly: the same race as in
    # test_completed_push_has_released_its_target can leave the nodes for a moment.)
    wait_for(lambda: push_released(vm, target) and idle(vm) == IDLE, 2.0, "QEMU to let go")
    assert vm.qmp("query-jobs") == []
    # And the next backup works.
    ended = int(job.name)
    job = backups / begin(backups, "<domainbackup mode='pull'/>")
    assert job.name == str(ended + 1)
    os.rmdir(job)
    assert idle(vm) == IDLE


# --- 5. errors ---------------------------------------------------------------------------------

BAD_REQUESTS = [
    # (id, document, errno, a word of the message[, a word of libvirt's message where its
    # message says it otherwise])
    ("malformed", "<domainbackup mode='pull'><disks></domainbackup>", errno.EINVAL, "XML"),
    ("unknown-element", "<domainbackup mode='pull'><bogus/></domainbackup>", errno.EINVAL,
     "bogus"),
    ("bad-mode", "<domainbackup mode='bogus'/>", errno.EINVAL, "mode"),
    ("unknown-disk", "<domainbackup mode='pull'><disks><disk name='vdz'/></disks>"
     "</domainbackup>", errno.ENOENT, "vdz"),
    ("unknown-incremental", "<domainbackup mode='pull'><incremental>nope</incremental><disks>"
     "<disk name='vda'/></disks></domainbackup>", errno.ENOENT, "nope"),
    ("existing-checkpoint", "<domainbackup mode='pull'><disks><disk name='vda'/></disks>"
     "<domaincheckpoint><name>mon</name><disks><disk name='vda'/></disks></domaincheckpoint>"
     "</domainbackup>", errno.EEXIST, "mon"),
    ("checkpoint-on-raw", "<domainbackup mode='pull'><domaincheckpoint><name>x</name>"
     "</domaincheckpoint></domainbackup>", errno.EOPNOTSUPP, "raw"),
    # libvirt's schema allows only qcow2 there: its message is the schema's.
    ("pull-raw-scratch", "<domainbackup mode='pull'><disks><disk name='vda'><driver type='raw'/>"
     "</disk></disks></domainbackup>", errno.EINVAL, "qcow2", "schema"),
    ("reserved-checkpoint-name", "<domainbackup mode='pull'><domaincheckpoint><name>new</name>"
     "<disks><disk name='vda'/></disks></domaincheckpoint></domainbackup>", errno.EINVAL,
     "reserved"),
]


@both
@pytest.mark.parametrize(("doc", "code", "word", "libvirt_word"),
                         [pytest.param(*r[1:4], r[4] if len(r) > 4 else r[3], id=r[0])
                          for r in BAD_REQUESTS])
def test_bad_backup_requests_fail_precisely_and_change_nothing(vm, mnt, doc, code, word,
                                                               libvirt_word):
    """The same errno over both backends; the message is the backend's (libvirt's own over
    libvirt), and nothing changes: not QEMU's state, nor vcfs's files, nor libvirt's job and
    checkpoints."""
    if over_libvirt(vm):
        word = libvirt_word
    dom = mnt.path / "vm1"
    os.mkdir(dom / "checkpoints/mon")
    before = everything(vm, mnt, dom)
    assert write_errno(dom / "backups/new", doc.encode()) == code
    assert everything(vm, mnt, dom) == before
    last = errors_of(dom)[-1]
    name = "EOPNOTSUPP" if code == errno.EOPNOTSUPP else errno.errorcode[code]
    assert f"backups/new {name}" in last
    assert word.lower() in last.lower()


@both
def test_second_backup_while_one_runs_is_ebusy_at_once(vm, mnt, tmp_path):
    dom = mnt.path / "vm1"
    backups = dom / "backups"
    begin(backups, "<domainbackup mode='pull'><disks><disk name='vda'/></disks></domainbackup>")
    before = everything(vm, mnt, dom)
    for request in (
        lambda: write_errno(backups / "new", b"<domainbackup mode='pull'/>"),
        lambda: write_errno(backups / "new", push_doc(tmp_path / "t.qcow2", "vdb").encode()),
        lambda: _mkdir_errno(backups / "now"),
    ):
        started = time.monotonic()
        assert request() == errno.EBUSY
        assert time.monotonic() - started < 1.0
        assert "EBUSY" in errors_of(dom)[-1] and "already running" in errors_of(dom)[-1]
    assert everything(vm, mnt, dom) == before
    assert not (tmp_path / "t.qcow2").exists()


def _mkdir_errno(path: Path) -> int:
    try:
        os.mkdir(path)
        return 0
    except OSError as e:
        return e.errno


def test_oversized_backup_request_is_efbig(vm, mnt):
    dom = mnt.path / "vm1"
    before = everything(vm, mnt, dom)
    fd = os.open(dom / "backups/new", os.O_WRONLY)
    os.write(fd, b"<domainbackup mode='pull'><!-- ")
    with pytest.raises(OSError) as e:
        for _ in range(5):
            os.write(fd, b"x" * (256 << 10))
    assert e.value.errno == errno.EFBIG
    os.close(fd)
    assert everything(vm, mnt, dom) == before
    assert "backups/new EFBIG" in errors_of(dom)[-1]


@both
def test_bad_backup_directory_names(vm, mnt):
    dom = mnt.path / "vm1"
    before = everything(vm, mnt, dom)
    for name in ("latest", "a b", ".x", "é", "x:y"):
        assert _mkdir_errno(dom / "backups" / name) == errno.EINVAL, name
        assert f"backups/{name} EINVAL" in errors_of(dom)[-1]
    # `new` exists: the kernel answers by itself.
    assert _mkdir_errno(dom / "backups/new") == errno.EEXIST
    assert everything(vm, mnt, dom) == before


# --- 6. rollback -------------------------------------------------------------------------------


@pytest.mark.parametrize("point", FAULT_POINTS)
def test_a_failing_step_leaves_nothing_behind(vm_factory, vcfs_mount, tmp_path, point):
    vm = qcow2_only(vm_factory)
    mnt = vcfs_mount(vm.host_dir, env={"VCFS_FAULT": point})
    dom = mnt.path / "vm1"
    backups = dom / "backups"
    os.mkdir(dom / "checkpoints/mon")
    vm.write("vda", 0, MiB, 0x42)
    vm.write("vda", 8 * MiB, 24 * MiB, 0x43)  # enough that a push job is still running at undo
    before = everything(vm, mnt, dom)
    pull = ("<domainbackup mode='pull'><incremental>mon</incremental><domaincheckpoint>"
            "<name>tue</name></domaincheckpoint></domainbackup>")
    assert write_errno(backups / "new", pull.encode()) == errno.EIO
    assert f"injected fault at {point}" in errors_of(dom)[-1]
    assert "backups/new EIO" in errors_of(dom)[-1]
    assert everything(vm, mnt, dom) == before
    if point in PUSH_FAULT_POINTS:
        target = tmp_path / "push.qcow2"
        push = push_doc(target, extra="<incremental>mon</incremental><domaincheckpoint>"
                                      "<name>tue</name></domaincheckpoint>")
        assert write_errno(backups / "new", push.encode()) == errno.EIO
        assert f"injected fault at {point}" in errors_of(dom)[-1]
        assert everything(vm, mnt, dom) == before
        assert not target.exists()
    # Without the fault the same backup works: nothing half-made is in the way.
    mnt.env = {}
    mnt.restart()
    job = backups / begin(backups, pull)
    assert set(vm.bitmaps("vda")) == {"mon", "tue"}
    client_root = backup_xml(job)
    assert xml_disk(client_root, "vda").get("exportbitmap") == "backup-vda"
    assert (job / "disks/vda").read_bytes()[:MiB] == b"\x42" * MiB
    os.rmdir(job)
    assert idle(vm) == IDLE


# --- 7. checkpoints during a backup ------------------------------------------------------------


def test_checkpoints_can_be_created_and_deleted_during_a_pull_backup(factory, vcfs_mount):
    vm = qcow2_only(factory)
    mnt = vcfs_mount(vm.host_dir)
    dom = mnt.path / "vm1"
    cps = dom / "checkpoints"
    backups = dom / "backups"
    size = 64 * MiB
    rng = random.Random(7)
    model: Model = {}
    write_units(vm, "vda", model, pattern_writes(rng, size, 10, range(0x10, 0x40)))
    os.mkdir(cps / "mon")
    changes = pattern_writes(rng, size, 12, range(0x40, 0x70))
    write_units(vm, "vda", model, changes)
    job = backups / begin(backups, "<domainbackup mode='pull'><incremental>mon</incremental>"
                                   "<domaincheckpoint><name>tue</name></domaincheckpoint>"
                                   "</domainbackup>")
    expected = image_of(model, size)
    temp_before = [b for b in qemu_state(vm)["bitmaps"] if b[1] == "backup-vda"]
    assert len(temp_before) == 1

    vm.write("vda", 0, UNIT, 0xAB)
    os.mkdir(cps / "wed")
    vm.write("vda", UNIT, UNIT, 0xAC)
    os.rmdir(cps / "mon")  # the backup's base
    os.rmdir(cps / "tue")  # the backup's own new checkpoint
    assert listing(cps) == ["current", "new", "redefine", "wed"]
    assert set(vm.bitmaps("vda")) == {"wed"} and set(vm.bitmaps("vdb")) == {"wed"}
    assert vm.bitmaps("vda")["wed"]["count"] == UNIT
    os.mkdir(cps / "thu")
    assert os.readlink(cps / "thu/parent") == "../wed"

    # The export is untouched: same temporary bitmap, same dirty extents, same image.
    assert [b for b in qemu_state(vm)["bitmaps"] if b[1] == "backup-vda"] == temp_before
    root = backup_xml(job)
    vda = xml_disk(root, "vda")
    client = NbdClient(root.find("server").get("socket"), vda.get("exportname"),
                       vda.get("exportbitmap"))
    try:
        assert client.flagged() == runs(set(changes))
    finally:
        client.close()
    assert_same_image((job / "disks/vda").read_bytes(), expected)
    os.rmdir(job)
    assert idle(vm) == IDLE
    assert set(vm.bitmaps("vda")) == {"wed", "thu"}


# --- 8. ending ---------------------------------------------------------------------------------


def test_rmdir_ends_a_pull_backup_and_open_readers_get_eio(factory, vcfs_mount):
    vm = qcow2_only(factory)
    mnt = vcfs_mount(vm.host_dir)
    dom = mnt.path / "vm1"
    backups = dom / "backups"
    os.mkdir(dom / "checkpoints/mon")
    vm.write("vda", 0, 8 * MiB, 0x61)
    vm.write("vda", 40 * MiB, 8 * MiB, 0x62)
    job = backups / begin(backups, "<domainbackup mode='pull'><incremental>mon</incremental>"
                                   "</domainbackup>")
    during = qemu_state(vm)
    assert during["nbd-server"]
    if over_libvirt(vm):
        # libvirt: one export and one `blockdev-backup sync=none` job per disk.
        assert len(during["exports"]) == 2
        assert [j[1] for j in during["jobs"]] == ["running", "running",
                                                  libvirt.VIR_DOMAIN_JOB_UNBOUNDED]
    else:
        assert len(during["exports"]) == 4 and during["jobs"] == []
    # The temporary bitmaps (QEMU 7.2 also lists unnamed ones of its own during a backup).
    assert [b[1] for b in during["bitmaps"] if b[1] and not b[2]] == ["backup-vda", "backup-vdb"]
    assert len(listing(mnt.state_dir / "scratch")) == 2
    assert listing(mnt.runtime_dir) == ["vm1-1.sock" if over_libvirt(vm) else "vm1-backup-1.sock"]

    reader = HeldReader(job / "disks/vda")
    try:
        assert reader.read_at(64 * 1024)[0] == "ok 61"
        assert reader.read_at(40 * MiB)[0] == "ok 62"
        os.rmdir(job)
        # The next read fails at once, whether it asks for pages read before or new ones.
        for offset in (64 * 1024, 40 * MiB, 20 * MiB):
            answer, took = reader.read_at(offset)
            assert answer == f"errno {errno.EIO}", (offset, answer)
            assert took < 5.0
    finally:
        reader.close()
    assert idle(vm) == IDLE
    if over_libvirt(vm):  # each image's file and format node, nothing else
        assert qemu_state(vm)["files"] == sorted(2 * [str(vm.image(t)) for t in ("vda", "vdb")])
    else:
        assert qemu_state(vm)["nodes"] == ["vda-file", "vda-format", "vdb-file", "vdb-format"]
    assert listing(mnt.state_dir / "scratch") == []
    assert listing(mnt.runtime_dir) == []
    assert listing(backups) == ["new"]
    assert set(vm.bitmaps("vda")) == {"mon"}


# --- 9. QEMU dies ------------------------------------------------------------------------------


def test_qemu_killed_during_a_pull_backup(factory, vcfs_mount, sh):
    vm1 = qcow2_only(factory, "vm1")
    vm2 = factory("vm2", [DiskSpec("vda", size=16 * MiB)])
    mnt = vcfs_mount(vm1.host_dir)
    dom = mnt.path / "vm1"
    backups = dom / "backups"
    vm1.write("vda", 0, 32 * MiB, 0x71)
    job = backups / begin(backups, "<domainbackup mode='pull'/>")
    scratch = listing(mnt.state_dir / "scratch")
    assert len(scratch) == 2
    reader = HeldReader(job / "disks/vda")
    try:
        assert reader.read_at(MiB)[0] == "ok 71"
        vm1.kill()
        answer, took = reader.read_at(24 * MiB)
        assert answer == f"errno {errno.EIO}", answer
        assert took < 5.0
    finally:
        reader.close()
    if over_libvirt(vm1):
        # A transient domain whose QEMU died is gone from libvirt, and vcfs drops it with its
        # job at once (a persistent one stays, stopped, its job failed): nothing of the backup
        # is left, not the socket QEMU could no longer remove, nor the scratch files.
        wait_for(lambda: listing(mnt.path) == ["vm2"], 5.0, "vm1 to vanish")
        assert listing(mnt.state_dir / "scratch") == []
        assert listing(mnt.runtime_dir) == []
    else:
        r = sh(f"cat {job}/disks/vda > /dev/null", timeout=10)
        assert r.returncode != 0 and "Input/output error" in r.stderr
        wait_for(lambda: status_of(job)["state"] == "failed", 5.0, "state: failed")
        st = status_of(job)
        assert st["mode"] == "pull" and "error" in st
        # The domain stays while its job does (across rescans).
        time.sleep(1.2)
        assert listing(mnt.path) == ["vm1", "vm2"]
    # The other domain is served.
    os.mkdir(mnt.path / "vm2/checkpoints/c1")
    assert set(vm2.bitmaps("vda")) == {"c1"}
    os.mkdir(mnt.path / "vm2/backups/now")
    assert (mnt.path / "vm2/backups/now/disks/vda").read_bytes() == bytes(16 * MiB)
    os.rmdir(mnt.path / "vm2/backups/now")
    assert idle(vm2) == IDLE
    if not over_libvirt(vm1):
        # Ending the failed job works and removes what vcfs made: scratch files and the
        # socket QEMU could no longer remove.
        os.rmdir(job)
        assert listing(mnt.state_dir / "scratch") == []
        assert listing(mnt.runtime_dir) == []
        wait_for(lambda: listing(mnt.path) == ["vm2"], 5.0, "vm1 to vanish")


# --- 7. the guest never pays for a backup (issue 11) -------------------------------------------
