"""qcow2 v3 images synthesized from an extent map: metadata computed, data read on demand.

The image is laid out as: header cluster, refcount table, refcount blocks, L1 table, the L2
tables that have any entry, then one data cluster per guest cluster that carries data, in
guest order. Every cluster has refcount 1 (the image is never written), so the whole layout
follows from three facts per guest cluster: data, zero, or unallocated. Its size is known
before the first byte is read, and any byte range can be produced without the ones before it.

Those facts are held as runs of clusters, never cluster by cluster: the layout is built when
the file is first looked at (a `stat`), and a 16 TiB disk has 256 M clusters of 64 KiB (walking
them in Python took 73 s). Building a layout costs in proportion to the extents, finding where a
cluster lives is a bisection over the runs, and an L2 table costs at most its own entries.

Incremental images name their base as backing file (with its format), so opened alone they
fail instead of reading as zeros, and a zero cluster that changed is an explicit zero cluster
so that it hides the backing file's old data.
Pure computation; `read` awaits the data callback for data clusters only.
"""

from __future__ import annotations

import bisect
import struct
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

from vcfs.domain.extents import Extent

MAGIC = b"QFI\xfb"
VERSION = 3
HEADER_LENGTH = 112
REFCOUNT_ORDER = 4  # 16-bit refcounts, as qemu-img makes them
OFLAG_COPIED = 1 << 63
OFLAG_ZERO = 1
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_END = 0
_ZERO_ENTRY = struct.pack(">Q", OFLAG_ZERO)


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


class Runs:
    """A set of cluster numbers as sorted, disjoint runs `(first, count)`, none adjacent to the
    next (so that two runs are never contiguous: `read` relies on it to make one guest range
    per run).

    The clusters are also numbered in order across the runs: for data runs that number is the
    data cluster's place in the file. `index` and `at` convert both ways by bisection over the
    runs' first clusters and over the cumulative counts before each run.
    Immutable once built.
    """

    __slots__ = ("_starts", "_ends", "_before", "total")

    def __init__(self, runs: Iterable[tuple[int, int]] = ()) -> None:
        """The union of `runs` `(first, count)`, given in any order; overlapping and adjacent
        runs merge, empty ones vanish. Linear when they come sorted (Timsort), as they do from
        an extent map."""
        starts: list[int] = []
        ends: list[int] = []
        before: list[int] = []
        total = 0
        for first, count in sorted(runs):
            if count <= 0:
                continue
            end = first + count
            if ends and first <= ends[-1]:  # overlaps or touches the last run: extend it
                if end > ends[-1]:
                    total += end - ends[-1]
                    ends[-1] = end
                continue
            starts.append(first)
            ends.append(end)
            before.append(total)
            total += count
        self._starts, self._ends, self._before = starts, ends, before
        self.total = total
        """Number of clusters in all the runs."""

    def __len__(self) -> int:
        """Number of runs."""
        return len(self._starts)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        """The runs as `(first, count)`, ascending."""
        return ((s, e - s) for s, e in zip(self._starts, self._ends, strict=True))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Runs) and (self._starts, self._ends) == (
            other._starts, other._ends
        )

    def __hash__(self) -> int:
        return hash((tuple(self._starts), tuple(self._ends)))

    def __repr__(self) -> str:
        return f"Runs({list(self)})"

    @property
    def end(self) -> int:
        """One past the last cluster (0 when empty)."""
        return self._ends[-1] if self._ends else 0

    def index(self, cluster: int) -> int | None:
        """The place of `cluster` among all the clusters of the runs, or None if not in any."""
        i = bisect.bisect_right(self._starts, cluster) - 1
        if i < 0 or cluster >= self._ends[i]:
            return None
        return self._before[i] + cluster - self._starts[i]

    def at(self, k: int) -> tuple[int, int]:
        """The `k`-th cluster (0 ≤ k < total), and how many clusters of its run are left from
        it on, itself included: the consecutive clusters that follow it."""
        if not 0 <= k < self.total:
            raise IndexError(k)
        i = bisect.bisect_right(self._before, k) - 1
        cluster = self._starts[i] + k - self._before[i]
        return cluster, self._ends[i] - cluster

    def overlapping(self, lo: int, hi: int) -> Iterator[tuple[int, int, int]]:
        """The parts of the runs inside clusters [lo, hi), as `(first, end, index of first)`."""
        i = max(0, bisect.bisect_right(self._starts, lo) - 1)
        while i < len(self._starts) and self._starts[i] < hi:
            s, e = max(self._starts[i], lo), min(self._ends[i], hi)
            if s < e:
                yield s, e, self._before[i] + s - self._starts[i]
            i += 1

    def __and__(self, other: Runs) -> Runs:
        """The clusters in both: one merge pass over the two sorted lists."""
        out: list[tuple[int, int]] = []
        i = j = 0
        a_s, a_e, b_s, b_e = self._starts, self._ends, other._starts, other._ends
        while i < len(a_s) and j < len(b_s):
            s, e = max(a_s[i], b_s[j]), min(a_e[i], b_e[j])
            if s < e:
                out.append((s, e - s))
            if a_e[i] < b_e[j]:  # the run that ends first cannot overlap anything further
                i += 1
            else:
                j += 1
        return Runs(out)

    def __sub__(self, other: Runs) -> Runs:
        """The clusters of self not in other: one merge pass over the two sorted lists."""
        out: list[tuple[int, int]] = []
        j = 0
        b_s, b_e = other._starts, other._ends
        for s, e in zip(self._starts, self._ends, strict=True):
            while j < len(b_s) and b_e[j] <= s:
                j += 1
            # Runs of other inside [s, e) cut it; the last one may reach into the next run of
            # self, so j stays on it.
            k, pos = j, s
            while k < len(b_s) and b_s[k] < e:
                if b_s[k] > pos:
                    out.append((pos, b_s[k] - pos))
                pos = max(pos, b_e[k])
                k += 1
            if pos < e:
                out.append((pos, e - pos))
        return Runs(out)


