"""Inode numbers for tree paths, living as long as the kernel's lookup count says.

An inode is a path from the root. Numbers are never reused, so a stale kernel reference can
never reach a different node that took the same number. Thread rule: trio tasks only.
"""

from __future__ import annotations

ROOT_INODE = 1
Path = tuple[str, ...]


class InodeTable:
    """Two-way map path ⇄ inode with kernel lookup counts."""

    def __init__(self) -> None:
        self._inode: dict[Path, int] = {(): ROOT_INODE}
        self._path: dict[int, Path] = {ROOT_INODE: ()}
        self._lookups: dict[int, int] = {}
        self._next = ROOT_INODE + 1

    def inode(self, path: Path) -> int:
        """The inode for `path`, allocated on first use."""
        ino = self._inode.get(path)
        if ino is None:
            ino = self._next
            self._next += 1
            self._inode[path] = ino
            self._path[ino] = path
        return ino

    def path(self, inode: int) -> Path | None:
        """The path an inode stands for, or None if the kernel forgot it."""
        return self._path.get(inode)

    def remember(self, inode: int) -> None:
        """The kernel took one more reference (lookup, mkdir, readdirplus entry)."""
        self._lookups[inode] = self._lookups.get(inode, 0) + 1

    def forget(self, inode: int, count: int) -> None:
        """The kernel dropped `count` references; the inode goes when none are left."""
        left = self._lookups.get(inode, 0) - count
        if left > 0:
            self._lookups[inode] = left
            return
        self._lookups.pop(inode, None)
        if inode != ROOT_INODE:
            path = self._path.pop(inode, None)
            if path is not None and self._inode.get(path) == inode:
                del self._inode[path]
