"""The one place where domain errors become errno values (DESIGN.md §1, Errors)."""

from __future__ import annotations

import errno

from vcfs import errors

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
