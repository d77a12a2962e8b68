"""The backup store: chains saved by scripts/vcfs-backup from a real mount, pruned by vcfs-prune
(killed at every step too), checked by vcfs-verify, restored instantly under a booted QEMU, and
run by the systemd units.

Every guest write goes through the device and into a model (one bytearray per disk); each
restore point is compared with the model's snapshot taken just before its backup began, written
out as a raw file so that `qemu-img compare` does the comparing.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.vm import VM, DiskSpec
from vcfs.store import KILL_ENV, STEPS

MiB = 1 << 20
UNIT = 64 << 10
"""Cluster size of the test disks and of the images vcfs serves."""
SIZES = {"vda": 8 * MiB, "vdb": 4 * MiB}
REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "scripts"
BIN = Path(sys.executable).parent
"""The virtualenv's bin: vcfs-prune and vcfs-verify, which vcfs-backup --keep runs too."""
ENV = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
METADATA_CLUSTERS = 6
"""A full image's clusters besides data: header, refcount table and block, L1, L2, a spare."""
SERVICE = REPO / "packaging/vcfs-backup@.service"
TIMER = REPO / "packaging/vcfs-backup@.timer"
INSTALLED = Path("/usr/local/bin/vcfs-backup")
WRAPPER_MARK = "# vcfs test wrapper"


def run(*argv: str | os.PathLike[str], env: dict[str, str] | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout,
                          env=ENV if env is None else env, stdin=subprocess.DEVNULL)


def qemu_img(*args: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    return run("qemu-img", *args)


# --- the guest, its model, its backups -----------------------------------------------------------


class Guest:
    """vm1 with disks vda and vdb, whose every write (whole 64 KiB units) also goes into a model."""

    def __init__(self, vm: VM, seed: int) -> None:
        self.vm = vm
        self.model = {d: bytearray(n) for d, n in SIZES.items()}
        self.written: dict[str, set[int]] = {d: set() for d in SIZES}
        self.rng = random.Random(seed)
        self.round = 0

    def write(self, disk: str, unit: int, pattern: int) -> None:
        self.vm.write(disk, unit * UNIT, UNIT, pattern)
        self.model[disk][unit * UNIT : (unit + 1) * UNIT] = bytes([pattern]) * UNIT
        self.written[disk].add(unit)

    def zero(self, disk: str, unit: int) -> None:
        """Write-zeroes over a unit holding data: an incremental must carry the zeros."""
        self.vm.hmp(f'qemu-io -d /machine/peripheral/{disk}/virtio-backend '
                    f'"write -z {unit * UNIT} {UNIT}"')
        self.model[disk][unit * UNIT : (unit + 1) * UNIT] = bytes(UNIT)

    def churn(self) -> None:
        """New data, old data overwritten, old data zeroed: what a night changes."""
        self.round += 1
        for disk, size in SIZES.items():
            units = size // UNIT
            fresh = self.rng.sample(sorted(set(range(units)) - self.written[disk]), 5)
            old = self.rng.sample(sorted(self.written[disk]), min(3, len(self.written[disk])))
            for u in fresh + old[:2]:
                self.write(disk, u, 0x10 + (self.round * 7 + u) % 0xE0)
            if old[2:]:
                self.zero(disk, old[2])

    def snapshot(self) -> dict[str, bytes]:
        return {d: bytes(m) for d, m in self.model.items()}


class Backups:
    """Runs scripts/vcfs-backup for vm1 into `dest`, remembering what each point must hold."""

    def __init__(self, guest: Guest, mount: Path, dest: Path, expected: Path) -> None:
        self.guest = guest
        self.mount = mount
        self.dest = dest
        self.expected = expected
        expected.mkdir(exist_ok=True)
        self.last = ""

    def take(self, *options: str, kind: str | None = None) -> str:
        """Churn, back up, return the restore point's name."""
        self.guest.churn()
        snapshot = self.guest.snapshot()
        # Points are named by the UTC second: wait for a new one.
        while time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) <= self.last:
            time.sleep(0.05)
        r = run(SCRIPTS / "vcfs-backup", *options, self.mount, "vm1", self.dest)
        assert r.returncode == 0, r.stdout + r.stderr
        got_kind, _, name, *_ = r.stdout.split()
        if kind is not None:
            assert got_kind == kind, r.stdout + r.stderr
        self.last = name
        for disk, data in snapshot.items():
            (self.expected / f"{disk}-{name}.raw").write_bytes(data)
        return name

    def raw(self, disk: str, name: str) -> Path:
        return self.expected / f"{disk}-{name}.raw"


