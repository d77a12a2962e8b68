"""Real QEMU virtual machines for `vcfs demo`: `VM` and `demo_vms` (also the base of the tests'
VMs, tests/vm.py, which adds what only tests inspect).

`VM` launches `qemu-system-x86_64` as a child process with two QMP monitors: the one under
`host_dir` belongs to vcfs, the second one (under `work_dir`) belongs to the demo or test driver,
so the driver never competes with vcfs for the vcfs monitor. Guest writes go through the virtio
device (HMP `qemu-io`), so they dirty bitmaps exactly like guest I/O.

Threading rule: everything here is blocking. A `VM` (and its `QmpClient`) belongs to the one
thread that created it - the demo or test driver - and must never be called from vcfs's own
event loop.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vcfs.demo.qmpclient import QmpClient

QEMU = "qemu-system-x86_64"
QEMU_IMG = "qemu-img"

# Linux's sun_path is 108 bytes including the terminating NUL.
_MAX_SOCKET_PATH = 107
# Fixed namespace so that a VM keeps its uuid across restarts and test runs.
_UUID_NAMESPACE = uuid.UUID("5b0c7a4e-9a43-4d8e-a1f6-6d1f0c3b7e10")

# VMs run in their own session (see VM.start), so nothing kills them if the driver crashes;
# this does, at interpreter exit.
_running: weakref.WeakSet[VM] = weakref.WeakSet()


@atexit.register
def _kill_leftover_vms() -> None:
    for vm in list(_running):
        vm.kill()


@dataclass
class DiskSpec:
    """One virtio-blk disk; `target` is both the device id and the node-name prefix."""

    target: str = "vda"
    fmt: str = "qcow2"
    size: int = 64 << 20
    compat: str = "1.1"
    """qcow2 only: "1.1" (v3, can hold persistent bitmaps) or "0.10" (v2, cannot)."""
    cluster_size: int | None = None


class VM:
    """A QEMU guest with virtio-blk disks, driven over its own test monitor.

    The disk with target `vda` gets node names `vda-file` (protocol) and `vda-format` (the
    format node, where bitmaps live) and device id `vda`.
    """

    def __init__(
        self, name: str, host_dir: Path, work_dir: Path, disks: Sequence[DiskSpec]
    ) -> None:
        self.name = name
        self.host_dir = Path(host_dir).absolute()
        self.work_dir = Path(work_dir).absolute()
        self.disks = list(disks)
        self.uuid = str(uuid.uuid5(_UUID_NAMESPACE, name))
        self.qmp_path = self.host_dir / f"{name}.qmp"
        self.test_qmp_path = self.work_dir / f"{name}.test.qmp"
        self.log_path = self.work_dir / f"{name}.log"
        for path in (self.qmp_path, self.test_qmp_path):
            # QEMU would fail with a less obvious message; fail early and say why.
            if len(os.fsencode(path)) > _MAX_SOCKET_PATH:
                raise ValueError(f"socket path too long for a unix socket: {path}")
        self._proc: subprocess.Popen[bytes] | None = None
        self._mon: QmpClient | None = None

    @property
    def pid(self) -> int | None:
        """The QEMU process id while it runs, else None."""
        if self._proc is None or self._proc.poll() is not None:
            return None
        return self._proc.pid

    @property
    def running(self) -> bool:
        """Whether the QEMU process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def image(self, target: str) -> Path:
        """The image file of the disk `target`."""
        return self.work_dir / f"{self.name}-{target}.{self._disk(target).fmt}"

    def create_images(self) -> None:
        """Create the missing disk images; existing ones are kept so bitmaps survive restarts."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        for disk in self.disks:
            path = self.image(disk.target)
            if path.exists():
                continue
            opts = []
            if disk.fmt == "qcow2":
                opts.append(f"compat={disk.compat}")
                if disk.cluster_size is not None:
                    opts.append(f"cluster_size={disk.cluster_size}")
            cmd = [QEMU_IMG, "create", "-q", "-f", disk.fmt]
            if opts:
                cmd += ["-o", ",".join(opts)]
            subprocess.run(cmd + [str(path), str(disk.size)], check=True, capture_output=True)

    def bios_path(self) -> Path:
        """A 64 KiB firmware whose reset vector halts the CPU for good.

        There is no guest OS: SeaBIOS would keep looking for a boot device and burn a quarter
        of a core, stolen from vcfs and the benchmarks. `cli; hlt` idles at 0 % CPU; the block
        layer, the monitors and guest-like writes through qemu-io work all the same.
        """
        path = self.work_dir / "halt-bios.bin"
        if not path.exists():
            firmware = bytearray(64 << 10)
            firmware[-16:-12] = b"\xfa\xf4\xeb\xfd"  # at 0xFFFFFFF0: cli; hlt; jmp back to hlt
            self.work_dir.mkdir(parents=True, exist_ok=True)
            path.write_bytes(bytes(firmware))
        return path

    def command(self) -> list[str]:
        """The QEMU command line."""
        cmd = [
            QEMU,
            "-name", self.name,
            "-uuid", self.uuid,
            "-machine", "pc,accel=kvm:tcg",
            "-nodefaults", "-no-user-config",
            "-display", "none",
            "-m", "32",
            "-bios", str(self.bios_path()),
            "-serial", "none",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
            "-chardev", f"socket,id=testmon,path={self.test_qmp_path},server=on,wait=off",
            "-mon", "chardev=testmon,mode=control",
        ]  # fmt: skip
        for disk in self.disks:
            t = disk.target
            cmd += [
                "-blockdev", f"driver=file,filename={self.image(t)},node-name={t}-file",
                "-blockdev", f"driver={disk.fmt},file={t}-file,node-name={t}-format",
                "-device", f"virtio-blk-pci,drive={t}-format,id={t}",
            ]  # fmt: skip
        return cmd

    def start(self, timeout: float = 15.0) -> None:
        """Launch QEMU (creating missing images) and wait until both monitors answer."""
        if self.running:
            raise RuntimeError(f"{self.name} is already running")
        self.host_dir.mkdir(parents=True, exist_ok=True)
        self.create_images()
        cmd = self.command()
        with open(self.log_path, "ab") as log:
            log.write(f"=== {time.strftime('%H:%M:%S')} start: {' '.join(cmd)}\n".encode())
            log.flush()
            # A session of its own keeps a terminal's Ctrl-C away from QEMU: the driver decides
            # when the VM goes (vcfs may still need it while unmounting).
            self._proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
            )
        _running.add(self)
        try:
            self._wait_for_monitors(time.monotonic() + timeout)
        except BaseException:
            self.kill()
            raise

    def _wait_for_monitors(self, deadline: float) -> None:
        while True:
            if not self.running:
                raise RuntimeError(f"{self.name}: QEMU exited at start-up:\n{self.log_text()}")
            mon = QmpClient(self.test_qmp_path, timeout=max(0.1, deadline - time.monotonic()))
            try:
                mon.connect()
                # The vcfs monitor is only probed with connect(): reading its greeting would
                # hang if vcfs (after a restart) already holds it, since QEMU serves one client
                # per monitor and leaves the others queued without a greeting.
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                    probe.settimeout(1.0)
                    probe.connect(os.fspath(self.qmp_path))
                self._mon = mon
                return
            except (FileNotFoundError, ConnectionError):
                # Not listening yet, or a stale socket file left by a killed QEMU.
                mon.close()
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.name}: monitors did not come up") from None
                time.sleep(0.02)

    def qmp(self, cmd: str, **args: Any) -> Any:
        """Run a QMP command on the test monitor (never the vcfs one).

        Underscores in argument names become dashes (`bitmap_mode=` is `bitmap-mode`).
        """
        if self._mon is None or not self.running:
            raise ConnectionError(f"{self.name} is not running")
        return self._mon.execute(cmd, {k.replace("_", "-"): v for k, v in args.items()})

    def hmp(self, line: str) -> str:
        """Run a human monitor command and return its output."""
        return self.qmp("human-monitor-command", command_line=line)

    def write(self, target: str, offset: int, length: int, pattern: int) -> None:
        """Write `length` bytes of `pattern` at `offset` through the device, as a guest would.

        Going through the virtio device's block backend (not the node) is what makes the
        write dirty the bitmaps exactly like guest I/O. `length` is at most 2 GiB - 512.
        """
        out = self.qemu_io(target, f"write -P 0x{pattern:02x} {offset} {length}")
        if f"wrote {length}/{length} bytes at offset {offset}" not in out:
            raise RuntimeError(f"{self.name}: write to {target} failed: {out.strip()}")

    def qemu_io(self, target: str, command: str) -> str:
        """Run a qemu-io `command` on `target` through its virtio device; return its output."""
        # HMP's qemu-io prints its result on QEMU's stdout (our log file, flushed per
        # command), not into the monitor reply; the reply only carries HMP-level errors.
        with open(self.log_path, "rb") as log:
            start = log.seek(0, os.SEEK_END)
            reply = self.hmp(f'qemu-io -d /machine/peripheral/{target}/virtio-backend "{command}"')
            log.seek(start)
            return reply + log.read().decode(errors="replace")

    def stop(self, timeout: float = 10.0) -> None:
        """Quit QEMU cleanly (persistent bitmaps get saved); SIGKILL it after `timeout`."""
        if not self.running:
            self._close()
            return
        try:
            self.qmp("quit")
        except (ConnectionError, TimeoutError, OSError):
            pass  # QEMU may close the monitor before the reply arrives.
        assert self._proc is not None
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._close()

    def kill(self, remove_socket: bool = False) -> None:
        """SIGKILL QEMU: persistent bitmaps in use are left inconsistent in the images.

        The vcfs socket file stays behind (like after a real crash) unless `remove_socket`.
        """
        if self.running:
            assert self._proc is not None
            os.kill(self._proc.pid, signal.SIGKILL)
            self._proc.wait()
        self._close()
        if remove_socket:
            self.qmp_path.unlink(missing_ok=True)

    def log_text(self) -> str:
        """QEMU's stdout/stderr of every start so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _close(self) -> None:
        if self._mon is not None:
            self._mon.close()
            self._mon = None

    def _disk(self, target: str) -> DiskSpec:
        for disk in self.disks:
            if disk.target == target:
                return disk
        raise KeyError(f"{self.name}: no disk {target}")

    def __repr__(self) -> str:
        return f"VM({self.name!r}, pid={self.pid})"


