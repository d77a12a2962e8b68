"""Checkpoints of one domain with libvirt's modern semantics, done directly over QMP.

One persistent, recording dirty bitmap per checkpointed disk, named after the checkpoint, on the
disk's top node. Creating never disables older bitmaps; deleting only removes bitmaps (nothing is
merged: an older bitmap already covers everything a younger one does). Metadata (name, parent,
creationTime, disks, domain) is vcfs's own, in the store; the bitmaps are the truth for dirty
data, and `problems()` says where the two disagree.

Order of effects, so that no failure leaves anything half-made: create runs the QMP transaction
first and writes metadata only if it succeeded (removing the bitmaps again if the write fails);
delete validates everything, removes all bitmaps in one transaction, then rewrites metadata.
The service reaches QEMU, the lock and the domain's facts through a `DomainContext`.
Over 400 lines on purpose: one class owns the metadata tree (`_checkpoints`, `current`) and
every mutation of it, with its rollback and crash recovery, so its invariants live in one place.
Thread rule: trio tasks only; every mutation holds the domain's lock.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import trio

from vcfs.domain.align import align_checkpoint, fill_bitmap_names
from vcfs.domain.context import DomainContext
from vcfs.domain.faults import fault_point
from vcfs.domain.model import BITMAP, NO, Checkpoint, CheckpointDef, CheckpointDisk, DomainInfo
from vcfs.domain.names import check_checkpoint_name
from vcfs.domain.ports import AddBitmap, CheckpointStore, Codec, RemoveBitmap
from vcfs.errors import (
    AlreadyExists,
    InvalidInput,
    NotFound,
    NotSupported,
    QmpCommandError,
    VcfsError,
)

log = logging.getLogger(__name__)

DELETE_MODES = frozenset({"children", "children-only", "metadata-only"})


def translate_qmp(e: QmpCommandError) -> VcfsError:
    """Give QEMU's refusals of bitmap operations their precise domain error."""
    if "Cannot store dirty bitmaps" in e.desc or "Can't store persistent bitmaps" in e.desc:
        return NotSupported(e.desc)
    if "already exists" in e.desc:
        return AlreadyExists(e.desc)
    return e


def checkpoint_problems(cp: CheckpointDef, info: DomainInfo) -> list[str]:
    """Why `cp`'s bitmaps cannot be trusted on the live domain; empty when they can.

    Disks that left the domain are tolerated, as libvirt does. Bitmaps are looked up by the
    checkpoint's name, which is also how libvirt finds them.
    """
    assert cp.name
    problems = []
    for entry in cp.bitmap_disks():
        disk = info.disk(entry.name)
        if disk is None:
            continue
        bitmap = disk.bitmap(cp.name)
        if bitmap is None:
            problems.append(f"bitmap '{cp.name}' is missing on disk '{entry.name}'")
        elif reason := bitmap.usable_problem():
            problems.append(f"bitmap '{cp.name}' on disk '{entry.name}' {reason}")
    return problems


@dataclass
class PreparedCheckpoint:
    """A validated new checkpoint and the bitmap adds that will make it real."""

    definition: CheckpointDef
    actions: list[AddBitmap]


