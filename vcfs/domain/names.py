"""Name rules for checkpoints and backup jobs: libvirt's file-name-safe pattern, vcfs's reserved
names. The one definition: the XML codec, the tree and the client commands use these.

Thread rule: pure functions, any thread.
"""

from __future__ import annotations

import re

from vcfs.errors import InvalidInput

NAME_PATTERN = re.compile(r"[a-zA-Z0-9_-][a-zA-Z0-9_.-]*")
"""libvirt's pattern for checkpoint (and bitmap) names: safe as a file name, no leading dot."""

NEW, REDEFINE, CURRENT, LATEST = "new", "redefine", "current", "latest"
"""The control entries of `checkpoints/` (new, redefine, current) and `backups/` (new, latest)."""
RESERVED = frozenset({NEW, REDEFINE, CURRENT, LATEST})
"""Names no checkpoint or job may take: they would hide a control entry, in either directory."""
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
