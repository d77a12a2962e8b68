"""The host (a directory of QMP sockets) and its domains.

Every socket `NAME.qmp` in the host directory is the monitor of one running QEMU, shown as domain
NAME. A background task rescans every second: new sockets are connected and reconciled, domains
whose socket vanished or whose connection dropped are removed. A listing of the root also
rescans, so a new VM shows up at the next `ls`.
Thread rule: trio tasks only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio

from vcfs.domain.backups import BackupService, ExportOpener
from vcfs.domain.backups.service import CBW_TIMEOUT
from vcfs.domain.checkpoints import CheckpointService
from vcfs.domain.context import INFO_TTL, DomainContext, Spawner
from vcfs.domain.errorlog import ErrorLog
from vcfs.domain.model import DomainInfo
from vcfs.domain.ports import CheckpointStore, Codec, LocalSystem, Qemu
from vcfs.domain.reader import BlockCache
from vcfs.errors import VcfsError

log = logging.getLogger(__name__)

SCAN_INTERVAL = 1.0
RETRY_FAILED_AFTER = 10.0
"""A socket nobody answers on (stale, or held by another client) is retried this rarely,
unless it is replaced by a new socket file."""


@dataclass
class Environment:
    """What every domain's services need from the composition root."""

    store: CheckpointStore
    codec: Codec
    runtime_dir: Path
    scratch_dir: Path
    open_export: ExportOpener
    system: LocalSystem
    """Files, sockets and ports of the host OS."""
    tls_dir: Path | None = None
    """x509 credentials for backup NBD servers with `tls='yes'`."""
    cache: BlockCache = field(default_factory=BlockCache)
    """Image blocks of every backup view of the mount, within one memory budget."""
    cbw_timeout: int = CBW_TIMEOUT
    """Seconds a backup's copy-before-write may hold a guest write (`--cbw-timeout`)."""
    scratch_limit: int | None = None
    """Bytes of scratch one disk of a backup may use (`--scratch-limit`); None: no limit."""
    preserve_shutdown: bool = False
    """A guest shutting down during a backup pauses instead (`--preserve-shutdown`)."""


class Domain:
    """One running QEMU: its monitor, briefly cached info, checkpoints, backups, error log.

    Composes the services over one `DomainContext`; they never call back into the Domain."""

    def __init__(self, name: str, qemu: Qemu, env: Environment, spawn: Spawner) -> None:
        self.name = name
        self.qemu = qemu
        self._codec = env.codec
        self.context = DomainContext(name, qemu, spawn, env.system)
        self.errors = ErrorLog()
        self.checkpoints = CheckpointService(self.context, env.store, env.codec)
        self.backups = BackupService(
            self.context, self.checkpoints, env.store, env.codec, env.runtime_dir,
            env.scratch_dir, env.open_export, env.tls_dir, env.cache, self.report,
            env.cbw_timeout, env.scratch_limit, env.preserve_shutdown,
        )
        self.created = time.time()
        self.socket_ino = 0

    @property
    def connected(self) -> bool:
        """Whether its QMP connection is still up (False once QEMU went away)."""
        return not self.qemu.closed

    async def xml(self) -> bytes:
        """The domain as libvirt-style `<domain>` XML (`<dom>/xml`)."""
        return self._codec.format_domain(await self.info())

    async def info(self, max_age: float = INFO_TTL) -> DomainInfo:
        """The domain's disks and bitmaps, at most `max_age` seconds old."""
        return await self.context.info(max_age)

    def invalidate(self) -> None:
        """Forget the cached info: QEMU's state was just changed."""
        self.context.invalidate()

    async def start(self) -> None:
        """Load metadata, finish or undo what a crash interrupted, report disagreements."""
        self.checkpoints.load()
        info = await self.info(max_age=0)
        recovered = await self.checkpoints.recover(info)
        recovered += await self.backups.recover(info)
        for path, message in recovered:
            log.warning("domain %s: %s: %s", self.name, path, message)
            self.errors.add(path, "RECOVER", message)
        if not self.connected:
            return  # recovery completed a shutdown the guest began (--preserve-shutdown)
        if recovered:
            info = await self.info(max_age=0)
        for path, message in self.checkpoints.reconcile(info):
            log.warning("domain %s: %s: %s", self.name, path, message)
            self.errors.add(path, "RECONCILE", message)

    def report(self, path: str, code: str, message: str) -> None:
        """Record a failed request in `errors` and the log."""
        log.warning("domain %s: %s: %s %s", self.name, path, code, message)
        self.errors.add(path, code, message)


