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


# --- the firmware --------------------------------------------------------------------------------
# Hand-assembled 16-bit real-mode code, one (machine code, instruction) pair a line, so no
# assembler is needed; `objdump -D -b binary -mi8086` on the image shows the same listing. QEMU
# maps the 64 KiB image at F000:0000 (0xF0000) and at 4 GiB - 64 KiB (where the reset vector is).
_FW_BOOT = 0x0000
_FW_NMI = 0x0080
_FW_GDT = 0x00C0
_FW_GDTR = _FW_GDT + 0x10
_FW_RESET = 0xFFF0  # the CPU's first instruction, at 0xFFFFFFF0

# The NMI of `inject-nmi` arrives through the local APIC's LINT1 input, which is masked at
# reset; QEMU drops it then. Unmasking it needs a write to the APIC at 0xFEE00000, beyond the
# 1 MiB real mode reaches: the code goes to protected mode just long enough to load ES with a
# 4 GiB data segment, and keeps it after returning to real mode ("unreal mode").
_FW_BOOT_CODE: tuple[tuple[str, str], ...] = (
    ("fa", "cli"),
    ("31 c0", "xor ax, ax"),
    ("8e d0", "mov ss, ax"),
    ("bc 00 7c", "mov sp, 0x7c00"),  # the NMI handler's stack, in RAM
    ("8e d8", "mov ds, ax"),
    ("c7 06 08 00 80 00", "mov word [0x0008], 0x0080"),  # IVT vector 2 (NMI) = F000:_FW_NMI
    ("c7 06 0a 00 00 f0", "mov word [0x000a], 0xf000"),
    ("2e 0f 01 16 d0 00", "lgdt cs:[0x00d0]"),  # _FW_GDTR
    ("0f 20 c0", "mov eax, cr0"),
    ("0c 01", "or al, 1"),
    ("0f 22 c0", "mov cr0, eax"),  # protected mode
    ("bb 08 00", "mov bx, 8"),
    ("8e c3", "mov es, bx"),  # flat 4 GiB data segment
    ("24 fe", "and al, 0xfe"),
    ("0f 22 c0", "mov cr0, eax"),  # real mode again; ES keeps its 4 GiB limit
    # Software-enable the APIC first: KVM's APIC ignores unmasking an LVT while it is disabled.
    ("26 67 66 c7 05 f0 00 e0 fe ff 01 00 00", "mov dword es:[0xfee000f0], 0x1ff"),  # SVR
    ("26 67 66 c7 05 60 03 e0 fe 00 04 00 00", "mov dword es:[0xfee00360], 0x400"),  # LINT1=NMI
    ("f4", "halt: hlt"),  # with IF clear only an NMI ends it; its IRET returns to the jmp
    ("eb fd", "jmp halt"),
)

# PIIX4 ACPI (PCI 00:01.3) as SeaBIOS sets it up, then soft-off (SLP_TYP 0, QEMU's _S5) through
# PM1_CNT. The PM I/O space is off at reset, so nothing else the VM does can reach it.
_FW_NMI_CODE: tuple[tuple[str, str], ...] = (
    ("66 50", "push eax"),
    ("52", "push dx"),
    ("ba f8 0c", "mov dx, 0xcf8"),
    ("66 b8 40 0b 00 80", "mov eax, 0x80000b40"),  # config address 00:01.3 reg 0x40 (PMBA)
    ("66 ef", "out dx, eax"),
    ("b2 fc", "mov dl, 0xfc"),
    ("66 b8 01 06 00 00", "mov eax, 0x601"),  # PM I/O base 0x600 (bit 0 is read-only 1)
    ("66 ef", "out dx, eax"),
    ("b2 f8", "mov dl, 0xf8"),
    ("66 b8 80 0b 00 80", "mov eax, 0x80000b80"),  # reg 0x80 (PMREGMISC)
    ("66 ef", "out dx, eax"),
    ("b2 fc", "mov dl, 0xfc"),
    ("b0 01", "mov al, 1"),  # PMIOSE: enable the PM I/O space
    ("ee", "out dx, al"),
    ("ba 04 06", "mov dx, 0x604"),  # PM1_CNT
    ("b8 00 20", "mov ax, 0x2000"),  # SLP_EN with SLP_TYP 0: soft-off
    ("ef", "out dx, ax"),
    ("5a", "pop dx"),
    ("66 58", "pop eax"),
    ("cf", "iret"),  # back to the halt loop, in case QEMU pauses rather than exits
)

