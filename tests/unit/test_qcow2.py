"""Tests for vcfs.domain.qcow2: synthesized qcow2 v3 images, checked against qemu-img.

A guest disk is modelled as bytes plus which bytes were ever written (holes) and which changed
since a base (dirty), and described as extents the way an NBD server does (base:allocation plus
a dirty bitmap of some granularity). The image synthesized from those extents must be a valid
qcow2 file (`qemu-img check`) that reads back exactly as the model (`qemu-img convert`), alone
for a full image and on top of its base for an incremental one. qemu-img is the reference
reader; the tests that need it are skipped when it is missing.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
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
    data, zero = qcow2.classify(case.extents, case.size, case.cs, case.incremental)
    if case.incremental and backing is None:
        backing = (BASE_NAME, "qcow2")
    return qcow2.plan(case.size, case.cs, data, zero, backing)


def base_layout(case: Case) -> qcow2.Layout:
    assert case.base_extents is not None
    data, zero = qcow2.classify(case.base_extents, case.size, case.cs, False)
    return qcow2.plan(case.size, case.cs, data, zero)


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
    for k, c in enumerate(lay.data):
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
    assert (lay.data, lay.zero) == ([3, 5], [1, 2, 12])
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
    assert len(lay.l2_tables) > 200
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
    want = data_intervals(lay)
    assert merged(guest.ranges) == want
    assert sum(n for _, n in guest.ranges) == sum(
        min(lay.cluster_size, case.size - c * lay.cluster_size) for c in lay.data
    )
    if case.incremental:  # never an unchanged cluster
        touched = {c for s, e in want for c in range(s // case.cs, _ceil(e, case.cs))}
        assert touched == set(lay.data)
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
    lay = qcow2.plan(size, cs, [0, 1])
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
    assert lay.file_size == cs * expected_clusters(case.size, cs, lay.data, lay.zero)
    assert lay.file_size == lay.data_offset + len(lay.data) * cs
    assert lay.rt_offset == cs and lay.data_offset % cs == 0
    metadata = lay.file_size // cs - len(lay.data)
    assert metadata == (3 + (lay.l2_offset - lay.l1_offset) // cs + len(lay.l2_tables)
                        + (lay.rb_clusters - 1) + (lay.rt_clusters - 1))


@needs_qemu
def test_refcount_blocks_at_their_boundaries(tmp_path: Path) -> None:
    """A 512-byte refcount block counts 256 clusters: files of 255, 256 and 258 clusters
    (257 is impossible: the 257th cluster needs a second block, which is the 258th)."""
    cs, size = 512, 4 * MiB
    image = b"\x42" * size
    lays = {d: qcow2.plan(size, cs, range(d)) for d in range(230, 520)}
    for lay in lays.values():
        assert lay.file_size == cs * expected_clusters(size, cs, lay.data, [])
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
    lay = qcow2.plan(size, cs, changed, [7, 8], (BASE_NAME, "qcow2"))
    # header + refcount table + refcount block + L1 + 13 L2 tables (8192 clusters each)
    assert lay.file_size == (100 + 1 + 1 + 1 + 1 + 13) * cs
    assert qcow2.plan(size, cs, [], backing=(BASE_NAME, "qcow2")).file_size == 4 * cs


# --- 5. empty images ---------------------------------------------------------------------------


@needs_qemu
@pytest.mark.parametrize(
    ("size", "cs"),
    [(512, 512), (512, 65536), (3 * MiB + 512, 512), (1 * GiB, 512), (10 * MiB, 65536),
     (100 * GiB, 65536), (5 * MiB, 2 * MiB), (64 * MiB - 512, 4096)],
)
def test_empty_image_is_valid_and_reads_as_zeros(size: int, cs: int, tmp_path: Path) -> None:
    image = qcow2.empty_image(size, cs)
    lay = qcow2.plan(size, cs, [])
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
            qcow2.plan(MiB, cs, [])


# --- 6. classify -------------------------------------------------------------------------------


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
    assert qcow2.classify(extents, 5000, cs, False) == ([0, 1, 4], [])


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
    assert qcow2.classify(extents, 2048, cs, False) == ([3], [0, 2])


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
    assert qcow2.classify(extents, 3072, cs, True) == ([3, 4], [1, 2])
    # The same disk as a full image: every cluster with data, allocated zeros as zero clusters.
    assert qcow2.classify(extents, 3072, cs, False) == ([0, 3, 4], [1])


def test_classify_last_partial_cluster() -> None:
    cs, size = 4096, 9 * 512  # cluster 1 is 512 bytes of guest disk
    assert qcow2.classify([E(0, 4096, zero=True, hole=True), E(4096, 512, dirty=True)],
                          size, cs, False) == ([1], [])
    assert qcow2.classify([E(0, 4096, zero=True, hole=True), E(4096, 512, zero=True)],
                          size, cs, False) == ([], [1])
    assert qcow2.classify([E(0, 4096), E(4096, 512, zero=True, dirty=True)],
                          size, cs, True) == ([], [1])
    assert qcow2.classify([E(0, 4608, zero=True, hole=True)], size, cs, False) == ([], [])


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
    data, zero = qcow2.classify(case.extents, case.size, cs, case.incremental)
    assert set(data) == (nonzero & wanted if case.incremental else nonzero)
    assert set(zero) == wanted - nonzero
    assert data == sorted(data) and zero == sorted(zero)
