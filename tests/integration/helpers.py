"""Small helpers the integration tests share: drive control files, list, wait."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path


def write_errno(path: Path, data: bytes) -> int:
    """Write `data` in one write() the way `echo` does; return the errno (0 on success)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    except OSError as e:
        return e.errno
    try:
        os.write(fd, data)
        return 0
    except OSError as e:
        return e.errno
    finally:
        try:
            os.close(fd)
        except OSError:
            pass


def errors_of(dom: Path) -> list[str]:
    """The lines of a domain's `errors` file."""
    return (dom / "errors").read_text().splitlines()


def listing(d: Path) -> list[str]:
    """A directory's entries, sorted."""
    return sorted(os.listdir(d))


def wait_for(predicate: Callable[[], object], timeout: float = 5.0, what: str = "condition"):
    """Poll `predicate` until it is true; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
