"""Named fault-injection points, so tests can make any step of an operation fail.

`VCFS_FAULT=point[,point…]` in vcfs's environment makes each named step raise BackendError
(as a failing QMP command would), exercising the rollback of everything done before it.
"""

from __future__ import annotations

import os

from vcfs.errors import BackendError

_ACTIVE = frozenset(p for p in os.environ.get("VCFS_FAULT", "").split(",") if p)


def fault_point(name: str) -> None:
    """Fail here if the environment asks for it."""
    if name in _ACTIVE:
        raise BackendError(f"injected fault at {name}")
