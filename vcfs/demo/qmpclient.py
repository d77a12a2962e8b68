"""A tiny synchronous QMP client, for driving the demo VMs (and the tests' VMs) over a monitor
of their own. Standard library only, so the demo needs nothing vcfs itself does not.

Thread rule: blocking; a client belongs to the one thread that created it and must never be
called from vcfs's own event loop.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any


class QmpError(Exception):
    """QEMU answered a command with an error."""

    def __init__(self, error_class: str, desc: str) -> None:
        super().__init__(f"{error_class}: {desc}")
        self.error_class = error_class
        self.desc = desc


class QmpClient:
    """A synchronous QMP client on a unix socket.

    Events arriving while waiting for a reply are kept in `events` (oldest first) rather than
    dropped, so a caller can look for e.g. BLOCK_JOB_COMPLETED. After a timeout or a lost
    connection the client is closed: a half-read reply would desynchronise it.
    """

    def __init__(self, path: str | os.PathLike[str], timeout: float = 10.0) -> None:
        self.path = os.fspath(path)
        self.timeout = timeout
        self.events: list[dict[str, Any]] = []
        self.greeting: dict[str, Any] = {}
        self._sock: socket.socket | None = None
        self._buf = b""
        self._next_id = 0

    def connect(self) -> None:
        """Connect, read the greeting and leave capabilities negotiation mode."""
        deadline = time.monotonic() + self.timeout
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.path)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._buf = b""
        try:
            self.greeting = self._read_message(deadline)
            if "QMP" not in self.greeting:
                raise ConnectionError(f"{self.path}: not a QMP greeting: {self.greeting!r}")
            self.execute("qmp_capabilities")
        except BaseException:
            self.close()
            raise

    def execute(
        self, cmd: str, args: dict[str, Any] | None = None, timeout: float | None = None
    ) -> Any:
        """Run one command and return its `return` value; raise QmpError on an error reply."""
        if self._sock is None:
            raise ConnectionError(f"{self.path}: not connected")
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        self._next_id += 1
        msg_id = self._next_id
        request: dict[str, Any] = {"execute": cmd, "id": msg_id}
        if args:
            request["arguments"] = args
        try:
            self._sock.sendall(json.dumps(request).encode() + b"\n")
            while True:
                reply = self._read_message(deadline)
                if "event" in reply:
                    self.events.append(reply)
                elif reply.get("id") == msg_id:
                    break
        except BaseException:
            self.close()
            raise
        if "error" in reply:
            err = reply["error"]
            raise QmpError(err.get("class", "GenericError"), err.get("desc", ""))
        return reply.get("return")

    def close(self) -> None:
        """Close the connection (idempotent)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> QmpClient:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _read_message(self, deadline: float) -> dict[str, Any]:
        assert self._sock is not None
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{self.path}: no answer from QEMU")
            self._sock.settimeout(remaining)
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                raise TimeoutError(f"{self.path}: no answer from QEMU") from None
            if not data:
                raise ConnectionError(f"{self.path}: QEMU closed the connection")
            self._buf += data
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)
