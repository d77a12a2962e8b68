"""Reading a pull backup through vcfs against nbdcopy of the same NBD export, in one run.

For a 4 GiB qcow2 disk holding 1 GiB of data - once in four 256 MiB runs, once in 64 KiB pieces
scattered over the whole disk - begin one pull backup, then alternately copy the point-in-time
image to a file with `cp disks/vda` and `cp disks/vda.qcow2` (through vcfs) and with `nbdcopy`
straight from the export vcfs's backup created; and, to separate reading from writing, read
`disks/vda.qcow2` into /dev/null with cat against `nbdcopy … null:`.
Caches are dropped before every run. Prints each run, the medians, the
ratio of throughputs (nbdcopy time / cp time: 1.0 means as fast as nbdcopy), and the time from
`new` to the first byte readable, next to libvirt's 59 ms `backup-begin` (which reads nothing).

    .venv/bin/python benchmarks/backup_read.py [--rounds 3] [--layouts contiguous,scattered]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from benchmarks.harness import median, timed, vcfs_mounted
from tests.vm import VM, DiskSpec

GiB, MiB, KiB = 1 << 30, 1 << 20, 1 << 10
SIZE = 4 * GiB
LIBVIRT_BACKUP_BEGIN_MS = 59.0


def fill(image: Path, layout: str) -> None:
    """Create the disk image holding 1 GiB of data in the given layout (before QEMU opens it)."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), str(SIZE)], check=True)
    if layout == "contiguous":
        cmds = [f"write -P 0x{0x40 + i:02x} {i * GiB} {256 * MiB}" for i in range(4)]
    else:  # 1 GiB in 64 KiB pieces, one in every four clusters
        cmds = [f"write -P 0x{(i % 200) + 1:02x} {i * 256 * KiB} {64 * KiB}"
                for i in range(SIZE // (256 * KiB))]
    subprocess.run(["qemu-io", "-f", "qcow2", str(image)], input="\n".join(cmds) + "\n",
                   text=True, check=True, capture_output=True)


def first_byte_ms(dom: Path, rounds: int) -> list[float]:
    """Time from writing `new` to the first byte read from the image, then end the backup."""
    out = []
    for _ in range(rounds):
        t = time.monotonic()
        fd = os.open(dom / "backups/new", os.O_WRONLY)
        os.write(fd, b"<domainbackup mode='pull'/>")
        os.close(fd)
        job = os.readlink(dom / "backups/latest")
        with open(dom / "backups" / job / "disks/vda", "rb", buffering=0) as f:
            f.read(1)
        out.append((time.monotonic() - t) * 1e3)
        os.rmdir(dom / "backups" / job)
    return out


def incremental_runs(vm: VM, dom: Path, base: Path) -> list[tuple[int, float, int, int]]:
    """64 MiB, then 512 MiB dirty since a checkpoint: time and NBD bytes of the qcow2 copy."""
    results = []
    out = base / "inc.qcow2"
    for dirty in (64 * MiB, 512 * MiB):
        begin = (f"<domainbackup mode='pull'><domaincheckpoint><name>base{dirty}</name>"
                 "</domaincheckpoint></domainbackup>")
        (dom / "backups/new").write_text(begin)
        job = os.readlink(dom / "backups/latest")
        os.rmdir(dom / "backups" / job)
        # dirty data in 1 MiB pieces spread over the disk, as a guest would leave it
        step = SIZE // (dirty // MiB)
        for i in range(dirty // MiB):
            vm.write("vda", i * step, MiB, 0x5A)
        inc = (f"<domainbackup mode='pull'><incremental>base{dirty}</incremental>"
               "</domainbackup>")
        (dom / "backups/new").write_text(inc)
        job = os.readlink(dom / "backups/latest")
        seconds = timed(["cp", str(dom / "backups" / job / "disks/vda.qcow2"), str(out)])
        status = (dom / "backups" / job / "status").read_text()
        nbd_bytes = int(re.search(r"nbd-read: (\d+)", status)[1])
        results.append((dirty, seconds, nbd_bytes, out.stat().st_size))
        out.unlink()
        os.rmdir(dom / "backups" / job)
    return results


def run_layout(layout: str, rounds: int, base: Path) -> None:
    vm = VM("bench", base / "host", base / "work", [DiskSpec("vda", size=SIZE)])
    vm.work_dir.mkdir(parents=True, exist_ok=True)
    fill(vm.image("vda"), layout)
    vm.start()
    try:
        with vcfs_mounted(vm.host_dir, base / "vcfs") as mnt:
            dom = mnt / "bench"
            os.mkdir(dom / "backups/b")
            xml = (dom / "backups/b/xml").read_text()
            sock = re.search(r"socket='([^']+)'", xml)[1]
            uri = f"nbd+unix:///vda?socket={sock}"
            out = base / "copy.raw"
            cp_times, qcow_times, nbd_times, dd_times, null_times = [], [], [], [], []
            for _ in range(rounds):
                # Reading alone, no file written: where vcfs's own time goes.
                dd_times.append(timed(["sh", "-c",
                                       f"cat {dom / 'backups/b/disks/vda.qcow2'} >/dev/null"]))
                null_times.append(timed(["nbdcopy", uri, "null:"]))
                cp_times.append(timed(["cp", str(dom / "backups/b/disks/vda"), str(out)]))
                out.unlink()
                qcow_times.append(timed(["cp", str(dom / "backups/b/disks/vda.qcow2"), str(out)]))
                out.unlink()
                nbd_times.append(timed(["nbdcopy", uri, str(out)]))
                out.unlink()
            os.rmdir(dom / "backups/b")
            fb = first_byte_ms(dom, 10)
            incremental = incremental_runs(vm, dom, base) if layout == "contiguous" else []
    finally:
        vm.stop()
        vm.kill()
    cp, qc, nc = median(cp_times), median(qcow_times), median(nbd_times)
    print(f"\n{layout}: 4 GiB disk, 1 GiB data")
    print("  cp via vcfs  : " + "  ".join(f"{t:6.2f}s" for t in cp_times)
          + f"   median {cp:.2f} s = {SIZE / GiB / cp:.2f} GiB/s of image")
    print("  nbdcopy      : " + "  ".join(f"{t:6.2f}s" for t in nbd_times)
          + f"   median {nc:.2f} s = {SIZE / GiB / nc:.2f} GiB/s of image")
    print("  cp vda.qcow2 : " + "  ".join(f"{t:6.2f}s" for t in qcow_times)
          + f"   median {qc:.2f} s")
    dd, null = median(dd_times), median(null_times)
    print(f"  read only: cat vda.qcow2 > /dev/null {dd:.2f} s, nbdcopy to null: {null:.2f} s"
          f" -> ratio {null / dd:.2f} (goal >= 1.0; the qcow2 view holds no holes)")
    print(f"  throughput ratio cp raw/nbdcopy:   {nc / cp:.2f}  (goal >= 0.8)")
    print(f"  throughput ratio cp qcow2/nbdcopy: {nc / qc:.2f}  (goal >= 0.8)")
    for dirty, seconds, nbd_bytes, size in incremental:
        print(f"  incremental, {dirty // MiB} MiB dirty: cp vda.qcow2 {seconds:.2f} s, "
              f"read from NBD {nbd_bytes / dirty:.3f} x dirty (goal 1.000), "
              f"image {size / MiB:.1f} MiB")
    print(f"  new -> first byte: median {median(fb):.1f} ms (min {min(fb):.1f}) over {len(fb)}"
          f"   [libvirt backup-begin alone: {LIBVIRT_BACKUP_BEGIN_MS:.0f} ms]")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--layouts", default="contiguous,scattered")
    args = parser.parse_args()
    for layout in args.layouts.split(","):
        base = Path(tempfile.mkdtemp(prefix="vcfs-bench-"))
        try:
            run_layout(layout, args.rounds, base)
        finally:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
