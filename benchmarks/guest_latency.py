"""What a pull backup costs the guest: write latency without a backup, under vcfs, under libvirt.

Issue 11's closing note. One VM with a 1 GiB qcow2 disk, filled with data before QEMU starts (so
every copy-before-write copies a real cluster), and vcfs mounted on it. Round by round, so that
the three see the same machine load, the guest writes `--writes` 4 KiB blocks at random offsets:

- `none`: no backup;
- `vcfs`: during a vcfs pull backup (`mkdir backups/NAME`): the guest's device is switched onto
  a `copy-before-write` filter (`on-cbw-error=break-snapshot`, `cbw-timeout`) into a qcow2
  scratch, exported through `snapshot-access`;
- `libvirt`: during libvirt 9's construction, built here over the VM's test monitor with no vcfs
  involved: a qcow2 scratch node whose backing is the disk, `blockdev-backup sync=none` from the
  disk into it (QEMU inserts its own copy-before-write filter, failing the guest's write when a
  copy fails), and an NBD export of the scratch node.

The guest's writes go through its virtio device's BlockBackend (HMP `qemu-io`), hence through any
filter in front of the disk; each write's latency is qemu-io's own measure (its ops/sec is
1/time, printed at full precision), not the monitor round trip. A write mostly lands on a
cluster not yet copied (a fresh backup each round; random 4 KiB offsets over 16,384 clusters),
which is the copy-before-write cost; caches are dropped before each phase, so the copies read
the disk as a guest's old data would be. Prints every round, then a table (median, p90, p99,
mean over all rounds) and the ratios to `none` and of vcfs to libvirt.

    .venv/bin/python -m benchmarks.guest_latency [--rounds 10] [--writes 500] [--size-mib 1024]
"""

from __future__ import annotations

import argparse
import math
import os
import random
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.harness import drop_caches, vcfs_mounted
from tests.vm import VM, DiskSpec

KiB, MiB = 1 << 10, 1 << 20
BLOCK = 4 * KiB
PHASES = ("none", "vcfs", "libvirt")

_REPORT = re.compile(r"wrote (\d+)/\d+ bytes at offset (\d+)\n[^\n]*and ([0-9.]+) ops/sec")


