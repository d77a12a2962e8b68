"""Mounting and serving: pyfuse3's init → main → close, around the Operations."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import pyfuse3
import trio

from vcfs import mountinfo
from vcfs.fs.ops import Operations
from vcfs.tree.fstree import Tree

log = logging.getLogger(__name__)


READ_AHEAD_KB = 1024
"""The kernel then asks for 1 MiB per read instead of 128 KiB: Python's cost is per request."""


def set_read_ahead(mountpoint: Path, kb: int, *, mountinfo_path: str = mountinfo.MOUNTINFO,
                   bdi_dir: str = "/sys/class/bdi") -> None:
    """Raise the read-ahead of the mount's backing device info (root only; best effort).

    The device number comes from mountinfo: stat()ing our own mount point here would wait for
    a FUSE loop that is not running yet. (`mountinfo_path` and `bdi_dir` are for tests.)
    """
    try:
        entry = mountinfo.find(mountpoint, mountinfo_path)
        if entry is None:
            log.info("cannot raise read-ahead of %s: not in mountinfo", mountpoint)
            return
        with open(f"{bdi_dir}/{entry.device}/read_ahead_kb", "w") as ra:
            ra.write(f"{kb}\n")
    except OSError as e:
        log.info("cannot raise read-ahead of %s: %s", mountpoint, e)


class FuseMount:
    """One mounted vcfs: `open()` mounts, `run()` serves until unmounted, `close()` unmounts."""

    def __init__(
        self, tree: Tree, mountpoint: Path, options: Sequence[str], cache_images: bool = False
    ) -> None:
        self.mountpoint = mountpoint
        self.ops = Operations(tree, cache_images)
        opts = {"fsname=vcfs", "subtype=vcfs", *options}
        # With allow_other the kernel must check our modes (disk images 0400, …).
        if "allow_other" in opts:
            opts.add("default_permissions")
        self._options = opts
        self._open = False

    def open(self) -> None:
        """Mount. Raises RuntimeError (from libfuse) when the mount fails."""
        if not hasattr(pyfuse3.Operations, "lseek"):
            # A stock pyfuse3 (the set-up installs one with lseek: packaging/pyfuse3-lseek).
            log.warning("this pyfuse3 has no lseek: tools will read the holes of disk images")
        pyfuse3.init(self.ops, str(self.mountpoint), self._options)
        self._open = True

    async def run(self) -> None:
        """Serve requests until the filesystem is unmounted."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._tune_read_ahead)
            await pyfuse3.main()
            nursery.cancel_scope.cancel()

    async def _tune_read_ahead(self) -> None:
        # The kernel caps read-ahead when it gets the INIT reply, so raise it only after that:
        # libfuse replies as soon as Operations.init() returns.
        await self.ops.initialized.wait()
        await trio.sleep(0.01)
        set_read_ahead(self.mountpoint, READ_AHEAD_KB)

    @property
    def is_open(self) -> bool:
        """Whether the filesystem is mounted by this object."""
        return self._open

    def close(self) -> None:
        """Unmount (if still mounted) and release the session."""
        if self._open:
            self._open = False
            pyfuse3.close(unmount=True)
