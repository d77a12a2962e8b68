"""vcfs over libvirt against libvirt's own tools: the latency of a checkpoint and of a backup
begin through the mount against `virsh` doing the same, and the copy of a pull backup's qcow2
view against `nbdcopy` of libvirt's export.

Run from the repository root as root: `.venv/bin/python -m benchmarks.libvirt_latency
[--rounds 10]`. It starts a private libvirtd (tests.libvirtd) with one domain whose 1 GiB qcow2
disk holds 256 MiB of data, mounts vcfs on the daemon's URI, and prints medians and ratios.
Both sides run as one process per operation (`mkdir(1)`/`rmdir(1)` against `virsh`), so each
pays its own start-up: that is what a script pays.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
from pathlib import Path

from benchmarks.harness import median, timed, vcfs_mounted
from tests.libvirtd import Libvirtd, LibvirtVM
from tests.vm import DiskSpec

GiB = 1 << 30
MiB = 1 << 20


def run_ok(cmd: list[str]) -> float:
    """Run a command; its wall-clock time in milliseconds (RuntimeError if it fails)."""
    start = time.perf_counter()
    r = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()}")
    return (time.perf_counter() - start) * 1000


def wait_no_job(vm: LibvirtVM) -> None:
    """virsh domjobabort returns before libvirt has torn the backup down."""
    deadline = time.monotonic() + 20
    while vm.dom.jobInfo()[0] != 0:
        if time.monotonic() > deadline:
            raise RuntimeError("the aborted job did not go away")
        time.sleep(0.01)


def fill(image: Path) -> None:
    """A 1 GiB qcow2 image with 256 MiB of data in 64 runs of 4 MiB, spread over the disk."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), str(GiB)], check=True)
    writes = [f"write -P 0x{0x10 + i % 0xE0:02x} {i * 16 * MiB} {4 * MiB}" for i in range(64)]
    cmd = ["qemu-io", "-f", "qcow2", str(image)]
    for w in writes:
        cmd += ["-c", w]
    subprocess.run(cmd, check=True, capture_output=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="vcfs-bench-"))
    daemon = Libvirtd()
    daemon.start()
    try:
        work = base / "work"
        work.mkdir()
        fill(work / "lv1-vda.qcow2")
        vm = LibvirtVM(daemon, "lv1", work, [DiskSpec("vda", size=GiB)])
        vm.start()
        virsh = ["virsh", "-q", "-c", daemon.uri]
        with vcfs_mounted(daemon.uri, base / "vcfs") as mnt:  # a URI: the harness passes it as is
            cps, backups = mnt / "lv1/checkpoints", mnt / "lv1/backups"
            results: dict[str, list[float]] = {k: [] for k in (
                "vcfs mkdir checkpoint", "virsh checkpoint-create-as",
                "vcfs rmdir checkpoint", "virsh checkpoint-delete",
                "vcfs mkdir backup (begin)", "virsh backup-begin",
                "vcfs rmdir backup (end)", "virsh domjobabort + gone")}
            backup_xml = work / "backup.xml"
            for i in range(args.rounds):
                results["vcfs mkdir checkpoint"].append(run_ok(["mkdir", f"{cps}/v{i}"]))
                results["vcfs rmdir checkpoint"].append(run_ok(["rmdir", f"{cps}/v{i}"]))
                results["virsh checkpoint-create-as"].append(run_ok(
                    [*virsh, "checkpoint-create-as", "lv1", f"r{i}", "--diskspec", "vda"]))
                results["virsh checkpoint-delete"].append(run_ok(
                    [*virsh, "checkpoint-delete", "lv1", f"r{i}"]))
                results["vcfs mkdir backup (begin)"].append(run_ok(["mkdir", f"{backups}/b{i}"]))
                results["vcfs rmdir backup (end)"].append(run_ok(["rmdir", f"{backups}/b{i}"]))
                backup_xml.write_text(
                    f"<domainbackup mode='pull'><server transport='unix' "
                    f"socket='{work}/virsh.sock'/><disks><disk name='vda' type='file'>"
                    f"<scratch file='{work}/virsh-scratch-{i}.qcow2'/></disk></disks>"
                    "</domainbackup>")
                results["virsh backup-begin"].append(run_ok(
                    [*virsh, "backup-begin", "lv1", str(backup_xml)]))
                start = time.perf_counter()
                run_ok([*virsh, "domjobabort", "lv1"])
                wait_no_job(vm)
                results["virsh domjobabort + gone"].append((time.perf_counter() - start) * 1000)

            print(f"{'operation (ms, one process each)':36} {'median':>8}")
            for label, samples in results.items():
                print(f"{label:36} {median(samples):8.1f}")
            for ours, theirs in (("vcfs mkdir checkpoint", "virsh checkpoint-create-as"),
                                 ("vcfs mkdir backup (begin)", "virsh backup-begin")):
                ratio = median(results[ours]) / median(results[theirs])
                print(f"{ours} / {theirs}: {ratio:.2f}")

            # The data: the same export read by cp of the qcow2 view and by nbdcopy, each
            # from a backup of its own (vcfs keeps what it read in its block cache).
            copies, nbdcopies = [], []
            for i in range(max(1, args.rounds // 3)):
                run_ok(["mkdir", f"{backups}/data{i}"])
                out = base / "copy.qcow2"
                copies.append(timed(["cp", f"{backups}/data{i}/disks/vda.qcow2", str(out)]))
                os.unlink(out)
                run_ok(["rmdir", f"{backups}/data{i}"])
                run_ok(["mkdir", f"{backups}/nbd{i}"])
                sock = mnt.parent / "run" / f"lv1-nbd{i}.sock"
                nbdcopies.append(timed(["nbdcopy", f"nbd+unix:///vda?socket={sock}",
                                        str(base / "copy.raw")]))
                os.unlink(base / "copy.raw")
                run_ok(["rmdir", f"{backups}/nbd{i}"])
            print(f"cp of the qcow2 view (256 MiB of data in 1 GiB): {median(copies):.2f} s")
            print(f"nbdcopy of libvirt's export to a file:          {median(nbdcopies):.2f} s")
            print(f"cp / nbdcopy: {median(copies) / median(nbdcopies):.2f}")
        vm.close()
    finally:
        daemon.stop()
        subprocess.run(["rm", "-rf", str(base)])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
