"""/proc/self/mountinfo, parsed once: for the mount (read-ahead), the client commands, the demo,
the tests and the benchmarks.

Reading mountinfo, not stat()ing a path, is how every caller asks "is it mounted": a stat of a
vcfs mount point waits for the vcfs process, so it hangs on a stuck mount, errors on a dead one
("Transport endpoint is not connected") and deadlocks in vcfs itself before its loop runs.

Line format (proc(5)): `ID PARENT MAJOR:MINOR ROOT MOUNT_POINT OPTIONS [OPTIONAL...] - FSTYPE
SOURCE SUPER_OPTIONS`; paths escape space, tab, newline and backslash as `\\ooo` octal.

Thread rule: pure functions and blocking file reads, any thread.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

MOUNTINFO = "/proc/self/mountinfo"

_ESCAPE = re.compile(r"\\([0-7]{3})")


@dataclass(frozen=True)
class MountEntry:
    """One line of mountinfo, paths unescaped."""

    device: str
    """`MAJOR:MINOR`, also the name of the mount's entry in /sys/class/bdi."""
    root: str
    mount_point: str
    options: str
    """Per-mount options (`rw,nosuid,noexec,...`)."""
    fstype: str
    """`fuse.vcfs` for a vcfs mount."""
    source: str


def unescape(field: str) -> str:
    """A mountinfo path field with its octal escapes decoded (`/mnt/my\\040vms`)."""
    return _ESCAPE.sub(lambda m: chr(int(m[1], 8)), field)


def parse_line(line: str) -> MountEntry | None:
    """One mountinfo line, or None if it is not one."""
    fields = line.split()
    try:
        dash = fields.index("-", 6)
        return MountEntry(
            device=fields[2], root=unescape(fields[3]), mount_point=unescape(fields[4]),
            options=fields[5], fstype=fields[dash + 1], source=unescape(fields[dash + 2]),
        )
    except (ValueError, IndexError):
        return None


def parse(text: str) -> list[MountEntry]:
    """Every mount of a mountinfo text, in its order (a later mount hides an earlier one on the
    same mount point)."""
    return [e for e in map(parse_line, text.splitlines()) if e is not None]


def read(path: str | os.PathLike[str] = MOUNTINFO) -> list[MountEntry]:
    """Every mount of this process's mount namespace (or of the mountinfo file `path`)."""
    with open(path) as f:
        return parse(f.read())


def mount_point_of(path: str | os.PathLike[str]) -> str:
    """`path` as mountinfo names it: absolute, its parent resolved, the last component kept.

    Resolving the last component would stat the mount itself (see the module docstring).
    """
    path = os.path.abspath(path)
    return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))


def find(path: str | os.PathLike[str], mountinfo: str | os.PathLike[str] = MOUNTINFO
         ) -> MountEntry | None:
    """The mount visible at `path` (the last one mounted there), or None."""
    target = mount_point_of(path)
    found = [e for e in read(mountinfo) if e.mount_point == target]
    return found[-1] if found else None


def is_mounted(path: str | os.PathLike[str]) -> bool:
    """Whether something is mounted on `path` (even a mount whose process died)."""
    return find(path) is not None
