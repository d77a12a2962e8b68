"""The tree over fake services: which names each directory shows, which node each name is,
and which service call each mkdir, rmdir and control-file write becomes.

No FUSE and no QEMU: `treefakes.FakeHost` stands for the host and its domains' services.
"""

from __future__ import annotations

import errno
from typing import Any

import pyfuse3
import pytest

from tests.unit.treefakes import FakeCodec, FakeDomain, FakeHost, FakeViews, ctx, run
from vcfs.fs.ops import Operations
from vcfs.tree.fstree import DisksDir, Tree
from vcfs.tree.nodes import ControlFile, Dir, ImageFile, Link, Node, ReadFile


class World:
    """A host with domain `vm` (checkpoints `mon` ← `tue`, pull backup `1`, push backup `2`)."""

    def __init__(self) -> None:
        self.vm = FakeDomain("vm")
        self.vm.checkpoints.add("mon")
        self.vm.checkpoints.add("tue", parent="mon")
        self.vda, self.vdb = FakeViews(b"\1" * 4096), FakeViews(b"\2" * 8192)
        self.vm.backups.add("2", {"vda": None})
        self.vm.backups.add("1", {"vda": self.vda, "vdb": self.vdb})
        self.host = FakeHost(self.vm)
        self.tree = Tree(self.host, FakeCodec())  # type: ignore[arg-type]

    def node(self, path: str) -> Node | None:
        return run(self.tree.resolve, tuple(p for p in path.split("/") if p))

    def dir(self, path: str) -> Dir:
        node = self.node(path)
        assert isinstance(node, Dir), path
        return node

    def names(self, path: str) -> list[str]:
        return run(self.dir(path).names)

    def read(self, path: str) -> bytes:
        node = self.node(path)
        assert isinstance(node, ReadFile), path
        return run(node.render)

    def write(self, path: str, request: bytes) -> Any:
        node = self.node(path)
        assert isinstance(node, ControlFile), path
        (one,), rest = node.split(request + (b"" if node._complete else b"\n"))
        assert rest == b""
        return run(node.submit, one)


@pytest.fixture
def w() -> World:
    return World()


def test_the_root_lists_the_domains_after_a_rescan(w: World) -> None:
    assert w.names("") == ["vm"]
    assert w.host.refreshes == [0.5]


def test_an_unknown_domain_is_looked_for_once_cheaply(w: World) -> None:
    assert w.node("nope") is None
    assert w.host.refreshes == [0.5]
    w.host.pending["new"] = FakeDomain("new")
    assert isinstance(w.node("new"), Dir)  # a VM that just appeared: no wait for the next scan


def test_a_domain_whose_monitor_closed_is_rescanned_at_once(w: World) -> None:
    assert isinstance(w.node("vm"), Dir) and w.host.refreshes == []
    w.vm.connected = False
    w.node("vm")
    assert w.host.refreshes == [0]


def test_a_domain_shows_its_xml_errors_checkpoints_and_backups(w: World) -> None:
    assert w.names("vm") == ["xml", "errors", "checkpoints", "backups"]
    assert w.read("vm/xml") == b"<domain>info of vm</domain>"
    assert w.read("vm/errors") == b""
    assert w.node("vm/other") is None


def test_a_report_lands_in_its_domains_errors(w: World) -> None:
    w.tree.report(("vm", "checkpoints", "new"), "EINVAL", "bad\nXML")
    w.tree.report(("vm",), "EIO", "gone")
    w.tree.report(("nope", "x"), "EIO", "nobody's")
    w.tree.report((), "EIO", "the root's")
    lines = w.read("vm/errors").decode().splitlines()
    assert [line.split(" ", 1)[1] for line in lines] == [
        "checkpoints/new EINVAL bad XML",
        ". EIO gone",
    ]


def test_resolve_stops_at_a_file(w: World) -> None:
    assert w.node("vm/xml/below") is None
    assert w.node("vm/checkpoints/mon/xml/x") is None


def test_checkpoints_list_the_control_files_current_and_each_checkpoint(w: World) -> None:
    assert w.names("vm/checkpoints") == ["new", "redefine", "current", "mon", "tue"]
    current = w.node("vm/checkpoints/current")
    assert isinstance(current, Link) and current.target == "tue"
    w.vm.checkpoints.current = None
    assert w.names("vm/checkpoints") == ["new", "redefine", "mon", "tue"]
    assert w.node("vm/checkpoints/current") is None
    assert w.node("vm/checkpoints/wed") is None


def test_checkpoint_control_files_and_mkdir_rmdir_call_the_service(w: World) -> None:
    w.write("vm/checkpoints/new", b"<domaincheckpoint/>")
    w.write("vm/checkpoints/redefine", b"<domaincheckpoint><name>x</name></domaincheckpoint>")
    cps = w.dir("vm/checkpoints")
    run(cps.mkdir, "wed")
    run(cps.rmdir, "mon")
    w.write("vm/checkpoints/tue/delete", b"metadata-only children")
    assert w.vm.checkpoints.calls == [
        ("create", b"<domaincheckpoint/>"),
        ("redefine", b"<domaincheckpoint><name>x</name></domaincheckpoint>"),
        ("create_default", "wed"),
        ("delete", "mon", set()),
        ("delete", "tue", {"metadata-only", "children"}),
    ]


