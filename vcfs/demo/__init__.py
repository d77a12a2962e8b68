"""`vcfs demo`: start two demo VMs, mount them, narrate a full and an incremental backup saved
as a qcow2 chain and restored with stock qemu-img, then serve until Ctrl-C.

The VMs come from vcfs.demo.vms; vcfs runs as `vcfs mount -f` in a process of its own, as a
user would run it. Everything the demo makes is removed when it ends.

Thread rule: blocking, the main thread; signals end the demo like Ctrl-C.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from vcfs.demo.vms import DEMO_WRITES, QEMU_IMG, VM, demo_vms
from vcfs.mountinfo import is_mounted

MiB = 1 << 20

GUEST_BEFORE_TUESDAY = ("vda", 64 * MiB, MiB, 0xD1)
"""What vm1's guest writes between Monday's full backup and Tuesday's incremental one."""
GUEST_AFTER_TUESDAY = ("vda", 0, MiB, 0xE1)
"""What it writes after Tuesday's backup began: the restored Tuesday must not show it."""

MON = ("<domainbackup mode='pull'><domaincheckpoint><name>mon</name></domaincheckpoint>"
       "</domainbackup>")
TUE = ("<domainbackup mode='pull'><incremental>mon</incremental><domaincheckpoint><name>tue"
       "</name></domaincheckpoint></domainbackup>")

TOUR_COMMANDS = (
    ("ls $M/..", "one directory per running VM"),
    ("cat $M/xml", "the domain and its disks"),
    ("ls -l $M/checkpoints", "mon, tue; current -> tue"),
    ("cat $M/checkpoints/tue/size", "bytes written since tue, per disk"),
    ("mkdir $M/backups/now", "a full pull backup of every disk"),
    ("ls -l $M/backups/now/disks", "vda, vda.qcow2, vda.map, vdb ..."),
    ("cat $M/backups/now/disks/vda.map", "which extents hold data"),
    ("rmdir $M/backups/now", "ends the job"),
    ("echo children > $M/checkpoints/mon/delete", "mon, tue and their bitmaps go"),
    ("cat $M/errors", "why a request failed"),
)


def tour(mnt: Path, backup: Path) -> str:
    """What to try next, once the narrated part is done."""
    width = max(len(cmd) for cmd, _ in TOUR_COMMANDS) + 2
    lines = [f"  {cmd:<{width}}# {why}" for cmd, why in TOUR_COMMANDS]
    return (
        "The mount stays up for exploring. In another terminal:\n\n"
        f"  export M={mnt}/vm1 B={backup}\n" + "\n".join(lines) + "\n\n"
        "Ctrl-C unmounts, stops the VMs and removes everything the demo made.\n"
    )


class DemoFailed(Exception):
    """A step of the narrated demo did not do what it shows."""


class Narrator:
    """Runs the demo's steps as a user would type them, printing each command and its output.

    Commands run with `sh` and the variables M (the domain's directory in the mount) and B
    (where backups are saved), so what is shown is what a user can paste.
    """

    def __init__(self, env: dict[str, str]) -> None:
        self.env = {**os.environ, **env}

    def say(self, text: str) -> None:
        print(text, flush=True)

    def run(self, cmd: str, show: bool = True) -> str:
        """Run `cmd`; print it and its output; fail the demo if it fails."""
        if show:
            print(f"  $ {cmd}", flush=True)
        r = subprocess.run(["sh", "-c", cmd], env=self.env, capture_output=True, text=True)
        out = (r.stdout + r.stderr).rstrip("\n")
        if show and out:
            print("\n".join(f"    {line}" for line in out.splitlines()), flush=True)
        if r.returncode != 0:
            raise DemoFailed(f"`{cmd}` failed with status {r.returncode}: {out}")
        return r.stdout


def expected_image(path: Path, size: int, writes: Sequence[tuple[int, int, int]]) -> None:
    """A raw image of `size` holding `writes` (offset, length, pattern): what the disk must be."""
    subprocess.run([QEMU_IMG, "create", "-q", "-f", "raw", str(path), str(size)], check=True)
    cmds = [a for off, n, pat in writes for a in ("-c", f"write -q -P 0x{pat:02x} {off} {n}")]
    subprocess.run(["qemu-io", "-f", "raw", *cmds, str(path)], check=True, capture_output=True)


