"""Soak: two domains, two running pull backups, 16 concurrent readers and checkpoint churn.

Runs for --duration seconds (default 300; loopback only, every loop bounded) and samples vcfs's
resident memory and open file descriptors every --every seconds. Fails (exit 1) on any failed
operation or if vcfs dies; prints the samples so memory and descriptor trends can be read.

    .venv/bin/python -m benchmarks.soak [--duration 300] [--every 15]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.harness import vcfs_mounted, vcfs_pid
from tests.vm import VM, DiskSpec

MiB = 1 << 20
READERS = 16


def sample(pid: int) -> tuple[int, int]:
    """(resident KiB, open descriptors) of a process."""
    rss = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text()
               .splitlines() if line.startswith("VmRSS:"))
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


class Soak:
    """The load: readers over the backup images, checkpoint churn, counters."""

    def __init__(self, mnt: Path, vms: list[VM], until: float) -> None:
        self.mnt, self.vms, self.until = mnt, vms, until
        self.ops = 0
        self.failures: list[str] = []
        self.lock = threading.Lock()

    def count(self, error: str | None = None) -> None:
        with self.lock:
            self.ops += 1
            if error:
                self.failures.append(error)

    def reader(self, i: int) -> None:
        rng = random.Random(i)
        vm = self.vms[i % 2]
        name = "vda.qcow2" if i % 4 == 3 else "vda"
        path = self.mnt / vm.name / "backups/soak/disks" / name
        while time.monotonic() < self.until:
            try:
                with open(path, "rb") as f:
                    size = os.fstat(f.fileno()).st_size
                    if rng.random() < 0.5:  # a sequential pass over 32 MiB
                        f.seek(rng.randrange(0, size - 32 * MiB, MiB))
                        for _ in range(32):
                            f.read(MiB)
                    else:  # random small reads
                        for _ in range(64):
                            f.seek(rng.randrange(0, size - 65536))
                            f.read(65536)
                self.count()
            except OSError as e:
                self.count(f"reader {i} {path}: {e}")

    def churn(self, vm: VM) -> None:
        cps = self.mnt / vm.name / "checkpoints"
        n = 0
        while time.monotonic() < self.until:
            n += 1
            try:
                os.mkdir(cps / f"soak{n}")
                vm.write("vdb", (n % 64) * MiB, 64 << 10, n % 250 + 1)
                (cps / f"soak{n}/size").read_text()
                if n > 3:
                    os.rmdir(cps / f"soak{n - 3}")
                self.count()
            except OSError as e:
                self.count(f"churn {vm.name} {n}: {e}")
            time.sleep(0.05)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=300.0)
    ap.add_argument("--every", type=float, default=15.0)
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="vcfs-soak-"))
    vms = [VM(f"vm{i}", base / "host", base / "work",
              [DiskSpec("vda", size=256 * MiB), DiskSpec("vdb", size=64 * MiB)])
           for i in (1, 2)]
    try:
        for i, vm in enumerate(vms):
            vm.start()
            for k in range(0, 256, 16):
                vm.write("vda", k * MiB, 4 * MiB, 0x30 + i + k % 7)
        with vcfs_mounted(vms[0].host_dir, base / "vcfs") as mnt:
            pid = vcfs_pid(mnt)
            for vm in vms:
                os.mkdir(mnt / vm.name / "backups/soak")
            until = time.monotonic() + args.duration
            soak = Soak(mnt, vms, until)
            threads = [threading.Thread(target=soak.reader, args=(i,)) for i in range(READERS)]
            threads += [threading.Thread(target=soak.churn, args=(vm,)) for vm in vms]
            for t in threads:
                t.start()
            start = time.monotonic()
            print(f"{'t (s)':>6} {'RSS (MiB)':>10} {'fds':>5} {'ops':>8} {'failures':>9}")
            while any(t.is_alive() for t in threads):
                rss, fds = sample(pid)
                print(f"{time.monotonic() - start:6.0f} {rss / 1024:10.1f} {fds:5d} "
                      f"{soak.ops:8d} {len(soak.failures):9d}", flush=True)
                time.sleep(min(args.every, max(0.1, until - time.monotonic() + 0.5)))
            for t in threads:
                t.join()
            rss, fds = sample(pid)
            print(f"{'end':>6} {rss / 1024:10.1f} {fds:5d} {soak.ops:8d} {len(soak.failures):9d}")
            for vm in vms:
                os.rmdir(mnt / vm.name / "backups/soak")
        for failure in soak.failures[:20]:
            print("FAILED:", failure)
        print(f"{soak.ops} operations, {len(soak.failures)} failed, {READERS} readers, "
              f"2 domains, {args.duration:.0f} s")
        return 1 if soak.failures else 0
    finally:
        for vm in vms:
            vm.kill()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
