"""A disk's views through the interface the tree uses (`images.Image`, `images.Document`),
over an export in memory: what `DiskViews` hands out is what the files show."""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.unit.test_data_path import FakeExport, image
from vcfs.domain.images import Document, Image
from vcfs.domain.model import Disk
from vcfs.domain.reader import BlockCache, ExportSource
from vcfs.domain.views import DiskViews
from vcfs.errors import BackendError

MiB = 1 << 20
SIZE = 8 * MiB
DATA = image(SIZE, {0: 1, 65536: 1, 5 * MiB: 2})


def with_views(test: Callable[[DiskViews, FakeExport], Awaitable[Any]]) -> Any:
    """Run `test` with views of DATA whose background tasks live in a nursery."""

    async def main() -> Any:
        export = FakeExport(DATA)
        disk = Disk(target="vda", node="vda-format", driver="qcow2", source="/img/vda.qcow2",
                    size=SIZE, allocated=3 * MiB)
        async with trio.open_nursery() as nursery:
            source = ExportSource(SIZE, lambda: export)
            views = DiskViews(disk, source, nursery.start_soon, False, None, BlockCache())
            try:
                return await test(views, export)
            finally:
                views.close()
                nursery.cancel_scope.cancel()

    return trio.run(main)


async def read_all(img: Image) -> bytes:
    return b"".join([bytes(await img.read(off, MiB)) for off in range(0, img.size, MiB)])


def test_the_raw_image_is_the_disk_with_its_holes() -> None:
    async def check(views: DiskViews, export: FakeExport) -> None:
        raw: Image = views.raw
        assert raw.size == SIZE
        assert raw.allocated() == 3 * MiB  # QEMU's estimate until the map is known
        assert await read_all(raw) == DATA
        assert await raw.seek(0, False) == 2 * 65536
        assert await raw.seek(2 * 65536, True) == 5 * MiB
        assert await raw.seek(5 * MiB + 65536, True) is None
        assert await raw.seek(SIZE, True) is None
        await views.extent_map.content()
        assert raw.allocated() == 3 * 65536  # exact once the map is known

    with_views(check)


def test_the_extent_map_merges_equal_neighbours_and_is_rendered_once() -> None:
    async def check(views: DiskViews, export: FakeExport) -> None:
        doc: Document = views.extent_map
        assert doc.size is None
        extents = json.loads(await doc.content())
        assert extents == [
            {"start": 0, "length": 2 * 65536, "zero": False, "dirty": True},
            {"start": 2 * 65536, "length": 5 * MiB - 2 * 65536, "zero": True, "dirty": False},
            {"start": 5 * MiB, "length": 65536, "zero": False, "dirty": True},
            {"start": 5 * MiB + 65536, "length": 3 * MiB - 65536, "zero": True, "dirty": False},
        ]
        calls = len(export.status_calls)
        assert await doc.content() == await doc.content()
        assert len(export.status_calls) == calls

    with_views(check)


def test_checksums_have_their_size_before_their_content() -> None:
    async def check(views: DiskViews, export: FakeExport) -> None:
        raw_sum: Document = views.raw_checksum
        qcow2_sum: Document = views.qcow2_checksum
        expected = f"{hashlib.sha256(DATA).hexdigest()}  vda\n".encode()
        assert raw_sum.size == len(expected)
        assert qcow2_sum.size == len(b"0" * 64 + b"  vda.qcow2\n")
        assert export.reads == []  # sizes cost no I/O
        assert await raw_sum.content() == expected
        qcow2 = await read_all(await views.qcow2())
        assert await qcow2_sum.content() == (
            f"{hashlib.sha256(qcow2).hexdigest()}  vda.qcow2\n".encode()
        )

    with_views(check)


def test_the_qcow2_image_is_all_data_and_converts_back_to_the_disk(tmp_path: Path) -> None:
    async def check(views: DiskViews, export: FakeExport) -> bytes:
        img: Image = await views.qcow2()
        assert img is not None and (await views.qcow2()).size == img.size
        assert img.allocated() == img.size
        assert await img.seek(0, True) == 0
        assert await img.seek(10, False) == img.size
        assert await img.seek(img.size, True) is None
        return await read_all(img)

    qcow2 = with_views(check)
    assert qcow2[:4] == b"QFI\xfb"
    (tmp_path / "vda.qcow2").write_bytes(qcow2)
    try:
        subprocess.run(["qemu-img", "convert", "-O", "raw", str(tmp_path / "vda.qcow2"),
                        str(tmp_path / "vda.raw")], check=True)
    except FileNotFoundError:
        pytest.skip("qemu-img is not installed")
    assert (tmp_path / "vda.raw").read_bytes() == DATA


def test_every_view_fails_once_the_backup_has_ended() -> None:
    async def check(views: DiskViews, export: FakeExport) -> None:
        qcow2 = await views.qcow2()
        views.close()
        for call in (lambda: views.raw.read(0, 10), lambda: views.raw.seek(0, True),
                     lambda: qcow2.read(0, 10)):
            with pytest.raises(BackendError):
                await call()

    with_views(check)