def chains(store: Path) -> dict[str, list[str]]:
    """Every chain list of a store (`chain`, `chain.LAST`), by file name."""
    return {p.name: p.read_text().split() for p in store.iterdir()
            if re.fullmatch(r"chain(\.\w+)?", p.name)}


def assert_points_restore(store: Path, backups: Backups) -> int:
    """Every point any chain list names restores to exactly its snapshot; return how many."""
    count = 0
    for listed, names in chains(store).items():
        for name in names:
            for disk in SIZES:
                image = store / f"{disk}-{name}.qcow2"
                r = qemu_img("compare", "-q", "-f", "qcow2", "-F", "raw", image,
                             backups.raw(disk, name))
                assert r.returncode == 0, f"{listed}: {image.name}: {r.stdout}{r.stderr}"
            count += 1
    return count


def listing(d: Path) -> list[str]:
    return sorted(os.listdir(d))


def digests(d: Path) -> dict[str, str]:
    """sha256 of every file of a directory: to show that something changed nothing."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


def store_vm(vm_factory) -> VM:
    return vm_factory("vm1", [DiskSpec(d, size=n) for d, n in SIZES.items()])


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def nonzero_units(data: bytes) -> int:
    zero = bytes(UNIT)
    return sum(data[o : o + UNIT] != zero for o in range(0, len(data), UNIT))


# --- 1. retention ------------------------------------------------------------------------------


def kill_labels() -> list[str]:
    """Every crash point of vcfs-prune: per-disk steps once for each disk."""
    per_disk = {"commit", "checksum", "rename", "merged"}
    return [label for s in STEPS
            for label in ([f"{s} {d}" for d in SIZES] if s in per_disk else [s])]


def test_prune_to_two_points_killed_at_every_step(vm_factory, vcfs_mount, tmp_path):
    vm = store_vm(vm_factory)
    mnt = vcfs_mount(vm.host_dir)
    store = tmp_path / "store"
    backups = Backups(Guest(vm, seed=3), mnt.path, store, tmp_path / "expected")
    # An earlier chain of two points, broken off (its checkpoint deleted behind the script's
    # back), then the current chain of five.
    first = [backups.take(kind="full"), backups.take(kind="incremental")]
    os.rmdir(mnt.path / "vm1/checkpoints" / first[-1])
    current = [backups.take(kind="full")] + [backups.take(kind="incremental") for _ in range(4)]
    assert chains(store) == {f"chain.{first[-1]}": first, "chain": current}
    assert assert_points_restore(store, backups) == 7
    pristine = tmp_path / "pristine"
    shutil.copytree(store, pristine)
    before = sum(allocated(p) for p in store.iterdir())

    labels = kill_labels()
    assert len(labels) == len(STEPS) + 4 * (len(SIZES) - 1)
    for label in labels:
        trial = tmp_path / "trial"
        shutil.rmtree(trial, ignore_errors=True)
        shutil.copytree(pristine, trial)
        r = run(BIN / "vcfs-prune", trial, "2", env={**ENV, KILL_ENV: label})
        assert r.returncode == -9, f"{label}: never reached ({r.returncode}): {r.stderr}"
        # Killed there: every point still listed restores to exactly its content …
        left = assert_points_restore(trial, backups)
        assert 2 <= left <= 5, (label, chains(trial))
        # … and the next run finishes the job.
        r = run(BIN / "vcfs-prune", trial, "2")
        assert r.returncode == 0, f"{label}: {r.stderr}"
        assert chains(trial) == {"chain": current[-2:]}, label
        assert assert_points_restore(trial, backups) == 2
        r = run(BIN / "vcfs-verify", trial)
        assert r.returncode == 0, f"{label}: {r.stdout}{r.stderr}"

    # Uninterrupted, on the store itself.
    start = time.monotonic()
    r = run(BIN / "vcfs-prune", store, "2")
    elapsed = time.monotonic() - start
    assert r.returncode == 0, r.stderr
    merged = [f"merged {a} into {b}" for a, b in zip(current[:3], current[1:4], strict=True)]
    lines = r.stdout.splitlines()
    assert lines[0] == f"deleted the earlier chain {first[0]} … {first[-1]}", r.stdout
    assert [re.sub(r" \(.*\)$", "", line) for line in lines[1:4]] == merged, r.stdout
    assert lines[4] == f"kept 2 restore points in {store}: {' '.join(current[-2:])}"
    print(f"\nprune of 7 points to 2 (one chain deleted, 3 merges): {elapsed:.2f} s")
    assert listing(store) == sorted(["chain", "lock"] + [
        f"{d}-{n}.qcow2{ext}" for d in SIZES for n in current[-2:] for ext in ("", ".sha256")])
    for disk in SIZES:
        full = store / f"{disk}-{current[-2]}.qcow2"
        assert "backing-filename" not in json.loads(qemu_img("info", "--output=json",
                                                             full).stdout)
        newest = json.loads(qemu_img("info", "--output=json", store / f"{disk}-{current[-1]}"
                                     ".qcow2").stdout)
        assert newest["backing-filename"] == full.name  # the name it always had
        # Sparse: the merged full image holds the point's data clusters and little else.
        data = nonzero_units(backups.raw(disk, current[-2]).read_bytes())
        assert allocated(full) <= (data + METADATA_CLUSTERS) * UNIT, (disk, allocated(full), data)
    assert sum(allocated(p) for p in store.iterdir()) < before
    # Restores with vcfs-restore itself, and vcfs-backup continues the pruned chain.
    for name in current[-2:]:
        for disk in SIZES:
            out = tmp_path / f"{disk}-{name}.out"
            r = run(SCRIPTS / "vcfs-restore", store, disk, name, out, "raw")
            assert r.returncode == 0, r.stderr
            assert out.read_bytes() == backups.raw(disk, name).read_bytes(), (disk, name)
            out.unlink()
    nxt = backups.take("--keep", "2", kind="incremental")
    assert chains(store) == {"chain": [current[-1], nxt]}
    assert assert_points_restore(store, backups) == 2
    assert run(BIN / "vcfs-verify", store).returncode == 0


def test_prune_and_verify_refuse_bad_requests_and_change_nothing(tmp_path):
    # A store made by qemu-img alone (what vcfs-backup would have saved): two points.
    store = tmp_path / "store"
    store.mkdir()
    full, inc = store / "vda-a.qcow2", store / "vda-b.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", full, "1M")
    qemu_img("create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", full.name, inc)
    for image in (full, inc):
        digest = hashlib.sha256(image.read_bytes()).hexdigest()
        (store / f"{image.name}.sha256").write_text(f"{digest}  {image.name}\n")
    (store / "chain").write_text("a\nb\n")
    assert run(BIN / "vcfs-verify", store).returncode == 0
    was = digests(store)

    cases = [
        (("0",), 1, "the number of restore points to keep must be at least 1"),
        (("two",), 2, "'two': not a number of restore points"),
        ((), 2, "the following arguments are required: N"),
    ]
    for args, status, message in cases:
        r = run(BIN / "vcfs-prune", store, *args)
        assert (r.returncode, r.stdout) == (status, ""), (args, r)
        assert message in r.stderr, (args, r.stderr)
    assert digests(store) == was
    r = run(BIN / "vcfs-prune", tmp_path, "1")
    assert r.returncode == 1 and f"{tmp_path}: not a backup store (no chain file)" in r.stderr
    r = run(BIN / "vcfs-verify", tmp_path / "nope")
    assert r.returncode == 1 and "no such directory" in r.stderr
    # Held by another tool (vcfs-backup takes the same flock): refused at once.
    fd = os.open(store / "lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        for argv in ([BIN / "vcfs-prune", store, "1"], [BIN / "vcfs-verify", store]):
            r = run(*argv)
            assert r.returncode == 1, r
            assert r.stderr == f"{argv[0].name}: {store}: in use by another vcfs-backup, " \
                "vcfs-prune or vcfs-verify\n", r.stderr
    finally:
        os.close(fd)
    # A chain that is not what it says (b's backing file is another image): nothing pruned.
    other = store / "vda-x.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", other, "1M")
    qemu_img("rebase", "-u", "-F", "qcow2", "-b", other.name, inc)
    was = digests(store)
    r = run(BIN / "vcfs-prune", store, "1")
    assert r.returncode == 1 and "vda-b.qcow2: backing file 'vda-x.qcow2', expected " \
        "'vda-a.qcow2'" in r.stderr, r.stderr
    assert digests(store) == was
    r = run(BIN / "vcfs-verify", store)
    assert r.returncode == 1
    assert "vda-b.qcow2: backing file vda-x.qcow2, but chain has vda-a.qcow2 before it" in r.stderr
    assert "vda-b.qcow2: checksum mismatch" in r.stderr  # rebase changed its header
    assert "note: vda-x.qcow2: in no chain list" in r.stderr
    assert digests(store) == was
    # Nothing to do is not an error.
    qemu_img("rebase", "-u", "-F", "qcow2", "-b", full.name, inc)
    r = run(BIN / "vcfs-prune", store, "5")
    assert r.returncode == 0 and "2 restore points" in r.stdout and "nothing to prune" in r.stdout


# --- 2. checksums and vcfs-verify --------------------------------------------------------------


def test_checksums_beside_each_image_and_verify_finds_a_corrupted_byte(vm_factory, vcfs_mount,
                                                                       tmp_path):
    vm = store_vm(vm_factory)
    mnt = vcfs_mount(vm.host_dir)
    store = tmp_path / "store"
    backups = Backups(Guest(vm, seed=5), mnt.path, store, tmp_path / "expected")
    names = [backups.take(kind="full"), backups.take(kind="incremental"),
             backups.take(kind="incremental")]
    images = [f"{d}-{n}.qcow2" for n in names for d in SIZES]
    # Each checksum file is what sha256sum prints for the saved image, so sha256sum checks it.
    for image in images:
        r = subprocess.run(["sha256sum", image], cwd=store, capture_output=True, text=True)
        assert (store / f"{image}.sha256").read_text() == r.stdout
    r = subprocess.run("sha256sum -c *.sha256", shell=True, cwd=store, capture_output=True,
                       text=True)
    assert r.returncode == 0 and r.stdout.count(": OK\n") == len(images), r.stdout + r.stderr
    r = run(BIN / "vcfs-verify", store)
    size = sum((store / i).stat().st_size for i in images)
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.fullmatch(rf"ok: 6 images, 3 restore points, {size} bytes checked in [\d.]+ s\n",
                        r.stdout), r.stdout
    assert r.stderr == ""

    # One byte of guest data flipped in the middle incremental: found, and only there.
    bad = store / f"vdb-{names[1]}.qcow2"
    extents = json.loads(qemu_img("map", "--output=json", bad).stdout)
    offset = next(e["offset"] for e in extents if e["data"] and e["depth"] == 0) + 12345
    with open(bad, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))
    assert qemu_img("check", bad).returncode == 0  # qemu-img alone cannot see it
    r = run(BIN / "vcfs-verify", store)
    assert r.returncode == 1, r.stdout
    assert r.stderr == (f"vcfs-verify: {bad.name}: checksum mismatch: the image changed after it "
                        "was saved\n"), r.stderr
    assert r.stdout.startswith("FAILED: 6 images, 3 restore points") and \
        r.stdout.endswith(", 1 problems\n"), r.stdout
    with open(bad, "r+b") as f:
        f.seek(offset)
        f.write(byte)
    # A broken header: qemu-img check's word. A missing link: the images that name it.
    header = store / f"vda-{names[2]}.qcow2"
    saved = header.read_bytes()
    header.write_bytes(b"XXXX" + saved[4:])
    gone = store / f"vda-{names[1]}.qcow2"
    gone.rename(tmp_path / "aside.qcow2")
    r = run(BIN / "vcfs-verify", store)
    assert r.returncode == 1
    problems = r.stderr.splitlines()
    assert f"vcfs-verify: chain: restore point {names[1]} has no image" not in problems
    assert f"vcfs-verify: {gone.name}.sha256: a checksum of a missing image" in problems
    assert any(p.startswith(f"vcfs-verify: {header.name}: unreadable: qemu-img info")
               for p in problems), problems
    assert any(p.startswith(f"vcfs-verify: {header.name}: qemu-img check: ") for p in problems)
    assert f"vcfs-verify: {header.name}: checksum mismatch: the image changed after it was " \
        "saved" in problems
    header.write_bytes(saved)
    r = run(BIN / "vcfs-verify", store)
    assert f"vcfs-verify: {header.name}: its backing file {gone.name} is missing" in \
        r.stderr.splitlines(), r.stderr
    assert "Could not open backing file" in r.stderr
    (tmp_path / "aside.qcow2").rename(gone)
    # A prune killed half-way is reported until vcfs-prune finishes it.
    r = run(BIN / "vcfs-prune", store, "1", env={**ENV, KILL_ENV: "rename vda"})
    assert r.returncode == -9
    r = run(BIN / "vcfs-verify", store)
    assert r.returncode == 1
    assert f"vcfs-verify: {store}/merging: a prune was interrupted; run vcfs-prune to finish " \
        "it" in r.stderr.splitlines(), r.stderr
    assert run(BIN / "vcfs-prune", store, "1").returncode == 0
    r = run(BIN / "vcfs-verify", store)
    assert r.returncode == 0 and r.stdout.startswith("ok: 2 images, 1 restore points"), r


def test_backup_checks_the_copy_against_the_mounts_checksum(vm_factory, vcfs_mount, tmp_path):
    vm = store_vm(vm_factory)
    mnt = vcfs_mount(vm.host_dir)
    probe = mnt.path / "vm1/backups/probe"
    os.mkdir(probe)
    offered = (probe / "disks/vda.qcow2.sha256").exists()
    if not offered:
        os.rmdir(probe)
        pytest.skip("the mount does not offer disks/<disk>.qcow2.sha256 yet")
    # What vcfs-backup relies on: after one cp of the view, its checksum file holds the sha256
    # of exactly the bytes served, in sha256sum format.
    copy = tmp_path / "probe.qcow2"
    shutil.copyfile(probe / "disks/vda.qcow2", copy)
    served = (probe / "disks/vda.qcow2.sha256").read_text()
    assert re.fullmatch(r"[0-9a-f]{64}  \S+\n", served), served
    assert served.split()[0] == hashlib.sha256(copy.read_bytes()).hexdigest()
    os.rmdir(probe)
    # vcfs-backup checks each copy against it (a mismatch fails the run) and saves the same.
    store = tmp_path / "store"
    backups = Backups(Guest(vm, seed=9), mnt.path, store, tmp_path / "expected")
    for kind in ("full", "incremental"):
        name = backups.take(kind=kind)
        for disk in SIZES:
            saved = (store / f"{disk}-{name}.qcow2.sha256").read_text().split()[0]
            image = store / f"{disk}-{name}.qcow2"
            assert saved == hashlib.sha256(image.read_bytes()).hexdigest()
    assert assert_points_restore(store, backups) == 2


# --- 3. instant recovery -----------------------------------------------------------------------


def test_instant_recovery_boots_a_restore_point_and_leaves_the_chain_alone(
        vm_factory, vcfs_mount, tmp_path):
    vm = store_vm(vm_factory)
    mnt = vcfs_mount(vm.host_dir)
    store = tmp_path / "store"
    backups = Backups(Guest(vm, seed=7), mnt.path, store, tmp_path / "expected")
    names = [backups.take(kind="full"), backups.take(kind="incremental"),
             backups.take(kind="incremental")]
    point = names[1]
    was = digests(store)

    rescue = VM("rescue", tmp_path / "rescue-qmp", tmp_path / "rescue",
                [DiskSpec(d, size=n) for d, n in SIZES.items()])
    rescue.work_dir.mkdir()
    start = time.monotonic()
    for disk in SIZES:
        r = run(SCRIPTS / "vcfs-restore", store, disk, point, "--instant", rescue.image(disk))
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith(f"instant restore of {disk} at {point}: "), r.stdout
    try:
        rescue.start()
        booted = time.monotonic() - start
        print(f"\ninstant recovery: overlays made and QEMU up in {booted:.2f} s")
        # Every unit of each disk, read through the virtio device, is the restore point's.
        for disk, size in SIZES.items():
            expected = backups.raw(disk, point).read_bytes()
            for u in range(size // UNIT):
                pattern = expected[u * UNIT]
                assert expected[u * UNIT : (u + 1) * UNIT] == bytes([pattern]) * UNIT
                assert rescue.has_pattern(disk, u * UNIT, UNIT, pattern), (disk, u)
        # The guest writes: into the overlay only.
        rescue.write("vda", 0, UNIT, 0xEE)
        assert rescue.has_pattern("vda", 0, UNIT, 0xEE)
        assert digests(store) == was
        assert run(BIN / "vcfs-verify", store).returncode == 0
        # The chain is open in the VM: pruning it is refused, and changes nothing.
        r = run(BIN / "vcfs-prune", store, "1")
        assert r.returncode == 1 and "open in another process" in r.stderr, r
        assert digests(store) == was
        # Made permanent while it runs: block-stream pulls the chain into the overlay.
        for disk in SIZES:
            rescue.qmp("block-stream", job_id=f"pull-{disk}", device=f"{disk}-format")
        deadline = time.monotonic() + 60
        while rescue.qmp("query-block-jobs"):
            assert time.monotonic() < deadline, "block-stream did not finish"
            time.sleep(0.05)
        for disk in SIZES:
            overlay = json.loads(qemu_img("info", "-U", "--output=json",
                                          rescue.image(disk)).stdout)
            assert "backing-filename" not in overlay, overlay
        assert rescue.has_pattern("vda", 0, UNIT, 0xEE)
        # Let go of the chain, it can be pruned while the VM runs on.
        r = run(BIN / "vcfs-prune", store, "1")
        assert r.returncode == 0, r.stderr
    finally:
        rescue.stop()
        rescue.kill()
    expected = bytearray(backups.raw("vda", point).read_bytes())
    expected[:UNIT] = bytes([0xEE]) * UNIT
    (tmp_path / "after.raw").write_bytes(expected)
    r = qemu_img("compare", "-q", "-f", "qcow2", "-F", "raw", rescue.image("vda"),
                 tmp_path / "after.raw")
    assert r.returncode == 0, r.stdout + r.stderr
    r = qemu_img("compare", "-q", "-f", "qcow2", "-F", "raw", rescue.image("vdb"),
                 backups.raw("vdb", point))
    assert r.returncode == 0, r.stdout + r.stderr

    # Refusals: an overlay that exists, a point never saved; nothing written.
    taken = tmp_path / "taken.qcow2"
    taken.write_bytes(b"keep")
    r = run(SCRIPTS / "vcfs-restore", store, "vda", names[-1], "--instant", taken)
    assert r.returncode == 1 and "exists" in r.stderr and taken.read_bytes() == b"keep"
    r = run(SCRIPTS / "vcfs-restore", store, "vda", "19700101T000000Z", "--instant",
            tmp_path / "no.qcow2")
    assert r.returncode == 1 and "no backup" in r.stderr and not (tmp_path / "no.qcow2").exists()


# --- 4. scheduled runs -------------------------------------------------------------------------


@pytest.fixture
def installed_backup() -> Iterator[Path]:
    """/usr/local/bin/vcfs-backup, where the unit's ExecStart= runs it (systemd-analyze checks
    that it is there). Skips rather than replace a real installation."""
    if os.geteuid() != 0:
        pytest.skip("needs root (/usr/local/bin)")
    if os.path.lexists(INSTALLED):
        pytest.skip(f"{INSTALLED} exists already: not replacing an installed vcfs-backup")
    INSTALLED.write_text(f"#!/bin/sh\n{WRAPPER_MARK}\nexec {SCRIPTS / 'vcfs-backup'} \"$@\"\n")
    INSTALLED.chmod(0o755)
    try:
        yield INSTALLED
    finally:
        if WRAPPER_MARK in INSTALLED.read_text():
            INSTALLED.unlink()


@pytest.mark.skipif(not os.path.exists("/usr/bin/systemd-analyze"),
                    reason="systemd-analyze is not installed")
def test_systemd_analyze_verifies_the_backup_timer_and_service(installed_backup, tmp_path):
    units = tmp_path / "units"
    units.mkdir()
    for unit in (SERVICE, TIMER):
        shutil.copy(unit, units)
    # An instance of each template, as `systemctl enable vcfs-backup@vm1.timer` makes.
    r = subprocess.run(["systemd-analyze", "verify", "--man=no",
                        units / "vcfs-backup@vm1.service", units / "vcfs-backup@vm1.timer"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stderr == "", r.stderr


def exec_start(unit: Path, instance: str, env: dict[str, str]) -> list[str]:
    """The unit's ExecStart= as argv: `%I` is the instance, `${X}` one word from Environment=
    (then `env`); the installed script is replaced by this checkout's."""
    values: dict[str, str] = {}
    command = None
    for line in unit.read_text().splitlines():
        key, _, value = line.partition("=")
        if key == "Environment":
            values.update(item.split("=", 1) for item in value.split())
        elif key == "ExecStart":
            command = value
    assert command is not None
    values.update(env)
    argv = [re.sub(r"\$\{(\w+)\}", lambda m: values[m[1]], word.replace("%I", instance))
            for word in command.split()]
    assert argv[0] == str(INSTALLED)
    return [str(SCRIPTS / "vcfs-backup"), *argv[1:]]