def test_a_checkpoint_shows_xml_size_delete_and_its_parent(w: World) -> None:
    assert w.names("vm/checkpoints/mon") == ["xml", "size", "delete"]
    assert w.names("vm/checkpoints/tue") == ["xml", "size", "delete", "parent"]
    parent = w.node("vm/checkpoints/tue/parent")
    assert isinstance(parent, Link) and parent.target == "../mon"
    assert w.node("vm/checkpoints/mon/parent") is None
    assert w.read("vm/checkpoints/mon/xml") == (
        b"<domaincheckpoint><name>mon</name></domaincheckpoint>"
    )
    assert w.read("vm/checkpoints/mon/size") == b"vda 4096\nvdb 0\n"
    assert w.dir("vm/checkpoints/mon").mtime == 1_700_000_100


def test_backups_list_new_latest_and_each_job(w: World) -> None:
    assert w.names("vm/backups") == ["new", "latest", "2", "1"]
    latest = w.node("vm/backups/latest")
    assert isinstance(latest, Link) and latest.target == "1"
    assert w.node("vm/backups/3") is None
    w.vm.backups.latest = None
    assert w.names("vm/backups") == ["new", "2", "1"]


def test_backup_control_files_and_mkdir_rmdir_call_the_service(w: World) -> None:
    w.write("vm/backups/new", b"<domainbackup/>")
    backups = w.dir("vm/backups")
    run(backups.mkdir, "7")
    run(backups.rmdir, "1")
    assert w.vm.backups.calls == [
        ("begin", b"<domainbackup/>"), ("begin_default", "7"), ("end", "1")
    ]


def test_a_backup_shows_xml_status_and_disks(w: World) -> None:
    assert w.names("vm/backups/1") == ["xml", "status", "disks"]
    assert w.read("vm/backups/1/xml") == b"<domainbackup id='1'/>"
    assert w.read("vm/backups/1/status") == b"state: running\n"
    assert w.dir("vm/backups/1").mtime == 1_700_000_200.0


def test_a_pull_backup_shows_five_files_per_disk(w: World) -> None:
    suffixes = ["", ".qcow2", ".map", ".sha256", ".qcow2.sha256"]
    assert w.names("vm/backups/1/disks") == [f"{d}{s}" for d in ("vda", "vdb") for s in suffixes]
    assert DisksDir.SUFFIXES == tuple(suffixes)


def test_a_push_backup_shows_no_disk_files(w: World) -> None:
    assert w.names("vm/backups/2/disks") == []
    assert w.node("vm/backups/2/disks/vda") is None


def test_disk_files_are_the_views_images_and_documents(w: World) -> None:
    raw = w.node("vm/backups/1/disks/vdb")
    assert isinstance(raw, ImageFile) and raw.image is w.vdb.raw
    qcow2 = w.node("vm/backups/1/disks/vdb.qcow2")
    assert isinstance(qcow2, ImageFile) and qcow2.image is w.vdb.qcow2_image
    assert raw.mode == qcow2.mode == 0o400
    for name, document in (
        ("vdb.map", w.vdb.extent_map),
        ("vdb.sha256", w.vdb.raw_checksum),
        ("vdb.qcow2.sha256", w.vdb.qcow2_checksum),
    ):
        node = w.node(f"vm/backups/1/disks/{name}")
        assert isinstance(node, ReadFile), name
        assert node.size == document.size
        assert run(node.render) == document.data


def test_checksum_sizes_are_known_before_their_content(w: World) -> None:
    node = w.node("vm/backups/1/disks/vda.qcow2.sha256")
    assert isinstance(node, ReadFile) and node.size == len(w.vda.qcow2_checksum.data)
    assert w.vda.qcow2_checksum.renders == 0
    node = w.node("vm/backups/1/disks/vda.map")
    assert isinstance(node, ReadFile) and node.size is None


@pytest.mark.parametrize("name", ["vdc", "vdc.qcow2", "vda.raw", "vda.qcow2.map", ".sha256"])
def test_other_names_in_disks_are_absent(w: World, name: str) -> None:
    assert w.node(f"vm/backups/1/disks/{name}") is None


def test_a_disk_named_like_a_suffix_is_still_found() -> None:
    w = World()
    views = FakeViews(b"x")
    w.vm.backups.add("3", {"map": views})
    raw = w.node("vm/backups/3/disks/map")
    assert isinstance(raw, ImageFile) and raw.image is views.raw
    assert isinstance(w.node("vm/backups/3/disks/map.map"), ReadFile)


def test_an_ended_backups_files_vanish(w: World) -> None:
    disks = w.dir("vm/backups/1/disks")
    del w.vm.backups.jobs["1"]
    assert run(disks.names) == []
    assert run(disks.child, "vda") is None


def test_the_handlers_over_the_tree_record_failures_in_the_domains_errors(w: World) -> None:
    """fs/ops over the real tree: a failed request is one line of `<dom>/errors`, at the
    path inside the domain, with its errno's name."""
    ops = Operations(w.tree)
    inode = pyfuse3.ROOT_INODE
    for name in ("vm", "checkpoints"):
        inode = run(ops.lookup, inode, name.encode(), ctx()).st_ino
    with pytest.raises(pyfuse3.FUSEError) as failed:
        run(ops.mkdir, inode, b"mon", 0o755, ctx())
    assert failed.value.errno == errno.EEXIST
    lines = w.read("vm/errors").decode().splitlines()
    assert [line.split(" ", 1)[1] for line in lines] == [
        "checkpoints/mon EEXIST checkpoint 'mon' already exists"
    ]