NO_RUNS = Runs()


@dataclass(frozen=True)
class Layout:
    """Where everything of one synthesized image lives: offsets, and three sets of runs (no
    structure per cluster, so a layout is as small as its extent map)."""

    size: int
    cluster_size: int
    data: Runs
    """Guest clusters that carry data; the k-th of them is the k-th data cluster of the file."""
    zero: Runs
    """Guest clusters that read as explicit zeros."""
    l2_tables: Runs
    """L1 indexes that have an L2 table; the k-th of them is at l2_offset + k * cluster_size."""
    backing: tuple[str, str] | None
    rt_offset: int
    rt_clusters: int
    rb_offset: int
    rb_clusters: int
    l1_offset: int
    l1_entries: int
    l2_offset: int
    data_offset: int
    file_size: int

    @property
    def clusters(self) -> int:
        return self.file_size // self.cluster_size


def plan(
    size: int,
    cluster_size: int,
    data: Runs = NO_RUNS,
    zero: Runs = NO_RUNS,
    backing: tuple[str, str] | None = None,
) -> Layout:
    """Lay out an image of virtual `size` whose `data` and `zero` guest clusters are given
    (disjoint)."""
    if cluster_size & (cluster_size - 1) or not 512 <= cluster_size <= 2 << 20:
        raise ValueError(f"bad cluster size {cluster_size}")
    cs = cluster_size
    per_l2 = cs // 8
    guest_clusters = _ceil(size, cs)
    if max(data.end, zero.end) > guest_clusters:
        raise ValueError(f"clusters past the end of a disk of {guest_clusters} clusters")
    l1_entries = _ceil(guest_clusters, per_l2)
    # An L2 table for every L1 index a run reaches: per run, not per cluster.
    l2_tables = Runs(
        (first // per_l2, (first + count - 1) // per_l2 - first // per_l2 + 1)
        for runs in (data, zero)
        for first, count in runs
    )
    l1_clusters = _ceil(l1_entries * 8, cs)  # none for an empty disk, as qemu-img does
    fixed = 1 + l1_clusters + l2_tables.total + data.total
    rb, rt = 1, 1
    while True:  # refcount structures count themselves: iterate to a fixed point
        total = fixed + rb + rt
        rb_new = _ceil(total, cs * 8 // (1 << REFCOUNT_ORDER))
        rt_new = _ceil(rb_new * 8, cs)
        if (rb_new, rt_new) == (rb, rt):
            break
        rb, rt = rb_new, rt_new
    rb_offset = cs * (1 + rt)
    l1_offset = rb_offset + rb * cs
    l2_offset = l1_offset + l1_clusters * cs
    data_offset = l2_offset + l2_tables.total * cs
    return Layout(
        size=size, cluster_size=cs, data=data, zero=zero, l2_tables=l2_tables, backing=backing,
        rt_offset=cs, rt_clusters=rt, rb_offset=rb_offset, rb_clusters=rb,
        l1_offset=l1_offset, l1_entries=l1_entries, l2_offset=l2_offset,
        data_offset=data_offset, file_size=data_offset + data.total * cs,
    )


def layout(
    extents: Iterable[Extent],
    size: int,
    cluster_size: int,
    incremental: bool,
    backing: tuple[str, str] | None = None,
) -> Layout:
    """The layout of the image of a disk of `size` bytes described by `extents` (sorted, as an
    extent map gives them; any order works, sorted is linear).

    Full image: a cluster with any non-zero byte is data; an all-zero cluster with allocated
    zeros is a zero cluster; the rest stays unallocated. Incremental image: a cluster with any
    changed byte is data (or a zero cluster when it is all zeros now, hiding the backing file's
    old data); unchanged clusters stay unallocated and read through to the base.
    """
    cs = cluster_size
    count = _ceil(size, cs)
    # Each extent, rounded out to whole clusters, marks the clusters it touches as holding a
    # non-zero byte and/or as wanted in the image. A cluster at an extent's edge is touched by
    # the extents on both sides: the unions below give it every mark, which is exactly the
    # "any byte of the cluster" rule, with no pass over the clusters.
    nonzero: list[tuple[int, int]] = []
    wanted: list[tuple[int, int]] = []
    for e in extents:
        if e.length <= 0:  # describes no byte (the cluster-by-cluster rule marked its cluster)
            continue
        first, last = e.start // cs, min(count, _ceil(e.end, cs))
        if first >= last:
            continue
        if not e.zero:
            nonzero.append((first, last - first))
        if e.dirty if incremental else not e.hole:
            wanted.append((first, last - first))
    has_data, has_wanted = Runs(nonzero), Runs(wanted)
    # A full image carries every non-zero cluster; an incremental one only the changed ones.
    data = has_data & has_wanted if incremental else has_data
    return plan(size, cs, data, has_wanted - has_data, backing)


def header(lay: Layout) -> bytes:
    """The first cluster: header, extensions, backing file name."""
    exts = b""
    backing_offset = backing_len = 0
    if lay.backing:
        name, fmt = lay.backing[0].encode(), lay.backing[1].encode()
        exts += struct.pack(">II", EXT_BACKING_FORMAT, len(fmt)) + fmt + b"\0" * (-len(fmt) % 8)
    exts += struct.pack(">II", EXT_END, 0)
    if lay.backing:
        backing_offset = HEADER_LENGTH + len(exts)
        backing_len = len(name)
    head = struct.pack(
        ">4sIQIIQIIQQIIQQQQII",
        MAGIC, VERSION, backing_offset, backing_len, lay.cluster_size.bit_length() - 1,
        lay.size, 0, lay.l1_entries, lay.l1_offset, lay.rt_offset, lay.rt_clusters,
        0, 0,  # no snapshots
        0, 0, 0,  # incompatible, compatible, autoclear features
        REFCOUNT_ORDER, HEADER_LENGTH,
    )
    head += b"\0" * (HEADER_LENGTH - len(head))  # compression type zlib, padding
    out = head + exts + (name if lay.backing else b"")
    if len(out) > lay.cluster_size:
        raise ValueError("backing file name does not fit in the header cluster")
    return out + b"\0" * (lay.cluster_size - len(out))


def _put(table: bytearray, at: int, count: int, first: int, step: int) -> None:
    """Write the 64-bit big-endian entries first, first+step, … into `table` from entry `at`:
    one pack per run, the table's other entries staying zero (unallocated)."""
    table[8 * at : 8 * (at + count)] = struct.pack(
        f">{count}Q", *range(first, first + count * step, step)
    )


def _metadata_cluster(lay: Layout, n: int) -> bytes:
    """File cluster `n`, which must lie before the data clusters."""
    cs = lay.cluster_size
    per = cs // 8  # 8-byte entries per cluster of a table
    off = n * cs
    if n == 0:
        return header(lay)
    table = bytearray(cs)
    if off < lay.rb_offset:  # refcount table: pointers to the refcount blocks
        first = (off - lay.rt_offset) // 8
        count = max(0, min(per, lay.rb_clusters - first))
        if count:
            _put(table, 0, count, lay.rb_offset + first * cs, cs)
        return bytes(table)
    if off < lay.l1_offset:  # refcount block: 1 for every cluster of the file
        per_block = cs // 2
        first = (off - lay.rb_offset) // cs * per_block
        ones = max(0, min(per_block, lay.clusters - first))
        return b"\x00\x01" * ones + b"\0" * (cs - 2 * ones)
    if off < lay.l2_offset:  # L1 table: pointers to the L2 tables
        first = (off - lay.l1_offset) // 8
        for s, e, k in lay.l2_tables.overlapping(first, first + per):
            _put(table, s - first, e - s, lay.l2_offset + k * cs | OFLAG_COPIED, cs)
        return bytes(table)
    # An L2 table: one entry per guest cluster it covers, written run by run.
    l1_index, _ = lay.l2_tables.at((off - lay.l2_offset) // cs)
    first = l1_index * per
    for s, e, k in lay.data.overlapping(first, first + per):
        _put(table, s - first, e - s, lay.data_offset + k * cs | OFLAG_COPIED, cs)
    for s, e, _ in lay.zero.overlapping(first, first + per):
        table[8 * (s - first) : 8 * (e - first)] = _ZERO_ENTRY * (e - s)
    return bytes(table)


Buffer = bytes | bytearray | memoryview
ReadGuest = Callable[[Sequence[tuple[int, int]]], Awaitable[Sequence[Buffer]]]


async def read(lay: Layout, offset: int, length: int, read_guest: ReadGuest) -> Buffer:
    """Bytes [offset, offset+length) of the image file.

    Data comes from `read_guest`, called once with every guest range needed: consecutive data
    clusters that are consecutive on the guest too make one range (one per data run).
    """
    cs = lay.cluster_size
    end = min(offset + length, lay.file_size)
    parts: list[bytes | int] = []  # bytes, or the index of a guest range
    ranges: list[tuple[int, int]] = []
    pos = offset
    while pos < end:
        if pos < lay.data_offset:
            n = pos // cs
            chunk_end = min(end, (n + 1) * cs)
            parts.append(_metadata_cluster(lay, n)[pos - n * cs : chunk_end - n * cs])
            pos = chunk_end
            continue
        # The rest of the data run that holds file data cluster k is one guest range.
        k, within = divmod(pos - lay.data_offset, cs)
        cluster, left = lay.data.at(k)
        run_end = min(end, pos - within + left * cs)
        guest = cluster * cs + within
        # The last cluster may pass the end of the disk: read what exists, pad with zeros.
        exists = min(run_end - pos, max(0, lay.size - guest))
        if exists:
            parts.append(len(ranges))
            ranges.append((guest, exists))
        if run_end - pos > exists:
            parts.append(b"\0" * (run_end - pos - exists))
        pos = run_end
    pieces = await read_guest(ranges) if ranges else []
    if len(parts) == 1 and isinstance(parts[0], int):
        return pieces[0]  # one guest range, as read: no copy of a whole block
    return b"".join(pieces[p] if isinstance(p, int) else p for p in parts)


def empty_image(
    size: int, cluster_size: int = 65536, backing: tuple[str, str] | None = None
) -> bytes:
    """A whole empty qcow2 image (backup scratch files and push targets)."""
    lay = plan(size, cluster_size, backing=backing)
    return b"".join(_metadata_cluster(lay, n) for n in range(lay.clusters))
