"""The service manager's notification protocol (sd_notify), without libsystemd.

When a service manager starts vcfs with `Type=notify` it names a datagram socket in
$NOTIFY_SOCKET: a path, or an abstract name when it starts with '@'. vcfs sends `READY=1` once
the mount is usable and `STOPPING=1` when it begins to unmount. Without $NOTIFY_SOCKET every
call does nothing, so the rest of vcfs never needs to know whether a manager is listening.

Thread rule: any thread; each call opens, sends and closes its own socket.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def socket_address(value: str | None) -> str | None:
    """The `AF_UNIX` address $NOTIFY_SOCKET names, or None (unset, or a kind we do not speak)."""
    if not value:
        return None
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None  # e.g. "vsock:…", which systemd uses only for VMs


def notify(*fields: str) -> bool:
    """Send `fields` (`KEY=value` strings) as one datagram; whether it was sent.

    A manager that went away must not take the filesystem down with it: failures are logged
    and swallowed.
    """
    address = socket_address(os.environ.get("NOTIFY_SOCKET"))
    if address is None:
        return False
    message = "\n".join(f.replace("\n", " ") for f in fields).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(address)
            s.sendall(message)
    except OSError as e:
        log.warning("cannot notify the service manager at %s: %s",
                    os.environ.get("NOTIFY_SOCKET"), e)
        return False
    return True


def ready(status: str) -> bool:
    """The mount is up and serving."""
    return notify("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")


def stopping(status: str) -> bool:
    """The mount is being taken down."""
    return notify("STOPPING=1", f"STATUS={status}")
