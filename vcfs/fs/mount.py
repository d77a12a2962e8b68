"""Mounting and serving: pyfuse3's init → main → close, around the Operations."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pyfuse3

from vcfs.fs.ops import Operations
from vcfs.tree.fstree import Tree


class FuseMount:
    """One mounted vcfs: `open()` mounts, `run()` serves until unmounted, `close()` unmounts."""

    def __init__(self, tree: Tree, mountpoint: Path, options: Sequence[str]) -> None:
        self.mountpoint = mountpoint
        self.ops = Operations(tree)
        opts = {"fsname=vcfs", "subtype=vcfs", *options}
        # With allow_other the kernel must check our modes (disk images 0400, …).
        if "allow_other" in opts:
            opts.add("default_permissions")
        self._options = opts
        self._open = False

    def open(self) -> None:
        """Mount. Raises RuntimeError (from libfuse) when the mount fails."""
        pyfuse3.init(self.ops, str(self.mountpoint), self._options)
        self._open = True

    async def run(self) -> None:
        """Serve requests until the filesystem is unmounted."""
        await pyfuse3.main()

    def close(self) -> None:
        """Unmount (if still mounted) and release the session."""
        if self._open:
            self._open = False
            pyfuse3.close(unmount=True)
