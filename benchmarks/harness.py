"""Shared set-up for the benchmarks: a real vcfs mount in a subprocess, torn down always."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from vcfs.mountinfo import is_mounted

MOUNT_TIMEOUT = 10.0


@contextlib.contextmanager
def vcfs_mounted(host_dir: Path, base: Path, *args: str) -> Iterator[Path]:
    """Mount vcfs on `host_dir` under `base`; yield the mount point; always unmount."""
    mnt, log = base / "mnt", base / "vcfs.log"
    mnt.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "vcfs", "mount", "-f", "--state-dir", str(base / "state"),
           "--runtime-dir", str(base / "run"), *args, str(host_dir), str(mnt)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while not is_mounted(mnt):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"vcfs did not mount:\n{log.read_text()}")
            time.sleep(0.02)
        yield mnt
    except Exception:
        print(f"----- vcfs log -----\n{log.read_text(errors='replace')}", file=sys.stderr)
        raise
    finally:
        if is_mounted(mnt):
            if subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True).returncode:
                subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def drop_caches() -> None:
    """Empty the page cache so that no run reads what the previous one left in memory."""
    os.sync()
    with contextlib.suppress(OSError), open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def timed(cmd: list[str]) -> float:
    """Seconds one run of `cmd` takes from cold caches; RuntimeError if it fails."""
    drop_caches()
    t = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed: {r.stderr.strip()}")
    return time.monotonic() - t


def median(values: list[float]) -> float:
    """The median (values need not be sorted)."""
    s = sorted(values)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2


def vcfs_pid(mnt: Path) -> int:
    """The vcfs process serving `mnt` (its command line names the mount point)."""
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"vcfs" in cmdline and str(mnt).encode() in cmdline:
                return int(pid)
    raise RuntimeError(f"no vcfs process serves {mnt}")
