"""Tests for vcfs.domain.qcow2: synthesized qcow2 v3 images, checked against qemu-img.

A guest disk is modelled as bytes plus which bytes were ever written (holes) and which changed
since a base (dirty), and described as extents the way an NBD server does (base:allocation plus
a dirty bitmap of some granularity). The image synthesized from those extents must be a valid
qcow2 file (`qemu-img check`) that reads back exactly as the model (`qemu-img convert`), alone
for a full image and on top of its base for an incremental one. qemu-img is the reference
reader; the tests that need it are skipped when it is missing.

The layout is built from runs of clusters; the former cluster-by-cluster implementation is kept
below as the reference, and on random extent maps (edges inside clusters, holes and allocated
zeros, full and incremental) both must make the same image byte for byte. TiB disks with
scattered extents check that a layout costs memory in proportion to its extents, not its size.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import random
import re
import shutil
import struct
import subprocess
import tempfile
import tracemalloc
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vcfs.domain import qcow2
from vcfs.domain.extents import Extent

SECTOR = 512
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

needs_qemu = pytest.mark.skipif(
    shutil.which("qemu-img") is None,
    reason="qemu-img not on PATH (Debian package qemu-utils): it is the reference qcow2 reader",
)

QEMU_SETTINGS = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
PURE_SETTINGS = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


# --- the guest disk model ----------------------------------------------------------------------


@dataclass(frozen=True)
class Op:
    """One guest write: `data` (a repeated pattern), `zero` (allocated zeros) or `discard`."""

    kind: str
    offset: int
    length: int
    pattern: bytes = b"\xff"


class Model:
    """A guest disk: its bytes, which bytes are allocated, which changed since the last base."""

    def __init__(self, size: int) -> None:
        self.data = bytearray(size)
        self.written = bytearray(size)
        self.dirty = bytearray(size)

    def apply(self, ops: Sequence[Op]) -> None:
        for op in ops:
            a, b = op.offset, op.offset + op.length
            if op.kind == "data":
                self.data[a:b] = (op.pattern * _ceil(op.length, len(op.pattern)))[: op.length]
            else:
                self.data[a:b] = bytes(op.length)
            self.written[a:b] = (b"\0" if op.kind == "discard" else b"\1") * op.length
            self.dirty[a:b] = b"\1" * op.length  # a discard marks the bitmap dirty too

    def new_base(self) -> None:
        """A backup was taken: nothing changed since."""
        self.dirty = bytearray(len(self.data))

    def extents(
        self, incremental: bool, dirty_granularity: int = 1, splits: Sequence[int] = ()
    ) -> list[Extent]:
        """The image as an NBD server describes it (split at `splits` as a server may)."""
        size = len(self.data)
        dirty = bytearray(size)
        for m in re.finditer(rb"\x01+", self.dirty):  # the bitmap's granularity: round out
            g = dirty_granularity
            s, e = m.start() // g * g, min(size, _ceil(m.end(), g) * g)
            dirty[s:e] = b"\1" * (e - s)
        cuts = {0, size, *(s for s in splits if 0 < s < size)}
        for flags, run in ((self.data, rb"\x00+"), (self.written, rb"\x00+"), (dirty, rb"\x01+")):
            for m in re.finditer(run, flags):
                cuts.update(m.span())
        out = []
        for s, e in pairwise(sorted(cuts)):
            zero = self.data[s] == 0  # runs of zero bytes are cut out: a run is uniform
            out.append(Extent(s, e - s, zero, bool(dirty[s]) if incremental else not zero,
                              hole=not self.written[s]))
        return out


@dataclass
class Case:
    """A disk image to synthesize; for an incremental one also its base at time 1."""

    cs: int
    size: int
    image: bytes = field(repr=False)
    extents: list[Extent] = field(repr=False)
    incremental: bool = False
    base: bytes | None = field(default=None, repr=False)
    base_extents: list[Extent] | None = field(default=None, repr=False)
    how: str = ""
    """How the model was made (shown when a test fails, instead of megabytes of image)."""


@st.composite
def geometries(draw: st.DrawFn) -> tuple[int, int]:
    """A cluster size and a virtual size: a multiple of 512 (as QEMU sizes disks), not
    necessarily of the cluster size; up to a few thousand clusters so that with small clusters
    the L1 table, the L2 tables and the refcount blocks span several clusters."""
    # Small clusters most often: only they make multi-cluster metadata in a small file.
    cs = 1 << draw(st.one_of(st.just(9), st.integers(9, 12), st.integers(9, 21)))
    max_clusters = max(3, min(6000, (4 * MiB) // cs))
    per_l2 = cs // 8
    clusters = draw(
        st.one_of(
            st.integers(0, 4),
            st.integers(0, max_clusters),
            st.integers(max_clusters // 2, max_clusters),
            st.sampled_from([per_l2 - 1, per_l2, per_l2 + 1, 2 * per_l2 + 1]).map(
                lambda n: min(n, max_clusters)
            ),
        )
    )
    tail = draw(st.integers(0, cs // SECTOR - 1)) * SECTOR
    if clusters == 0 and tail == 0:
        tail = SECTOR  # size 0 is its own (failing) test: test_zero_sized_image_is_clean
    return cs, clusters * cs + tail


@st.composite
def op_lists(
    draw: st.DrawFn, size: int, cs: int, before: Sequence[Op] = (), max_ops: int = 6
) -> list[Op]:
    """Guest writes; some of them again where one of `before` wrote (to undo or change it)."""
    ops: list[Op] = []
    for _ in range(draw(st.integers(0, max_ops))):
        kind = draw(st.sampled_from(["data", "data", "zero", "discard"]))
        where = draw(st.sampled_from(["anywhere", "cluster", "tail", "again"]))
        if where == "again" and before:
            old = draw(st.sampled_from(before))
            ops.append(Op(kind, old.offset, old.length, bytes([draw(st.integers(1, 255))])))
            continue
        if where == "cluster":
            offset = draw(st.integers(0, (size - 1) // cs)) * cs
        elif where == "tail":  # touches the last (maybe partial) cluster
            offset = size - draw(st.integers(1, min(size, 2 * cs)))
        else:
            offset = draw(st.integers(0, size - 1))
        length = draw(st.one_of(st.integers(1, 2 * cs), st.integers(64 * KiB, 256 * KiB)))
        length = min(size - offset, length)
        pattern = bytes(draw(st.lists(st.integers(1, 255), min_size=1, max_size=7)))
        ops.append(Op(kind, offset, length, pattern))
    return ops


@st.composite
def full_cases(draw: st.DrawFn) -> Case:
    cs, size = draw(geometries())
    model = Model(size)
    ops = draw(op_lists(size, cs))
    model.apply(ops)
    splits = draw(st.lists(st.integers(0, size), max_size=4))
    extents = model.extents(False, splits=splits)
    return Case(cs, size, bytes(model.data), extents, how=f"ops={ops} splits={splits}")


@st.composite
def incremental_cases(draw: st.DrawFn) -> Case:
    cs, size = draw(geometries())
    model = Model(size)
    ops = draw(op_lists(size, cs))
    model.apply(ops)
    base, base_extents = bytes(model.data), model.extents(False)
    model.new_base()
    then = draw(op_lists(size, cs, ops))
    model.apply(then)
    granularity = draw(st.sampled_from([1, SECTOR, 4 * KiB, 64 * KiB]))
    splits = draw(st.lists(st.integers(0, size), max_size=4))
    extents = model.extents(True, granularity, splits)
    how = f"ops={ops} then={then} dirty_granularity={granularity} splits={splits}"
    return Case(cs, size, bytes(model.data), extents, True, base, base_extents, how)


any_cases = st.one_of(full_cases(), incremental_cases())


# --- synthesizing ------------------------------------------------------------------------------

BASE_NAME = "vda-base.qcow2"
LONGEST_NAME = f"vdz-{'c' * (255 - 10)}.qcow2"
"""`<disk>-<checkpoint>.qcow2` as long as a file name can be (NAME_MAX, 255 bytes)."""


def layout(case: Case, backing: tuple[str, str] | None = None) -> qcow2.Layout:
    if case.incremental and backing is None:
        backing = (BASE_NAME, "qcow2")
    return qcow2.layout(case.extents, case.size, case.cs, case.incremental, backing)


def base_layout(case: Case) -> qcow2.Layout:
    assert case.base_extents is not None
    return qcow2.layout(case.base_extents, case.size, case.cs, False)


def clusters(runs: qcow2.Runs) -> list[int]:
    """Every cluster of `runs`, ascending (for small disks only)."""
    return [c for first, count in runs for c in range(first, first + count)]


def runs_of(cluster_numbers: Iterable[int]) -> qcow2.Runs:
    return qcow2.Runs((c, 1) for c in cluster_numbers)


class Guest:
    """`read_guest` over the model's bytes, recording every call."""

    def __init__(self, image: bytes) -> None:
        self.image = image
        self.calls: list[list[tuple[int, int]]] = []

    async def __call__(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        self.calls.append(list(ranges))
        return [self.image[off : off + n] for off, n in ranges]

    @property
    def ranges(self) -> list[tuple[int, int]]:
        return [r for call in self.calls for r in call]


def read(lay: qcow2.Layout, image: bytes, offset: int = 0, length: int | None = None) -> bytes:
    length = lay.file_size - offset if length is None else length
    return trio.run(qcow2.read, lay, offset, length, Guest(image))


def data_intervals(lay: qcow2.Layout, start: int = 0, end: int | None = None) -> list[list[int]]:
    """Guest [start, end) intervals of the data clusters whose file bytes lie in [start, end),
    clipped at the virtual size and merged."""
    end = lay.file_size if end is None else end
    out: list[list[int]] = []
    for k, c in enumerate(clusters(lay.data)):
        f0 = lay.data_offset + k * lay.cluster_size
        lo, hi = max(start, f0), min(end, f0 + lay.cluster_size)
        g0, g1 = c * lay.cluster_size + lo - f0, min(lay.size, c * lay.cluster_size + hi - f0)
        if g0 < g1:
            if out and out[-1][1] == g0:
                out[-1][1] = g1
            else:
                out.append([g0, g1])
    return out


def merged(ranges: Sequence[tuple[int, int]]) -> list[list[int]]:
    out: list[list[int]] = []
    for off, n in sorted(r for r in ranges if r[1]):
        if out and out[-1][1] == off:
            out[-1][1] = off + n
        else:
            out.append([off, off + n])
    return out


# --- qemu-img ----------------------------------------------------------------------------------


def qemu_img(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["qemu-img", *map(str, args)], capture_output=True, text=True, timeout=60
    )


def assert_clean(path: Path, file_size: int) -> None:
    """`qemu-img check` finds no error, no leak, and the image ends where the file does."""
    res = qemu_img("check", "--output=json", path)
    assert res.returncode == 0, f"qemu-img check {path.name}: {res.stdout}{res.stderr}"
    report = json.loads(res.stdout)
    assert report["check-errors"] == 0
    assert report.get("corruptions", 0) == report.get("leaks", 0) == 0, report
    assert report["image-end-offset"] == file_size, report


def info(path: Path) -> dict[str, object]:
    res = qemu_img("info", "--output=json", path)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def as_raw(path: Path) -> bytes:
    out = path.with_suffix(".raw")
    res = qemu_img("convert", "-O", "raw", path, out)
    assert res.returncode == 0, res.stderr
    return out.read_bytes()


@contextlib.contextmanager
def scratch(tmp_path: Path) -> Iterator[Path]:
    """A fresh directory per hypothesis example, removed after it."""
    d = Path(tempfile.mkdtemp(dir=tmp_path))
    try:
        yield d
    finally:
        shutil.rmtree(d)


# --- 1. qemu-img reads the synthesized images as the model -------------------------------------


@needs_qemu
@QEMU_SETTINGS
@given(case=full_cases())
def test_full_image_is_valid_and_reads_as_the_disk(case: Case, tmp_path: Path) -> None:
    lay = layout(case)
    with scratch(tmp_path) as d:
        path = d / "full.qcow2"
        path.write_bytes(read(lay, case.image))
        assert_clean(path, lay.file_size)
        meta = info(path)
        assert meta["virtual-size"] == case.size
        assert meta["cluster-size"] == case.cs
        assert "backing-filename" not in meta
        assert as_raw(path) == case.image


@needs_qemu
@QEMU_SETTINGS
@given(
    case=incremental_cases(),
    base_name=st.sampled_from([BASE_NAME, "vdb-ckpt.2024-05-01T12.00 (1).qcow2", LONGEST_NAME]),
)
def test_incremental_image_on_its_base_reads_as_the_disk(
    case: Case, base_name: str, tmp_path: Path
) -> None:
    assert case.base is not None
    base_lay, lay = base_layout(case), layout(case, (base_name, "qcow2"))
    with scratch(tmp_path) as d:
        base, top = d / base_name, d / "incr.qcow2"
        base.write_bytes(read(base_lay, case.base))
        top.write_bytes(read(lay, case.image))
        assert_clean(base, base_lay.file_size)
        assert as_raw(base) == case.base
        assert_clean(top, lay.file_size)
        meta = info(top)
        assert meta["virtual-size"] == case.size
        assert meta["backing-filename"] == base_name
        assert meta["backing-filename-format"] == "qcow2"
        assert as_raw(top) == case.image

        # Without its base the image cannot be opened: it never silently reads as zeros.
        alone = d / "alone"
        alone.mkdir()
        raw = alone / "x.raw"
        shutil.copy(top, alone / "incr.qcow2")
        lone = alone / "incr.qcow2"
        for args in (["info", "--backing-chain", lone], ["convert", "-O", "raw", lone, raw]):
            res = qemu_img(*args)
            assert res.returncode != 0, args
            assert f"Could not open '{alone / base_name}'" in res.stderr
        assert not raw.exists()


@needs_qemu
def test_changed_zeros_hide_the_base_and_unchanged_clusters_read_through(tmp_path: Path) -> None:
    cs, size = 4 * KiB, 64 * KiB
    model = Model(size)
    model.apply([Op("data", 0, 8 * cs, b"base")])
    base, base_extents = bytes(model.data), model.extents(False)
    model.new_base()
    model.apply([
        Op("zero", 1 * cs, cs),  # allocated zeros now
        Op("discard", 2 * cs, cs),  # a hole now
        Op("zero", 3 * cs + 100, 50),  # part of a cluster zeroed: still data
        Op("data", 5 * cs, 10, b"new"),  # part of a cluster rewritten
        Op("zero", 12 * cs, cs),  # zeros over zeros: changed, still zero
    ])
    case = Case(cs, size, bytes(model.data), model.extents(True, 512), True, base, base_extents)
    lay = layout(case)
    assert (clusters(lay.data), clusters(lay.zero)) == ([3, 5], [1, 2, 12])
    (tmp_path / BASE_NAME).write_bytes(read(base_layout(case), base))
    top = tmp_path / "incr.qcow2"
    top.write_bytes(read(lay, case.image))
    assert_clean(top, lay.file_size)
    raw = as_raw(top)
    assert raw[cs : 3 * cs] == bytes(2 * cs)
    assert raw == case.image
    res = qemu_img("map", "--output=json", top)
    assert res.returncode == 0, res.stderr
    depth0 = {(m["start"], m["length"], m["zero"]) for m in json.loads(res.stdout)
              if m["depth"] == 0}
    # Clusters 1-2 and 12 are zero in the top image; 3 and 5 are its data; the rest is the base's.
    assert depth0 == {(cs, 2 * cs, True), (3 * cs, cs, False), (5 * cs, cs, False),
                      (12 * cs, cs, True)}


@needs_qemu
def test_metadata_spanning_many_clusters(tmp_path: Path) -> None:
    """512-byte clusters, 9 MiB: several L1 clusters, hundreds of L2 tables, more refcount
    blocks than one refcount table cluster points to."""
    cs, size = 512, 9 * MiB
    image = bytearray(random.Random(7).randbytes(size))
    for c in range(0, size // cs, 97):  # some zero clusters among the data, and a hole
        image[c * cs : (c + 1) * cs] = bytes(cs)
    image[5 * MiB : 5 * MiB + 300 * cs] = bytes(300 * cs)
    model = Model(size)
    model.apply([Op("data", 0, 5 * MiB), Op("data", 5 * MiB + 300 * cs, size - 5 * MiB - 300 * cs)])
    model.data[:] = image
    case = Case(cs, size, bytes(image), model.extents(False))
    lay = layout(case)
    assert lay.l2_offset - lay.l1_offset > cs
    assert lay.l2_tables.total > 200
    assert lay.rb_clusters > cs // 8 and lay.rt_clusters >= 2
    path = tmp_path / "big.qcow2"
    path.write_bytes(read(lay, case.image))
    assert_clean(path, lay.file_size)
    assert as_raw(path) == case.image


# --- 2. any byte range is the same bytes as in the whole file ----------------------------------


@PURE_SETTINGS
@given(case=any_cases, data=st.data())
def test_any_range_equals_the_same_range_of_the_whole_file(case: Case, data: st.DataObject) -> None:
    lay = layout(case)
    whole = read(lay, case.image)
    assert len(whole) == lay.file_size
    cs = lay.cluster_size
    edges = [lay.rt_offset, lay.rb_offset, lay.l1_offset, lay.l2_offset, lay.data_offset,
             lay.file_size - cs, lay.file_size]
    for _ in range(5):
        start = data.draw(st.one_of(
            st.integers(0, lay.file_size),
            st.tuples(st.sampled_from(edges), st.integers(-cs - 3, cs + 3)).map(
                lambda t: max(0, t[0] + t[1])
            ),
        ))
        length = data.draw(st.one_of(st.integers(0, 2 * cs + 7), st.integers(0, lay.file_size)))
        assert read(lay, case.image, start, length) == whole[start : start + length]


# --- 3. read_guest is asked for the data clusters and nothing else -----------------------------


def changed_clusters(case: Case) -> set[int]:
    return {c for e in case.extents if e.dirty
            for c in range(e.start // case.cs, _ceil(e.end, case.cs))}


@PURE_SETTINGS
@given(case=any_cases, data=st.data())
def test_read_guest_is_asked_for_exactly_the_data_clusters(
    case: Case, data: st.DataObject
) -> None:
    lay = layout(case)
    guest = Guest(case.image)
    trio.run(qcow2.read, lay, 0, lay.file_size, guest)
    assert len(guest.calls) == (1 if lay.data else 0)  # one round trip for the whole file
    assert len(guest.ranges) == len(lay.data)  # one range per data run
    want = data_intervals(lay)
    assert merged(guest.ranges) == want
    assert sum(n for _, n in guest.ranges) == sum(
        min(lay.cluster_size, case.size - c * lay.cluster_size) for c in clusters(lay.data)
    )
    if case.incremental:  # never an unchanged cluster
        touched = {c for s, e in want for c in range(s // case.cs, _ceil(e, case.cs))}
        assert touched == set(clusters(lay.data))
        assert touched <= changed_clusters(case)

    for _ in range(4):  # a part of the file: only the data clusters in that part
        start = data.draw(st.integers(0, lay.file_size))
        length = data.draw(st.integers(0, lay.file_size - start))
        guest = Guest(case.image)
        trio.run(qcow2.read, lay, start, length, guest)
        assert len(guest.calls) <= 1
        assert merged(guest.ranges) == data_intervals(lay, start, start + length)
        assert sum(n for _, n in guest.ranges) == sum(
            e - s for s, e in data_intervals(lay, start, start + length)
        )


def test_read_in_the_padding_of_the_last_cluster_asks_for_no_empty_range() -> None:
    cs, size = 4 * KiB, 6 * KiB  # cluster 1 holds guest bytes 4-6 KiB, then 2 KiB of padding
    image = b"\x11" * size
    lay = qcow2.plan(size, cs, qcow2.Runs([(0, 2)]))
    guest = Guest(image)
    got = trio.run(qcow2.read, lay, lay.data_offset + cs + 3 * KiB, 512, guest)
    assert got == bytes(512)
    assert all(n > 0 and off + n <= size for off, n in guest.ranges), guest.calls


# --- 4. the file is the data clusters plus a little metadata -----------------------------------


def expected_clusters(size: int, cs: int, data: Sequence[int], zero: Sequence[int]) -> int:
    """File clusters computed independently: header, L1, L2 tables, data, and the fewest
    refcount blocks and table clusters that count every cluster including themselves."""
    per_l2 = cs // 8
    l1 = max(1, _ceil(_ceil(_ceil(size, cs), per_l2) * 8, cs))
    l2 = len({c // per_l2 for c in (*data, *zero)})
    fixed = 1 + l1 + l2 + len(data)
    rb = 1
    while rb * (cs // 2) < fixed + rb + _ceil(rb * 8, cs):
        rb += 1
    return fixed + rb + _ceil(rb * 8, cs)


@PURE_SETTINGS
@given(case=any_cases)
def test_file_size_is_data_plus_metadata(case: Case) -> None:
    lay = layout(case)
    cs = lay.cluster_size
    data, zero = clusters(lay.data), clusters(lay.zero)
    assert lay.file_size == cs * expected_clusters(case.size, cs, data, zero)
    assert lay.file_size == lay.data_offset + len(data) * cs
    assert lay.rt_offset == cs and lay.data_offset % cs == 0
    metadata = lay.file_size // cs - lay.data.total
    assert metadata == (3 + (lay.l2_offset - lay.l1_offset) // cs + lay.l2_tables.total
                        + (lay.rb_clusters - 1) + (lay.rt_clusters - 1))


@needs_qemu
def test_refcount_blocks_at_their_boundaries(tmp_path: Path) -> None:
    """A 512-byte refcount block counts 256 clusters: files of 255, 256 and 258 clusters
    (257 is impossible: the 257th cluster needs a second block, which is the 258th)."""
    cs, size = 512, 4 * MiB
    image = b"\x42" * size
    lays = {d: qcow2.plan(size, cs, qcow2.Runs([(0, d)])) for d in range(230, 520)}
    for lay in lays.values():
        assert lay.file_size == cs * expected_clusters(size, cs, clusters(lay.data), [])
        assert lay.rb_clusters * cs // 2 >= lay.clusters > (lay.rb_clusters - 1) * cs // 2
    assert {lay.clusters for lay in lays.values()} >= {255, 256, 258, 511, 512, 514}
    for d in (246, 247, 248, 497, 498, 499):
        lay = lays[d]
        path = tmp_path / f"{d}.qcow2"
        path.write_bytes(read(lay, image))
        assert_clean(path, lay.file_size)
    assert as_raw(path) == image[: 499 * cs] + bytes(size - 499 * cs)


def test_incremental_file_is_changed_clusters_plus_small_overhead() -> None:
    cs, size = 64 * KiB, 10 * GiB
    changed = [i * 1000 for i in range(100)]  # 100 scattered changed clusters
    lay = qcow2.plan(size, cs, runs_of(changed), runs_of([7, 8]), (BASE_NAME, "qcow2"))
    # header + refcount table + refcount block + L1 + 13 L2 tables (8192 clusters each)
    assert lay.file_size == (100 + 1 + 1 + 1 + 1 + 13) * cs
    assert qcow2.plan(size, cs, backing=(BASE_NAME, "qcow2")).file_size == 4 * cs


# --- 5. empty images ---------------------------------------------------------------------------


@needs_qemu
@pytest.mark.parametrize(
    ("size", "cs"),
    [(512, 512), (512, 65536), (3 * MiB + 512, 512), (1 * GiB, 512), (10 * MiB, 65536),
     (100 * GiB, 65536), (5 * MiB, 2 * MiB), (64 * MiB - 512, 4096)],
)
def test_empty_image_is_valid_and_reads_as_zeros(size: int, cs: int, tmp_path: Path) -> None:
    image = qcow2.empty_image(size, cs)
    lay = qcow2.plan(size, cs)
    assert image == read(lay, b"")
    path = tmp_path / "empty.qcow2"
    path.write_bytes(image)
    assert_clean(path, len(image))
    meta = info(path)
    assert (meta["virtual-size"], meta["cluster-size"]) == (size, cs)
    res = qemu_img("map", "--output=json", path)
    assert res.returncode == 0, res.stderr
    assert [(m["start"], m["length"], m["data"], m["zero"]) for m in json.loads(res.stdout)] == [
        (0, size, False, True)
    ]
    if size <= 16 * MiB:
        assert as_raw(path) == bytes(size)


@needs_qemu
@pytest.mark.parametrize("cs", [512, 65536])
def test_empty_image_with_backing_reads_through_to_it(cs: int, tmp_path: Path) -> None:
    size = 1 * MiB
    base = tmp_path / "base image.qcow2"
    assert qemu_img("create", "-q", "-f", "qcow2", base, str(size)).returncode == 0
    res = subprocess.run(["qemu-io", "-c", "write -P 0x5a 4096 8192", str(base)],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    top = tmp_path / "top.qcow2"
    top.write_bytes(qcow2.empty_image(size, cs, (base.name, "qcow2")))
    assert_clean(top, top.stat().st_size)
    meta = info(top)
    assert meta["backing-filename"] == base.name
    assert meta["backing-filename-format"] == "qcow2"
    assert as_raw(top) == bytes(4096) + b"\x5a" * 8192 + bytes(size - 4096 - 8192)


@needs_qemu
def test_zero_sized_image_is_clean(tmp_path: Path) -> None:
    path = tmp_path / "zero.qcow2"
    path.write_bytes(qcow2.empty_image(0, 65536))
    assert info(path)["virtual-size"] == 0
    assert_clean(path, path.stat().st_size)


def test_long_backing_name_and_bad_cluster_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="backing file name"):
        qcow2.empty_image(MiB, 512, ("b" * 400, "qcow2"))
    assert len(qcow2.empty_image(MiB, 4096, ("b" * 400, "qcow2"))) == 4 * 4096
    assert len(qcow2.empty_image(MiB, 512, (LONGEST_NAME, "qcow2"))) == 4 * 512
    for cs in (256, 1000, 4 * MiB, 0):
        with pytest.raises(ValueError, match="cluster size"):
            qcow2.plan(MiB, cs)


# --- 6. classification: which clusters are data, which zero -----------------------------------


def classified(
    extents: Sequence[Extent], size: int, cs: int, incremental: bool
) -> tuple[list[int], list[int]]:
    """The data and zero clusters of the extent-built layout, checked against the reference."""
    lay = qcow2.layout(extents, size, cs, incremental)
    got = clusters(lay.data), clusters(lay.zero)
    assert got == reference_classify(extents, size, cs, incremental)
    return got


def E(start: int, length: int, *, zero: bool = False, dirty: bool = False,  # noqa: N802
      hole: bool = False) -> Extent:
    return Extent(start, length, zero, dirty, hole)


def test_classify_full_partial_clusters() -> None:
    cs = 1024
    extents = [
        E(0, 1000, zero=True, hole=True),
        E(1000, 100, dirty=True),  # straddles clusters 0 and 1
        E(1100, 3000, zero=True, hole=True),  # clusters 2 and 3 untouched
        E(4100, 4, dirty=True),  # one byte of data at the start of cluster 4
        E(4104, 896, zero=True, hole=True),
    ]
    assert classified(extents, 5000, cs, False) == ([0, 1, 4], [])


def test_classify_full_zero_allocated_is_a_zero_cluster_and_a_hole_is_nothing() -> None:
    cs = 512
    extents = [
        E(0, 512, zero=True),  # allocated zeros
        E(512, 512, zero=True, hole=True),  # never written
        E(1024, 256, zero=True),  # half allocated zeros, half a hole: still a zero cluster
        E(1280, 256, zero=True, hole=True),
        E(1536, 10, dirty=True),  # data with allocated zeros in the same cluster: data
        E(1546, 502, zero=True),
    ]
    assert classified(extents, 2048, cs, False) == ([3], [0, 2])


def test_classify_incremental_dirty_zero_and_unchanged_data() -> None:
    cs = 512
    extents = [
        E(0, 512),  # data, unchanged: read through to the base
        E(512, 512, zero=True, dirty=True),  # became zeros: explicit zero cluster
        E(1024, 512, zero=True, hole=True, dirty=True),  # discarded: explicit zero cluster
        E(1536, 100, dirty=True),  # changed data
        E(1636, 412),  # unchanged data in the same cluster: all read from this image
        E(2048, 100, zero=True, dirty=True),  # changed to zeros, rest of cluster unchanged data
        E(2148, 412),
        E(2560, 512, zero=True, hole=True),  # unchanged hole
    ]
    assert classified(extents, 3072, cs, True) == ([3, 4], [1, 2])
    # The same disk as a full image: every cluster with data, allocated zeros as zero clusters.
    assert classified(extents, 3072, cs, False) == ([0, 3, 4], [1])


def test_classify_last_partial_cluster() -> None:
    cs, size = 4096, 9 * 512  # cluster 1 is 512 bytes of guest disk
    assert classified([E(0, 4096, zero=True, hole=True), E(4096, 512, dirty=True)],
                      size, cs, False) == ([1], [])
    assert classified([E(0, 4096, zero=True, hole=True), E(4096, 512, zero=True)],
                      size, cs, False) == ([], [1])
    assert classified([E(0, 4096), E(4096, 512, zero=True, dirty=True)],
                      size, cs, True) == ([], [1])
    assert classified([E(0, 4608, zero=True, hole=True)], size, cs, False) == ([], [])


@PURE_SETTINGS
@given(case=any_cases)
def test_classify_matches_the_model(case: Case) -> None:
    cs, count = case.cs, _ceil(case.size, case.cs)
    nonzero = {c for c in range(count) if any(case.image[c * cs : (c + 1) * cs])}
    if case.incremental:
        wanted = changed_clusters(case)
    else:
        wanted = {c for e in case.extents if not e.hole
                  for c in range(e.start // cs, _ceil(e.end, cs))}
    data, zero = classified(case.extents, case.size, cs, case.incremental)
    assert set(data) == (nonzero & wanted if case.incremental else nonzero)
    assert set(zero) == wanted - nonzero
    assert data == sorted(data) and zero == sorted(zero)


# --- 7. the reference: the former cluster-by-cluster implementation ----------------------------
# vcfs built layouts this way until the layout was built from runs: one flag per guest cluster
# and a dict over the data clusters. Too slow and too large for big disks (a 16 TiB disk has
# 256 M clusters of 64 KiB), but simple enough to be obviously right: the extent-built layout
# must give the same image, byte for byte. Kept here unchanged but for its names.


def reference_classify(
    extents: Iterable[Extent], size: int, cluster_size: int, incremental: bool
) -> tuple[list[int], list[int]]:
    cs = cluster_size
    count = _ceil(size, cs)
    nonzero, wanted = bytearray(count), bytearray(count)
    for e in extents:
        first, last = e.start // cs, _ceil(e.end, cs)
        if not e.zero:
            nonzero[first:last] = b"\1" * (last - first)
        if e.dirty if incremental else not e.hole:
            wanted[first:last] = b"\1" * (last - first)
    data, zero = [], []
    for c in range(count):
        if nonzero[c] and (wanted[c] or not incremental):
            data.append(c)
        elif wanted[c]:
            zero.append(c)
    return data, zero


@dataclass
class ReferenceLayout:
    size: int
    cluster_size: int
    data: list[int]
    zero: list[int]
    backing: tuple[str, str] | None = None
    rt_offset: int = 0
    rt_clusters: int = 0
    rb_offset: int = 0
    rb_clusters: int = 0
    l1_offset: int = 0
    l1_entries: int = 0
    l2_offset: int = 0
    l2_tables: list[int] = field(default_factory=list)
    data_offset: int = 0
    file_size: int = 0
    _data_index: dict[int, int] = field(default_factory=dict)
    _zero_set: frozenset[int] = frozenset()

    @property
    def clusters(self) -> int:
        return self.file_size // self.cluster_size


def reference_plan(
    size: int,
    cluster_size: int,
    data: Sequence[int],
    zero: Sequence[int] = (),
    backing: tuple[str, str] | None = None,
) -> ReferenceLayout:
    cs = cluster_size
    entries_per_l2 = cs // 8
    lay = ReferenceLayout(size, cs, sorted(data), sorted(zero), backing)
    lay.l1_entries = _ceil(_ceil(size, cs), entries_per_l2)
    lay.l2_tables = sorted({c // entries_per_l2 for c in (*lay.data, *lay.zero)})
    l1_clusters = _ceil(lay.l1_entries * 8, cs)
    fixed = 1 + l1_clusters + len(lay.l2_tables) + len(lay.data)
    rb, rt = 1, 1
    while True:
        total = fixed + rb + rt
        rb_new = _ceil(total, cs * 8 // (1 << qcow2.REFCOUNT_ORDER))
        rt_new = _ceil(rb_new * 8, cs)
        if (rb_new, rt_new) == (rb, rt):
            break
        rb, rt = rb_new, rt_new
    lay.rt_offset, lay.rt_clusters = cs, rt
    lay.rb_offset, lay.rb_clusters = cs * (1 + rt), rb
    lay.l1_offset = lay.rb_offset + rb * cs
    lay.l2_offset = lay.l1_offset + l1_clusters * cs
    lay.data_offset = lay.l2_offset + len(lay.l2_tables) * cs
    lay.file_size = lay.data_offset + len(lay.data) * cs
    lay._data_index = {c: k for k, c in enumerate(lay.data)}
    lay._zero_set = frozenset(lay.zero)
    return lay


def reference_header(lay: ReferenceLayout) -> bytes:
    exts = b""
    backing_offset = backing_len = 0
    if lay.backing:
        name, fmt = lay.backing[0].encode(), lay.backing[1].encode()
        exts += struct.pack(">II", qcow2.EXT_BACKING_FORMAT, len(fmt)) + fmt + b"\0" * (
            -len(fmt) % 8
        )
    exts += struct.pack(">II", qcow2.EXT_END, 0)
    if lay.backing:
        backing_offset = qcow2.HEADER_LENGTH + len(exts)
        backing_len = len(name)
    head = struct.pack(
        ">4sIQIIQIIQQIIQQQQII",
        qcow2.MAGIC, qcow2.VERSION, backing_offset, backing_len,
        lay.cluster_size.bit_length() - 1, lay.size, 0, lay.l1_entries, lay.l1_offset,
        lay.rt_offset, lay.rt_clusters, 0, 0, 0, 0, 0, qcow2.REFCOUNT_ORDER, qcow2.HEADER_LENGTH,
    )
    head += b"\0" * (qcow2.HEADER_LENGTH - len(head))
    out = head + exts + (name if lay.backing else b"")
    return out + b"\0" * (lay.cluster_size - len(out))


def reference_metadata_cluster(lay: ReferenceLayout, n: int) -> bytes:
    cs = lay.cluster_size
    off = n * cs
    if n == 0:
        return reference_header(lay)
    if off < lay.rb_offset:
        first = (off - lay.rt_offset) // 8
        entries = [
            lay.rb_offset + i * cs if i < lay.rb_clusters else 0
            for i in range(first, first + cs // 8)
        ]
        return struct.pack(f">{cs // 8}Q", *entries)
    if off < lay.l1_offset:
        per_block = cs // 2
        first = (off - lay.rb_offset) // cs * per_block
        ones = max(0, min(per_block, lay.clusters - first))
        return b"\x00\x01" * ones + b"\0" * (cs - 2 * ones)
    if off < lay.l2_offset:
        first = (off - lay.l1_offset) // 8
        entries = []
        for i in range(first, first + cs // 8):
            j = bisect.bisect_left(lay.l2_tables, i)
            present = i < lay.l1_entries and j < len(lay.l2_tables) and lay.l2_tables[j] == i
            entries.append(lay.l2_offset + j * cs | qcow2.OFLAG_COPIED if present else 0)
        return struct.pack(f">{cs // 8}Q", *entries)
    l1_index = lay.l2_tables[(off - lay.l2_offset) // cs]
    per_l2 = cs // 8
    entries = []
    for c in range(l1_index * per_l2, (l1_index + 1) * per_l2):
        k = lay._data_index.get(c)
        if k is not None:
            entries.append(lay.data_offset + k * cs | qcow2.OFLAG_COPIED)
        elif c in lay._zero_set:
            entries.append(qcow2.OFLAG_ZERO)
        else:
            entries.append(0)
    return struct.pack(f">{per_l2}Q", *entries)


async def reference_read(
    lay: ReferenceLayout, offset: int, length: int, read_guest: qcow2.ReadGuest
) -> bytes:
    cs = lay.cluster_size
    end = min(offset + length, lay.file_size)
    parts: list[bytes | int] = []
    ranges: list[tuple[int, int]] = []
    pos = offset
    while pos < end:
        n = pos // cs
        if pos < lay.data_offset:
            chunk_end = min(end, (n + 1) * cs)
            parts.append(reference_metadata_cluster(lay, n)[pos - n * cs : chunk_end - n * cs])
            pos = chunk_end
            continue
        k = (pos - lay.data_offset) // cs
        k_end = k + 1
        while (lay.data_offset + k_end * cs < end and k_end < len(lay.data)
               and lay.data[k_end] == lay.data[k_end - 1] + 1):
            k_end += 1
        run_end = min(end, lay.data_offset + k_end * cs)
        guest = lay.data[k] * cs + (pos - lay.data_offset - k * cs)
        exists = min(run_end - pos, max(0, lay.size - guest))
        if exists:
            parts.append(len(ranges))
            ranges.append((guest, exists))
        parts.append(b"\0" * (run_end - pos - exists))
        pos = run_end
    pieces = await read_guest(ranges) if ranges else []
    return b"".join(pieces[p] if isinstance(p, int) else p for p in parts)


# --- 8. the extent-built layout is the reference's image, byte for byte ------------------------


class PatternGuest:
    """A guest disk of any size whose bytes are a fixed function of their offset: a random
    block of a prime length repeated, so it never lines up with a cluster."""

    PERIOD = 4099

    def __init__(self, seed: int = 0) -> None:
        self.block = random.Random(seed).randbytes(self.PERIOD)

    def bytes(self, offset: int, n: int) -> bytes:
        start = offset % self.PERIOD
        return (self.block * (_ceil(start + n, self.PERIOD)))[start : start + n]

    async def __call__(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        return [self.bytes(off, n) for off, n in ranges]


@dataclass
class MapCase:
    """An extent map as a server may give it, straight from random cuts and flags (no model
    bytes, so the disk can be large)."""

    cs: int
    size: int
    extents: list[Extent]
    incremental: bool


@st.composite
def extent_maps(draw: st.DrawFn, large: bool = False) -> MapCase:
    """Extents whose edges fall on cluster edges, inside clusters and one byte or sector off
    them; several extents in one cluster; data, allocated zeros and holes, changed or not."""
    cs = 1 << draw(st.one_of(st.integers(9, 12), st.integers(9, 21)))
    if large:  # larger than a whole-file comparison can afford, still fine for the reference
        clusters_ = draw(st.integers(1, (1 << 18) if cs < 1 * MiB else 1 << 14))
    else:
        clusters_ = draw(st.integers(0, max(3, min(6000, (4 * MiB) // cs))))
    size = max(SECTOR, clusters_ * cs + draw(st.integers(0, cs // SECTOR - 1)) * SECTOR)
    count = _ceil(size, cs)
    cuts = {0, size}
    for _ in range(draw(st.integers(0, 30))):
        anchor = draw(st.integers(0, count)) * cs
        delta = draw(st.one_of(
            st.just(0), st.sampled_from([-1, 1, -SECTOR, SECTOR]), st.integers(-cs, cs)
        ))
        cuts.add(min(size, max(0, anchor + delta)))
    extents = []
    for s, e in pairwise(sorted(cuts)):
        kind = draw(st.sampled_from(["data", "zero", "hole"]))
        extents.append(Extent(s, e - s, kind != "data", draw(st.booleans()), kind == "hole"))
    return MapCase(cs, size, extents, draw(st.booleans()))


def both_layouts(case: MapCase) -> tuple[qcow2.Layout, ReferenceLayout]:
    """The extent-built layout and the reference's, which must agree on every cluster."""
    backing = (BASE_NAME, "qcow2") if case.incremental else None
    lay = qcow2.layout(case.extents, case.size, case.cs, case.incremental, backing)
    data, zero = reference_classify(case.extents, case.size, case.cs, case.incremental)
    ref = reference_plan(case.size, case.cs, data, zero, backing)
    assert lay.file_size == ref.file_size
    assert (clusters(lay.data), clusters(lay.zero)) == (ref.data, ref.zero)
    assert clusters(lay.l2_tables) == ref.l2_tables
    offsets = ("rt_offset", "rt_clusters", "rb_offset", "rb_clusters", "l1_offset",
               "l1_entries", "l2_offset", "data_offset")
    assert [getattr(lay, a) for a in offsets] == [getattr(ref, a) for a in offsets]
    return lay, ref


@PURE_SETTINGS
@given(case=extent_maps(), data=st.data())
def test_extent_built_image_equals_the_reference_image(
    case: MapCase, data: st.DataObject
) -> None:
    lay, ref = both_layouts(case)
    guest = PatternGuest()
    whole = trio.run(qcow2.read, lay, 0, lay.file_size, guest)
    assert whole == trio.run(reference_read, ref, 0, ref.file_size, guest)
    # Extents in any order make the same layout (the map gives them sorted; nothing relies on it).
    shuffled = data.draw(st.permutations(case.extents))
    assert qcow2.layout(shuffled, case.size, case.cs, case.incremental, lay.backing) == lay


@settings(PURE_SETTINGS, max_examples=25)
@given(case=extent_maps(large=True), data=st.data())
def test_extent_built_large_image_equals_the_reference_in_any_range(
    case: MapCase, data: st.DataObject
) -> None:
    lay, ref = both_layouts(case)
    guest = PatternGuest()
    cs = lay.cluster_size
    edges = [lay.rb_offset, lay.l1_offset, lay.l2_offset, lay.data_offset,
             lay.file_size - cs, lay.file_size]
    for _ in range(8):
        start = data.draw(st.one_of(
            st.integers(0, lay.file_size),
            st.tuples(st.sampled_from(edges), st.integers(-cs - 3, cs + 3)).map(
                lambda t: max(0, t[0] + t[1])
            ),
        ))
        length = data.draw(st.one_of(st.integers(0, 2 * cs + 7), st.integers(0, 4 * MiB)))
        assert trio.run(qcow2.read, lay, start, length, guest) == trio.run(
            reference_read, ref, start, length, guest
        )


# --- 9. runs of clusters -----------------------------------------------------------------------


cluster_sets = st.sets(st.integers(0, 200), max_size=60)


def runs_with_gaps(numbers: set[int]) -> qcow2.Runs:
    """The runs of `numbers`, given as overlapping and adjacent pieces in a shuffled order."""
    pieces = [(c, 1) for c in numbers] + [(c, 2) for c in numbers if c + 1 in numbers]
    random.Random(len(numbers)).shuffle(pieces)
    return qcow2.Runs(pieces)


@PURE_SETTINGS
@given(a=cluster_sets, b=cluster_sets, lo=st.integers(0, 210), hi=st.integers(0, 210))
def test_runs_are_the_sets_they_describe(a: set[int], b: set[int], lo: int, hi: int) -> None:
    ra, rb = runs_with_gaps(a), runs_with_gaps(b)
    assert clusters(ra) == sorted(a) and ra.total == len(a)
    assert all(s1 + n1 < s2 for (s1, n1), (s2, _) in pairwise(ra))  # never adjacent
    assert clusters(ra & rb) == sorted(a & b)
    assert clusters(ra - rb) == sorted(a - b)
    assert ra.end == (max(a) + 1 if a else 0)
    ordered = sorted(a)
    for k, c in enumerate(ordered):
        assert ra.index(c) == k
        following = next(i for i in range(k, len(ordered) + 1)
                         if i == len(ordered) or ordered[i] != c + i - k)
        assert ra.at(k) == (c, following - k)
    assert all(ra.index(c) is None for c in range(-1, 202) if c not in a)
    with pytest.raises(IndexError):
        ra.at(len(a))
    inside = [(s, e, k) for s, e, k in ra.overlapping(lo, hi)]
    assert [c for s, e, _ in inside for c in range(s, e)] == [c for c in ordered if lo <= c < hi]
    assert all(k == ra.index(s) for s, _, k in inside)


# --- 10. TiB disks: the layout is as large as the extent map -----------------------------------


TiB = 1 << 40


def scattered(size: int, count: int = 2000, length: int = 64 * KiB, seed: int = 1) -> list[Extent]:
    """`count` data extents of `length` at random sector offsets spread over the disk (most
    straddle two clusters), holes between them."""
    rng = random.Random(seed)
    slot = size // count
    out, pos = [], 0
    for i in range(count):
        start = i * slot + rng.randrange((slot - length) // SECTOR) * SECTOR
        out += [Extent(pos, start - pos, True, False, True), Extent(start, length, False, True)]
        pos = start + length
    out.append(Extent(pos, size - pos, True, False, True))
    return [e for e in out if e.length]


def rounded(extents: Sequence[Extent], size: int, cs: int) -> list[list[int]]:
    """The guest intervals of the clusters that the data extents touch, merged."""
    return merged([(s, min(size, _ceil(e.end, cs) * cs) - s)
                   for e in extents if not e.zero for s in [e.start // cs * cs]])


class MarkerGuest:
    """A huge guest that reads as zeros but for an 8-byte marker (its own offset, top bit set)
    at both ends of each data extent: images of it stay small on disk, and a cluster in the
    wrong place shows."""

    def __init__(self, extents: Sequence[Extent]) -> None:
        self.marks = sorted(m for e in extents if not e.zero for m in (e.start, e.end - 8))

    def bytes(self, offset: int, n: int) -> bytes:
        out = bytearray(n)
        for m in self.marks[bisect.bisect_left(self.marks, offset - 7) :]:
            if m >= offset + n:
                break
            mark = struct.pack(">Q", m | qcow2.OFLAG_COPIED)
            lo, hi = max(m, offset), min(m + 8, offset + n)
            out[lo - offset : hi - offset] = mark[lo - m : hi - m]
        return bytes(out)

    async def __call__(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        return [self.bytes(off, n) for off, n in ranges]


async def l2_entries(lay: qcow2.Layout, guest: qcow2.ReadGuest) -> dict[int, int]:
    """Guest cluster → its L2 entry, found as a qcow2 reader finds them: from the header, the
    L1 table, then each L2 table it points to (all through `qcow2.read`)."""

    async def fetch(offset: int, n: int) -> bytes:
        got = await qcow2.read(lay, offset, n, guest)
        assert len(got) == n
        return got

    head = await fetch(0, qcow2.HEADER_LENGTH)
    magic, version, _, _, bits, size, _, l1_size, l1_offset = struct.unpack_from(
        ">4sIQIIQIIQ", head
    )
    assert (magic, version, 1 << bits, size) == (qcow2.MAGIC, 3, lay.cluster_size, lay.size)
    per_l2 = lay.cluster_size // 8
    out = {}
    l1 = struct.unpack(f">{l1_size}Q", await fetch(l1_offset, l1_size * 8))
    for i, pointer in enumerate(l1):
        if not pointer:
            continue
        assert pointer & qcow2.OFLAG_COPIED
        table = await fetch(pointer & ~qcow2.OFLAG_COPIED, lay.cluster_size)
        for m in re.finditer(rb"[^\0]+", table):  # an L2 table is mostly zeros: skip them fast
            for j in range(m.start() // 8, (m.end() - 1) // 8 + 1):
                out[i * per_l2 + j] = struct.unpack_from(">Q", table, 8 * j)[0]
    return out


@pytest.mark.parametrize("incremental", [False, True], ids=["full", "incremental"])
@pytest.mark.parametrize("size", [1 * TiB, 16 * TiB], ids=["1TiB", "16TiB"])
def test_huge_disk_layout_is_proportional_to_its_extents(size: int, incremental: bool) -> None:
    cs = 64 * KiB
    extents = scattered(size)
    tracemalloc.start()
    try:
        lay = qcow2.layout(extents, size, cs, incremental)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # One flag per cluster would be 256 MiB for 16 TiB: the layout holds runs only.
    assert peak < 2 * MiB, peak
    expected = [c for s, e in rounded(extents, size, cs) for c in range(s // cs, _ceil(e, cs))]
    assert clusters(lay.data) == expected and lay.zero.total == 0
    assert lay.file_size == lay.data_offset + len(expected) * cs

    guest = MarkerGuest(extents)
    entries = trio.run(l2_entries, lay, guest)
    assert sorted(entries) == expected
    assert [entries[c] for c in expected] == [
        lay.data_offset + k * cs | qcow2.OFLAG_COPIED for k in range(len(expected))
    ]

    def file_offset(guest_offset: int) -> int:
        return (entries[guest_offset // cs] & ~qcow2.OFLAG_COPIED) + guest_offset % cs

    rng = random.Random(size)
    for e in rng.sample([e for e in extents if not e.zero], 5):  # an extent reads as the guest
        got = trio.run(qcow2.read, lay, file_offset(e.start), e.length, guest)
        assert got == guest.bytes(e.start, e.length)
        assert got[:8] == struct.pack(">Q", e.start | qcow2.OFLAG_COPIED)
    start = rng.randrange(lay.data_offset, lay.file_size - 4 * MiB)  # a range of many runs
    by_file = {(v & ~qcow2.OFLAG_COPIED) // cs: c for c, v in entries.items()}
    want = b"".join(guest.bytes(by_file[n] * cs, cs)
                    for n in range(start // cs, _ceil(start + 4 * MiB, cs)))
    got = trio.run(qcow2.read, lay, start, 4 * MiB, guest)
    assert got == want[start % cs : start % cs + 4 * MiB]


def write_sparse(lay: qcow2.Layout, guest: qcow2.ReadGuest, path: Path) -> None:
    """The whole image file, written as a sparse file: only its non-zero pages take space."""
    page = 4 * KiB

    async def write() -> None:
        with path.open("wb") as f:
            for offset in range(0, lay.file_size, 16 * MiB):
                chunk = await qcow2.read(lay, offset, 16 * MiB, guest)
                for at in range(0, len(chunk), page):
                    if chunk.count(0, at, at + page) != min(page, len(chunk) - at):
                        f.seek(offset + at)
                        f.write(chunk[at : at + page])
            f.truncate(lay.file_size)

    trio.run(write)


@needs_qemu
@pytest.mark.parametrize("size", [1 * TiB, 16 * TiB], ids=["1TiB", "16TiB"])
def test_huge_disk_image_passes_qemu_img_check_and_maps_its_extents(
    size: int, tmp_path: Path
) -> None:
    cs = 64 * KiB
    extents = scattered(size)
    lay = qcow2.layout(extents, size, cs, False)
    guest = MarkerGuest(extents)
    path = tmp_path / "huge.qcow2"
    write_sparse(lay, guest, path)
    assert_clean(path, lay.file_size)
    assert info(path)["virtual-size"] == size
    res = qemu_img("map", "--output=json", path)
    assert res.returncode == 0, res.stderr
    mapped = json.loads(res.stdout)
    assert merged([(m["start"], m["length"]) for m in mapped if m["data"]]) == rounded(
        extents, size, cs
    )
    # A few extents' clusters, read back by qemu-img (a raw window over the image, as
    # `qemu-img dd` counts `count` from the disk's start, not from `skip`): both markers each.
    for i, e in enumerate(random.Random(size).sample([e for e in extents if not e.zero], 3)):
        start, end = e.start // cs * cs, _ceil(e.end, cs) * cs
        window = {"driver": "raw", "offset": start, "size": end - start,
                  "file": {"driver": "qcow2", "file": {"driver": "file", "filename": str(path)}}}
        out = tmp_path / f"part{i}.raw"
        res = qemu_img("convert", "-O", "raw", f"json:{json.dumps(window)}", out)
        assert res.returncode == 0, res.stderr
        assert out.read_bytes() == guest.bytes(start, end - start)
