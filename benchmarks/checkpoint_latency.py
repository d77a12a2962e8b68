"""Checkpoint create/delete latency through vcfs against the same operations done with raw QMP.

Starts one real QEMU VM (two qcow2 disks) in a temporary directory, mounts vcfs on it in the
foreground as a subprocess, and then, interleaved round by round so that both sides see the same
machine load:

- vcfs: `os.mkdir(checkpoints/NAME)` and `os.rmdir(...)` from this process, plus the same through
  `mkdir`/`rmdir` subprocesses (the figure a user at a shell sees, process start included);
- raw QMP over the VM's test monitor: one `transaction` of persistent `block-dirty-bitmap-add`
  per disk, and one of `block-dirty-bitmap-remove` per disk - what vcfs sends QEMU underneath.

Prints the median and p90 of each, the overhead vcfs adds over raw QMP, and libvirt's published
reference figures for context. Everything it starts is torn down, also on errors and Ctrl-C.

    .venv/bin/python benchmarks/checkpoint_latency.py [--rounds 20]
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.harness import vcfs_mounted
from tests.vm import VM, DiskSpec

DISKS = ("vda", "vdb")
WARMUP_ROUNDS = 2

# libvirt's figures for the same operations (virsh against libvirtd on a running QEMU domain),
# quoted for context only: they were measured elsewhere, not by this script.
LIBVIRT_CREATE_MS = 31.0
LIBVIRT_DELETE_MS = 19.0
LIBVIRT_VIRSH_START_MS = 16.0


def timed(fn: Callable[[], object]) -> float:
    """Run `fn` once; return its wall-clock time in milliseconds."""
    start = time.perf_counter_ns()
    fn()
    return (time.perf_counter_ns() - start) / 1e6


def run_ok(cmd: list[str]) -> None:
    """Run a command, raising with its stderr if it fails (a failed mkdir is no measurement)."""
    r = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()}")


def p90(samples: list[float]) -> float:
    """The 90th percentile by nearest rank (an observed sample, not an interpolation)."""
    ordered = sorted(samples)
    return ordered[math.ceil(0.9 * len(ordered)) - 1]


class Bench:
    """The measurements of one run, keyed by row label, in insertion (= display) order."""

    def __init__(self, vm: VM, mnt: Path, scratch: Path) -> None:
        self.vm = vm
        self.cps = mnt / vm.name / "checkpoints"
        self.scratch = scratch
        self.samples: dict[str, list[float]] = {}

    def record(self, label: str, ms: float, keep: bool) -> None:
        """Keep a sample unless this is a warm-up round."""
        if keep:
            self.samples.setdefault(label, []).append(ms)

    def raw_add(self, name: str) -> None:
        """One transaction adding a persistent bitmap on every disk, as vcfs's mkdir does."""
        actions = [
            {"type": "block-dirty-bitmap-add",
             "data": {"node": f"{d}-format", "name": name, "persistent": True}}
            for d in DISKS
        ]  # fmt: skip
        self.vm.qmp("transaction", actions=actions)

    def raw_remove(self, name: str) -> None:
        """One transaction removing the bitmap from every disk, as vcfs's rmdir does."""
        actions = [
            {"type": "block-dirty-bitmap-remove", "data": {"node": f"{d}-format", "name": name}}
            for d in DISKS
        ]
        self.vm.qmp("transaction", actions=actions)

    def round(self, i: int, keep: bool) -> None:
        """One round of every measurement; which side goes first alternates to cancel order bias.

        Each round creates and deletes a leaf checkpoint, so every round starts from the same
        checkpoint tree (empty) and the same set of bitmaps.
        """
        sides = [self._vcfs_round, self._raw_round]
        if i % 2:
            sides.reverse()
        for side in sides:
            side(i, keep)

    def _vcfs_round(self, i: int, keep: bool) -> None:
        path = self.cps / f"v{i}"
        self.record("vcfs os.mkdir", timed(lambda: os.mkdir(path)), keep)
        self.record("vcfs os.rmdir", timed(lambda: os.rmdir(path)), keep)
        path = self.cps / f"s{i}"
        self.record("vcfs mkdir(1) process", timed(lambda: run_ok(["mkdir", str(path)])), keep)
        self.record("vcfs rmdir(1) process", timed(lambda: run_ok(["rmdir", str(path)])), keep)
        # The same commands on a local directory: what process start alone costs.
        local = self.scratch / f"l{i}"
        self.record("local mkdir(1) process", timed(lambda: run_ok(["mkdir", str(local)])), keep)
        self.record("local rmdir(1) process", timed(lambda: run_ok(["rmdir", str(local)])), keep)

    def _raw_round(self, i: int, keep: bool) -> None:
        name = f"r{i}"
        self.record("raw QMP add transaction", timed(lambda: self.raw_add(name)), keep)
        self.record("raw QMP remove transaction", timed(lambda: self.raw_remove(name)), keep)

    def check_vcfs_really_creates_bitmaps(self) -> None:
        """Fail loudly if vcfs's mkdir does not do what the raw side is compared with."""
        os.mkdir(self.cps / "probe")
        try:
            for d in DISKS:
                b = self.vm.bitmaps(d).get("probe")
                if not (b and b.get("persistent") and b.get("recording")):
                    raise RuntimeError(f"vcfs mkdir made no persistent bitmap on {d}: {b}")
        finally:
            os.rmdir(self.cps / "probe")
        left = {d: sorted(self.vm.bitmaps(d)) for d in DISKS}
        if any(left.values()):
            raise RuntimeError(f"vcfs rmdir left bitmaps behind: {left}")

    def median(self, label: str) -> float:
        """Median of a row, in ms."""
        return statistics.median(self.samples[label])

    def report(self, rounds: int) -> None:
        """Print the table, vcfs's overhead over raw QMP, and libvirt's reference figures."""
        print(f"\n{rounds} rounds, {len(DISKS)} qcow2 disks; times in ms\n")
        print(f"{'operation':<30} {'median':>8} {'p90':>8}")
        for label, samples in self.samples.items():
            print(f"{label:<30} {statistics.median(samples):>8.2f} {p90(samples):>8.2f}")

        print("\nvcfs overhead over raw QMP (median - median, and ratio):")
        for op, vcfs_label, raw_label in (
            ("create", "vcfs os.mkdir", "raw QMP add transaction"),
            ("delete", "vcfs os.rmdir", "raw QMP remove transaction"),
        ):
            v, r = self.median(vcfs_label), self.median(raw_label)
            print(f"  {op}: {v:.2f} - {r:.2f} = {v - r:+.2f} ms  (x{v / r:.1f})")

        print("\nuser-visible, process start included (libvirt measured elsewhere, for context):")
        for op, vcfs_label, local_label, libvirt_ms in (
            ("create", "vcfs mkdir(1) process", "local mkdir(1) process", LIBVIRT_CREATE_MS),
            ("delete", "vcfs rmdir(1) process", "local rmdir(1) process", LIBVIRT_DELETE_MS),
        ):
            v, start = self.median(vcfs_label), self.median(local_label)
            print(
                f"  {op}: vcfs {v:.2f} ms, of which ~{start:.2f} ms starting the process;"
                f" virsh {libvirt_ms:.0f} ms, of which {LIBVIRT_VIRSH_START_MS:.0f} ms"
                " starting virsh"
            )