Connector = Callable[[Path], Awaitable[Qemu]]


class Host:
    """The set of domains behind a directory of QMP sockets."""

    def __init__(self, path: Path, connect: Connector, env: Environment) -> None:
        self.path = path
        self._connect = connect
        self._env = env
        self._nursery: trio.Nursery | None = None
        self._domains: dict[str, Domain] = {}
        self._failed: dict[str, tuple[int, float]] = {}
        self._lock = trio.Lock()
        self._scanned_at = -1e9

    def names(self) -> list[str]:
        """The names of the domains currently shown."""
        return sorted(self._domains)

    def get(self, name: str) -> Domain | None:
        """The domain called `name`, if it is connected."""
        return self._domains.get(name)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Scan now, report ready, then rescan every second until cancelled.

        Background tasks of the domains (push-job watchers, read prefetches) run in this task's
        nursery, so they end with the mount.
        """
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await self.scan()
            task_status.started()
            while True:
                await trio.sleep(SCAN_INTERVAL)
                await self.scan()

    def _spawn(self, fn: Callable[..., Awaitable[object]], *args: object) -> None:
        assert self._nursery is not None, "Host.run() is not running"
        self._nursery.start_soon(fn, *args)

    async def refresh(self, max_age: float = 0.5) -> None:
        """Rescan unless a scan finished less than `max_age` seconds ago."""
        if trio.current_time() - self._scanned_at > max_age:
            await self.scan()

    async def scan(self) -> None:
        """Bring the set of domains in line with the sockets in the host directory."""
        async with self._lock:
            sockets = self._sockets()
            for name, dom in list(self._domains.items()):
                if dom.qemu.closed:
                    dom.backups.qemu_gone()
                gone = name not in sockets or dom.qemu.closed
                # A domain whose QEMU died with a backup job stays, so that the job's failed
                # status can be read, until the job is removed or the VM comes back.
                if gone and dom.backups.names() and sockets.get(name) in (None, dom.socket_ino):
                    continue
                if gone:
                    log.info("domain %s: gone", name)
                    del self._domains[name]
                    await dom.backups.abandon()
                    await dom.qemu.close()
            now = trio.current_time()
            todo = []
            for name, ino in sockets.items():
                if name in self._domains:
                    continue
                failed = self._failed.get(name)
                if failed and failed[0] == ino and now - failed[1] < RETRY_FAILED_AFTER:
                    continue
                todo.append((name, ino))
            if todo:
                async with trio.open_nursery() as nursery:
                    for name, ino in todo:
                        nursery.start_soon(self._add, name, ino)
            self._scanned_at = trio.current_time()

    def _sockets(self) -> dict[str, int]:
        """Domain name -> inode of its `NAME.qmp` socket."""
        found = self._env.system.sockets(str(self.path))
        return {n[: -len(".qmp")]: ino for n, ino in found.items() if n.endswith(".qmp")}

    async def _add(self, name: str, ino: int) -> None:
        try:
            qemu = await self._connect(self.path / f"{name}.qmp")
        except VcfsError as e:
            log.debug("domain %s: not connected: %s", name, e)
            self._failed[name] = (ino, trio.current_time())
            return
        dom = Domain(name, qemu, self._env, self._spawn)
        dom.socket_ino = ino
        try:
            await dom.start()
        except VcfsError as e:
            log.warning("domain %s: cannot start: %s", name, e)
            self._failed[name] = (ino, trio.current_time())
            await qemu.close()
            return
        self._failed.pop(name, None)
        self._domains[name] = dom
        log.info("domain %s: connected", name)

    async def close(self) -> None:
        """Disconnect every domain."""
        for dom in self._domains.values():
            await dom.backups.abandon()
            await dom.qemu.close()
        self._domains.clear()