def fill(image: Path, size: int) -> None:
    """Create the disk image full of data (before QEMU opens it): every cluster allocated."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), str(size)], check=True)
    step = 64 * MiB
    cmds = "".join(f"write -P 0x{0x10 + i % 200:02x} {off} {min(step, size - off)}\n"
                   for i, off in enumerate(range(0, size, step)))
    subprocess.run(["qemu-io", "-f", "qcow2", str(image)], input=cmds, text=True, check=True,
                   capture_output=True)


def guest_writes(vm: VM, offsets: list[int], pattern: int) -> list[float]:
    """Write 4 KiB at each offset through the guest's device; each write's latency in µs."""
    out = []
    for offset in offsets:
        report = vm.qemu_io("vda", f"write -P 0x{pattern:02x} {offset} {BLOCK}")
        m = _REPORT.search(report)
        if not m or int(m[1]) != BLOCK or int(m[2]) != offset:
            raise RuntimeError(f"guest write at {offset} failed: {report.strip()}")
        out.append(1e6 / float(m[3]))
    return out


class LibvirtFleecing:
    """libvirt 9's pull backup, built over the test monitor: scratch + sync=none + NBD export.

    Like libvirt: the scratch qcow2 overlays the disk's node (so the export shows the point in
    time), `blockdev-backup sync=none` (QEMU's own copy-before-write, which fails the guest's
    write when a copy fails) copies old data there, and the scratch node is exported read-only.
    """

    JOB, EXPORT = "backup-vda-libvirt", "libvirt-vda"

    def __init__(self, vm: VM, work: Path) -> None:
        self.vm = vm
        self.scratch = work / "libvirt-scratch.qcow2"
        self.socket = work / "libvirt-nbd.sock"

    def begin(self, size: int) -> None:
        """Create the scratch, start the job and the export (what `virsh backup-begin` does)."""
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(self.scratch), str(size)],
                       check=True)
        vm = self.vm
        vm.qmp("blockdev-add", driver="file", node_name="lv-scratch-file",
               filename=str(self.scratch))
        vm.qmp("blockdev-add", driver="qcow2", node_name="lv-scratch", file="lv-scratch-file",
               backing="vda-format")
        vm.qmp("transaction", actions=[{"type": "blockdev-backup", "data": {
            "device": "vda-format", "target": "lv-scratch", "sync": "none", "job-id": self.JOB,
            "auto-finalize": True, "auto-dismiss": False}}])
        vm.qmp("nbd-server-start", addr={"type": "unix", "data": {"path": str(self.socket)}})
        vm.qmp("block-export-add", type="nbd", id=self.EXPORT, node_name="lv-scratch",
               name="vda", writable=False)
        status = {j["id"]: j["status"] for j in vm.qmp("query-jobs")}
        if status.get(self.JOB) != "running":
            raise RuntimeError(f"libvirt-style backup job is not running: {status}")

    def end(self) -> None:
        """Tear it all down, as `virsh domjobabort` does for a pull backup."""
        vm = self.vm
        vm.qmp("block-export-del", id=self.EXPORT)
        vm.qmp("nbd-server-stop")
        vm.qmp("job-cancel", id=self.JOB)
        deadline = time.monotonic() + 10
        while {j["id"]: j["status"] for j in vm.qmp("query-jobs")}.get(self.JOB) != "concluded":
            if time.monotonic() > deadline:
                raise RuntimeError("libvirt-style backup job did not conclude")
            time.sleep(0.01)
        vm.qmp("job-dismiss", id=self.JOB)
        vm.qmp("blockdev-del", node_name="lv-scratch")
        vm.qmp("blockdev-del", node_name="lv-scratch-file")
        self.scratch.unlink()


def device_node(vm: VM) -> str:
    """The node the guest's device writes to (the disk's node, or a filter over it)."""
    for dev in vm.qmp("query-block"):
        if dev.get("qdev") in ("vda", "/machine/peripheral/vda/virtio-backend"):
            return str(dev["inserted"]["node-name"])
    raise RuntimeError("no device vda")


def allocated(directory: Path) -> int:
    """Bytes allocated on disk by the files in `directory` (the scratch images)."""
    return sum(f.stat().st_blocks * 512 for f in directory.iterdir() if f.is_file())


def percentile(samples: list[float], p: float) -> float:
    """The p-th percentile by nearest rank (an observed sample, not an interpolation)."""
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def run(
    rounds: int, writes: int, size: int, base: Path
) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Measure every phase `rounds` times; the latencies (µs) and scratch growth of each."""
    vm = VM("lat", base / "host", base / "work", [DiskSpec("vda", size=size)])
    vm.work_dir.mkdir(parents=True, exist_ok=True)
    fill(vm.image("vda"), size)
    rng = random.Random(11)
    samples: dict[str, list[float]] = {p: [] for p in PHASES}
    copied: dict[str, int] = dict.fromkeys(PHASES, 0)
    vm.start()
    try:
        with vcfs_mounted(vm.host_dir, base / "vcfs") as mnt:
            backups = mnt / vm.name / "backups"
            libvirt_dir = base / "libvirt"
            libvirt_dir.mkdir()
            libvirt = LibvirtFleecing(vm, libvirt_dir)
            scratch_dirs = {"none": None, "vcfs": base / "vcfs/state/scratch",
                            "libvirt": libvirt_dir}

            def vcfs_begin(name: str) -> Callable[[], None]:
                os.mkdir(backups / name)
                status = (backups / name / "status").read_text()
                if "state: running" not in status:
                    raise RuntimeError(f"vcfs backup is not running:\n{status}")

                def end() -> None:
                    status = (backups / name / "status").read_text()
                    os.rmdir(backups / name)
                    if "state: running" not in status:
                        raise RuntimeError(f"vcfs backup did not stay running:\n{status}")
                return end

            def libvirt_begin(name: str) -> Callable[[], None]:
                libvirt.begin(size)
                return libvirt.end

            begins: dict[str, Callable[[str], Callable[[], None]]] = {
                "none": lambda name: lambda: None, "vcfs": vcfs_begin, "libvirt": libvirt_begin,
            }
            for r in range(rounds):
                line = []
                for i, phase in enumerate(PHASES):
                    offsets = [rng.randrange(size // BLOCK) * BLOCK for _ in range(writes)]
                    drop_caches()
                    end = begins[phase](f"lat{r}")
                    try:
                        # A write that bypasses the backup's filter would measure nothing.
                        if (device_node(vm) == "vda-format") != (phase == "none"):
                            raise RuntimeError(f"{phase}: the device writes to {device_node(vm)}")
                        scratch = scratch_dirs[phase]
                        before = allocated(scratch) if scratch else 0
                        lat = guest_writes(vm, offsets, 0x80 + (3 * r + i) % 100)
                        copied[phase] += (allocated(scratch) - before) if scratch else 0
                    finally:
                        end()
                    samples[phase] += lat
                    line.append(f"{phase} {statistics.median(lat):7.1f} / "
                                f"{percentile(lat, 99):8.1f}")
                print(f"round {r + 1}: median / p99 µs  " + "   ".join(line), flush=True)
            if (mnt / vm.name / "errors").read_text().strip():
                raise RuntimeError("vcfs reported errors:\n" + (mnt / vm.name / "errors")
                                   .read_text())
    finally:
        vm.stop()
        vm.kill()
    for word in ("failed", "error"):
        if word in vm.log_text().lower():
            raise RuntimeError(f"QEMU logged a failure:\n{vm.log_text()}")
    return samples, copied


def report(samples: dict[str, list[float]], copied: dict[str, int], size: int) -> None:
    print(f"\nguest 4 KiB random writes over a {size // MiB} MiB disk full of data, "
          f"{len(samples['none'])} per phase (µs, qemu-io's own timing)")
    print(f"  {'phase':8} {'median':>9} {'p90':>9} {'p99':>9} {'mean':>9}   scratch growth")
    stats = {}
    for phase in PHASES:
        lat = samples[phase]
        stats[phase] = (statistics.median(lat), percentile(lat, 99))
        print(f"  {phase:8} {statistics.median(lat):9.1f} {percentile(lat, 90):9.1f} "
              f"{percentile(lat, 99):9.1f} {statistics.fmean(lat):9.1f}   "
              f"{copied[phase] / MiB:7.1f} MiB = {copied[phase] / len(lat) / KiB:5.1f} KiB/write")
    (nm, np), (vm_, vp), (lm, lp) = stats["none"], stats["vcfs"], stats["libvirt"]
    print(f"  vcfs / none     : median x{vm_ / nm:.2f}, p99 x{vp / np:.2f}")
    print(f"  libvirt / none  : median x{lm / nm:.2f}, p99 x{lp / np:.2f}")
    print(f"  vcfs / libvirt  : median x{vm_ / lm:.2f}, p99 x{vp / lp:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--writes", type=int, default=500, help="4 KiB writes per phase and round")
    parser.add_argument("--size-mib", type=int, default=1024, help="the disk's size")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="vcfs-bench-"))
    try:
        samples, copied = run(args.rounds, args.writes, args.size_mib * MiB, base)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    report(samples, copied, args.size_mib * MiB)


if __name__ == "__main__":
    main()
