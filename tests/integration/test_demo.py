"""`vcfs demo`, headless: the narrated backup and restore, then Ctrl-C, as a user runs it.

The test checks the restored image itself, byte for byte against what the demo's guest wrote,
rather than trusting the demo's own comparison.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

from vcfs.demo import DEMO_WRITES, GUEST_AFTER_TUESDAY, GUEST_BEFORE_TUESDAY, MON, TUE
from vcfs.mountinfo import is_mounted

MiB = 1 << 20
HANG_GUARD = 180.0
"""Seconds before a demo that never reaches its tour is declared hung (not a speed limit)."""


def expected_mib(index: int) -> int:
    """The byte every byte of MiB `index` of vm1's vda holds at Tuesday's backup."""
    value = 0
    writes = [(o, n, p + 1) for t, o, n, p in DEMO_WRITES if t == "vda"]  # vm1: pattern + 1
    writes.append(GUEST_BEFORE_TUESDAY[1:])
    for offset, length, pattern in writes:  # in order: a later write wins
        assert offset % MiB == 0 and length % MiB == 0
        if offset <= index * MiB < offset + length:
            value = pattern
    return value


def kill_leftovers(base: Path) -> None:
    """SIGKILL the QEMU processes a killed demo left behind (those running from `base`)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if str(base).encode() in cmdline and b"qemu-system" in cmdline:
            os.kill(int(pid), signal.SIGKILL)


def test_demo_backs_up_restores_compares_and_cleans_up_on_ctrl_c(tmp_path):
    mnt = tmp_path / "demo"
    proc = subprocess.Popen(
        [sys.executable, "-m", "vcfs", "demo", str(mnt)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    touring = threading.Event()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "Ctrl-C unmounts" in line:
                touring.set()
        touring.set()  # the demo ended early: stop waiting

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    base = None
    try:
        touring.wait(HANG_GUARD)
        out = "".join(lines)
        assert proc.poll() is None and "Ctrl-C unmounts" in out, out
        m = re.search(r"\(M=(\S+), B=(\S+)\)", out)
        assert m, out
        dom, backup = Path(m[1]), Path(m[2])
        base = backup.parent
        assert dom == mnt / "vm1"
        # narrated with the commands a user types
        for cmd in (
            f'echo "{MON}" > $M/backups/new',
            "cp $M/backups/1/disks/vda.qcow2 $B/vda-mon.qcow2",
            f'echo "{TUE}" > $M/backups/new',
            "cp $M/backups/2/disks/vda.qcow2 $B/vda-tue.qcow2",
            "qemu-img convert -O raw $B/vda-tue.qcow2 $B/vda-restored-tue.raw",
        ):
            assert f"  $ {cmd}" in out, cmd
        assert out.count("Images are identical.") == 2, out
        # the saved chain, checked here: the incremental names its base; Tuesday restored is
        # the disk as the guest had written it when the backup began, and not what came after
        info = subprocess.run(["qemu-img", "info", "-U", str(backup / "vda-tue.qcow2")],
                              capture_output=True, text=True, check=True).stdout
        assert "backing file: vda-mon.qcow2" in info
        restored = backup / "vda-restored-tue.raw"
        assert restored.stat().st_size == 256 * MiB
        with open(restored, "rb") as f:
            for i in range(256):
                assert f.read(MiB) == bytes([expected_mib(i)]) * MiB, f"MiB {i}"
        assert expected_mib(GUEST_AFTER_TUESDAY[1] // MiB) != GUEST_AFTER_TUESDAY[3]
        # and the mount is still up for exploring
        assert sorted(os.listdir(dom / "checkpoints")) == ["current", "mon", "new", "redefine",
                                                           "tue"]
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            if base is not None:
                kill_leftovers(base)
            subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True)
        reader.join(5)
    out = "".join(lines)
    assert proc.returncode == 0, out
    assert out.rstrip().endswith("demo stopped, everything removed"), out
    assert not is_mounted(mnt) and not mnt.exists() and not base.exists()
