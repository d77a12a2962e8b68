"""The ports the domain services depend on, and the typed QMP actions they issue.

Adapters implement these Protocols; unit tests implement them with fakes. Every method is a trio
coroutine unless it says otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from vcfs.domain.model import CheckpointDef, DiskRef, DomainInfo


@dataclass(frozen=True)
class AddBitmap:
    """`block-dirty-bitmap-add` as a transaction action."""

    node: str
    name: str
    persistent: bool = True
    disabled: bool = False
    granularity: int | None = None


@dataclass(frozen=True)
class RemoveBitmap:
    """`block-dirty-bitmap-remove` as a transaction action."""

    node: str
    name: str


Action = AddBitmap | RemoveBitmap


class Qemu(Protocol):
    """One running QEMU, reached over its QMP monitor."""

    @property
    def closed(self) -> bool:
        """True once the connection is gone (QEMU quit or the socket closed)."""
        ...

    async def domain_info(self, name: str) -> DomainInfo:
        """The domain's identity, disks and bitmaps, fresh from QEMU."""
        ...

    async def transaction(self, actions: Sequence[Action]) -> None:
        """Run the actions atomically; raise QmpCommandError if QEMU refuses them."""
        ...

    async def close(self) -> None:
        """Drop the connection. Never raises."""
        ...


class CheckpointStore(Protocol):
    """Crash-safe persistence of checkpoint metadata, per domain. Synchronous: small files."""

    def load(self, domain: str) -> tuple[list[CheckpointDef], str | None]:
        """Every stored checkpoint of the domain, and the stored current checkpoint's name."""
        ...

    def save(self, domain: str, checkpoint: CheckpointDef) -> None:
        """Write (or replace) one checkpoint's metadata; durable when this returns."""
        ...

    def remove(self, domain: str, name: str) -> None:
        """Forget one checkpoint's metadata; durable when this returns."""
        ...

    def set_current(self, domain: str, name: str | None) -> None:
        """Record which checkpoint is current (None: no current)."""
        ...


class Codec(Protocol):
    """The XML codec: documents in and out. Pure functions, any thread."""

    def document_complete(self, data: bytes) -> bool: ...

    def parse_checkpoint(self, data: bytes, *, redefine: bool) -> CheckpointDef: ...

    def format_checkpoint(
        self, cp: CheckpointDef, *, include_domain: bool = True, comment: str | None = None
    ) -> bytes: ...

    def format_domain(self, info: DomainInfo) -> bytes: ...

    def parse_domain(self, domain_xml: bytes) -> tuple[str | None, list[DiskRef]]: ...
