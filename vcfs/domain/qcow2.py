"""qcow2 v3 images synthesized from an extent map: metadata computed, data read on demand.

The image is laid out as: header cluster, refcount table, refcount blocks, L1 table, the L2
tables that have any entry, then one data cluster per guest cluster that carries data, in
guest order. Every cluster has refcount 1 (the image is never written), so the whole layout
follows from three facts per guest cluster: data, zero, or unallocated. Its size is known
before the first byte is read, and any byte range can be produced without the ones before it.

Incremental images name their base as backing file (with its format), so opened alone they
fail instead of reading as zeros, and a zero cluster that changed is an explicit zero cluster
so that it hides the backing file's old data.
Pure computation; `read` awaits the data callback for data clusters only.
"""

from __future__ import annotations

import bisect
import struct
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field

from vcfs.domain.extents import Extent

MAGIC = b"QFI\xfb"
VERSION = 3
HEADER_LENGTH = 112
REFCOUNT_ORDER = 4  # 16-bit refcounts, as qemu-img makes them
OFLAG_COPIED = 1 << 63
OFLAG_ZERO = 1
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_END = 0


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class Layout:
    """Where everything of one synthesized image lives."""

    size: int
    cluster_size: int
    data: list[int]
    """Guest cluster numbers that carry data, ascending; the k-th is the k-th data cluster."""
    zero: list[int]
    """Guest cluster numbers that read as explicit zeros, ascending."""
    backing: tuple[str, str] | None = None
    rt_offset: int = 0
    rt_clusters: int = 0
    rb_offset: int = 0
    rb_clusters: int = 0
    l1_offset: int = 0
    l1_entries: int = 0
    l2_offset: int = 0
    l2_tables: list[int] = field(default_factory=list)
    """L1 indexes that have an L2 table, ascending; the i-th table is at l2_offset + i*cs."""
    data_offset: int = 0
    file_size: int = 0
    _data_index: dict[int, int] = field(default_factory=dict)
    _zero_set: frozenset[int] = frozenset()

    @property
    def clusters(self) -> int:
        return self.file_size // self.cluster_size


