"""CheckpointService semantics against fake ports: libvirt's rules, and nothing half-made."""

from __future__ import annotations

import pytest
import trio

from tests.unit.fakes import FakeQemu, FakeStore, disk, make_domain
from vcfs.adapters import xmlcodec
from vcfs.domain.model import Bitmap
from vcfs.errors import AlreadyExists, InvalidInput, NoSpace, NotFound, NotSupported


def make(*disks, uuid=None):
    qemu = FakeQemu(disks or (disk("vda"), disk("vdb")), uuid=uuid)
    store = FakeStore()
    dom = make_domain(qemu, store)
    dom.checkpoints.load()
    return dom, qemu, store


def run(fn, *args):
    return trio.run(fn, *args)


def doc(body: str = "") -> bytes:
    return f"<domaincheckpoint>{body}</domaincheckpoint>".encode()


def test_create_adds_one_bitmap_per_disk_and_chains_parents():
    dom, qemu, store = make()
    cps = dom.checkpoints

    async def go():
        await cps.create(doc("<name>a</name>"))
        await cps.create(doc("<name>b</name>"))

    run(go)
    assert qemu.bitmap_names("vda") == ["a", "b"]
    assert qemu.bitmap_names("vdb") == ["a", "b"]
    assert cps.current == "b" and store.current == "b"
    assert cps.get("b").parent == "a" and cps.get("a").parent is None
    saved = xmlcodec.parse_checkpoint(store.files["b"], redefine=True)
    assert saved.parent == "a" and saved.creation_time and saved.domain_xml


def test_create_ignores_parent_and_creation_time_given_by_the_user():
    dom, _, store = make()
    run(dom.checkpoints.create, doc("<name>a</name><parent><name>zz</name></parent>"
                                    "<creationTime>5</creationTime>"))
    cp = dom.checkpoints.get("a").definition
    assert cp.parent is None and cp.creation_time != 5


def test_default_name_is_unix_time():
    dom, _, _ = make()
    dom.checkpoints._clock = lambda: 1234567890.7
    assert run(dom.checkpoints.create, doc()) == "1234567890"


def test_listing_one_disk_makes_the_others_no():
    dom, qemu, _ = make()
    run(dom.checkpoints.create, doc("<name>a</name><disks><disk name='vdb'/></disks>"))
    assert qemu.bitmap_names("vda") == [] and qemu.bitmap_names("vdb") == ["a"]
    disks = dom.checkpoints.get("a").definition.disks
    assert [(d.name, d.checkpoint) for d in disks] == [("vda", "no"), ("vdb", "bitmap")]


def test_disk_named_by_source_path_is_normalised_to_target():
    dom, qemu, _ = make()
    run(dom.checkpoints.create, doc("<name>a</name><disks><disk name='/img/vdb.qcow2'/></disks>"))
    assert qemu.bitmap_names("vdb") == ["a"]


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ("<name>a</name><disks><disk name='vdz'/></disks>", NotFound),
        ("<name>a</name><disks><disk name='vda'/><disk name='vda'/></disks>", InvalidInput),
        ("<name>a</name><disks><disk name='vda' bitmap='other'/></disks>", InvalidInput),
        ("<name>new</name>", InvalidInput),
        ("<name>x", InvalidInput),
    ],
)
def test_bad_requests_change_nothing(body, error):
    dom, qemu, store = make()
    with pytest.raises(error):
        run(dom.checkpoints.create, doc(body) if not body.endswith("x") else body.encode())
    assert qemu.transactions == [] and store.files == {} and dom.checkpoints.names() == []


def test_raw_disk_refuses_default_checkpoint_but_mkdir_skips_it():
    dom, qemu, _ = make(disk("vda"), disk("vdc", driver="raw"))
    with pytest.raises(NotSupported):
        run(dom.checkpoints.create, doc("<name>a</name>"))
    run(dom.checkpoints.create_default, "a")
    disks = dom.checkpoints.get("a").definition.disks
    assert [(d.name, d.checkpoint) for d in disks] == [("vda", "bitmap"), ("vdc", "no")]


def test_qcow2_v2_cannot_hold_a_bitmap():
    dom, qemu, _ = make(disk("vda", qcow2_v3=False))
    with pytest.raises(NotSupported, match="compat=0.10"):
        run(dom.checkpoints.create, doc("<name>a</name>"))
    assert dom.checkpoints.names() == [] and qemu.transactions == []


