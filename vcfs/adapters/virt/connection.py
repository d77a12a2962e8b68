"""One libvirt connection per host: events, keepalive, reconnection, and calls with deadlines.

libvirt's calls block, so each runs in a worker thread (`trio.to_thread`) under a deadline: the
kernel cannot interrupt a FUSE handler, and a libvirtd that stops answering must cost a request
an EIO, not hang it. libvirt's objects are thread-safe; a `virDomain` handle is only a name and a
uuid that the daemon looks up at each call, so handles are cached per connection.

Events (domain lifecycle, job completed, connection closed) need libvirt's default event loop:
registered once per process before the first connection, and run by one daemon thread. Its
callbacks hand each event to the trio loop (`TrioToken.run_sync_soon`). The keepalive makes a
vanished daemon show as a closed connection within `KEEPALIVE_INTERVAL * (KEEPALIVE_COUNT + 1)`
seconds even when vcfs sends nothing.
Thread rule: `Connection`'s coroutines run in trio tasks; `fn`s given to `call` run in worker
threads; callbacks run in the event thread and only schedule work on the trio loop.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import libvirt
import trio

from vcfs.adapters.virt.errors import is_connection_lost, translate
from vcfs.errors import BackendError, Disconnected

log = logging.getLogger(__name__)

T = TypeVar("T")

CALL_TIMEOUT = 30.0
"""Deadline of one libvirt call. libvirt itself waits up to 30 s for a domain's job lock, but
vcfs serialises its own requests per domain and refuses a second backup before asking."""
KEEPALIVE_INTERVAL = 5
KEEPALIVE_COUNT = 3
KEEPALIVE_ENV = "VCFS_LIBVIRT_KEEPALIVE"
"""`INTERVAL,COUNT` instead of the above: the tests' hung libvirtd is given up in seconds."""


def keepalive() -> tuple[int, int]:
    """(interval, count) of the keepalive: libvirt closes the connection after
    interval * (count + 1) seconds without an answer."""
    interval, _, count = os.environ.get(KEEPALIVE_ENV, "").partition(",")
    if interval.isdigit() and count.isdigit():
        return int(interval), int(count)
    return KEEPALIVE_INTERVAL, KEEPALIVE_COUNT
THREADS = 1
"""libvirt calls in flight at once, all domains of the host together: one. libvirt 9.0's
client crashes the process (SIGSEGV in libvirt.so) when its keepalive closes a connection
while a second call waits on it (measured: libvirtd stopped with SIGSTOP, two calls in flight,
the process dies when libvirtd resumes; one call in flight gets its error after the keepalive's
20 s and nothing breaks). Calls take a millisecond or so; the FUSE requests that need one wait
their turn. A call abandoned at its deadline keeps its turn until libvirt returns it, so a hung
libvirtd costs every later call its deadline (EIO), and never a second call in flight."""

Event = tuple[str, str, dict[str, Any]]
"""(kind, domain uuid, details): kind is `lifecycle` or `job-completed`."""

_loop_lock = threading.Lock()
_loop_started = False


def _start_event_loop() -> None:
    """Register libvirt's default event loop and run it in a daemon thread (once a process)."""
    global _loop_started
    with _loop_lock:
        if _loop_started:
            return
        # Errors reach vcfs as exceptions; libvirt's default handler would print each on stderr.
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
        libvirt.virEventRegisterDefaultImpl()
        threading.Thread(target=_run_events, name="libvirt-events", daemon=True).start()
        _loop_started = True


def _run_events() -> None:
    while True:
        if libvirt.virEventRunDefaultImpl() < 0:
            log.error("libvirt event loop failed; retrying")
            time.sleep(1)


