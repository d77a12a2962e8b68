"""`vcfs status` and `vcfs wait`: watching a mount the way a user would, by reading its files.

Nothing here talks to QEMU or to the vcfs process: a domain is a directory, a job's progress is
its `status` file (format and parser: `vcfs.domain.status`, shared with the writer).
Push jobs' progress is QEMU's; pull jobs' is the bytes read through `disks/`. Rates and times
left are computed here from successive reads.

Thread rule: synchronous; `vcfs status` lists each mount in a thread of its own, to pass by
one that does not answer.
"""

from __future__ import annotations

import io
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from vcfs import mountinfo
from vcfs.domain.names import CURRENT, RESERVED
from vcfs.domain.status import COMPLETED, RUNNING, JobStatus, parse

RATE_WINDOW = 5.0
"""Seconds of samples the rate is averaged over."""
BAR = 24


class NotABackup(Exception):
    """The path is not a backup job's directory."""


def read_status(job: Path) -> JobStatus:
    """The status of the job whose directory is `job` (OSError, ValueError)."""
    return parse((job / "status").read_text())


# ---- finding things ---------------------------------------------------------------------------


def vcfs_mounts(path: str = mountinfo.MOUNTINFO) -> list[Path]:
    """Mount points of every vcfs mount (filesystem type fuse.vcfs)."""
    return [Path(e.mount_point) for e in mountinfo.read(path) if e.fstype == "fuse.vcfs"]


def is_domain_dir(path: Path) -> bool:
    return (path / "checkpoints").is_dir() and (path / "backups").is_dir()


def domain_dirs(path: Path) -> list[Path]:
    """The domain directories under a mount, or `path` itself if it is one."""
    if is_domain_dir(path):
        return [path]
    return [d for d in sorted(path.iterdir()) if is_domain_dir(d)]


def job_dirs(dom: Path) -> list[Path]:
    """A domain's backup job directories, in numeric order where ids are numbers."""
    names = [n for n in os.listdir(dom / "backups") if n not in RESERVED]
    names.sort(key=lambda n: (not n.isdigit(), int(n) if n.isdigit() else 0, n))
    return [dom / "backups" / n for n in names]


# ---- formatting -------------------------------------------------------------------------------


