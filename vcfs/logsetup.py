"""Logging set-up of a mount: stderr (journal-style when stderr is the journal) and/or a file.

Thread rule: call once, at start-up, before other threads exist.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

TIMESTAMPED = "%(asctime)s %(levelname)s %(name)s: %(message)s"
SYSLOG_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
                   logging.CRITICAL: 2}


def stderr_is_journal() -> bool:
    """Whether stderr is the journal's stream ($JOURNAL_STREAM names its device and inode)."""
    value = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    try:
        st = os.fstat(2)
        return bool(value) and (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (OSError, ValueError):
        return False


class JournalFormatter(logging.Formatter):
    """`<6>INFO vcfs.x: message`: journald reads the priority and adds the time itself."""

    def __init__(self) -> None:
        super().__init__("%(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        priority = SYSLOG_PRIORITY.get(record.levelno, 6)
        return f"<{priority}>{super().format(record)}"


def setup_logging(debug: bool, log_file: Path | None, to_stderr: bool = True) -> None:
    """Log to stderr (journal-style when stderr is the journal) and/or a file; each line
    names the level between spaces."""
    handlers: list[logging.Handler] = []
    if to_stderr:
        handler: logging.Handler = logging.StreamHandler()
        handler.setFormatter(
            JournalFormatter() if stderr_is_journal() else logging.Formatter(TIMESTAMPED)
        )
        handlers.append(handler)
    if log_file:
        handler = logging.FileHandler(log_file)
        handler.setFormatter(logging.Formatter(TIMESTAMPED))
        handlers.append(handler)
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(logging.DEBUG if debug else logging.INFO)
