"""Checkpoint metadata on disk, written crash-safely.

Layout: `STATE/domains/<domain>/checkpoints/<name>.xml` holds each checkpoint in libvirt's own
format (with `<domain>`), so an export to or import from libvirt is lossless;
`STATE/domains/<domain>/current` names the current checkpoint; `STATE/domains/<domain>/intents/`
holds a JSON record of each multi-step operation in progress, written before it acts, so that
after a crash the operation is finished or undone. Every write is temp file, fsync,
rename, fsync of the directory: after a crash a file is either the old or the new version.
Thread rule: synchronous and small; called from trio tasks directly.
"""

from __future__ import annotations

import errno
import json
import logging
import os
from pathlib import Path
from typing import Any

from vcfs.adapters import xmlcodec
from vcfs.domain.model import CheckpointDef
from vcfs.errors import BackendError, InvalidInput, NoSpace, TooLarge, VcfsError

log = logging.getLogger(__name__)


def write_atomically(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so that a crash leaves the old or the new content."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
        fsync_dir(path.parent)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise os_error(f"cannot write {path}", e) from None


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink in `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unlink_durably(path: Path, what: str) -> None:
    """Remove `path` (if it exists) so that a crash cannot bring it back."""
    try:
        path.unlink(missing_ok=True)
        fsync_dir(path.parent)
    except OSError as e:
        raise os_error(f"cannot remove {what}", e) from None


def os_error(what: str, e: OSError) -> VcfsError:
    """The domain error for a local I/O failure (ENOSPC gets its own)."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return NoSpace(f"{what}: no space left")
    return BackendError(f"{what}: {e.strerror}")


class StateStore:
    """The `CheckpointStore` port over a directory owned by vcfs (mode 0700)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(root, 0o700)

    def _dir(self, domain: str) -> Path:
        d = self.root / "domains" / domain / "checkpoints"
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        return d

    def load(self, domain: str) -> tuple[list[CheckpointDef], str | None]:
        d = self._dir(domain)
        defs = []
        for f in sorted(d.glob("*.xml")):
            try:
                defs.append(xmlcodec.parse_checkpoint(f.read_bytes(), redefine=True))
            except (InvalidInput, TooLarge, OSError) as e:
                # Keep the file: a human must look at it; vcfs never silently drops metadata.
                log.warning("domain %s: ignoring unreadable checkpoint metadata %s: %s",
                            domain, f, e)
        current_file = d.parent / "current"
        current = current_file.read_text().strip() if current_file.exists() else None
        return defs, current or None

    def save(self, domain: str, checkpoint: CheckpointDef) -> None:
        assert checkpoint.name
        write_atomically(
            self._dir(domain) / f"{checkpoint.name}.xml", xmlcodec.format_checkpoint(checkpoint)
        )

    def remove(self, domain: str, name: str) -> None:
        unlink_durably(self._dir(domain) / f"{name}.xml", f"metadata of {name}")

    def set_current(self, domain: str, name: str | None) -> None:
        write_atomically(self._dir(domain).parent / "current", (name or "").encode() + b"\n")

    def _intents(self, domain: str) -> Path:
        d = self.root / "domains" / domain / "intents"
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        return d

    def put_intent(self, domain: str, key: str, intent: dict[str, Any]) -> None:
        write_atomically(self._intents(domain) / f"{key}.json", json.dumps(intent).encode())

    def intents(self, domain: str) -> dict[str, dict[str, Any]]:
        found = {}
        for f in sorted(self._intents(domain).glob("*.json")):
            try:
                found[f.stem] = json.loads(f.read_bytes())
            except (OSError, ValueError) as e:
                log.warning("domain %s: ignoring unreadable intent %s: %s", domain, f, e)
        return found

    def drop_intent(self, domain: str, key: str) -> None:
        unlink_durably(self._intents(domain) / f"{key}.json", f"intent {key}")