def test_checkpoint_of_no_disk_is_accepted_as_libvirt_does():
    dom, qemu, store = make()
    cps = dom.checkpoints
    run(cps.create, doc("<name>a</name><disks><disk name='vda' checkpoint='no'/></disks>"))
    assert [(d.name, d.checkpoint) for d in cps.get("a").definition.disks] == [
        ("vda", "no"), ("vdb", "no")]
    assert qemu.transactions == [] and qemu.bitmap_names("vda") == qemu.bitmap_names("vdb") == []
    assert "a" in store.files and cps.current == "a" and store.current == "a"
    assert run(cps.sizes, "a") == {} and run(cps.problems, "a") == []
    # it parents the next checkpoint, which records bitmaps as usual
    run(cps.create_default, "b")
    assert cps.get("b").parent == "a" and qemu.bitmap_names("vda") == ["b"]
    # and goes without touching QEMU: it has no bitmap to remove
    run(cps.delete, "a")
    assert cps.names() == ["b"] and cps.get("b").parent is None
    assert [len(t) for t in qemu.transactions] == [2]
    assert "a" not in store.files


@pytest.mark.parametrize("kind", ["raw", "qcow2 v2"])
def test_mkdir_on_a_domain_without_bitmap_capable_disks_checkpoints_no_disk(kind):
    vda = disk("vda", driver="raw") if kind == "raw" else disk("vda", qcow2_v3=False)
    dom, qemu, store = make(vda)
    run(dom.checkpoints.create_default, "a")
    assert [(d.name, d.checkpoint) for d in dom.checkpoints.get("a").definition.disks] == [
        ("vda", "no")]
    assert qemu.transactions == [] and "a" in store.files
    # every disk by default (a document without <disks>) still needs bitmaps: refused
    with pytest.raises(NotSupported):
        run(dom.checkpoints.create, doc("<name>b</name>"))
    assert dom.checkpoints.names() == ["a"]


def test_crash_in_the_create_of_a_checkpoint_of_no_disk_is_undone_without_qemu():
    dom, qemu, store = make()
    store.put_intent("vm1", "checkpoint-create-a", {
        "op": "checkpoint-create", "name": "a", "disks": []})
    done = run(dom.checkpoints.recover, run(dom.info, 0))
    assert done == [("checkpoints/a", "undid interrupted create of a (0 bitmaps)")]
    assert store.pending == {} and qemu.transactions == [] and dom.checkpoints.names() == []


def test_duplicate_name_and_foreign_bitmap_are_eexist():
    dom, qemu, _ = make()
    run(dom.checkpoints.create_default, "a")
    with pytest.raises(AlreadyExists):
        run(dom.checkpoints.create_default, "a")
    qemu.set_bitmaps("vda", Bitmap("b"))
    with pytest.raises(AlreadyExists, match="already has a bitmap"):
        run(dom.checkpoints.create_default, "b")


def test_metadata_write_failure_removes_the_bitmaps_again():
    dom, qemu, store = make()
    store.fail_saves = True
    with pytest.raises(NoSpace):
        run(dom.checkpoints.create_default, "a")
    assert qemu.bitmap_names("vda") == [] and dom.checkpoints.names() == []
    assert store.current is None


def test_qemu_refusal_writes_no_metadata():
    dom, qemu, store = make()
    qemu.fail_next = "Cannot store dirty bitmaps in qcow2 v2 files"
    with pytest.raises(NotSupported):
        run(dom.checkpoints.create_default, "a")
    assert store.files == {} and dom.checkpoints.names() == []


def tree_abc(dom):
    async def go():
        for n in "abc":
            await dom.checkpoints.create_default(n)
    run(go)


def test_delete_reparents_children_and_moves_current():
    dom, qemu, store = make()
    tree_abc(dom)
    run(dom.checkpoints.delete, "b")
    assert dom.checkpoints.get("c").parent == "a"
    assert xmlcodec.parse_checkpoint(store.files["c"], redefine=True).parent == "a"
    assert qemu.bitmap_names("vda") == ["a", "c"]
    run(dom.checkpoints.delete, "c")
    assert dom.checkpoints.current == "a" and store.current == "a"


