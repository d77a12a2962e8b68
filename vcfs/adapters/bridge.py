"""Run asyncio coroutines from trio: one asyncio event loop in a daemon thread.

qemu.qmp is an asyncio library and the filesystem runs on trio. Every QMP connection lives on
this one loop; trio tasks submit coroutines with `run()` and are woken through the trio token
when the result is ready. Cancelling the trio task cancels the asyncio future.
Thread rule: `run()` is called from trio only; the coroutine runs on the loop thread only.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

import trio

T = TypeVar("T")


class AsyncioBridge:
    """An asyncio loop in a thread, usable from trio tasks."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="vcfs-asyncio", daemon=True
        )
        self._thread.start()

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` on the asyncio loop and return its result to the calling trio task."""
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)

        def wake(_: object) -> None:
            try:
                token.run_sync_soon(done.set)
            except trio.RunFinishedError:
                pass  # trio is gone: nobody is waiting any more

        future.add_done_callback(wake)
        try:
            await done.wait()
        except trio.Cancelled:
            future.cancel()
            raise
        return future.result()

    def close(self) -> None:
        """Stop the loop thread. Pending coroutines are abandoned."""
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