def main(argv: list[str] | None = None) -> int:
    """Set up, measure, report, tear down."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20, help="measured rounds (default 20)")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    for tool in ("qemu-system-x86_64", "qemu-img", "fusermount3"):
        if shutil.which(tool) is None:
            print(f"checkpoint_latency: {tool} is not on PATH", file=sys.stderr)
            return 1

    # A short base path: QEMU's unix socket paths must fit in 107 bytes.
    base = Path(tempfile.mkdtemp(prefix="vcfs-bench-"))
    vm = VM("bench", base / "qmp", base / "work",
            [DiskSpec(d, size=64 << 20) for d in DISKS])  # fmt: skip
    scratch = base / "scratch"
    scratch.mkdir()
    try:
        started = time.monotonic()
        vm.start()
        with vcfs_mounted(vm.host_dir, base / "vcfs") as mnt:
            bench = Bench(vm, mnt, scratch)
            bench.check_vcfs_really_creates_bitmaps()
            for i in range(WARMUP_ROUNDS + args.rounds):
                bench.round(i, keep=i >= WARMUP_ROUNDS)
            bench.report(args.rounds)
        print(f"\n(total run time {time.monotonic() - started:.1f} s)")
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        try:
            vm.stop()
        finally:
            vm.kill()
            shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
