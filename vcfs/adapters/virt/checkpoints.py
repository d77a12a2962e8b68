"""`<dom>/checkpoints/` over libvirt's checkpoint API.

libvirt owns the checkpoints (metadata and bitmaps): `new` is checkpointCreateXML with the
document as given, `redefine` adds REDEFINE|REDEFINE_VALIDATE, `rmdir` and `delete` map their
modes to the delete flags, `size` is the XML with VIR_DOMAIN_CHECKPOINT_XML_SIZE. The tree reads
names, parents and `current` synchronously, so they come from a cache: refreshed after every
change vcfs makes and at each scan of the host (changes made with `virsh` show within a scan).

libvirt 9.0 has no call that names its current checkpoint (the parent of the next one). vcfs
knows it after its own creates (the new one) and deletes (libvirt's rule: the deleted current's
parent); otherwise it takes the leaf created last, which is libvirt's current unless someone
deleted a leaf behind vcfs's back.
Thread rule: trio tasks only; changes hold the domain's lock.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import libvirt
import trio

from vcfs.adapters.virt import documents
from vcfs.adapters.virt.connection import Connection
from vcfs.domain.checkpoints import CheckpointService
from vcfs.domain.model import Checkpoint
from vcfs.domain.names import check_checkpoint_name
from vcfs.errors import NotFound

_DELETE_FLAGS = {
    "children": libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_CHILDREN,
    "children-only": libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_CHILDREN_ONLY,
    "metadata-only": libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY,
}
_CHILDREN_FLAGS = (libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_CHILDREN
                   | libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_CHILDREN_ONLY)
_REDEFINE = (libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE
             | libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE_VALIDATE)


class LibvirtCheckpoints:
    """The checkpoints of one libvirt domain (the tree's `Checkpoints`)."""

    def __init__(self, conn: Connection, uuid: str, lock: trio.Lock) -> None:
        self._conn = conn
        self._uuid = uuid
        self._lock = lock
        self._entries: dict[str, Checkpoint] = {}
        self._current: str | None = None
        self._known_current = False
        """Whether `_current` is what vcfs itself made current (see the module docstring)."""

    # ---- reading (from the cache) -----------------------------------------------------------

    @property
    def current(self) -> str | None:
        return self._current

    def names(self) -> list[str]:
        return sorted(self._entries)

    def get(self, name: str) -> Checkpoint | None:
        return self._entries.get(name)

    async def xml(self, name: str) -> bytes:
        """libvirt's checkpoint-dumpxml (with the domain)."""
        return await self._on_checkpoint(name, lambda cp: cp.getXMLDesc(0), "checkpoint XML")

    async def sizes(self, name: str) -> dict[str, int]:
        """libvirt's `size` per disk; an inactive domain measures none (libvirt cannot)."""
        def sized(dom: libvirt.virDomain) -> str | None:
            cp = dom.checkpointLookupByName(name)
            if not dom.isActive():
                return None
            return str(cp.getXMLDesc(libvirt.VIR_DOMAIN_CHECKPOINT_XML_SIZE))

        xml = await self._conn.on_domain(self._uuid, sized, "checkpoint size")
        if xml is None:
            return {}
        definition = documents.checkpoint_definition(xml)
        return {d.name: d.size for d in definition.disks or () if d.size is not None}

    async def _on_checkpoint(self, name: str, fn: Callable[[Any], str], what: str) -> bytes:
        xml = await self._conn.on_domain(
            self._uuid, lambda dom: fn(dom.checkpointLookupByName(name)), what)
        return str(xml).encode()

    # ---- the cache ----------------------------------------------------------------------------

    async def refresh(self) -> None:
        """Re-read the checkpoints from libvirt (names, parents, creation times)."""
        def read(dom: libvirt.virDomain) -> list[str]:
            return [cp.getXMLDesc(libvirt.VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN)
                    for cp in dom.listAllCheckpoints(0)]

        xmls = await self._conn.on_domain(self._uuid, read, "list checkpoints")
        entries = {}
        for xml in xmls:
            definition = documents.checkpoint_definition(xml)
            if definition.name:
                entries[definition.name] = Checkpoint(definition)
        self._entries = entries
        if not (self._known_current and (self._current in entries or self._current is None)):
            self._known_current = False
            self._current = self._newest_leaf()

    async def resync(self) -> None:
        """The periodic re-read, unless a change is under way: a list read before that change
        and stored after it would hide its checkpoint until the next scan."""
        if self._lock.locked():
            return
        async with self._lock:
            await self.refresh()

    def _newest_leaf(self) -> str | None:
        parents = {c.parent for c in self._entries.values()}
        leaves = [c for n, c in self._entries.items() if n not in parents]
        if not leaves:
            return None
        newest = max(leaves, key=lambda c: (c.definition.creation_time or 0, c.name))
        return newest.name

    def created(self, name: str) -> None:
        """A checkpoint vcfs made (here or with a backup): it is libvirt's current now."""
        self._current = name
        self._known_current = True

    # ---- changing -----------------------------------------------------------------------------

    async def create(self, document: bytes) -> str:
        """checkpointCreateXML with the document as given; libvirt names an unnamed one."""
        documents.checkpoint_name(document)
        text = document.decode(errors="replace")
        async with self._lock:
            name = await self._conn.on_domain(
                self._uuid, lambda dom: dom.checkpointCreateXML(text, 0).getName(),
                "checkpoint create")
            self.created(name)
            await self.refresh()
        return str(name)

    async def create_default(self, name: str) -> None:
        """Every disk that can hold a bitmap gets one; the others `checkpoint='no'`."""
        check_checkpoint_name(name)
        async with self._lock:
            def create(dom: libvirt.virDomain) -> None:
                disks = documents.domain_disks(dom.XMLDesc(0))
                dom.checkpointCreateXML(documents.default_checkpoint(name, disks), 0)

            await self._conn.on_domain(self._uuid, create, "checkpoint create")
            self.created(name)
            await self.refresh()

    async def redefine(self, document: bytes) -> str:
        """REDEFINE with REDEFINE_VALIDATE: every bitmap it names must exist and be usable."""
        documents.checkpoint_name(document)
        text = document.decode(errors="replace")
        async with self._lock:
            name = await self._conn.on_domain(
                self._uuid, lambda dom: dom.checkpointCreateXML(text, _REDEFINE).getName(),
                "checkpoint redefine")
            # libvirt's rule: the first redefined checkpoint, or a child of the current one,
            # becomes current; the cache works it out from the leaves.
            self._known_current = False
            await self.refresh()
        return str(name)

    def parse_delete_modes(self, line: str) -> set[str]:
        return CheckpointService.parse_delete_modes(line)

    async def delete(self, name: str, modes: Iterable[str] = ()) -> None:
        """Delete with the flags of `modes` (all or nothing: libvirt's own guarantee)."""
        flags = 0
        for mode in modes:
            flags |= _DELETE_FLAGS[mode]
        async with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                raise NotFound(f"no checkpoint named '{name}'")
            await self._conn.on_domain(
                self._uuid, lambda dom: dom.checkpointLookupByName(name).delete(flags),
                "checkpoint delete")
            # libvirt's rule: a deleted current passes to the nearest surviving ancestor.
            gone = self._descendants(name) if flags & _CHILDREN_FLAGS else set()
            if not flags & libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_CHILDREN_ONLY:
                gone.add(name)
            if self._current in gone:
                survivor: str | None = self._current
                while survivor in gone:
                    survivor = self._entries[survivor].parent if survivor else None
                self._current = survivor
                self._known_current = True
            await self.refresh()

    def _descendants(self, name: str) -> set[str]:
        found: set[str] = set()
        todo = [name]
        while todo:
            parent = todo.pop()
            for n, c in self._entries.items():
                if c.parent == parent and n not in found:
                    found.add(n)
                    todo.append(n)
        return found
