"""The domain exception hierarchy.

Every failure the user can cause or see is one of these. Adapters translate library errors
(QMP, NBD, XML, OS) into them; only the FUSE layer turns them into an errno. Messages are one
line, written for the user who reads `<dom>/errors`.
"""


class VcfsError(Exception):
    """Base of every expected failure. The message is shown to the user as is."""


class InvalidInput(VcfsError):
    """Malformed or schema-invalid XML, a bad name, an unknown value (EINVAL)."""


class AlreadyExists(VcfsError):
    """The name is taken (EEXIST)."""


class NotFound(VcfsError):
    """Unknown disk, checkpoint, parent or incremental base (ENOENT)."""


class NotSupported(VcfsError):
    """The disk cannot hold a bitmap, or QEMU lacks the feature (EOPNOTSUPP)."""


class NotPermitted(VcfsError):
    """The operation makes no sense on this node (EPERM), e.g. `mkdir` in a disk directory."""


class Busy(VcfsError):
    """Another job holds the resource (EBUSY)."""


class TooLarge(VcfsError):
    """A request over the size limit (EFBIG)."""


class NoSpace(VcfsError):
    """The state directory or a scratch location is full (ENOSPC)."""


class BackendError(VcfsError):
    """QEMU gone, a QMP or NBD failure, or a local I/O error (EIO)."""


class QmpCommandError(BackendError):
    """QEMU answered a command with an error. `error_class` is QMP's class name."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"{command}: {desc}")
        self.command = command
        self.error_class = error_class
        self.desc = desc


class Disconnected(BackendError):
    """The QMP connection is gone (QEMU quit or the socket vanished)."""
