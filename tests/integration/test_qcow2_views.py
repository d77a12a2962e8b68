"""The qcow2 and map views of pull backups, and the scripts built on them, through a real mount.

Backups are taken the way users take them (`echo … > backups/new`, `cp`, `rmdir`), chained by
the naming convention (an incremental image names `<disk>-<base>.qcow2` as its backing file),
and checked with qemu-img alone. Every guest write also goes into a model of the disks (one
bytearray per disk), and images are compared with the model's snapshot at the instant of
`new`: never with the live image, whose qcow2 metadata QEMU has not flushed.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.vm import VM, DiskSpec

UNIT = 64 << 10
"""Cluster size of the test disks, and granularity of their bitmaps."""
MiB = 1 << 20
SIZES = {"vda": 64 * MiB, "vdb": 32 * MiB}
SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
METADATA_CLUSTERS = 6
"""Header, refcount table and block, L1, one L2 table: five clusters, one to spare."""


# --- the guest and its model -------------------------------------------------------------------


class Guest:
    """A VM whose every write also lands in a model of its disks.

    `state` says per 64 KiB unit what the disk's image holds there: "data" (written with a
    non-zero pattern, maybe partly) or "zero" (write-zeroes over the whole unit); a unit never
    written is absent. `changed` collects the units written since the last checkpoint.
    """

    def __init__(self, vm: VM) -> None:
        self.vm = vm
        self.model = {d: bytearray(n) for d, n in SIZES.items()}
        self.state: dict[str, dict[int, str]] = {d: {} for d in SIZES}
        self.changed: dict[str, set[int]] = {d: set() for d in SIZES}

    def write(self, disk: str, offset: int, length: int, pattern: int) -> None:
        assert pattern != 0, "a zero pattern would make the map's zero flags unpredictable"
        self.vm.write(disk, offset, length, pattern)
        self.model[disk][offset : offset + length] = bytes([pattern]) * length
        for u in range(offset // UNIT, (offset + length - 1) // UNIT + 1):
            self.state[disk][u] = "data"
            self.changed[disk].add(u)

    def write_zeroes(self, disk: str, unit: int) -> None:
        """Write-zeroes over one whole unit, as a guest's discard/zeroing would."""
        self.vm.hmp(f'qemu-io -d /machine/peripheral/{disk}/virtio-backend '
                    f'"write -z {unit * UNIT} {UNIT}"')
        assert self.vm.has_pattern(disk, unit * UNIT, UNIT, 0)
        self.model[disk][unit * UNIT : (unit + 1) * UNIT] = bytes(UNIT)
        self.state[disk][unit] = "zero"
        self.changed[disk].add(unit)

    def units(self, disk: str, kind: str) -> set[int]:
        return {u for u, s in self.state[disk].items() if s == kind}

    def never_written(self, disk: str) -> set[int]:
        return set(range(SIZES[disk] // UNIT)) - set(self.state[disk])

    def scatter(self, rng: random.Random, disk: str, units: list[int], patterns: range) -> None:
        for u in units:
            self.write(disk, u * UNIT, UNIT, rng.choice(patterns))


class Scribbler:
    """A thread writing through the guest (and the model) until stopped.

    The main thread must not touch the VM or the model meanwhile: only the filesystem.
    """

    def __init__(self, guest: Guest, writes: list[tuple[str, int, int]]) -> None:
        self.guest = guest
        self.writes = writes
        self.count = 0
        self.stop = threading.Event()
        self.head_start = threading.Event()
        self.failures: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            for i in range(len(self.writes) * 4):
                if self.stop.is_set():
                    break
                disk, unit, pattern = self.writes[i % len(self.writes)]
                pattern = 0x80 + (pattern + i // len(self.writes)) % 0x7F  # never zero
                self.guest.write(disk, unit * UNIT, UNIT, pattern)
                self.count += 1
                if self.count == 5:
                    self.head_start.set()
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            self.failures.append(e)
        finally:
            self.head_start.set()

    def __enter__(self) -> Scribbler:
        self.thread.start()
        assert self.head_start.wait(20)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(30)
        assert not self.thread.is_alive(), "the guest writer hung"
        assert not self.failures, self.failures


# --- backups -----------------------------------------------------------------------------------


@dataclass
class Point:
    """One backup of the chain: what it must contain, what vcfs served."""

    name: str
    base: str | None
    snapshot: dict[str, bytes]
    changed: dict[str, set[int]]
    """Units written between the base's `new` and this one's (every written unit if full)."""
    state: dict[str, dict[int, str]]
    maps: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    """Size of each disk's qcow2 view, as stat shows it on the mount."""
    during_copy: int = 0
    """Guest writes completed while `cp` ran."""

    def image(self, d: Path, disk: str) -> Path:
        return d / f"{disk}-{self.name}.qcow2"


def begin_doc(name: str, base: str | None) -> str:
    inc = f"<incremental>{base}</incremental>" if base else ""
    return (f"<domainbackup mode='pull'>{inc}<domaincheckpoint><name>{name}</name>"
            "</domaincheckpoint></domainbackup>")


def take_backup(
    guest: Guest,
    dom: Path,
    dest: Path,
    name: str,
    base: str | None,
    rng: random.Random,
    sh,
) -> Point:
    """Begin a pull backup creating checkpoint `name`, `cp` its qcow2 views into `dest` while
    the guest writes, read its maps, end it. Return what it must contain."""
    snapshot = {d: bytes(m) for d, m in guest.model.items()}
    state = {d: dict(s) for d, s in guest.state.items()}
    changed = guest.changed if base else {d: set(s) for d, s in guest.state.items()}
    guest.changed = {d: set() for d in SIZES}  # the new checkpoint records from here on
    point = Point(name, base, snapshot, {d: set(u) for d, u in changed.items()}, state)

    r = sh(f'echo "{begin_doc(name, base)}" > {dom}/backups/new')
    assert r.returncode == 0, r.stderr + (dom / "errors").read_text()
    job = os.readlink(dom / "backups/latest")
    disks = dom / "backups" / job / "disks"

    # After `new`, the guest overwrites data of this backup, fills zero units, and writes
    # units this backup did not change: none of it may show in this backup.
    writes = []
    for disk in SIZES:
        data = sorted(guest.units(disk, "data"))
        fresh = sorted(guest.never_written(disk))
        for u in rng.sample(data, min(6, len(data))) + rng.sample(fresh, 6):
            writes.append((disk, u, rng.randrange(0xC0, 0xFF)))
    rng.shuffle(writes)
    with Scribbler(guest, writes) as scribbler:
        for disk in SIZES:
            point.maps[disk] = json.loads((disks / f"{disk}.map").read_text())
        before = scribbler.count
        r = sh(" && ".join(f"cp {disks}/{d}.qcow2 {point.image(dest, d)}" for d in SIZES))
        point.during_copy = scribbler.count - before
        assert r.returncode == 0, r.stderr
        for disk in SIZES:
            point.sizes[disk] = (disks / f"{disk}.qcow2").stat().st_size
            assert_random_reads_match(disks / f"{disk}.qcow2", point.image(dest, disk), rng)
    assert sh(f"rmdir {dom}/backups/{job}").returncode == 0
    return point


def assert_random_reads_match(view: Path, copy: Path, rng: random.Random) -> None:
    """Reads of the view at odd offsets and lengths (past its end too) match the copy."""
    expected = copy.read_bytes()
    fd = os.open(view, os.O_RDONLY)
    try:
        for _ in range(40):
            offset = rng.randrange(len(expected) + UNIT)
            length = rng.choice([1, 511, 4096, 70000, 3 * UNIT + 17, 5 * MiB])
            got = os.pread(fd, length, offset)
            assert got == expected[offset : offset + length], (view.name, offset, length)
    finally:
        os.close(fd)


def qemu_img(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(["qemu-img", *map(str, args)], capture_output=True, text=True, timeout=60)
    if check:
        assert r.returncode == 0, f"qemu-img {' '.join(map(str, args))}: {r.stderr}"
    return r


def info(image: Path) -> dict[str, Any]:
    return json.loads(qemu_img("info", "--output=json", image).stdout)


def first_difference(got: bytes, expected: bytes) -> str:
    if len(got) != len(expected):
        return f"sizes differ: {len(got)} != {len(expected)}"
    for off in range(0, len(got), UNIT):
        a, b = got[off : off + UNIT], expected[off : off + UNIT]
        if a != b:
            i = next(i for i in range(UNIT) if a[i] != b[i])
            return f"first difference at {off + i:#x}: {a[i]:#04x} != {b[i]:#04x} (expected)"
    return "identical"


def assert_raw_equals(image: Path, expected: bytes, work: Path, fmt: str = "qcow2") -> None:
    """`qemu-img convert -O raw` of `image` is byte for byte `expected`."""
    out = work / f"{image.name}.raw"
    out.unlink(missing_ok=True)
    qemu_img("convert", "-f", fmt, "-O", "raw", image, out)
    got = out.read_bytes()
    out.unlink()
    assert got == expected, f"{image.name}: {first_difference(got, expected)}"


def allocated(image: Path, depth: int = 0) -> tuple[set[int], set[int]]:
    """(data units, zero units) that `image` itself (depth 0) holds, per `qemu-img map`."""
    data: set[int] = set()
    zero: set[int] = set()
    for e in json.loads(qemu_img("map", "--output=json", image).stdout):
        if e["depth"] != depth or not (e["data"] or e["zero"]) or e.get("present") is False:
            continue
        assert e["start"] % UNIT == 0 and e["length"] % UNIT == 0, e
        units = set(range(e["start"] // UNIT, (e["start"] + e["length"]) // UNIT))
        (data if e["data"] else zero).update(units)
    return data, zero


def nonzero_units(snapshot: bytes) -> set[int]:
    z = bytes(UNIT)
    return {u for u in range(len(snapshot) // UNIT) if snapshot[u * UNIT : (u + 1) * UNIT] != z}


def build_chain(vm: VM, mnt, sh, dest: Path, length: int = 3) -> tuple[Guest, list[Point]]:
    """A full backup `b0`, then incrementals `b1`, `b2`… each from the one before, with guest
    writes (data, partial units, zeroing of old data) before each and during each copy."""
    dest.mkdir(exist_ok=True)
    dom = mnt.path / vm.name
    rng = random.Random(7)
    guest = Guest(vm)
    points: list[Point] = []
    for i in range(length):
        for disk, size in SIZES.items():
            units = size // UNIT
            if i == 0:
                # Lone units, a run, the first and the last unit, a partial unit.
                guest.scatter(rng, disk, rng.sample(range(1, units - 1), 20), range(0x10, 0x40))
                guest.scatter(rng, disk, [*range(40, 52), 0, units - 1], range(0x10, 0x40))
                guest.write(disk, 60 * UNIT + 8192, 4096, 0x41)
                for u in (41, 45):  # zeroed again before the full backup: no data there
                    guest.write_zeroes(disk, u)
            else:
                data = sorted(guest.units(disk, "data"))
                old = rng.sample(data, 8)
                guest.scatter(rng, disk, old[:5], range(0x40 * i + 0x10, 0x40 * i + 0x30))
                for u in old[5:]:
                    guest.write_zeroes(disk, u)  # must hide the base's data
                fresh = rng.sample(sorted(guest.never_written(disk)), 10)
                guest.scatter(rng, disk, fresh, range(0x40 * i + 0x10, 0x40 * i + 0x30))
                guest.write(disk, (70 + i) * UNIT + 512, 1024, 0x42 + i)  # partial unit
        base = points[-1].name if points else None
        points.append(take_backup(guest, dom, dest, f"b{i}", base, rng, sh))
    return guest, points


def qcow2_vm(vm_factory) -> VM:
    return vm_factory("vm1", [DiskSpec(d, size=n) for d, n in SIZES.items()])


# --- 1. the chain, as qemu-img sees it ---------------------------------------------------------


def test_chain_full_incremental_incremental_is_point_in_time(vm_factory, vcfs_mount, sh,
                                                           tmp_path):
    vm = qcow2_vm(vm_factory)
    mnt = vcfs_mount(vm.host_dir)
    dest = tmp_path / "dest"
    guest, points = build_chain(vm, mnt, sh, dest)
    assert sorted(os.listdir(dest)) == sorted(
        f"{disk}-b{i}.qcow2" for disk in SIZES for i in range(3)
    )
    assert all(p.during_copy > 0 for p in points), "no guest write happened during a copy"

    for p in points:
        for disk, size in SIZES.items():
            image = p.image(dest, disk)
            r = qemu_img("check", image, check=False)
            assert r.returncode == 0 and "No errors were found" in r.stdout, r.stdout + r.stderr
            meta = info(image)
            assert meta["format"] == "qcow2" and meta["virtual-size"] == size
            assert meta["cluster-size"] == UNIT
            assert meta["format-specific"]["data"]["compat"] == "1.1"
            if p.base is None:
                assert "backing-filename" not in meta, meta
            else:
                assert meta["backing-filename"] == f"{disk}-{p.base}.qcow2"
                assert meta["backing-filename-format"] == "qcow2"
            assert image.stat().st_size == p.sizes[disk]
            assert_raw_equals(image, p.snapshot[disk], tmp_path)

    # The later writes (the ones made during the copies included) are in the live disk.
    for disk in SIZES:
        model = guest.model[disk]
        assert model != points[-1].snapshot[disk]
        for u in sorted(guest.state[disk])[:40]:
            assert vm.has_pattern(disk, u * UNIT, 512, model[u * UNIT])

    # Restore by commit: the incrementals committed down into the full image.
    commit = tmp_path / "commit"
    shutil.copytree(dest, commit)
    for disk in SIZES:
        qemu_img("commit", "-q", commit / f"{disk}-b2.qcow2")
        qemu_img("commit", "-q", commit / f"{disk}-b1.qcow2")
        assert qemu_img("check", commit / f"{disk}-b0.qcow2", check=False).returncode == 0
        assert_raw_equals(commit / f"{disk}-b0.qcow2", points[2].snapshot[disk], tmp_path)
    # Restore by rebase: the newest image made self-contained.
    rebase = tmp_path / "rebase"
    shutil.copytree(dest, rebase)
    for disk in SIZES:
        image = rebase / f"{disk}-b2.qcow2"
        qemu_img("rebase", "-b", "", image)
        assert "backing-filename" not in info(image)
        (rebase / f"{disk}-b1.qcow2").unlink()
        (rebase / f"{disk}-b0.qcow2").unlink()
        assert_raw_equals(image, points[2].snapshot[disk], tmp_path)


# --- 2. an incremental image alone ---------------------------------------------------------------


def test_incremental_image_without_its_base_fails(vm_factory, vcfs_mount, sh, tmp_path):
    vm = qcow2_vm(vm_factory)
    mnt = vcfs_mount(vm.host_dir)
    dest = tmp_path / "dest"
    _, points = build_chain(vm, mnt, sh, dest, length=2)
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(dest / "vda-b1.qcow2", alone)
    image = alone / "vda-b1.qcow2"
    out = tmp_path / "out.raw"
    r = qemu_img("convert", "-O", "raw", image, out, check=False)
    assert r.returncode != 0, "an incremental image without its base read as something"
    assert "Could not open backing file" in r.stderr and "vda-b0.qcow2" in r.stderr, r.stderr
    assert not out.exists(), "qemu-img wrote something (zeros?) for an image it cannot read"
    assert qemu_img("check", image, check=False).returncode != 0
    assert qemu_img("info", "--backing-chain", image, check=False).returncode != 0
    # The base put back next to it: whole again.
    shutil.copy(dest / "vda-b0.qcow2", alone)
    assert_raw_equals(image, points[1].snapshot["vda"], tmp_path)


# --- 3. sizes ----------------------------------------------------------------------------------


def test_images_hold_exactly_the_changed_clusters(vm_factory, vcfs_mount, sh, tmp_path):
    vm = qcow2_vm(vm_factory)
    mnt = vcfs_mount(vm.host_dir)
    dest = tmp_path / "dest"
    _, points = build_chain(vm, mnt, sh, dest, length=3)
    for p in points:
        for disk in SIZES:
            image = p.image(dest, disk)
            data, zero = allocated(image)
            if p.base is None:
                # The full image: every unit holding data, nothing else.
                assert data == nonzero_units(p.snapshot[disk])
                assert data == {u for u, s in p.state[disk].items() if s == "data"}
                # (Zero clusters where the guest zeroed data would do; QEMU reports holes.)
                assert zero <= {u for u, s in p.state[disk].items() if s == "zero"}, zero
            else:
                # An incremental image: the changed units, data or explicit zeros.
                changed = p.changed[disk]
                zeroed = {u for u in changed if p.state[disk][u] == "zero"}
                assert zeroed, "the test meant to zero some units"
                assert data == changed - zeroed
                assert zero == zeroed
            size = image.stat().st_size
            assert len(data) * UNIT < size <= (len(data) + METADATA_CLUSTERS) * UNIT, (
                f"{image.name}: {size} bytes for {len(data)} data clusters"
            )


# --- 4. the map --------------------------------------------------------------------------------


def test_map_covers_the_disk_and_flags_exactly_what_changed(vm_factory, vcfs_mount, sh, tmp_path):
    vm = qcow2_vm(vm_factory)
    mnt = vcfs_mount(vm.host_dir)
    _, points = build_chain(vm, mnt, sh, tmp_path / "dest", length=2)
    for p in points:
        for disk, size in SIZES.items():
            extents = p.maps[disk]
            assert extents and all(set(e) == {"start", "length", "zero", "dirty"}
                                   for e in extents), extents[:3]
            pos = 0
            for e in extents:
                assert e["start"] == pos and e["length"] > 0, (pos, e)
                pos += e["length"]
            assert pos == size == sum(e["length"] for e in extents)
            for a, b in zip(extents, extents[1:], strict=False):
                assert (a["zero"], a["dirty"]) != (b["zero"], b["dirty"]), ("not merged", a, b)

            def units(flag: str, value: bool, extents=extents) -> set[int]:
                out: set[int] = set()
                for e in extents:
                    if e[flag] == value:
                        assert e["start"] % UNIT == 0 and e["length"] % UNIT == 0, e
                        out.update(range(e["start"] // UNIT, (e["start"] + e["length"]) // UNIT))
                return out

            nonzero = nonzero_units(p.snapshot[disk])
            assert units("zero", False) == nonzero, disk
            if p.base is None:
                assert all(e["dirty"] == (not e["zero"]) for e in extents), extents
            else:
                assert units("dirty", True) == p.changed[disk]


# --- 5. rsync ----------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("rsync") is None, reason="rsync is not installed")
def test_rsync_copies_equal_cp_copies(vm_factory, vcfs_mount, sh, tmp_path):
    vm = qcow2_vm(vm_factory)
    mnt = vcfs_mount(vm.host_dir)
    dom = mnt.path / "vm1"
    copied, synced = tmp_path / "cp", tmp_path / "rsync"
    copied.mkdir()
    synced.mkdir()
    guest = Guest(vm)
    rng = random.Random(5)
    snapshots = []
    for name, base in (("r0", None), ("r1", "r0")):
        for disk in SIZES:
            guest.scatter(rng, disk, rng.sample(sorted(guest.never_written(disk)), 12),
                          range(1, 0xFF))
        snapshots.append({d: bytes(m) for d, m in guest.model.items()})
        r = sh(f'echo "{begin_doc(name, base)}" > {dom}/backups/new')
        assert r.returncode == 0, r.stderr
        disks = dom / "backups" / os.readlink(dom / "backups/latest") / "disks"
        r = sh(" && ".join(f"cp {disks}/{d}.qcow2 {copied}/{d}-{name}.qcow2" for d in SIZES))
        assert r.returncode == 0, r.stderr
        r = sh(f"rsync -r --include='*.qcow2' --exclude='*' {disks}/ {synced}/")
        assert r.returncode == 0, r.stderr
        assert sh(f"rmdir {disks.parent}").returncode == 0
        assert sorted(n for n in os.listdir(synced) if n.count("-") == 0) == [
            f"{d}.qcow2" for d in SIZES
        ]
        for d in SIZES:
            got = synced / f"{d}.qcow2"
            assert got.read_bytes() == (copied / f"{d}-{name}.qcow2").read_bytes(), (d, name)
            got.rename(synced / f"{d}-{name}.qcow2")
    for d in SIZES:
        assert_raw_equals(synced / f"{d}-r1.qcow2", snapshots[1][d], tmp_path)


# --- 6. the scripts ----------------------------------------------------------------------------


def test_backup_and_restore_scripts(vm_factory, vcfs_mount, sh, tmp_path):
    vm = qcow2_vm(vm_factory)
    mnt = vcfs_mount(vm.host_dir)
    dom = mnt.path / "vm1"
    dest = tmp_path / "backups"
    guest = Guest(vm)
    rng = random.Random(11)
    snapshots: dict[str, dict[str, bytes]] = {}
    last_start = 0.0

    def run_backup(expect: str) -> subprocess.CompletedProcess[str]:
        nonlocal last_start
        for disk in SIZES:
            fresh = rng.sample(sorted(guest.never_written(disk)), 6)
            guest.scatter(rng, disk, fresh, range(0x10, 0xF0))
            data = sorted(guest.units(disk, "data"))
            guest.scatter(rng, disk, rng.sample(data, min(3, len(data))), range(0x10, 0xF0))
        snapshot = {d: bytes(m) for d, m in guest.model.items()}
        time.sleep(max(0.0, last_start + 1.1 - time.time()))  # names are UTC seconds
        last_start = time.time()
        r = sh(f"{SCRIPTS}/vcfs-backup {mnt.path} vm1 {dest}")
        assert r.returncode == 0, r.stdout + r.stderr
        kind, _, name, *_ = r.stdout.split()
        assert kind == expect, r.stdout
        assert r.stdout == f"{kind} backup {name} of vm1 saved in {dest}\n"
        snapshots[name] = snapshot
        return r

    def checkpoints() -> list[str]:
        return sorted(set(os.listdir(dom / "checkpoints")) - {"new", "redefine", "current"})

    def restore(name: str, disk: str, out: Path, *fmt: str) -> subprocess.CompletedProcess[str]:
        return sh(f"{SCRIPTS}/vcfs-restore {dest} {disk} {name} {out} {' '.join(fmt)}")

    def assert_restores(name: str) -> None:
        for disk in SIZES:
            out = tmp_path / f"{disk}-{name}.raw"
            r = restore(name, disk, out, "raw")
            assert r.returncode == 0, r.stdout + r.stderr
            got = out.read_bytes()
            out.unlink()
            assert got == snapshots[name][disk], f"{disk} at {name}: " + first_difference(
                got, snapshots[name][disk])

    def name_of(r: subprocess.CompletedProcess[str]) -> str:
        return r.stdout.split()[2]

    names = [name_of(run_backup(k)) for k in ("full", "incremental", "incremental")]
    assert (dest / "chain").read_text().split() == names
    assert checkpoints() == [names[-1]]
    assert sorted(os.listdir(dest)) == sorted(
        ["chain", "lock"] + [f"{disk}-{n}.qcow2{ext}" for disk in SIZES for n in names
                             for ext in ("", ".sha256")]
    )
    assert os.listdir(dom / "backups") == ["new"]
    for name in (dest / "chain").read_text().split():
        assert_restores(name)
    # The default format: a self-contained qcow2.
    out = tmp_path / "vda.qcow2"
    r = restore(names[-1], "vda", out)
    assert r.returncode == 0, r.stderr
    assert "backing-filename" not in info(out)
    assert_raw_equals(out, snapshots[names[-1]]["vda"], tmp_path)

    # The chain's checkpoint deleted behind the script's back: a new chain.
    assert sh(f"rmdir {dom}/checkpoints/{names[-1]}").returncode == 0
    r = run_backup("full")
    assert f"cannot continue the chain from {names[-1]}" in r.stderr, r.stderr
    r_name = name_of(r)
    assert (dest / "chain").read_text() == f"{r_name}\n"
    assert checkpoints() == [r_name]
    assert_restores(r_name)
    assert_restores(names[-1])  # the old chain's files are still whole
    next_name = name_of(run_backup("incremental"))
    assert (dest / "chain").read_text().split() == [r_name, next_name]
    assert info(dest / f"vda-{next_name}.qcow2")["backing-filename"] == f"vda-{r_name}.qcow2"
    assert_restores(next_name)

    # vcfs-restore refuses to overwrite, and to restore what was never backed up.
    out.write_bytes(b"keep")
    r = restore(names[0], "vda", out, "raw")
    assert r.returncode == 1 and "exists" in r.stderr, r
    assert out.read_bytes() == b"keep"
    missing = tmp_path / "missing.raw"
    r = restore("19700101T000000Z", "vda", missing, "raw")
    assert r.returncode == 1 and "no backup" in r.stderr, r
    assert not missing.exists()
    r = restore(names[0], "vdz", missing, "raw")
    assert r.returncode == 1 and not missing.exists(), r
    # A chain with a missing link is refused before anything is written.
    link = dest / f"vda-{names[1]}.qcow2"
    link.rename(tmp_path / "aside.qcow2")
    r = restore(names[2], "vda", missing, "raw")
    assert r.returncode != 0 and f"vda-{names[1]}.qcow2" in r.stderr, r
    assert not missing.exists()