class Connection:
    """The connection to one libvirt URI, reopened when libvirtd comes back."""

    def __init__(self, uri: str, on_event: Callable[[Event], None]) -> None:
        self.uri = uri
        self._on_event = on_event
        """Called in the trio thread for each domain event."""
        self._conn: libvirt.virConnect | None = None
        self._domains: dict[str, libvirt.virDomain] = {}
        self._token: trio.lowlevel.TrioToken | None = None
        self._limiter = trio.CapacityLimiter(THREADS)

    @property
    def alive(self) -> bool:
        """Whether the connection is open (False after libvirtd went away, until reopened)."""
        return self._conn is not None

    async def open(self, timeout: float = CALL_TIMEOUT) -> None:
        """Connect (or reconnect), with keepalive and the event callbacks registered."""
        _start_event_loop()
        self._token = trio.lowlevel.current_trio_token()
        try:
            with trio.fail_after(timeout):
                conn = await trio.to_thread.run_sync(self._open, abandon_on_cancel=True,
                                                     limiter=self._limiter)
        except trio.TooSlowError:
            raise BackendError(f"{self.uri}: libvirt did not answer in {timeout:.0f} s") from None
        except libvirt.libvirtError as e:
            raise BackendError(f"{self.uri}: {translate(e)}") from None
        self._conn = conn
        self._domains = {}

    def _open(self) -> libvirt.virConnect:
        conn = libvirt.open(self.uri)
        try:
            conn.setKeepAlive(*keepalive())
            conn.registerCloseCallback(self._closed, None)
            conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
                                        self._lifecycle, None)
            conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_JOB_COMPLETED,
                                        self._job_completed, None)
        except libvirt.libvirtError:
            conn.close()
            raise
        return conn

    # ---- event thread -----------------------------------------------------------------------

    def _post(self, event: Event) -> None:
        if self._token is None:
            return
        try:
            self._token.run_sync_soon(self._on_event, event)
        except trio.RunFinishedError:
            pass  # the mount is ending

    def _lifecycle(self, _conn: object, dom: libvirt.virDomain, event: int, detail: int,
                   _opaque: object) -> None:
        self._post(("lifecycle", dom.UUIDString(), {"event": event, "detail": detail}))

    def _job_completed(self, _conn: object, dom: libvirt.virDomain, params: dict[str, Any],
                       _opaque: object) -> None:
        self._post(("job-completed", dom.UUIDString(), dict(params)))

    def _closed(self, conn: libvirt.virConnect, reason: int, _opaque: object) -> None:
        log.warning("%s: connection closed (reason %d)", self.uri, reason)
        if self._token is not None:
            try:
                self._token.run_sync_soon(self._lost, conn)
            except trio.RunFinishedError:
                pass

    # ---- trio side --------------------------------------------------------------------------

    def _lost(self, conn: libvirt.virConnect | None = None) -> None:
        """Forget a connection that is gone (the host reopens it at its next scan)."""
        if conn is not None and conn is not self._conn:
            return  # an older connection's late close callback
        if self._conn is not None:
            log.warning("%s: lost the connection to libvirtd", self.uri)
        self._conn = None
        self._domains = {}

    async def call(self, fn: Callable[[libvirt.virConnect], T], what: str,
                   timeout: float = CALL_TIMEOUT) -> T:
        """`fn(connection)` in a worker thread, under a deadline; libvirt's errors translated."""
        conn = self._conn
        if conn is None:
            raise Disconnected(f"not connected to {self.uri}")

        def run() -> T:
            try:
                return fn(conn)
            except libvirt.libvirtError as e:
                # After a keepalive timeout libvirt 9.0 answers every call with "internal
                # error: client socket is closed" and calls no close callback (measured): ask
                # the connection itself, a local check.
                try:
                    e.vcfs_connection_dead = not conn.isAlive()
                except libvirt.libvirtError:
                    e.vcfs_connection_dead = True
                raise

        try:
            with trio.fail_after(timeout):
                return await trio.to_thread.run_sync(run, abandon_on_cancel=True,
                                                     limiter=self._limiter)
        except trio.TooSlowError:
            raise BackendError(f"libvirt did not answer {what} in {timeout:g} s") from None
        except libvirt.libvirtError as e:
            if is_connection_lost(e) or getattr(e, "vcfs_connection_dead", False):
                self._lost(conn)
            raise translate(e) from None

    async def on_domain(self, uuid: str, fn: Callable[[libvirt.virDomain], T], what: str,
                        timeout: float = CALL_TIMEOUT) -> T:
        """`fn(domain)` for the domain with this uuid (see `call`)."""
        def run(conn: libvirt.virConnect) -> T:
            dom = self._domains.get(uuid)
            if dom is None:
                dom = conn.lookupByUUIDString(uuid)
                if conn is self._conn:
                    self._domains[uuid] = dom
            return fn(dom)

        return await self.call(run, what, timeout)

    async def close(self) -> None:
        """Close the connection. Never raises."""
        conn, self._conn = self._conn, None
        self._token = None
        if conn is None:
            return
        def close_blocking() -> None:
            try:
                conn.unregisterCloseCallback()
            except libvirt.libvirtError:
                pass
            try:
                conn.close()
            except libvirt.libvirtError:
                pass
        with trio.move_on_after(5):
            await trio.to_thread.run_sync(close_blocking, abandon_on_cancel=True)