class CheckpointService:
    """The checkpoint tree of one domain: create, redefine, delete, inspect."""

    def __init__(
        self,
        ctx: DomainContext,
        store: CheckpointStore,
        codec: Codec,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._ctx = ctx
        self._store = store
        self._codec = codec
        self._clock = clock
        self._checkpoints: dict[str, Checkpoint] = {}
        self.current: str | None = None

    # ---- reading ----------------------------------------------------------------------------

    def names(self) -> list[str]:
        """Every checkpoint name, sorted."""
        return sorted(self._checkpoints)

    def get(self, name: str) -> Checkpoint | None:
        """The checkpoint called `name`, if any."""
        return self._checkpoints.get(name)

    def require(self, name: str) -> Checkpoint:
        """The checkpoint called `name`, or NotFound."""
        cp = self._checkpoints.get(name)
        if cp is None:
            raise NotFound(f"no checkpoint named '{name}'")
        return cp

    def children(self, name: str) -> list[str]:
        """Direct children of `name`, sorted."""
        return sorted(n for n, c in self._checkpoints.items() if c.parent == name)

    def descendants(self, name: str) -> list[str]:
        """All descendants of `name`, deepest first (the order to delete them in)."""
        out: list[str] = []
        for child in self.children(name):
            out.extend(self.descendants(child))
            out.append(child)
        return out

    async def problems(self, name: str) -> list[str]:
        """Why this checkpoint is broken, from the (briefly cached) live bitmaps."""
        cp = self.require(name)
        return checkpoint_problems(cp.definition, await self._ctx.info())

    async def xml(self, name: str) -> bytes:
        """`virsh checkpoint-dumpxml` output, with a comment when the checkpoint is broken."""
        cp = self.require(name)
        problems = await self.problems(name)
        comment = "broken: " + "; ".join(problems) if problems else None
        return self._codec.format_checkpoint(cp.definition, comment=comment)

    async def sizes(self, name: str) -> dict[str, int]:
        """Dirty bytes since the checkpoint, per disk whose bitmap is present and usable.

        With the bitmap on the top node only, its `count` is exactly what libvirt computes by
        merging the chain into a temporary bitmap, without the three extra QMP round trips.
        """
        cp = self.require(name)
        info = await self._ctx.info(max_age=0)
        sizes = {}
        for entry in cp.definition.bitmap_disks():
            disk = info.disk(entry.name)
            bitmap = disk.bitmap(name) if disk else None
            if bitmap is not None and bitmap.usable_problem() is None:
                sizes[entry.name] = bitmap.count
        return sizes

    # ---- loading and reconciliation ---------------------------------------------------------

    def load(self) -> None:
        """Read the stored metadata. Parents that do not exist are reported, not dropped."""
        defs, current = self._store.load(self._ctx.name)
        self._checkpoints = {d.name: Checkpoint(d) for d in defs if d.name}
        if current not in self._checkpoints:
            leaves = [n for n in self._checkpoints if not self.children(n)]
            current = leaves[0] if len(leaves) == 1 else None
        self.current = current

    async def recover(self, info: DomainInfo) -> list[tuple[str, str]]:
        """Finish or undo the checkpoint operations a crash interrupted; say what was done.

        Create: metadata written means it completed (only `current` may lag); otherwise its
        bitmaps, if the transaction ran, are removed. Redefine: one metadata write; only
        `current` may lag behind it. Delete: the bitmaps went in one
        transaction, so either they are all still there (nothing happened) or the metadata
        part is finished now.
        """
        done = []
        dom = self._ctx.name
        for key, intent in self._store.intents(dom).items():
            op = intent.get("op")
            if op == "checkpoint-create":
                name = intent["name"]
                if name in self._checkpoints:
                    self.current = name
                    self._store.set_current(dom, name)
                    done.append((f"checkpoints/{name}", f"completed interrupted create of {name}"))
                else:
                    stray = [
                        RemoveBitmap(disk.node, name)
                        for target in intent["disks"]
                        if (disk := info.disk(target)) is not None and disk.bitmap(name)
                    ]
                    if stray:
                        await self._ctx.qemu.transaction(stray)
                    done.append((f"checkpoints/{name}",
                                 f"undid interrupted create of {name} ({len(stray)} bitmaps)"))
            elif op == "checkpoint-redefine":
                name = intent["name"]
                if name in self._checkpoints and intent["current"]:
                    self.current = name
                    self._store.set_current(dom, name)
                    done.append((f"checkpoints/{name}",
                                 f"completed interrupted redefine of {name}"))
            elif op == "checkpoint-delete":
                victims = [v for v in intent["victims"] if v in self._checkpoints]
                still_there = not intent["metadata_only"] and any(
                    (disk := info.disk(target)) is not None and disk.bitmap(victim)
                    for target, victim in intent["bitmaps"]
                )
                if victims and not still_there:
                    self._forget(victims)
                    done.append(("checkpoints", f"completed interrupted delete of "
                                 f"{', '.join(victims)}"))
            else:
                continue  # not a checkpoint operation
            self._store.drop_intent(dom, key)
        if done:
            self._ctx.invalidate()
        return done

    def reconcile(self, info: DomainInfo) -> list[tuple[str, str]]:
        """Compare metadata with QEMU's bitmaps; return (path, message) for each disagreement."""
        findings = []
        for name, cp in sorted(self._checkpoints.items()):
            if cp.parent and cp.parent not in self._checkpoints:
                findings.append(
                    (f"checkpoints/{name}", f"parent '{cp.parent}' of '{name}' has no metadata")
                )
            for problem in checkpoint_problems(cp.definition, info):
                findings.append(
                    (f"checkpoints/{name}", f"checkpoint '{name}' is broken: {problem}")
                )
        for disk in info.disks:
            for bitmap in disk.bitmaps:
                if bitmap.name and bitmap.persistent and bitmap.name not in self._checkpoints:
                    findings.append(
                        (
                            "checkpoints",
                            f"bitmap '{bitmap.name}' on disk '{disk.target}' has no checkpoint "
                            "metadata (left alone; `redefine` can adopt it)",
                        )
                    )
        return findings

    # ---- creating ---------------------------------------------------------------------------

    async def create(self, document: bytes) -> str:
        """Create the checkpoint a `<domaincheckpoint>` document describes; return its name."""
        cp = self._codec.parse_checkpoint(document, redefine=False)
        name = cp.name or str(int(self._clock()))
        check_checkpoint_name(name)
        async with self._ctx.lock:
            await self._create(cp.with_(name=name))
        return name

    async def create_default(self, name: str) -> None:
        """`mkdir NAME`: every disk that can hold a bitmap gets one, the others `no`.

        On a domain none of whose disks can hold a bitmap (all raw, say) that is a checkpoint
        of no disk, which libvirt accepts too: a script that checkpoints every VM of a host the
        same way must not fail on such a VM.
        """
        check_checkpoint_name(name)
        async with self._ctx.lock:
            info = await self._ctx.info(max_age=0)
            disks = tuple(
                CheckpointDisk(d.target, BITMAP if d.bitmap_capable else NO) for d in info.disks
            )
            await self._create(CheckpointDef(name=name, disks=disks), info)

    async def _create(self, cp: CheckpointDef, info: DomainInfo | None = None) -> None:
        prepared = await self.prepare(cp, info)
        name = prepared.definition.name
        key = f"checkpoint-create-{name}"
        self._store.put_intent(self._ctx.name, key, {
            "op": "checkpoint-create", "name": name,
            "disks": [d.name for d in prepared.definition.bitmap_disks()],
        })
        try:
            fault_point("checkpoint.create.transaction")
            if prepared.actions:  # a checkpoint of no disk has no bitmap to add
                try:
                    await self._ctx.qemu.transaction(prepared.actions)
                except QmpCommandError as e:
                    raise translate_qmp(e) from None
                finally:
                    self._ctx.invalidate()
            try:
                fault_point("checkpoint.create.commit")
            except BaseException:
                # The bitmaps exist but no metadata will: remove them, or they would stay
                # behind with neither metadata nor intent (`commit` undoes its own failures).
                await self.undo(prepared)
                raise
            await self.commit(prepared)
            fault_point("checkpoint.create.done")
        finally:
            # Reached on success and after a rollback alike; only a crash leaves the intent.
            self._store.drop_intent(self._ctx.name, key)

    async def prepare(
        self, cp: CheckpointDef, info: DomainInfo | None = None
    ) -> PreparedCheckpoint:
        """Validate and align a new checkpoint; return it with the bitmap adds it needs.

        Nothing changes until the caller runs the actions (alone, or inside a backup's
        transaction) and then calls `commit`. The caller holds the domain lock throughout;
        `info`, when given, must have been fetched under it.
        """
        name = cp.name
        assert name
        if name in self._checkpoints:
            raise AlreadyExists(f"checkpoint '{name}' already exists")
        if info is None:
            info = await self._ctx.info(max_age=0)
        cp = align_checkpoint(cp, [d.ref() for d in info.disks])
        actions = []
        for entry in cp.bitmap_disks():
            if entry.bitmap != name:
                raise InvalidInput(
                    f"bitmap for disk '{entry.name}' must match checkpoint name '{name}'"
                )
            disk = info.disk(entry.name)
            assert disk is not None
            if problem := disk.bitmap_problem():
                raise NotSupported(problem)
            if disk.bitmap(name) is not None:
                raise AlreadyExists(f"disk '{disk.target}' already has a bitmap named '{name}'")
            actions.append(AddBitmap(disk.node, name))
        # No action at all (every disk `checkpoint='no'`) is accepted, as libvirt accepts it:
        # the checkpoint records no bitmap, `size` is empty, and it can parent others.
        cp = cp.with_(
            parent=self.current,
            creation_time=int(self._clock()),
            domain_xml=self._codec.format_domain(info),
        )
        return PreparedCheckpoint(cp, actions)

    async def commit(self, prepared: PreparedCheckpoint) -> None:
        """Record a checkpoint whose bitmaps now exist; on failure remove them again."""
        cp = prepared.definition
        assert cp.name
        try:
            self._store.save(self._ctx.name, cp)
            self._store.set_current(self._ctx.name, cp.name)
        except VcfsError:
            await self.undo(prepared)
            raise
        self._checkpoints[cp.name] = Checkpoint(cp)
        self.current = cp.name
        log.info("domain %s: created checkpoint %s", self._ctx.name, cp.name)

    async def undo(self, prepared: PreparedCheckpoint) -> None:
        """Remove the bitmaps (and any metadata) of a checkpoint that could not be committed."""
        cp = prepared.definition
        assert cp.name
        try:
            self._store.remove(self._ctx.name, cp.name)
            self._store.set_current(self._ctx.name, self.current)
        except VcfsError as e:
            log.error("domain %s: cannot roll back metadata of %s: %s", self._ctx.name,
                      cp.name, e)
        try:
            with trio.CancelScope(shield=True):  # a cancelled request must not strand them
                await self._ctx.qemu.transaction(
                    [RemoveBitmap(a.node, a.name) for a in prepared.actions]
                )
        except VcfsError as e:
            log.error("domain %s: cannot roll back bitmaps of %s: %s", self._ctx.name,
                      cp.name, e)
        self._ctx.invalidate()

    # ---- redefining -------------------------------------------------------------------------

    async def redefine(self, document: bytes) -> str:
        """Re-create (or update) metadata for bitmaps that already exist; always validates."""
        cp = self._codec.parse_checkpoint(document, redefine=True)
        assert cp.name
        name = check_checkpoint_name(cp.name)
        async with self._ctx.lock:
            info = await self._ctx.info(max_age=0)
            if cp.domain_xml is not None:
                uuid, disks = self._codec.parse_domain(cp.domain_xml)
                if uuid and info.uuid and uuid.lower() != info.uuid.lower():
                    raise InvalidInput(
                        f"definition for checkpoint {name} must use uuid {info.uuid}"
                    )
                cp = align_checkpoint(cp, disks)
            else:
                cp = fill_bitmap_names(cp)
            self._check_parent(name, cp.parent)
            problems = [
                f"missing or broken bitmap '{name}' for disk '{p}'"
                for p in self._invalid_bitmap_disks(cp, info)
            ]
            if problems:
                raise InvalidInput("; ".join(problems))
            # libvirt's rule: the first redefined checkpoint, or a child of the current one,
            # becomes current.
            becomes_current = self.current is None or cp.parent == self.current
            key = f"checkpoint-redefine-{name}"
            self._store.put_intent(self._ctx.name, key, {
                "op": "checkpoint-redefine", "name": name, "current": becomes_current})
            saved = done = False
            try:
                fault_point("checkpoint.redefine.metadata")
                self._store.save(self._ctx.name, cp)
                saved = True
                self._checkpoints[name] = Checkpoint(cp)
                fault_point("checkpoint.redefine.current")
                if becomes_current:
                    self._store.set_current(self._ctx.name, name)
                    self.current = name
                done = True
            finally:
                # Once the metadata is written the redefine is decided: a failure after it
                # leaves the intent, so the next start makes the checkpoint current too.
                if done or not saved:
                    self._store.drop_intent(self._ctx.name, key)
        log.info("domain %s: redefined checkpoint %s", self._ctx.name, name)
        return name

    def _check_parent(self, name: str, parent: str | None) -> None:
        if parent is None:
            return
        if parent == name:
            raise InvalidInput(f"checkpoint {name} cannot be its own parent")
        if parent not in self._checkpoints:
            raise NotFound(f"parent {parent} for checkpoint {name} not found")
        if parent in self.descendants(name):
            raise InvalidInput(f"parent {parent} would make a cycle with checkpoint {name}")

    @staticmethod
    def _invalid_bitmap_disks(cp: CheckpointDef, info: DomainInfo) -> list[str]:
        assert cp.name
        bad = []
        for entry in cp.bitmap_disks():
            disk = info.disk(entry.name)
            if disk is None:
                continue  # the disk left the domain: tolerated, as in libvirt
            bitmap = disk.bitmap(cp.name)
            if bitmap is None or bitmap.usable_problem() is not None:
                bad.append(entry.name)
        return bad

    # ---- deleting ---------------------------------------------------------------------------

    @staticmethod
    def parse_delete_modes(line: str) -> set[str]:
        """The modes in a line written to `<name>/delete`, validated."""
        modes = set(line.replace(",", " ").split())
        if not modes:
            raise InvalidInput("expected one or more of: children, children-only, metadata-only")
        unknown = modes - DELETE_MODES
        if unknown:
            raise InvalidInput(
                f"unknown delete mode '{sorted(unknown)[0]}': "
                "use children, children-only or metadata-only"
            )
        if {"children", "children-only"} <= modes:
            raise InvalidInput("children and children-only are mutually exclusive")
        return modes

    async def delete(self, name: str, modes: Iterable[str] = ()) -> None:
        """Delete a checkpoint (and/or its descendants); all or nothing."""
        modes = set(modes)
        async with self._ctx.lock:
            self.require(name)
            victims = []
            if modes & {"children", "children-only"}:
                victims = self.descendants(name)
            if "children-only" not in modes:
                victims.append(name)
            if not victims:
                return
            key = f"checkpoint-delete-{name}"
            self._store.put_intent(self._ctx.name, key, {
                "op": "checkpoint-delete", "victims": victims,
                "metadata_only": "metadata-only" in modes,
                "bitmaps": [[d.name, v] for v in victims
                            for d in self._checkpoints[v].definition.bitmap_disks()],
            })
            removed = done = False
            try:
                fault_point("checkpoint.delete.transaction")
                if "metadata-only" not in modes:
                    removed = await self._remove_bitmaps(victims)
                fault_point("checkpoint.delete.metadata")
                self._forget(victims)
                fault_point("checkpoint.delete.done")
                done = True
            finally:
                # Bitmaps cannot be put back: once they are gone the delete is decided, and a
                # failure after it leaves the intent, so the next start finishes the metadata.
                if done or not removed:
                    self._store.drop_intent(self._ctx.name, key)
        log.info("domain %s: deleted checkpoint(s) %s", self._ctx.name, ", ".join(victims))

    async def _remove_bitmaps(self, victims: list[str]) -> bool:
        """Remove the victims' bitmaps in one transaction; whether there were any."""
        info = await self._ctx.info(max_age=0)
        actions, missing = [], []
        for victim in victims:
            for entry in self._checkpoints[victim].definition.bitmap_disks():
                disk = info.disk(entry.name)
                if disk is None:
                    continue
                if disk.bitmap(victim) is None:
                    missing.append(f"bitmap '{victim}' not found on disk '{entry.name}'")
                else:
                    actions.append(RemoveBitmap(disk.node, victim))
        if missing:
            raise NotFound(
                "; ".join(missing)
                + ": nothing was deleted (write metadata-only to `delete` to drop the metadata "
                "of a broken checkpoint)"
            )
        if not actions:
            return False  # a checkpoint of no disk (or whose disks all left): no bitmap
        try:
            await self._ctx.qemu.transaction(actions)
        finally:
            self._ctx.invalidate()
        return True

    def _forget(self, victims: list[str]) -> None:
        """Drop metadata of `victims`: survivors re-parent first, then files go, then current."""
        gone = set(victims)

        def surviving_ancestor(n: str | None) -> str | None:
            while n is not None and n in gone:
                n = self._checkpoints[n].parent
            return n

        for n, cp in self._checkpoints.items():
            if n not in gone and cp.parent in gone:
                new_def = cp.definition.with_(parent=surviving_ancestor(cp.parent))
                self._store.save(self._ctx.name, new_def)
                cp.definition = new_def
        for victim in victims:
            self._store.remove(self._ctx.name, victim)
        if self.current in gone:
            self.current = surviving_ancestor(self.current)
            self._store.set_current(self._ctx.name, self.current)
        for victim in victims:
            del self._checkpoints[victim]
