"""The libvirt backend's checkpoint cache over a stand-in libvirt domain: which checkpoint is
`current` (libvirt 9.0 has no call naming it), and delete modes mapped to libvirt's flags."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import libvirt
import trio
from lxml import etree

from vcfs.adapters.virt.checkpoints import LibvirtCheckpoints


class FakeCheckpoint:
    def __init__(self, dom: FakeDomain, name: str) -> None:
        self.dom, self.name = dom, name

    def getName(self) -> str:  # noqa: N802 (libvirt's name)
        return self.name

    def getXMLDesc(self, flags: int = 0) -> str:  # noqa: N802
        parent, created = self.dom.checkpoints[self.name]
        p = f"<parent><name>{parent}</name></parent>" if parent else ""
        return (f"<domaincheckpoint><name>{self.name}</name>{p}"
                f"<creationTime>{created}</creationTime></domaincheckpoint>")

    def delete(self, flags: int) -> None:
        """libvirt's rules: children re-parent to the nearest survivor, and so does current."""
        self.dom.deleted.append((self.name, flags))
        cps = self.dom.checkpoints
        victims = set()
        if flags & (libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_CHILDREN
                    | libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_CHILDREN_ONLY):
            todo = [self.name]
            while todo:
                parent = todo.pop()
                kids = [n for n, (p, _) in cps.items() if p == parent]
                victims.update(kids)
                todo.extend(kids)
        if not flags & libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_CHILDREN_ONLY:
            victims.add(self.name)

        def survivor(name: str | None) -> str | None:
            while name in victims:
                name = cps[name][0]
            return name

        self.dom.current = survivor(self.dom.current)
        for n, (p, created) in list(cps.items()):
            if n not in victims:
                cps[n] = (survivor(p), created)
        for n in victims:
            del cps[n]


class FakeDomain:
    """Checkpoints as libvirt keeps them: name -> (parent, creation time)."""

    def __init__(self) -> None:
        self.checkpoints: dict[str, tuple[str | None, int]] = {}
        self.current: str | None = None
        self.clock = 1_700_000_000
        self.deleted: list[tuple[str, int]] = []

    def checkpointCreateXML(self, xml: str, flags: int) -> FakeCheckpoint:  # noqa: N802
        name = etree.fromstring(xml.encode()).findtext("name")
        self.clock += 1
        self.checkpoints[name] = (self.current, self.clock)
        self.current = name
        return FakeCheckpoint(self, name)

    def checkpointLookupByName(self, name: str) -> FakeCheckpoint:  # noqa: N802
        return FakeCheckpoint(self, name)

    def listAllCheckpoints(self, flags: int = 0) -> list[FakeCheckpoint]:  # noqa: N802
        return [FakeCheckpoint(self, n) for n in self.checkpoints]

    def XMLDesc(self, flags: int = 0) -> str:  # noqa: N802
        return ("<domain><devices><disk device='disk'><driver type='qcow2'/>"
                "<source file='/a'/><target dev='vda'/></disk></devices></domain>")


class FakeConnection:
    def __init__(self, dom: FakeDomain) -> None:
        self.dom = dom

    async def on_domain(self, uuid: str, fn: Callable[[Any], Any], what: str) -> Any:
        return fn(self.dom)


def run(body: Callable[[LibvirtCheckpoints, FakeDomain], Any]) -> None:
    dom = FakeDomain()

    async def main() -> None:
        cps = LibvirtCheckpoints(FakeConnection(dom), "uuid", trio.Lock())  # type: ignore[arg-type]
        await body(cps, dom)

    trio.run(main)


def test_current_follows_creates_and_deletes_as_libvirt_does():
    async def body(cps: LibvirtCheckpoints, dom: FakeDomain) -> None:
        for name in ("a", "b", "c"):
            await cps.create_default(name)
        assert cps.current == "c" and cps.get("c").parent == "b"
        await cps.delete("c")  # the current one: its parent becomes current
        assert cps.current == "b" == dom.current
        await cps.create_default("d")
        assert cps.get("d").parent == "b"
        await cps.delete("a", {"children"})
        assert cps.names() == [] and cps.current is None is dom.current

    run(body)


def test_children_only_keeps_the_checkpoint_and_makes_it_current():
    async def body(cps: LibvirtCheckpoints, dom: FakeDomain) -> None:
        for name in ("a", "b", "c"):
            await cps.create_default(name)
        await cps.delete("a", {"children-only"})
        assert cps.names() == ["a"] and cps.current == "a"
        assert dom.deleted[0] == ("a", libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_CHILDREN_ONLY)

    run(body)


def test_checkpoints_made_behind_vcfs_back_show_at_the_next_refresh():
    async def body(cps: LibvirtCheckpoints, dom: FakeDomain) -> None:
        await cps.refresh()
        assert cps.current is None
        dom.checkpointCreateXML("<domaincheckpoint><name>x</name></domaincheckpoint>", 0)
        dom.checkpointCreateXML("<domaincheckpoint><name>y</name></domaincheckpoint>", 0)
        await cps.resync()
        assert cps.names() == ["x", "y"] and cps.current == "y"  # the newest leaf
        assert cps.get("y").definition.creation_time == dom.clock

    run(body)