def human(n: float) -> str:
    """1536 -> `1.5 KiB`."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def duration(seconds: float) -> str:
    """75 -> `1:15`, 3675 -> `1:01:15`."""
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def percent(done: int, total: int) -> str:
    return f"{100 * done / total:3.0f}%" if total else "  -%"


def bar(done: int, total: int, width: int = BAR) -> str:
    filled = int(width * done / total) if total else 0
    filled = max(0, min(width, filled))
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def checkpoint_line(dom: Path) -> str:
    cps = dom / "checkpoints"
    names = sorted(n for n in os.listdir(cps) if n not in RESERVED)
    if not names:
        return "checkpoints: none"
    current = os.readlink(cps / CURRENT) if os.path.lexists(cps / CURRENT) else None
    shown = []
    for n in names:
        notes = ["current"] if n == current else []
        try:
            if b"<!-- broken" in (cps / n / "xml").read_bytes():
                notes.append("broken")
        except OSError:
            notes.append("unreadable")
        shown.append(f"{n} ({', '.join(notes)})" if notes else n)
    return "checkpoints: " + ", ".join(shown)


def job_lines(job: Path, st: JobStatus) -> list[str]:
    head = f"backup {job.name}: {st.mode}, {st.state}"
    if st.error:
        head += f": {st.error}"
    if st.nbd_read is not None:
        head += f" ({human(st.nbd_read)} fetched over NBD)"
    lines = [head]
    width = max((len(d.name) for d in st.disks), default=0)
    for d in st.disks:
        lines.append(f"  {d.name:<{width}}  {human(d.done)} / {human(d.total)}  "
                     f"{percent(d.done, d.total)}")
    return lines


def domain_lines(dom: Path) -> list[str]:
    lines = [dom.name]
    try:
        lines.append("  " + checkpoint_line(dom))
        jobs = job_dirs(dom)
    except OSError as e:
        return [*lines, f"  unreadable: {e.strerror or e}"]
    if not jobs:
        lines.append("  backups: none")
    for job in jobs:
        try:
            st = read_status(job)
        except (OSError, ValueError) as e:
            if isinstance(e, FileNotFoundError):
                continue  # ended meanwhile
            lines.append(f"  backup {job.name}: unreadable status: {e}")
            continue
        lines += ["  " + line for line in job_lines(job, st)]
    return lines


# ---- vcfs status ------------------------------------------------------------------------------


MOUNT_DEADLINE = 5.0
"""Seconds one mount may take to be listed before `vcfs status` passes it by: a dead FUSE
server or a mount stuck behind a hung QEMU must not hang the listing of the others."""


def status(mountpoint: Path | None, *, watch: bool = False, interval: float = 1.0,
           out: TextIO | None = None, err: TextIO | None = None,
           deadline: float = MOUNT_DEADLINE) -> int:
    """`vcfs status [MOUNTPOINT] [--watch]`: 0, or 1 if a mount could not be read (the others
    are still listed)."""
    out = out or sys.stdout
    err = err or sys.stderr
    if mountpoint is None:
        roots = vcfs_mounts()
        if not roots:
            print("vcfs: no vcfs mount found", file=err)
            return 1
    else:
        roots = [mountpoint]
    code = 0
    readable = []
    for root in roots:
        listing = _Listing(root, named=mountpoint is not None)
        # A daemon thread: one blocked in a hung mount's syscall dies with the process.
        worker = threading.Thread(target=listing.run, daemon=True)
        worker.start()
        worker.join(deadline)
        if worker.is_alive():
            print(f"vcfs: {root}: no answer in {deadline:g} s (passed by)", file=err)
            code = 1
            continue
        out.write(listing.out.getvalue())
        err.write(listing.err.getvalue())
        if listing.code and mountpoint is not None:
            return listing.code
        code = max(code, listing.code)
        if not listing.code:
            readable.append(root)
    out.flush()
    if watch and readable:
        return max(code, Watcher(readable, out, interval).run())
    return code


class _Listing:
    """What `vcfs status` prints of one mount (or domain directory), made in a thread of its
    own so that a mount that does not answer can be passed by."""

    def __init__(self, root: Path, named: bool) -> None:
        self.root = root
        self.named = named
        """The user named this path (else it is one of every vcfs mount)."""
        self.out = io.StringIO()
        self.err = io.StringIO()
        self.code = 0

    def run(self) -> None:
        root = self.root
        try:
            doms = domain_dirs(root)
        except OSError as e:  # e.g. a dead mount: "Transport endpoint is not connected"
            print(f"vcfs: {root}: {e.strerror or e}", file=self.err)
            self.code = 1
            return
        if self.named and not doms and not _looks_like_vcfs(root):
            print(f"vcfs: {root}: not a vcfs mount or domain directory", file=self.err)
            self.code = 1
            return
        if not self.named:
            print(f"{root}:", file=self.out)
        if not doms:
            print("no domains", file=self.out)
        for dom in doms:
            print("\n".join(domain_lines(dom)), file=self.out)


def _looks_like_vcfs(path: Path) -> bool:
    return any(path.resolve() == m for m in vcfs_mounts())


@dataclass
class Rate:
    """Bytes per second over the last RATE_WINDOW seconds of samples."""

    samples: deque[tuple[float, int]] = field(default_factory=deque)

    def add(self, t: float, done: int) -> float | None:
        self.samples.append((t, done))
        while len(self.samples) > 2 and t - self.samples[1][0] >= RATE_WINDOW:
            self.samples.popleft()
        (t0, d0), (t1, d1) = self.samples[0], self.samples[-1]
        if t1 - t0 < 0.05:
            return None
        return max(0.0, (d1 - d0) / (t1 - t0))


class Watcher:
    """`status --watch`: one progress line per disk of each running job, redrawn in place on a
    terminal, appended otherwise, until no job is running."""

    def __init__(self, roots: Iterable[Path], out: TextIO, interval: float) -> None:
        self.roots = list(roots)
        self.out = out
        self.interval = max(0.05, interval)
        self.tty = out.isatty()
        self.rates: dict[tuple[Path, str], Rate] = {}
        self.started: dict[Path, float] = {}
        """When each watched job began (wall clock)."""
        self.drawn = 0

    def running(self, watched: dict[Path, JobStatus]) -> list[tuple[Path, JobStatus]]:
        """Every running job; a watched job whose status cannot be read just now (but whose
        directory is still there) keeps its last status."""
        jobs = []
        for root in self.roots:
            try:
                doms = domain_dirs(root)
            except OSError:
                continue
            for dom in doms:
                try:
                    dirs = job_dirs(dom)
                except OSError:
                    continue
                for job in dirs:
                    try:
                        st = read_status(job)
                    except FileNotFoundError:
                        continue
                    except (OSError, ValueError):
                        if job not in watched:
                            continue
                        st = watched[job]
                    if st.state == RUNNING:
                        jobs.append((job, st))
        return jobs

    def run(self) -> int:
        watched: dict[Path, JobStatus] = {}
        first = True
        while True:
            now = time.monotonic()
            running = self.running(watched)
            lines: list[str] = []
            current = {job for job, _ in running}
            for job in [j for j in watched if j not in current]:
                # Finished since the last round: one final line, then forget it.
                began = self.started.pop(job)
                try:
                    st = read_status(job)
                    final = f"{st.state}" + (f": {st.error}" if st.error else "")
                except (OSError, ValueError):
                    final = "removed"
                lines.append(f"{self.label(job)}: {final} after {duration(time.time() - began)}")
                del watched[job]
            if lines:
                self.draw(lines, final=True)
            if not running:
                if first:
                    print("no backup job is running", file=self.out)
                self.out.flush()
                return 0
            first = False
            lines = []
            for job, st in running:
                watched[job] = st
                if job not in self.started:
                    self.started[job] = _began(job)
                lines += self.progress_lines(job, st, now)
            self.draw(lines)
            time.sleep(self.interval)

    def label(self, job: Path) -> str:
        return f"{job.parent.parent.name} backup {job.name}"

    def progress_lines(self, job: Path, st: JobStatus, now: float) -> list[str]:
        lines = []
        for d in st.disks:
            rate = self.rates.setdefault((job, d.name), Rate()).add(now, d.done)
            if rate:
                left = (d.total - d.done) / rate if d.total > d.done else 0.0
                speed = f"{human(rate)}/s  {duration(left)} left"
            else:
                speed = "--/s  --:-- left"
            lines.append(f"{self.label(job)} ({st.mode}) {d.name} {bar(d.done, d.total)} "
                         f"{percent(d.done, d.total)}  {human(d.done)}/{human(d.total)}  "
                         f"{speed}")
        return lines

    def draw(self, lines: list[str], final: bool = False) -> None:
        """On a terminal, replace the previous progress lines; final lines stay."""
        if self.tty and self.drawn:
            self.out.write(f"\x1b[{self.drawn}F\x1b[J")
        self.out.write("".join(line + "\n" for line in lines))
        self.out.flush()
        self.drawn = 0 if final else len(lines)


def _began(job: Path) -> float:
    """When a job began: its directory's mtime (now, if it cannot be read)."""
    try:
        return os.stat(job).st_mtime
    except OSError:
        return time.time()


