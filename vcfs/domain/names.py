"""Name rules for checkpoints (libvirt's filename-safe pattern plus vcfs's reserved names)."""

from __future__ import annotations

import re

from vcfs.errors import InvalidInput

NAME_PATTERN = re.compile(r"[a-zA-Z0-9_-][a-zA-Z0-9_.-]*")
RESERVED = frozenset({"new", "redefine", "current", "latest"})
MAX_NAME_BYTES = 255


def check_checkpoint_name(name: str) -> str:
    """Return `name` if it can name a checkpoint, else raise InvalidInput saying why."""
    if not name:
        raise InvalidInput("checkpoint name is empty")
    if len(name.encode()) > MAX_NAME_BYTES:
        raise InvalidInput(f"checkpoint name is longer than {MAX_NAME_BYTES} bytes")
    if not NAME_PATTERN.fullmatch(name):
        raise InvalidInput(
            f"invalid checkpoint name {name!r}: use letters, digits, '_', '-' and '.', "
            "not starting with '.'"
        )
    if name in RESERVED:
        raise InvalidInput(f"checkpoint name {name!r} is reserved")
    return name


def check_job_name(name: str) -> str:
    """Return `name` if it can name a backup job directory, else raise InvalidInput."""
    if not NAME_PATTERN.fullmatch(name) or len(name.encode()) > MAX_NAME_BYTES:
        raise InvalidInput(
            f"invalid backup name {name!r}: use letters, digits, '_', '-' and '.', "
            "not starting with '.'"
        )
    if name in RESERVED:
        raise InvalidInput(f"backup name {name!r} is reserved")
    return name