def test_the_units_command_backs_up_nightly_keeping_n_points(vm_factory, vcfs_mount, tmp_path):
    vm = store_vm(vm_factory)
    mnt = vcfs_mount(vm.host_dir)
    guest = Guest(vm, seed=11)
    stores = tmp_path / "stores"
    argv = exec_start(SERVICE, "vm1", {"VCFS_MOUNTPOINT": str(mnt.path),
                                       "VCFS_STORE": str(stores), "VCFS_KEEP": "2"})
    assert argv[1:] == ["--keep", "2", str(mnt.path), "vm1", str(stores / "vm1")]
    last = ""
    runs = []
    for _ in range(3):
        guest.churn()
        while time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) <= last:
            time.sleep(0.05)
        r = run(*argv)
        assert r.returncode == 0, r.stdout + r.stderr
        last = r.stdout.split()[2]
        runs.append(last)
        (tmp_path / f"vda-{last}.raw").write_bytes(guest.model["vda"])
    assert chains(stores / "vm1") == {"chain": runs[-2:]}
    assert r.stdout.splitlines()[-1] == f"kept 2 restore points in {stores / 'vm1'}: " \
        f"{' '.join(runs[-2:])}"
    for name in runs[-2:]:
        r = qemu_img("compare", "-q", "-f", "qcow2", "-F", "raw", stores / f"vm1/vda-{name}.qcow2",
                     tmp_path / f"vda-{name}.raw")
        assert r.returncode == 0, r.stdout
    assert run(BIN / "vcfs-verify", stores / "vm1").returncode == 0
    # Bad retention counts are refused before anything is made.
    for keep in ("0", "x", ""):
        r = run(SCRIPTS / "vcfs-backup", "--keep", keep, mnt.path, "vm1", tmp_path / "new")
        assert r.returncode == 2 and "not a positive number" in r.stderr, r
    assert not (tmp_path / "new").exists()
    assert listing(mnt.path / "vm1/backups") == ["new"]
