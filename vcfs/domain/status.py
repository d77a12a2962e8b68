"""The `status` file of a backup job: one typed record, its rendering and its parsing.

The format is a contract between the mount (the backup service writes it) and the client
commands (`vcfs status`, `vcfs wait` read it), and scripts read it too, so it is defined here
once and both sides use `render` and `parse`:

    state: running|completed|failed|cancelled
    mode: pull|push
    disk <name>: <done>/<total>        one line per disk, in the job's order
    nbd-read: <bytes>                  pull jobs only
    scratch <name>: <bytes>            the host disk space its scratch uses, while it exists
    guest: <one line>                  only when the guest shut down and QEMU waits for the job
    error: <one line>                  only when the job failed

`parse(render(s)) == s` for every record (an error is folded to one line when rendered).

Thread rule: pure functions over values, any thread; no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field

RUNNING, COMPLETED, FAILED, CANCELLED = "running", "completed", "failed", "cancelled"
STATES = (RUNNING, COMPLETED, FAILED, CANCELLED)


@dataclass(frozen=True)
class DiskProgress:
    """One `disk <name>: <done>/<total>` line: bytes done of the disk's total."""

    name: str
    done: int
    total: int


@dataclass
class JobStatus:
    """The content of one job's `status` file."""

    state: str
    mode: str
    disks: list[DiskProgress] = field(default_factory=list)
    nbd_read: int | None = None
    """Bytes fetched from the NBD export (pull jobs); None when the line is absent."""
    error: str | None = None
    scratch: dict[str, int] = field(default_factory=dict)
    """Per disk, the bytes its scratch file occupies on the host."""
    guest: str | None = None
    """What became of the guest, when that matters to the job (it shut down meanwhile)."""


def one_line(text: str) -> str:
    """`text` with its line breaks folded to spaces: a value must not start a new key."""
    return " ".join(text.splitlines())


def render(status: JobStatus) -> str:
    """The `status` file's text for `status`, newline-terminated."""
    lines = [f"state: {status.state}", f"mode: {status.mode}"]
    lines += [f"disk {d.name}: {d.done}/{d.total}" for d in status.disks]
    if status.nbd_read is not None:
        lines.append(f"nbd-read: {status.nbd_read}")
    lines += [f"scratch {name}: {n}" for name, n in status.scratch.items()]
    if status.guest:
        lines.append(f"guest: {one_line(status.guest)}")
    if status.error:
        lines.append(f"error: {one_line(status.error)}")
    return "".join(line + "\n" for line in lines)


def parse(text: str) -> JobStatus:
    """The record a `status` file's text renders; ValueError if it is not one.

    Unknown keys and lines without `: ` are skipped, so a newer writer may add keys.
    """
    st = JobStatus(state="", mode="")
    for line in text.splitlines():
        key, sep, value = line.partition(": ")
        if not sep:
            continue
        if key == "state":
            st.state = value
        elif key == "mode":
            st.mode = value
        elif key.startswith("disk "):
            done, _, total = value.partition("/")
            st.disks.append(DiskProgress(key[5:], int(done), int(total or 0)))
        elif key == "nbd-read":
            st.nbd_read = int(value)
        elif key.startswith("scratch "):
            st.scratch[key[8:]] = int(value)
        elif key == "guest":
            st.guest = value
        elif key == "error":
            st.error = value
    if not st.state:
        raise ValueError("no state: line")
    return st