def plan(
    size: int,
    cluster_size: int,
    data: Sequence[int],
    zero: Sequence[int] = (),
    backing: tuple[str, str] | None = None,
) -> Layout:
    """Lay out an image of virtual `size` whose `data` and `zero` guest clusters are given."""
    if cluster_size & (cluster_size - 1) or not 512 <= cluster_size <= 2 << 20:
        raise ValueError(f"bad cluster size {cluster_size}")
    cs = cluster_size
    entries_per_l2 = cs // 8
    lay = Layout(size, cs, sorted(data), sorted(zero), backing)
    lay.l1_entries = _ceil(_ceil(size, cs), entries_per_l2)
    lay.l2_tables = sorted({c // entries_per_l2 for c in (*lay.data, *lay.zero)})
    l1_clusters = _ceil(lay.l1_entries * 8, cs)  # none for an empty disk, as qemu-img does
    fixed = 1 + l1_clusters + len(lay.l2_tables) + len(lay.data)
    rb, rt = 1, 1
    while True:  # refcount structures count themselves: iterate to a fixed point
        total = fixed + rb + rt
        rb_new = _ceil(total, cs * 8 // (1 << REFCOUNT_ORDER))
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


def _metadata_cluster(lay: Layout, n: int) -> bytes:
    """File cluster `n`, which must lie before the data clusters."""
    cs = lay.cluster_size
    off = n * cs
    if n == 0:
        return header(lay)
    if off < lay.rb_offset:  # refcount table: pointers to the refcount blocks
        first = (off - lay.rt_offset) // 8
        entries = [
            lay.rb_offset + i * cs if i < lay.rb_clusters else 0
            for i in range(first, first + cs // 8)
        ]
        return struct.pack(f">{cs // 8}Q", *entries)
    if off < lay.l1_offset:  # refcount block: 1 for every cluster of the file
        per_block = cs // 2
        first = (off - lay.rb_offset) // cs * per_block
        ones = max(0, min(per_block, lay.clusters - first))
        return b"\x00\x01" * ones + b"\0" * (cs - 2 * ones)
    if off < lay.l2_offset:  # L1 table
        first = (off - lay.l1_offset) // 8
        entries = []
        for i in range(first, first + cs // 8):
            j = bisect.bisect_left(lay.l2_tables, i)
            present = i < lay.l1_entries and j < len(lay.l2_tables) and lay.l2_tables[j] == i
            entries.append(lay.l2_offset + j * cs | OFLAG_COPIED if present else 0)
        return struct.pack(f">{cs // 8}Q", *entries)
    # an L2 table
    l1_index = lay.l2_tables[(off - lay.l2_offset) // cs]
    per_l2 = cs // 8
    entries = []
    for c in range(l1_index * per_l2, (l1_index + 1) * per_l2):
        k = lay._data_index.get(c)
        if k is not None:
            entries.append(lay.data_offset + k * cs | OFLAG_COPIED)
        elif c in lay._zero_set:
            entries.append(OFLAG_ZERO)
        else:
            entries.append(0)
    return struct.pack(f">{per_l2}Q", *entries)


Buffer = bytes | bytearray | memoryview
ReadGuest = Callable[[Sequence[tuple[int, int]]], Awaitable[Sequence[Buffer]]]


async def read(lay: Layout, offset: int, length: int, read_guest: ReadGuest) -> bytes:
    """Bytes [offset, offset+length) of the image file.

    Data comes from `read_guest`, called once with every guest range needed: consecutive data
    clusters that are consecutive on the guest too make one range.
    """
    cs = lay.cluster_size
    end = min(offset + length, lay.file_size)
    parts: list[bytes | int] = []  # bytes, or the index of a guest range
    ranges: list[tuple[int, int]] = []
    pos = offset
    while pos < end:
        n = pos // cs
        if pos < lay.data_offset:
            chunk_end = min(end, (n + 1) * cs)
            parts.append(_metadata_cluster(lay, n)[pos - n * cs : chunk_end - n * cs])
            pos = chunk_end
            continue
        k = (pos - lay.data_offset) // cs
        k_end = k + 1
        while (lay.data_offset + k_end * cs < end and k_end < len(lay.data)
               and lay.data[k_end] == lay.data[k_end - 1] + 1):
            k_end += 1
        run_end = min(end, lay.data_offset + k_end * cs)
        guest = lay.data[k] * cs + (pos - lay.data_offset - k * cs)
        # The last cluster may pass the end of the disk: read what exists, pad with zeros.
        exists = min(run_end - pos, max(0, lay.size - guest))
        if exists:
            parts.append(len(ranges))
            ranges.append((guest, exists))
        parts.append(b"\0" * (run_end - pos - exists))
        pos = run_end
    pieces = await read_guest(ranges) if ranges else []
    return b"".join(pieces[p] if isinstance(p, int) else p for p in parts)


def classify(
    extents: Iterable[Extent], size: int, cluster_size: int, incremental: bool
) -> tuple[list[int], list[int]]:
    """Which guest clusters an image carries as data, and which as explicit zeros.

    Full image: a cluster with any non-zero byte is data; an all-zero cluster with allocated
    zeros is a zero cluster; the rest stays unallocated. Incremental image: a cluster with any
    changed byte is data (or a zero cluster when it is all zeros now, hiding the backing file's
    old data); unchanged clusters stay unallocated and read through to the base.
    """
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


def empty_image(
    size: int, cluster_size: int = 65536, backing: tuple[str, str] | None = None
) -> bytes:
    """A whole empty qcow2 image (backup scratch files and push targets)."""
    lay = plan(size, cluster_size, [], backing=backing)
    return b"".join(_metadata_cluster(lay, n) for n in range(lay.clusters))
