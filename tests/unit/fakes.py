"""Fakes of the domain ports for unit tests of pure logic (never instead of real QEMU tests)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, NoReturn

from vcfs.adapters import xmlcodec
from vcfs.adapters.codec import XmlCodec
from vcfs.domain.host import Domain, Environment
from vcfs.domain.model import Bitmap, CheckpointDef, Disk, DomainInfo
from vcfs.domain.ports import Action, AddBitmap, RemoveBitmap
from vcfs.errors import NoSpace, QmpCommandError


def disk(target: str, driver: str = "qcow2", **kw: object) -> Disk:
    """A disk as QEMU would report it."""
    kw.setdefault("qcow2_v3", driver == "qcow2")
    return Disk(target=target, node=f"{target}-format", driver=driver,
                source=f"/img/{target}.{driver}", size=1 << 26, **kw)  # type: ignore[arg-type]


class FakeQemu:
    """An in-memory QEMU: disks with bitmaps, atomic transactions, QEMU's refusals."""

    def __init__(self, disks: Sequence[Disk], uuid: str | None = None) -> None:
        self.disks = {d.node: d for d in disks}
        self.order = [d.node for d in disks]
        self.uuid = uuid
        self.transactions: list[list[Action]] = []
        self.closed = False
        self.fail_next: str | None = None

    async def domain_info(self, name: str) -> DomainInfo:
        return DomainInfo(name, self.uuid, tuple(self.disks[n] for n in self.order))

    async def transaction(self, actions: Sequence[Action]) -> None:
        if self.fail_next:
            msg, self.fail_next = self.fail_next, None
            raise QmpCommandError("transaction", "GenericError", msg)
        new = dict(self.disks)
        for a in actions:
            d = new[a.node]
            names = [b.name for b in d.bitmaps]
            if isinstance(a, AddBitmap):
                if a.name in names:
                    raise QmpCommandError("transaction", "GenericError",
                                          f"Bitmap already exists: {a.name}")
                if a.persistent and not d.qcow2_v3:
                    raise QmpCommandError("transaction", "GenericError",
                                          "Cannot store dirty bitmaps in qcow2 v2 files")
                new[a.node] = replace(d, bitmaps=(*d.bitmaps, Bitmap(a.name)))
            elif isinstance(a, RemoveBitmap):
                if a.name not in names:
                    raise QmpCommandError("transaction", "GenericError",
                                          f"Dirty bitmap '{a.name}' not found")
                new[a.node] = replace(d, bitmaps=tuple(b for b in d.bitmaps if b.name != a.name))
        self.disks = new
        self.transactions.append(list(actions))

    def bitmap_names(self, target: str) -> list[str | None]:
        return [b.name for b in self.disks[f"{target}-format"].bitmaps]

    def set_bitmaps(self, target: str, *bitmaps: Bitmap) -> None:
        node = f"{target}-format"
        self.disks[node] = replace(self.disks[node], bitmaps=bitmaps)

    async def close(self) -> None:
        self.closed = True


class FakeStore:
    """An in-memory checkpoint store that round-trips through the real codec."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.current: str | None = None
        self.fail_saves = False
        self.pending: dict[str, dict[str, Any]] = {}

    def load(self, domain: str) -> tuple[list[CheckpointDef], str | None]:
        return [xmlcodec.parse_checkpoint(x, redefine=True) for x in self.files.values()], \
            self.current

    def save(self, domain: str, checkpoint: CheckpointDef) -> None:
        if self.fail_saves:
            raise NoSpace("cannot write metadata: no space left")
        assert checkpoint.name
        self.files[checkpoint.name] = xmlcodec.format_checkpoint(checkpoint)

    def remove(self, domain: str, name: str) -> None:
        self.files.pop(name, None)

    def set_current(self, domain: str, name: str | None) -> None:
        self.current = name

    def put_intent(self, domain: str, key: str, intent: dict[str, Any]) -> None:
        self.pending[key] = intent

    def intents(self, domain: str) -> dict[str, dict[str, Any]]:
        return dict(self.pending)

    def drop_intent(self, domain: str, key: str) -> None:
        self.pending.pop(key, None)


def environment(store: FakeStore | None = None) -> Environment:
    """The services' environment with fakes where I/O would be."""

    def no_export(*args: object) -> NoReturn:
        raise AssertionError("unit tests open no NBD export")

    return Environment(store or FakeStore(), XmlCodec(), Path("/nonexistent/run"),
                       Path("/nonexistent/scratch"), no_export)


def make_domain(qemu: FakeQemu, store: FakeStore | None = None) -> Domain:
    """A Domain over fakes; background tasks are refused (unit tests spawn none)."""

    def no_spawn(*args: object) -> NoReturn:
        raise AssertionError("unit tests spawn no background task")

    return Domain("vm1", qemu, environment(store), no_spawn)
