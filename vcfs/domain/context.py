"""What a domain's services share: the QMP port, the lock, briefly cached facts, the spawner.

The checkpoint and backup services receive this context instead of a back-reference to the
`Domain` that owns them, so they import nothing above themselves and run over fakes alone.
Thread rule: trio tasks only.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import trio

from vcfs.domain.model import DomainInfo
from vcfs.domain.ports import LocalSystem, Qemu

INFO_TTL = 0.5
"""How long a DomainInfo is reused: disk changes show within a second, yet a burst of reads
costs one round trip."""

Spawner = Callable[..., None]
"""`spawn(async_fn, *args)`: start a background task that lives as long as the mount."""


class DomainContext:
    """One running QEMU as its services see it."""

    def __init__(
        self,
        name: str,
        qemu: Qemu,
        spawn: Spawner,
        system: LocalSystem,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.qemu = qemu
        self.spawn = spawn
        self.system = system
        self.lock = trio.Lock()
        """Held by every mutation of the domain (checkpoints and backups alike)."""
        self._clock = clock
        self._info: DomainInfo | None = None
        self._info_at = 0.0

    async def info(self, max_age: float = INFO_TTL) -> DomainInfo:
        """The domain's disks and bitmaps, at most `max_age` seconds old."""
        now = self._clock()
        if self._info is None or now - self._info_at >= max_age:
            self._info = await self.qemu.domain_info(self.name)
            self._info_at = now
        return self._info

    def invalidate(self) -> None:
        """Forget the cached info: QEMU's state was just changed."""
        self._info = None