def test_delete_children_and_children_only():
    dom, qemu, _ = make()
    tree_abc(dom)
    run(dom.checkpoints.delete, "a", {"children-only"})
    assert dom.checkpoints.names() == ["a"] and dom.checkpoints.current == "a"
    assert qemu.bitmap_names("vda") == ["a"]
    run(dom.checkpoints.delete, "a", {"children"})
    assert dom.checkpoints.names() == [] and dom.checkpoints.current is None
    assert qemu.bitmap_names("vda") == []


def test_metadata_only_keeps_bitmaps():
    dom, qemu, store = make()
    tree_abc(dom)
    run(dom.checkpoints.delete, "b", {"metadata-only"})
    assert qemu.bitmap_names("vda") == ["a", "b", "c"] and "b" not in store.files


def test_delete_with_a_missing_bitmap_changes_nothing():
    """libvirt 9.0 crashes after this sequence; vcfs must leave a consistent tree."""
    dom, qemu, store = make()
    tree_abc(dom)
    qemu.set_bitmaps("vda", Bitmap("a"), Bitmap("b"))  # c's bitmap vanished behind our back
    before = dict(store.files)
    with pytest.raises(NotFound, match="bitmap 'c' not found on disk 'vda'"):
        run(dom.checkpoints.delete, "a", {"children-only"})
    assert store.files == before and dom.checkpoints.names() == ["a", "b", "c"]
    with pytest.raises(NotFound):
        run(dom.checkpoints.delete, "a", {"children"})
    assert dom.checkpoints.names() == ["a", "b", "c"]
    assert qemu.bitmap_names("vdb") == ["a", "b", "c"]
    assert run(dom.checkpoints.problems, "c") == ["bitmap 'c' is missing on disk 'vda'"]
    run(dom.checkpoints.delete, "c", {"metadata-only"})
    run(dom.checkpoints.delete, "a", {"children"})
    # metadata-only left c's healthy bitmap on vdb: now an orphan, never silently removed
    assert dom.checkpoints.names() == [] and qemu.bitmap_names("vdb") == ["c"]


@pytest.mark.parametrize("line", ["", "children children-only", "bogus", "children,nope"])
def test_delete_modes_are_validated(line):
    with pytest.raises(InvalidInput):
        make_domain(FakeQemu([])).checkpoints.parse_delete_modes(line)


def test_delete_modes_combine():
    cps = make_domain(FakeQemu([])).checkpoints
    assert cps.parse_delete_modes("children metadata-only\n") == {"children", "metadata-only"}


def redefine_doc(name, parent=None, created=100, disks="", domain=""):
    p = f"<parent><name>{parent}</name></parent>" if parent else ""
    return doc(f"<name>{name}</name>{p}<creationTime>{created}</creationTime>{disks}{domain}")


def test_redefine_validates_bitmaps_and_restores_metadata():
    dom, qemu, store = make()
    qemu.set_bitmaps("vda", Bitmap("a"))
    qemu.set_bitmaps("vdb", Bitmap("a"))
    run(dom.checkpoints.redefine, redefine_doc("a", disks="<disks><disk name='vda'/></disks>"))
    assert dom.checkpoints.current == "a"
    assert dom.checkpoints.get("a").definition.disks[0].bitmap == "a"
    with pytest.raises(InvalidInput, match="missing or broken bitmap 'b'"):
        run(dom.checkpoints.redefine, redefine_doc("b", "a", disks="<disks><disk name='vda'/>"
                                                             "</disks>"))
    assert dom.checkpoints.names() == ["a"]


def test_redefine_rejects_inconsistent_bitmaps():
    dom, qemu, _ = make()
    qemu.set_bitmaps("vda", Bitmap("a", inconsistent=True))
    with pytest.raises(InvalidInput):
        run(dom.checkpoints.redefine, redefine_doc("a", disks="<disks><disk name='vda'/></disks>"))


def test_redefine_parent_rules():
    dom, qemu, _ = make()
    qemu.set_bitmaps("vda", Bitmap("a"), Bitmap("b"))
    d = "<disks><disk name='vda'/></disks>"
    with pytest.raises(NotFound):
        run(dom.checkpoints.redefine, redefine_doc("a", "zz", disks=d))
    with pytest.raises(InvalidInput):
        run(dom.checkpoints.redefine, redefine_doc("a", "a", disks=d))
    run(dom.checkpoints.redefine, redefine_doc("a", disks=d))
    run(dom.checkpoints.redefine, redefine_doc("b", "a", disks=d))
    assert dom.checkpoints.current == "b"
    with pytest.raises(InvalidInput, match="cycle"):
        run(dom.checkpoints.redefine, redefine_doc("a", "b", disks=d))
    # Updating keeps children attached.
    run(dom.checkpoints.redefine, redefine_doc("a", created=200, disks=d))
    assert dom.checkpoints.get("b").parent == "a"
    assert dom.checkpoints.get("a").definition.creation_time == 200


