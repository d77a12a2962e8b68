"""A domain's recent failed requests, shown in `<dom>/errors`, newest last."""

from __future__ import annotations

import time
from collections import deque


class ErrorLog:
    """A bounded log of one-line failure records. Not thread-safe: trio tasks only."""

    def __init__(self, limit: int = 200) -> None:
        self._lines: deque[str] = deque(maxlen=limit)

    def add(self, path: str, code: str, message: str) -> None:
        """Record one failure: where, the errno name (or a level), and the full message."""
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        one_line = " ".join(message.split())
        self._lines.append(f"{stamp} {path} {code} {one_line}\n")

    def render(self) -> bytes:
        """The whole log as the `errors` file shows it."""
        return "".join(self._lines).encode()
