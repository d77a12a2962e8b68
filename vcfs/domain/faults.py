"""Named fault-injection points, so tests can make any step of an operation fail or crash.

`VCFS_FAULT=point[,point…]` in vcfs's environment makes each named step raise BackendError
(as a failing QMP command would), exercising the rollback of everything done before it.
`VCFS_KILL=point` makes the process SIGKILL itself there, exercising crash recovery.
"""

from __future__ import annotations

import os
import signal

from vcfs.errors import BackendError

_ACTIVE = frozenset(p for p in os.environ.get("VCFS_FAULT", "").split(",") if p)
_KILL = os.environ.get("VCFS_KILL", "")


def fault_point(name: str) -> None:
    """Fail or die here if the environment asks for it."""
    if name == _KILL:
        os.kill(os.getpid(), signal.SIGKILL)
    if name in _ACTIVE:
        raise BackendError(f"injected fault at {name}")