# ---- vcfs wait --------------------------------------------------------------------------------


def backup_dir(path: Path) -> Path:
    """The job directory `path` names (following `latest`), or NotABackup."""
    job = Path(os.path.realpath(path))
    try:
        if job.parent.name != "backups" or not job.is_dir():
            raise NotABackup(f"{path}: not a backup job directory (MOUNT/DOMAIN/backups/ID)")
        read_status(job)
    except (OSError, ValueError):
        raise NotABackup(f"{path}: not a backup job directory (no readable status)") from None
    return job


def wait(path: Path, *, interval: float = 0.2, err: TextIO | None = None) -> int:
    """`vcfs wait BACKUP`: 0 completed, 1 failed/cancelled/gone, 2 not a backup."""
    err = err or sys.stderr
    try:
        job = backup_dir(path)
    except NotABackup as e:
        print(f"vcfs: {e}", file=err)
        return 2
    name = f"backup {job.name} of {job.parent.parent.name}"
    while True:
        try:
            st = read_status(job)
        except FileNotFoundError:
            print(f"vcfs: {name} was removed before it finished", file=err)
            return 1
        except (OSError, ValueError) as e:
            print(f"vcfs: {name}: cannot read its status: {e}", file=err)
            return 1
        if st.state != RUNNING:
            break
        time.sleep(interval)
    if st.state == COMPLETED:
        return 0
    print(f"vcfs: {name} {st.state}" + (f": {st.error}" if st.error else ""), file=err)
    return 1
