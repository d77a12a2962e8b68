"""CheckpointService at every fault point, over fakes: a failing step (VCFS_FAULT) leaves either
nothing or an operation the next start finishes, and a kill (VCFS_KILL) at every step leaves
what recovery completes or undoes, as tests/integration/test_crash.py checks against QEMU."""

from __future__ import annotations

import copy

import pytest
import trio

from tests.unit.fakes import FakeQemu, FakeStore, disk, make_domain
from vcfs.domain import checkpoints as checkpoints_module
from vcfs.domain import faults
from vcfs.domain.host import Domain
from vcfs.errors import BackendError

CREATE_POINTS = {  # point -> does the checkpoint exist afterwards?
    "checkpoint.create.transaction": False,
    "checkpoint.create.commit": False,
    "checkpoint.create.done": True,
}
DELETE_POINTS = {  # point -> is the checkpoint gone once the next start has recovered?
    "checkpoint.delete.transaction": False,
    "checkpoint.delete.metadata": True,
    "checkpoint.delete.done": True,
}
REDEFINE_POINTS = {  # point -> does the checkpoint exist (and is current) after recovery?
    "checkpoint.redefine.metadata": False,
    "checkpoint.redefine.current": True,
}


class Crash(BaseException):
    """vcfs was SIGKILLed here."""


def new_domain(qemu: FakeQemu, store: FakeStore) -> Domain:
    dom = make_domain(qemu, store)
    trio.run(dom.start)
    return dom


def setup() -> tuple[Domain, FakeQemu, FakeStore]:
    qemu, store = FakeQemu([disk("vda"), disk("vdb")]), FakeStore()
    dom = new_domain(qemu, store)
    for name in "ab":
        trio.run(dom.checkpoints.create_default, name)
    return dom, qemu, store


def delete_b(dom: Domain) -> None:
    trio.run(dom.checkpoints.delete, "b", ())


def redefine_c(dom: Domain, saved: bytes) -> None:
    trio.run(dom.checkpoints.redefine, saved)


def restart(qemu: FakeQemu, store: FakeStore) -> Domain:
    """A new vcfs over what QEMU and the store hold."""
    return new_domain(qemu, store)


def create_c(dom: Domain) -> None:
    trio.run(dom.checkpoints.create, b"<domaincheckpoint><name>c</name></domaincheckpoint>")


def prepare_redefine(dom: Domain) -> bytes:
    create_c(dom)
    saved = trio.run(dom.checkpoints.xml, "c")
    trio.run(dom.checkpoints.delete, "c", {"metadata-only"})
    return saved


@pytest.mark.parametrize(("point", "exists"), list(CREATE_POINTS.items()))
def test_create_failing_at_each_step(monkeypatch, point, exists):
    dom, qemu, store = setup()
    monkeypatch.setattr(faults, "_ACTIVE", frozenset({point}))
    with pytest.raises(BackendError):
        create_c(dom)
    assert ("c" in dom.checkpoints.names()) == exists == ("c" in store.files)
    assert ("c" in qemu.bitmap_names("vda")) == exists
    assert store.pending == {}


@pytest.mark.parametrize(("point", "gone"), list(DELETE_POINTS.items()))
def test_delete_failing_at_each_step_is_undone_or_finished_at_the_next_start(
    monkeypatch, point, gone
):
    dom, qemu, store = setup()
    monkeypatch.setattr(faults, "_ACTIVE", frozenset({point}))
    with pytest.raises(BackendError):
        delete_b(dom)
    monkeypatch.setattr(faults, "_ACTIVE", frozenset())
    dom = restart(qemu, store)
    assert ("b" in dom.checkpoints.names()) != gone and ("b" in store.files) != gone
    assert ("b" in qemu.bitmap_names("vda")) != gone
    assert dom.checkpoints.current == ("a" if gone else "b") and store.pending == {}


@pytest.mark.parametrize(("point", "exists"), list(REDEFINE_POINTS.items()))
def test_redefine_failing_at_each_step(monkeypatch, point, exists):
    dom, qemu, store = setup()
    saved = prepare_redefine(dom)
    monkeypatch.setattr(faults, "_ACTIVE", frozenset({point}))
    with pytest.raises(BackendError):
        redefine_c(dom, saved)
    assert ("c" in dom.checkpoints.names()) == exists  # in memory as in the store
    monkeypatch.setattr(faults, "_ACTIVE", frozenset())
    dom = restart(qemu, store)
    assert ("c" in dom.checkpoints.names()) == exists
    assert dom.checkpoints.current == ("c" if exists else "b") and store.pending == {}


def kill_at(
    point: str, qemu: FakeQemu, store: FakeStore, monkeypatch: pytest.MonkeyPatch
) -> list[tuple[FakeQemu, FakeStore]]:
    """Make the checkpoint service 'die' at `point`; the list receives what it left."""
    left: list[tuple[FakeQemu, FakeStore]] = []

    def fault_point(name: str) -> None:
        if name == point and not left:
            left.append(copy.deepcopy((qemu, store)))
            raise Crash(point)

    monkeypatch.setattr(checkpoints_module, "fault_point", fault_point)
    return left


@pytest.mark.parametrize(("point", "exists"), list(CREATE_POINTS.items()))
def test_create_killed_at_each_step(monkeypatch, point, exists):
    dom, qemu, store = setup()
    left = kill_at(point, qemu, store, monkeypatch)
    with pytest.raises(Crash):
        create_c(dom)
    dom = restart(*left[0])
    qemu, store = left[0]
    assert ("c" in dom.checkpoints.names()) == exists
    assert ("c" in qemu.bitmap_names("vda")) == exists == ("c" in qemu.bitmap_names("vdb"))
    assert dom.checkpoints.current == ("c" if exists else "b") and store.pending == {}
    assert "RECOVER" in dom.errors.render().decode()


@pytest.mark.parametrize(("point", "gone"), list(DELETE_POINTS.items()))
def test_delete_killed_at_each_step(monkeypatch, point, gone):
    dom, qemu, store = setup()
    left = kill_at(point, qemu, store, monkeypatch)
    with pytest.raises(Crash):
        delete_b(dom)
    dom = restart(*left[0])
    qemu, store = left[0]
    assert ("b" in dom.checkpoints.names()) != gone
    assert ("b" in qemu.bitmap_names("vda")) != gone
    assert dom.checkpoints.current == ("a" if gone else "b") and store.pending == {}


@pytest.mark.parametrize(("point", "exists"), list(REDEFINE_POINTS.items()))
def test_redefine_killed_at_each_step(monkeypatch, point, exists):
    dom, qemu, store = setup()
    saved = prepare_redefine(dom)
    left = kill_at(point, qemu, store, monkeypatch)
    with pytest.raises(Crash):
        redefine_c(dom, saved)
    dom = restart(*left[0])
    qemu, store = left[0]
    assert ("c" in dom.checkpoints.names()) == exists
    assert dom.checkpoints.current == ("c" if exists else "b") and store.pending == {}
