"""libvirt's errors as vcfs's: the one place where a `libvirtError` gets its errno class.

The message is libvirt's own, so `<dom>/errors` says exactly what libvirt refused. Some codes
mean different things by message (libvirt 9.0 reports a taken checkpoint name as "operation
failed: domain moment X already exists" and an existing scratch file as an invalid argument):
those few are told apart here too, never by callers.
Thread rule: pure functions, any thread.
"""

from __future__ import annotations

import libvirt

from vcfs.errors import (
    AlreadyExists,
    BackendError,
    Busy,
    InvalidInput,
    NotFound,
    NotSupported,
    VcfsError,
)

_BY_CODE: dict[int, type[VcfsError]] = {
    libvirt.VIR_ERR_XML_ERROR: InvalidInput,
    libvirt.VIR_ERR_XML_DETAIL: InvalidInput,
    libvirt.VIR_ERR_XML_INVALID_SCHEMA: InvalidInput,
    libvirt.VIR_ERR_INVALID_ARG: InvalidInput,
    libvirt.VIR_ERR_OPERATION_INVALID: InvalidInput,
    # Redefine's validation, or an incremental backup from a broken checkpoint.
    libvirt.VIR_ERR_CHECKPOINT_INCONSISTENT: InvalidInput,
    libvirt.VIR_ERR_NO_DOMAIN_CHECKPOINT: NotFound,
    libvirt.VIR_ERR_NO_DOMAIN_BACKUP: NotFound,
    # "checkpoint for disk vdb unsupported for storage type raw"
    libvirt.VIR_ERR_CONFIG_UNSUPPORTED: NotSupported,
    libvirt.VIR_ERR_OPERATION_UNSUPPORTED: NotSupported,
    libvirt.VIR_ERR_NO_SUPPORT: NotSupported,
    # "cannot acquire state change lock": another job holds the domain.
    libvirt.VIR_ERR_OPERATION_TIMEOUT: Busy,
}
"""Everything else (internal errors, RPC and system errors, a domain that vanished mid-call,
an operation QEMU failed) is EIO: the request may be fine, the path to QEMU is not."""

_BY_MESSAGE: list[tuple[str, type[VcfsError]]] = [
    ("already exists", AlreadyExists),
    ("' exists", AlreadyExists),  # "store '/x.qcow2' for backup of 'vda' exists"
    ("no disk named", NotFound),  # a checkpoint naming an unknown disk
    ("not found", NotFound),
]
"""Checked first: the message says more than the code (see the module docstring)."""


def translate(e: libvirt.libvirtError) -> VcfsError:
    """The vcfs error for a libvirt error, carrying libvirt's message on one line."""
    message = " ".join((e.get_error_message() or str(e)).split())
    if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN or "domain is not running" in message:
        return BackendError(message)  # QEMU went away under the request
    for words, cls in _BY_MESSAGE:
        if words in message:
            return cls(message)
    return _BY_CODE.get(e.get_error_code() or 0, BackendError)(message)


def is_connection_lost(e: libvirt.libvirtError) -> bool:
    """Whether the error means the connection to libvirtd is gone (not a refusal)."""
    return e.get_error_code() in (libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_ERR_RPC,
                                  libvirt.VIR_ERR_NO_CONNECT, libvirt.VIR_ERR_INVALID_CONN)


def is_no_job(e: libvirt.libvirtError) -> bool:
    """Whether libvirt refused because no job is active (an abort of a job that just ended)."""
    return e.get_error_code() == libvirt.VIR_ERR_OPERATION_INVALID


def is_no_backup(e: libvirt.libvirtError) -> bool:
    """Whether libvirt says the domain runs no backup job."""
    return e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_BACKUP