def narrate_backup_and_restore(vm: VM, index: int, mnt: Path, backup: Path) -> None:
    """A full and an incremental backup of vm's vda, copied out as a qcow2 chain while the
    guest writes, restored with qemu-img and compared with what the guest wrote."""
    started = time.monotonic()
    dom = mnt / vm.name
    size = next(d.size for d in vm.disks if d.target == "vda")
    written = [(o, n, p + index) for t, o, n, p in DEMO_WRITES if t == "vda"]
    n = Narrator({"M": str(dom), "B": str(backup)})
    n.say(f"\n== A backup and a restore, as a user types them (M={dom}, B={backup}) ==\n")

    n.say("1. Monday: a full backup of vm1, creating checkpoint 'mon' in the same instant.")
    n.run(f'echo "{MON}" > $M/backups/new')
    job = n.run("readlink $M/backups/latest").strip()
    n.run(f"ls -l $M/backups/{job}/disks")
    n.run(f"cp $M/backups/{job}/disks/vda.qcow2 $B/vda-mon.qcow2")
    n.run(f"rmdir $M/backups/{job}")
    expected_image(backup / "vda-expected-mon.raw", size, written)

    target, offset, length, pattern = GUEST_BEFORE_TUESDAY
    n.say(f"\n2. The guest writes {length // MiB} MiB at {offset // MiB} MiB of {target} "
          "(through its virtio disk, as a guest would).")
    vm.write(target, offset, length, pattern)
    written.append((offset, length, pattern))
    n.run("cat $M/checkpoints/mon/size")

    n.say("\n3. Tuesday: an incremental backup - only what changed since 'mon'.")
    n.run(f'echo "{TUE}" > $M/backups/new')
    job = n.run("readlink $M/backups/latest").strip()
    target, offset, length, pattern = GUEST_AFTER_TUESDAY
    n.say(f"   Meanwhile the guest writes {length // MiB} MiB at {offset} "
          "(after the backup began: not part of Tuesday).")
    vm.write(target, offset, length, pattern)
    n.run(f"cp $M/backups/{job}/disks/vda.qcow2 $B/vda-tue.qcow2")
    n.run(f"rmdir $M/backups/{job}")
    n.run("ls -lh $B/*.qcow2 | awk '{print $5, $9}'")
    n.run("qemu-img info $B/vda-tue.qcow2 | grep '^backing file:'")
    expected_image(backup / "vda-expected-tue.raw", size, written)

    n.say("\n4. Restore with stock qemu-img: it follows vda-tue.qcow2 -> vda-mon.qcow2.")
    n.run("qemu-img convert -O raw $B/vda-tue.qcow2 $B/vda-restored-tue.raw")
    n.say("   Compared with images the demo built from what the guest wrote by each backup:")
    for day, image in (("mon", "$B/vda-mon.qcow2"), ("tue", "$B/vda-restored-tue.raw")):
        out = n.run(f"qemu-img compare $B/vda-expected-{day}.raw {image}")
        if "Images are identical." not in out:
            raise DemoFailed(f"the {day} restore differs from the disk at {day}: {out}")
    n.say(f"\nBackup, copy and restore verified in {time.monotonic() - started:.1f} s.\n")


def run_demo(mountpoint: Path) -> int:
    """`vcfs demo`: start the demo VMs, mount them, narrate a backup and a restore, then serve
    until Ctrl-C. Returns 1 if a step failed (after cleaning up all the same)."""
    import tempfile

    mountpoint = mountpoint.absolute()
    made_mountpoint = not mountpoint.exists()
    mountpoint.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="vcfs-demo-"))
    backup = base / "backup"
    backup.mkdir()
    status = 0
    # A `kill` or a closed terminal ends the demo like Ctrl-C: cleaned up, nothing left running.
    # SIGINT too, explicitly: started in the background by a script, it would come ignored.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _interrupt)
    try:
        print("starting demo VMs …", flush=True)
        with demo_vms(base / "vms") as (host_dir, vms):
            vcfs = _start_vcfs(host_dir, mountpoint, base)
            try:
                print(f"vcfs mounted vm1 and vm2 at {mountpoint}", flush=True)
                narrate_backup_and_restore(vms[0], 1, mountpoint, backup)
                print(tour(mountpoint, backup), flush=True)
                vcfs.wait()  # until Ctrl-C (or an unmount from elsewhere)
            finally:
                _stop_vcfs(vcfs, mountpoint)  # before the VMs go
    except KeyboardInterrupt:
        pass
    except DemoFailed as e:
        print(f"\ndemo failed: {e}", file=sys.stderr, flush=True)
        status = 1
    finally:
        shutil.rmtree(base, ignore_errors=True)
        if made_mountpoint:
            with contextlib.suppress(OSError):
                mountpoint.rmdir()
    print("demo stopped, everything removed", flush=True)
    return status


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _start_vcfs(host_dir: Path, mountpoint: Path, base: Path) -> subprocess.Popen[bytes]:
    """`vcfs mount -f`, as a user would run it, in a session of its own: Ctrl-C reaches only
    the demo, which then unmounts in order (vcfs first, the VMs after)."""
    log = base / "vcfs.log"
    with open(log, "wb") as out:
        vcfs = subprocess.Popen(
            [sys.executable, "-m", "vcfs", "mount", "-f", "--state-dir", str(base / "state"),
             "--runtime-dir", str(base / "run"), str(host_dir), str(mountpoint)],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + 30
    while not is_mounted(mountpoint):
        if vcfs.poll() is not None or time.monotonic() > deadline:
            _stop_vcfs(vcfs, mountpoint)
            raise DemoFailed(f"vcfs did not mount {mountpoint}:\n{log.read_text()}")
        time.sleep(0.02)
    return vcfs


def _stop_vcfs(vcfs: subprocess.Popen[bytes], mountpoint: Path) -> None:
    """SIGTERM: vcfs unmounts cleanly; SIGKILL and a lazy unmount if it does not end."""
    if vcfs.poll() is None:
        vcfs.send_signal(signal.SIGTERM)
        try:
            vcfs.wait(15)
        except subprocess.TimeoutExpired:
            vcfs.kill()
            vcfs.wait()
    if is_mounted(mountpoint):
        subprocess.run(["fusermount3", "-uz", str(mountpoint)], capture_output=True)
