"""The libvirt connection's calls: off the trio loop, under a deadline, errors translated,
a lost connection noticed. No libvirtd: the connection object is a stand-in."""

from __future__ import annotations

import threading
import time

import libvirt
import pytest
import trio

from vcfs.adapters.virt.connection import Connection
from vcfs.errors import BackendError, Disconnected, NotFound


class StandIn:
    """A libvirt connection as far as `Connection.call` looks at it."""

    def __init__(self, alive: bool = True) -> None:
        self.alive = alive

    def isAlive(self) -> bool:  # noqa: N802 (libvirt's name)
        return self.alive


def connection(alive: bool = True) -> Connection:
    conn = Connection("qemu:///nowhere", lambda event: None)
    conn._conn = StandIn(alive)  # type: ignore[assignment]
    return conn


def libvirt_error(code: int, message: str) -> libvirt.libvirtError:
    e = libvirt.libvirtError(message)
    e.err = (code, 10, message, 2, None, None, None, 0, 0)
    return e


def test_a_call_runs_in_a_worker_thread():
    async def main() -> str:
        return await connection().call(lambda c: threading.current_thread().name, "x")

    assert trio.run(main) != threading.main_thread().name


def test_a_call_that_hangs_fails_at_its_deadline_and_the_loop_goes_on():
    release = threading.Event()

    async def main() -> float:
        start = time.monotonic()
        with pytest.raises(BackendError, match="did not answer list domains in 0.2 s"):
            await connection().call(lambda c: release.wait(10), "list domains", timeout=0.2)
        return time.monotonic() - start

    try:
        assert trio.run(main) < 2
    finally:
        release.set()


def test_libvirt_refusals_are_translated_and_keep_the_connection():
    async def main() -> Connection:
        conn = connection()

        def refuse(c: object) -> None:
            raise libvirt_error(libvirt.VIR_ERR_NO_DOMAIN_CHECKPOINT,
                                "Domain checkpoint not found: no checkpoint named 'x'")

        with pytest.raises(NotFound, match="no checkpoint named 'x'"):
            await conn.call(refuse, "checkpoint lookup")
        return conn

    assert trio.run(main).alive


def test_a_lost_connection_is_dropped_until_reopened():
    async def main() -> None:
        conn = connection()

        def broken(c: object) -> None:
            raise libvirt_error(libvirt.VIR_ERR_SYSTEM_ERROR, "Cannot recv data: EOF")

        with pytest.raises(BackendError, match="Cannot recv data"):
            await conn.call(broken, "list domains")
        assert not conn.alive
        with pytest.raises(Disconnected):
            await conn.call(lambda c: None, "list domains")

    trio.run(main)


def test_a_connection_closed_by_its_keepalive_is_dropped_too():
    async def main() -> bool:
        conn = connection(alive=False)

        def closed(c: object) -> None:
            raise libvirt_error(libvirt.VIR_ERR_INTERNAL_ERROR,
                                "internal error: client socket is closed")

        with pytest.raises(BackendError, match="client socket is closed"):
            await conn.call(closed, "list domains")
        return conn.alive

    assert trio.run(main) is False


def test_options_of_vcfs_own_fleecing_are_said_to_be_ignored_over_libvirt(caplog, tmp_path):
    from vcfs.adapters.virt.host import LibvirtHost
    from vcfs.domain.host import Environment

    def env(**options: object) -> Environment:
        return Environment(None, None, tmp_path, tmp_path, None, None,  # type: ignore[arg-type]
                           **options)

    LibvirtHost("qemu:///system", env())
    assert "QMP hosts only" not in caplog.text
    LibvirtHost("qemu:///system", env(scratch_limit=1 << 20, preserve_shutdown=True))
    assert "--scratch-limit, --preserve-shutdown apply to QMP hosts only" in caplog.text