# A null descriptor, then flat 4 GiB data (base 0, limit 0xfffff pages). Its accessed bit (type
# 0x93) is preset: the GDT is in ROM, and under KVM the CPU retried writing that bit forever.
_FW_GDT_BYTES = bytes.fromhex("0000000000000000 ffff000000938f00")
_FW_GDTR_BYTES = (len(_FW_GDT_BYTES) - 1).to_bytes(2, "little") + (0xF0000 + _FW_GDT).to_bytes(
    4, "little"
)
_FW_RESET_CODE: tuple[tuple[str, str], ...] = (("ea 00 00 00 f0", "jmp 0xf000:0x0000"),)


def firmware() -> bytes:
    """The 64 KiB firmware image of every VM (see `VM.bios_path`)."""
    image = bytearray(64 << 10)
    pieces = (
        (_FW_BOOT, b"".join(bytes.fromhex(code) for code, _ in _FW_BOOT_CODE), _FW_NMI),
        (_FW_NMI, b"".join(bytes.fromhex(code) for code, _ in _FW_NMI_CODE), _FW_GDT),
        (_FW_GDT, _FW_GDT_BYTES, _FW_GDTR),
        (_FW_GDTR, _FW_GDTR_BYTES, _FW_RESET),
        (_FW_RESET, b"".join(bytes.fromhex(code) for code, _ in _FW_RESET_CODE), len(image)),
    )
    for start, data, end in pieces:
        if start + len(data) > end:
            raise AssertionError(f"firmware piece at {start:#x} overlaps the next at {end:#x}")
        image[start : start + len(data)] = data
    return bytes(image)


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
        """The VM's firmware: 64 KiB that idle the CPU for good and power off on an NMI.

        There is no guest OS: SeaBIOS would keep looking for a boot device and burn a quarter
        of a core, stolen from vcfs and the benchmarks. This firmware halts with interrupts off
        (0 % CPU); the block layer, the monitors and guest-like writes through qemu-io work all
        the same. Its NMI handler is what `guest_poweroff` triggers (see `firmware`).
        """
        path = self.work_dir / "halt-bios.bin"
        data = firmware()
        # Compared, not just tested for existence: a work dir may hold an older firmware.
        if not path.exists() or path.read_bytes() != data:
            self.work_dir.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            tmp.write_bytes(data)
            tmp.replace(path)  # a QEMU starting meanwhile never reads half a firmware
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

    def guest_poweroff(self, timeout: float = 10.0) -> None:
        """Make the guest itself power off, as an OS does on `poweroff`, and return at once.

        Sends an NMI (QMP `inject-nmi` on the test monitor); the firmware's NMI handler writes
        soft-off to the ACPI PM1 control register. QEMU then emits SHUTDOWN with `guest: true`
        and reason `guest-shutdown`, and runs its shutdown action: by default it exits (status
        0); after `set-action shutdown=pause` it stays, stopped, with status `shutdown`.
        Returns before any of that happens.

        QEMU drops an NMI that arrives before the firmware has unmasked it, and on a loaded
        host the vCPU may not have run a single instruction yet when the monitors answer. So
        the NMI is sent only once the CPU sits in the firmware's final `hlt`, which comes after
        the unmasking; TimeoutError if it does not get there within `timeout` seconds.
        """
        deadline = time.monotonic() + timeout
        while "HLT=1" not in self.hmp("info registers"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: the firmware did not reach its halt loop")
            time.sleep(0.01)
        self.qmp("inject-nmi")

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
