"""The one place where domain errors become errno values (DESIGN.md §1, Errors).

`ERRNO` chooses the errno of each domain error; `guarded`, around every FUSE handler, applies
it and records the failure in the domain's `errors`.
Thread rule: trio tasks on the pyfuse3 main loop.
"""

from __future__ import annotations

import errno
import functools
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeVar

import pyfuse3

from vcfs import errors

log = logging.getLogger(__name__)

ERRNO: list[tuple[type[errors.VcfsError], int]] = [
    (errors.InvalidInput, errno.EINVAL),
    (errors.AlreadyExists, errno.EEXIST),
    (errors.NotFound, errno.ENOENT),
    (errors.NotSupported, errno.EOPNOTSUPP),
    (errors.Busy, errno.EBUSY),
    (errors.TooLarge, errno.EFBIG),
    (errors.NoSpace, errno.ENOSPC),
    (errors.NotPermitted, errno.EPERM),
    # QEMU gone, QMP or NBD failure, local I/O error: the data may be fine, the path to it is not.
    (errors.BackendError, errno.EIO),
]


def errno_for(e: errors.VcfsError) -> int:
    """The errno a failure is reported with."""
    for cls, code in ERRNO:
        if isinstance(e, cls):
            return code
    return errno.EIO


# Linux gives ENOTSUP and EOPNOTSUPP one value; errorcode picks ENOTSUP, the contract says
# EOPNOTSUPP.
PREFERRED_NAMES = {errno.EOPNOTSUPP: "EOPNOTSUPP"}


def errno_name(code: int) -> str:
    """`EINVAL` for 22, as `<dom>/errors` shows it."""
    return PREFERRED_NAMES.get(code) or errno.errorcode.get(code, str(code))


class FailureLog(Protocol):
    """Where failed requests are recorded: the tree, which finds the path's domain."""

    def report(self, path: Sequence[str], code: str, message: str) -> None: ...


class Handlers(Protocol):
    """What `guarded` needs of the object whose handlers it wraps."""

    @property
    def tree(self) -> FailureLog: ...


H = TypeVar("H", bound=Callable[..., Awaitable[Any]])

Where = Callable[..., Sequence[str]]
"""The path a request is about, from the handler's own arguments (`self` first): its failure is
recorded in that path's domain's `errors`."""


def guarded(where: Where | None) -> Callable[[H], H]:
    """Wrap a FUSE handler so that only FUSEError leaves it.

    A `FUSEError` passes unchanged. A domain error (`VcfsError`) becomes its errno
    (`errno_for`) and is recorded against `where(self, *args)`, so that the client sees why its
    request failed in `<dom>/errors` (a path outside any domain records nothing; so do requests
    about no path, with no `where`). Anything else is a bug: logged with its traceback and turned
    into EIO, because a handler raising anything but FUSEError takes the whole mount down.
    """

    def decorate(fn: H) -> H:
        @functools.wraps(fn)
        async def wrapper(self: Handlers, *args: Any) -> Any:
            try:
                return await fn(self, *args)
            except pyfuse3.FUSEError:
                raise
            except errors.VcfsError as e:
                code = errno_for(e)
                self.tree.report(_where(where, self, args), errno_name(code), str(e))
                raise pyfuse3.FUSEError(code) from None
            except Exception:
                log.exception("unexpected error in %s", fn.__name__)
                raise pyfuse3.FUSEError(errno.EIO) from None

        return wrapper  # type: ignore[return-value]  # same signature: *args passed through

    return decorate


def _where(where: Where | None, handlers: Handlers, args: tuple[Any, ...]) -> Sequence[str]:
    """The path of a failed request; the root (no domain's `errors`) if it is gone meanwhile."""
    if where is None:
        return ()
    try:
        return where(handlers, *args)
    except (pyfuse3.FUSEError, KeyError):  # inode forgotten, handle released
        return ()