# What demo_vms writes: (target, offset, length, pattern); pattern + VM index keeps VMs apart.
DEMO_WRITES: tuple[tuple[str, int, int, int], ...] = (
    ("vda", 0, 2 << 20, 0xA0),
    ("vda", 128 << 20, 1 << 20, 0xB0),
    ("vdb", 1 << 20, 1 << 20, 0xC0),
)


@contextlib.contextmanager
def demo_vms(
    base_dir: Path, vm_class: Callable[[str, Path, Path, Sequence[DiskSpec]], VM] = VM
) -> Iterator[tuple[Path, list[VM]]]:
    """Run two demo VMs `vm1` and `vm2`, each with qcow2 disks vda (256 MiB) and vdb (64 MiB).

    Each disk holds a few MiB of recognisable data (see DEMO_WRITES; VM n uses pattern + n).
    Yields (host_dir, vms); the VMs are always stopped and everything created is removed.
    `vm_class` makes the VMs (tests pass theirs, which can inspect more).
    """
    base_dir = Path(base_dir).absolute()
    made_base = not base_dir.exists()
    host_dir, work_dir = base_dir / "qmp", base_dir / "work"
    made = [d for d in (host_dir, work_dir) if not d.exists()]
    disks = [DiskSpec("vda", size=256 << 20), DiskSpec("vdb", size=64 << 20)]
    vms = [vm_class(f"vm{i}", host_dir, work_dir, disks) for i in (1, 2)]
    try:
        for i, vm in enumerate(vms, 1):
            vm.start()
            for target, offset, length, pattern in DEMO_WRITES:
                vm.write(target, offset, length, pattern + i)
        yield host_dir, vms
    finally:
        for vm in vms:
            try:
                vm.stop()
            finally:
                vm.kill()
        for d in made:
            shutil.rmtree(d, ignore_errors=True)
        if made_base:
            shutil.rmtree(base_dir, ignore_errors=True)