def test_redefine_with_foreign_domain_uuid_is_refused():
    dom, qemu, _ = make(disk("vda"), uuid="c7a5fdbd-edaf-9455-926a-d65c16db1809")
    qemu.set_bitmaps("vda", Bitmap("a"))
    foreign = ("<domain type='kvm'><name>x</name><uuid>11111111-2222-3333-4444-555555555555"
               "</uuid><devices><disk type='file' device='disk'><source file='/img/vda.qcow2'/>"
               "<target dev='vda'/></disk></devices></domain>")
    with pytest.raises(InvalidInput, match="must use uuid"):
        run(dom.checkpoints.redefine, redefine_doc("a", domain=foreign))


def test_reconcile_reports_broken_and_orphans():
    dom, qemu, store = make()
    tree_abc(dom)
    qemu.set_bitmaps("vda", Bitmap("a", inconsistent=True), Bitmap("c"), Bitmap("stray"))
    dom.checkpoints.load()
    info = run(dom.info, 0)
    findings = [m for _, m in dom.checkpoints.reconcile(info)]
    assert any("'a' is broken" in m and "inconsistent" in m for m in findings)
    assert any("'b' is broken" in m and "missing" in m for m in findings)
    assert any("'stray'" in m and "no checkpoint metadata" in m for m in findings)
    assert not any("'c' is broken" in m for m in findings)
    assert dom.checkpoints.names() == ["a", "b", "c"]  # nothing silently dropped


def test_sizes_report_dirty_bytes_of_usable_bitmaps_only():
    dom, qemu, _ = make()
    run(dom.checkpoints.create_default, "a")
    qemu.set_bitmaps("vda", Bitmap("a", count=3 << 20))
    qemu.set_bitmaps("vdb", Bitmap("a", count=5, inconsistent=True))
    assert run(dom.checkpoints.sizes, "a") == {"vda": 3 << 20}


def test_current_after_restart_is_stored_or_unique_leaf():
    dom, qemu, store = make()
    tree_abc(dom)
    store.current = None
    dom.checkpoints.load()
    assert dom.checkpoints.current == "c"


def test_recover_undoes_an_uncommitted_create_and_finishes_a_half_done_delete():
    dom, qemu, store = make()
    tree_abc(dom)
    # a create that crashed after its transaction, before its metadata
    qemu.set_bitmaps("vda", *qemu.disks["vda-format"].bitmaps, Bitmap("d"))
    store.put_intent("vm1", "checkpoint-create-d", {
        "op": "checkpoint-create", "name": "d", "disks": ["vda", "vdb"]})
    # a delete of b that crashed after removing its bitmaps, before its metadata
    for t in ("vda", "vdb"):
        qemu.set_bitmaps(t, *(b for b in qemu.disks[f"{t}-format"].bitmaps if b.name != "b"))
    store.put_intent("vm1", "checkpoint-delete-b", {
        "op": "checkpoint-delete", "victims": ["b"], "metadata_only": False,
        "bitmaps": [["vda", "b"], ["vdb", "b"]]})
    done = run(dom.checkpoints.recover, run(dom.info, 0))
    assert len(done) == 2 and store.pending == {}
    assert qemu.bitmap_names("vda") == ["a", "c"]
    assert dom.checkpoints.names() == ["a", "c"] and dom.checkpoints.get("c").parent == "a"


def test_recover_leaves_an_untouched_delete_alone():
    dom, qemu, store = make()
    tree_abc(dom)
    store.put_intent("vm1", "checkpoint-delete-b", {
        "op": "checkpoint-delete", "victims": ["b"], "metadata_only": False,
        "bitmaps": [["vda", "b"], ["vdb", "b"]]})
    run(dom.checkpoints.recover, run(dom.info, 0))
    assert dom.checkpoints.names() == ["a", "b", "c"] and store.pending == {}
