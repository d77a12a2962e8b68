"""Huge, mostly empty disks: cost follows the data, not the virtual size; memory stays bounded.

For a 1 TiB and a 16 TiB qcow2 disk holding 2,000 scattered 64 KiB extents (125 MiB), begin a
pull backup and measure, against the same NBD export in the same run:
- `stat disks/vda.qcow2` on a fresh backup (the layout needs the whole extent map), next to
  `qemu-img map` of the disk image itself (QEMU's own block-status walk: the floor);
- `cp disks/vda` (hole-aware through SEEK_DATA/SEEK_HOLE) against `nbdcopy` → file;
- `cp disks/vda.qcow2` (its size and rate: proportional to the data, not the disk);
- the cost of one FUSE read request, from `dd` over a hole with 128 KiB and 1 MiB requests.
Then a VM with four 1 TiB disks: four `cp` of the raw views and four of the qcow2 views at
once, sampling vcfs's resident memory, against the bound `--image-cache` sets.
Copies go to a tmpfs (ext4 cannot hold a 16 TiB file). Caches are dropped before every run.

    .venv/bin/python benchmarks/huge_disks.py [--rounds 3] [--sizes 1,16]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from benchmarks.harness import drop_caches, median, timed, vcfs_mounted, vcfs_pid
from tests.vm import VM, DiskSpec, scattered_image
from vcfs.domain.reader import BLOCK, CACHE_BYTES, LOADING

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
UNIT = 64 * KiB
EXTENTS = 2000


@contextlib.contextmanager
def tmpfs(path: Path) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4g", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def rss(pid: int) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", text)[1]) * KiB


def begin(dom: Path, name: str) -> tuple[Path, str]:
    """Begin a full pull backup; its disks directory and the NBD URI of vda."""
    os.mkdir(dom / "backups" / name)
    sock = re.search(r"socket='([^']+)'", (dom / "backups" / name / "xml").read_text())[1]
    return dom / "backups" / name / "disks", f"nbd+unix:///vda?socket={sock}"


def per_request_us(raw: Path, size: int) -> tuple[float, float]:
    """µs per FUSE read of a hole (no NBD involved), with 128 KiB and 1 MiB requests."""
    out = []
    for bs, count in ((128 * KiB, 16384), (MiB, 4096)):
        skip = (size // 2) // bs  # the middle of the disk: a hole, whatever the seed
        t = timed(["dd", f"if={raw}", "of=/dev/null", f"bs={bs}", f"count={count}",
                   f"skip={skip}"])
        out.append(t / count * 1e6)
    return out[0], out[1]


def run_size(tib: int, rounds: int, base: Path) -> None:
    size = tib * TiB
    vm = VM("big", base / "host", base / "work", [DiskSpec("vda", size=size)])
    vm.work_dir.mkdir(parents=True, exist_ok=True)
    scattered_image(vm.image("vda"), size, EXTENTS, seed=tib)
    qemu_map = timed(["qemu-img", "map", "--output=json", str(vm.image("vda"))])
    vm.start()
    stats, cps, nbds, qcows = [], [], [], []
    try:
        with vcfs_mounted(vm.host_dir, base / "vcfs") as mnt, tmpfs(base / "out") as out:
            dom = mnt / "big"
            # A fresh backup for each measure: like nbdcopy, vcfs then pays for the extent map.
            for r in range(rounds):
                disks, uri = begin(dom, f"s{r}")
                t = time.monotonic()
                qsize = (disks / "vda.qcow2").stat().st_size
                stats.append(time.monotonic() - t)
                qcows.append(timed(["cp", str(disks / "vda.qcow2"), str(out / "vda.qcow2")]))
                (out / "vda.qcow2").unlink()
                os.rmdir(dom / "backups" / f"s{r}")
                disks, uri = begin(dom, f"c{r}")
                cps.append(timed(["cp", str(disks / "vda"), str(out / "vda.raw")]))
                assert (out / "vda.raw").stat().st_blocks * 512 < 2 * EXTENTS * UNIT
                (out / "vda.raw").unlink()
                nbds.append(timed(["nbdcopy", uri, str(out / "vda.raw")]))
                (out / "vda.raw").unlink()
                if r == rounds - 1:
                    req128, req1m = per_request_us(disks / "vda", size)
                os.rmdir(dom / "backups" / f"c{r}")
    finally:
        vm.stop()
        vm.kill()
    st, cp, nb, qc = median(stats), median(cps), median(nbds), median(qcows)
    print(f"\n{tib} TiB disk, {EXTENTS} scattered 64 KiB extents ({EXTENTS * UNIT / MiB:.0f} MiB)")
    print("  stat vda.qcow2 (fresh backup): " + "  ".join(f"{t:.3f}s" for t in stats)
          + f"   median {st:.3f} s (goal < 0.5 s); qemu-img map of the image: {qemu_map:.3f} s")
    print("  cp vda (map incl): " + "  ".join(f"{t:6.2f}s" for t in cps) + f"   median {cp:.2f} s")
    print("  nbdcopy -> file  : " + "  ".join(f"{t:6.2f}s" for t in nbds) + f"   median {nb:.2f} s")
    print(f"  cp raw / nbdcopy : {cp / nb:.2f} x the time (goal <= 2.0)")
    print("  cp vda.qcow2     : " + "  ".join(f"{t:6.2f}s" for t in qcows)
          + f"   median {qc:.2f} s for {qsize / MiB:.0f} MiB = {qsize / MiB / qc:.0f} MiB/s"
          " (after its stat)")
    print(f"  one FUSE read of a hole: {req128:.0f} us (128 KiB), {req1m:.0f} us (1 MiB)")


def run_memory(base: Path) -> None:
    names = [f"vd{c}" for c in "abcd"]
    vm = VM("four", base / "host", base / "work", [DiskSpec(n, size=TiB) for n in names])
    vm.work_dir.mkdir(parents=True, exist_ok=True)
    for i, n in enumerate(names):
        scattered_image(vm.image(n), TiB, EXTENTS, seed=100 + i)
    vm.start()
    peaks: dict[str, int] = {}
    try:
        with vcfs_mounted(vm.host_dir, base / "vcfs") as mnt, tmpfs(base / "out") as out:
            pid = vcfs_pid(mnt)
            idle = rss(pid)
            disks, _ = begin(mnt / "four", "b")
            for suffix in ("", ".qcow2"):
                peak, done = 0, threading.Event()

                def sample(pid: int = pid, done: threading.Event = done) -> None:
                    nonlocal peak
                    while not done.is_set():
                        peak = max(peak, rss(pid))
                        time.sleep(0.02)

                sampler = threading.Thread(target=sample)
                sampler.start()
                drop_caches()
                t = time.monotonic()
                procs = [subprocess.Popen(["cp", str(disks / f"{n}{suffix}"),
                                           str(out / f"{n}{suffix}")]) for n in names]
                assert all(p.wait() == 0 for p in procs)
                elapsed = time.monotonic() - t
                done.set()
                sampler.join()
                peaks[suffix or ".raw"] = peak
                print(f"  four cp of {suffix or 'raw'} views at once: {elapsed:.2f} s, "
                      f"vcfs RSS peak {peak / MiB:.0f} MiB")
                for n in names:
                    (out / f"{n}{suffix}").unlink()
            os.rmdir(mnt / "four/backups/b")
    finally:
        vm.stop()
        vm.kill()
    bound = CACHE_BYTES + 2 * LOADING * BLOCK
    print(f"  vcfs RSS idle {idle / MiB:.0f} MiB; data-path bound (--image-cache "
          f"{CACHE_BYTES // MiB} MiB + {LOADING} blocks of {BLOCK // MiB} MiB loading, twice): "
          f"{bound / MiB:.0f} MiB above idle -> peak above idle "
          f"{(max(peaks.values()) - idle) / MiB:.0f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sizes", default="1,16", help="disk sizes in TiB, comma separated")
    parser.add_argument("--no-memory", action="store_true", help="skip the four-reader run")
    args = parser.parse_args()
    for tib in (int(s) for s in args.sizes.split(",")):
        base = Path(tempfile.mkdtemp(prefix="vcfs-bench-"))
        try:
            run_size(tib, args.rounds, base)
        finally:
            shutil.rmtree(base, ignore_errors=True)
    if not args.no_memory:
        print("\nfour readers of four 1 TiB views")
        base = Path(tempfile.mkdtemp(prefix="vcfs-bench-"))
        try:
            run_memory(base)
        finally:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
