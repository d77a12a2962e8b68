"""A libvirt connection as the mount's host: every domain of it is a directory.

Domains appear and vanish with libvirt's lifecycle events (each event triggers a rescan at
once), and a rescan every `SCAN_INTERVAL` catches what an event cannot tell: checkpoints made
with `virsh`, a connection lost and reopened. Inactive persistent domains are listed too, with
their checkpoints (what libvirt allows offline, vcfs allows). After a reconnection every domain
re-reads its checkpoints and adopts the backup libvirt still runs.
Thread rule: trio tasks only (libvirt's calls go through `Connection`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

import libvirt
import trio

from vcfs.adapters.virt.backups import LibvirtBackups
from vcfs.adapters.virt.checkpoints import LibvirtCheckpoints
from vcfs.adapters.virt.connection import Connection, Event
from vcfs.domain.backups.service import CBW_TIMEOUT
from vcfs.domain.errorlog import ErrorLog
from vcfs.domain.host import Environment
from vcfs.errors import VcfsError

log = logging.getLogger(__name__)

SCAN_INTERVAL = 2.0
RECONNECT_INTERVAL = 1.0


class LibvirtDomain:
    """One domain of the connection (the tree's `DomainApi`)."""

    def __init__(self, conn: Connection, name: str, uuid: str, env: Environment,
                 spawn: Callable[..., None], remote_host: str | None = None) -> None:
        self.name = name
        self.uuid = uuid
        self._conn = conn
        self.created = time.time()
        self.errors = ErrorLog()
        self.active = False
        # One change at a time per domain, checkpoints and backups alike: libvirt would make
        # the second wait for its job lock (up to 30 s) where vcfs answers at once.
        lock = trio.Lock()
        self.checkpoints = LibvirtCheckpoints(conn, uuid, lock)
        self.backups = LibvirtBackups(conn, uuid, name, lock, env, spawn, self.report,
                                      self.checkpoints, remote_host)

    @property
    def connected(self) -> bool:
        """Whether the host's connection to libvirtd is up (the domain may be stopped)."""
        return self._conn.alive

    async def xml(self) -> bytes:
        """libvirt's own `<domain>` document of it (live when it runs)."""
        xml = await self._conn.on_domain(self.uuid, lambda dom: dom.XMLDesc(0), "domain XML")
        return str(xml).encode()

    def report(self, path: str, code: str, message: str) -> None:
        log.warning("domain %s: %s: %s %s", self.name, path, code, message)
        self.errors.add(path, code, message)

    async def sync(self) -> None:
        """Re-read checkpoints; adopt (or notice the end of) a backup job."""
        await self.checkpoints.resync()
        await self.backups.adopt()


class LibvirtHost:
    """The domains of one libvirt URI (the mount's `Backend`)."""

    def __init__(self, uri: str, env: Environment) -> None:
        self.uri = uri
        self._env = env
        self._remote_host = urlsplit(uri).hostname
        """None for a local URI (`qemu:///system`)."""
        # These shape vcfs's own fleecing over QMP; libvirt fleeces by its own rules.
        ignored = [option for option, given in (
            ("--cbw-timeout", env.cbw_timeout != CBW_TIMEOUT),
            ("--scratch-limit", env.scratch_limit is not None),
            ("--preserve-shutdown", env.preserve_shutdown)) if given]
        if ignored:
            log.warning("%s: %s apply to QMP hosts only: libvirt runs its backups its own way",
                        uri, ", ".join(ignored))
        self._conn = Connection(uri, self._event)
        self._domains: dict[str, LibvirtDomain] = {}
        self._lock = trio.Lock()
        self._wake = trio.Event()
        self._scanned_at = -1e9
        self._nursery: trio.Nursery | None = None

    def names(self) -> list[str]:
        return sorted(self._domains)

    def get(self, name: str) -> LibvirtDomain | None:
        return self._domains.get(name)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect and scan, report ready, then rescan on events and every few seconds."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await self._conn.open()
            await self.scan()
            task_status.started()
            while True:
                with trio.move_on_after(SCAN_INTERVAL if self._conn.alive
                                        else RECONNECT_INTERVAL):
                    await self._wake.wait()
                self._wake = trio.Event()
                await self.scan()

    def _spawn(self, fn: Callable[..., Awaitable[object]], *args: object) -> None:
        """Start a background task in the host's nursery; none once the mount is ending (an
        event can still arrive while `close` ends the jobs)."""
        if self._nursery is None:
            return
        try:
            self._nursery.start_soon(fn, *args)
        except RuntimeError:  # the nursery is closed: the mount is ending
            log.debug("not starting %s: the host is closing", fn)

    def _event(self, event: Event) -> None:
        """A domain event from libvirt (in the trio thread): rescan now; hand a finished
        job to its domain's backups. Never raises: it runs as a trio callback, where an
        exception would end the whole mount."""
        try:
            kind, uuid, details = event
            if kind == "job-completed":
                for dom in list(self._domains.values()):
                    if dom.uuid == uuid:
                        dom.backups.job_completed(details)
            self._wake.set()
        except Exception:
            log.exception("%s: handling libvirt event %s", self.uri, event[0])

    async def refresh(self, max_age: float = 0.5) -> None:
        """The tree's rescan (a listing of the root): the list of domains only, one call;
        the periodic scan re-reads what the domains hold."""
        if trio.current_time() - self._scanned_at > max_age:
            await self.scan(full=False)

    async def scan(self, full: bool = True) -> None:
        """Bring the domains in line with libvirt's list; reconnect first if needed.

        New domains read their checkpoints and backup at once; with `full`, every domain
        does (concurrently: a fleet's hypervisor has many)."""
        async with self._lock:
            if not self._conn.alive:
                if not full:
                    # A listing must not wait for a libvirtd that may hang in connect: the
                    # background scan reconnects; meanwhile the domains known stay shown.
                    return
                try:
                    await self._conn.open()
                    log.info("%s: reconnected", self.uri)
                except VcfsError as e:
                    log.debug("%s: still not connected: %s", self.uri, e)
                    self._scanned_at = trio.current_time()
                    return
            try:
                found = await self._conn.call(_list_domains, "list domains")
            except VcfsError as e:
                log.warning("%s: cannot list domains: %s", self.uri, e)
                self._scanned_at = trio.current_time()
                return
            for name, known in list(self._domains.items()):
                if name not in found or found[name][0] != known.uuid:
                    log.info("domain %s: gone", name)
                    del self._domains[name]
                    known.backups.domain_gone()
                    await known.backups.abandon()
            todo = []
            for name, (uuid, active) in found.items():
                dom = self._domains.get(name)
                if dom is None:
                    dom = LibvirtDomain(self._conn, name, uuid, self._env, self._spawn,
                                        self._remote_host)
                    log.info("domain %s: found (%s)", name, "running" if active else "inactive")
                    todo.append(dom)
                elif full:
                    todo.append(dom)
                if dom.active and not active:
                    dom.backups.domain_gone()
                dom.active = active
            async with trio.open_nursery() as nursery:
                for dom in todo:
                    nursery.start_soon(self._sync, dom)
            for dom in todo:  # shown once they know their checkpoints
                self._domains.setdefault(dom.name, dom)
            self._scanned_at = trio.current_time()

    @staticmethod
    async def _sync(dom: LibvirtDomain) -> None:
        try:
            await dom.sync()
        except VcfsError as e:
            log.warning("domain %s: %s", dom.name, e)

    async def close(self) -> None:
        """End every backup job vcfs runs, then close the connection."""
        for dom in self._domains.values():
            await dom.backups.abandon()
        self._domains.clear()
        await self._conn.close()


def _list_domains(conn: libvirt.virConnect) -> dict[str, tuple[str, bool]]:
    """name -> (uuid, running), for every domain of the connection."""
    return {d.name(): (d.UUIDString(), bool(d.isActive())) for d in conn.listAllDomains(0)}
