"""Real QEMU virtual machines for the demo and the integration tests.

`VM` launches `qemu-system-x86_64` as a child process with two QMP monitors: the one under
`host_dir` belongs to vcfs, the second one (under `work_dir`) belongs to the test or demo driver,
so the driver never competes with vcfs for the vcfs monitor. `QmpClient` is a deliberately tiny
synchronous JSON client so that this module depends on nothing but the standard library.

Threading rule: everything here is blocking. A `VM` (and its `QmpClient`) belongs to the one
thread that created it - the test or the demo driver - and must never be called from vcfs's own
event loop.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vcfs.mountinfo import is_mounted

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


class QmpError(Exception):
    """QEMU answered a command with an error."""

    def __init__(self, error_class: str, desc: str) -> None:
        super().__init__(f"{error_class}: {desc}")
        self.error_class = error_class
        self.desc = desc


class QmpClient:
    """A synchronous QMP client on a unix socket.

    Events arriving while waiting for a reply are kept in `events` (oldest first) rather than
    dropped, so a caller can look for e.g. BLOCK_JOB_COMPLETED. After a timeout or a lost
    connection the client is closed: a half-read reply would desynchronise it.
    """

    def __init__(self, path: str | os.PathLike[str], timeout: float = 10.0) -> None:
        self.path = os.fspath(path)
        self.timeout = timeout
        self.events: list[dict[str, Any]] = []
        self.greeting: dict[str, Any] = {}
        self._sock: socket.socket | None = None
        self._buf = b""
        self._next_id = 0

    def connect(self) -> None:
        """Connect, read the greeting and leave capabilities negotiation mode."""
        deadline = time.monotonic() + self.timeout
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.path)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._buf = b""
        try:
            self.greeting = self._read_message(deadline)
            if "QMP" not in self.greeting:
                raise ConnectionError(f"{self.path}: not a QMP greeting: {self.greeting!r}")
            self.execute("qmp_capabilities")
        except BaseException:
            self.close()
            raise

    def execute(
        self, cmd: str, args: dict[str, Any] | None = None, timeout: float | None = None
    ) -> Any:
        """Run one command and return its `return` value; raise QmpError on an error reply."""
        if self._sock is None:
            raise ConnectionError(f"{self.path}: not connected")
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        self._next_id += 1
        msg_id = self._next_id
        request: dict[str, Any] = {"execute": cmd, "id": msg_id}
        if args:
            request["arguments"] = args
        try:
            self._sock.sendall(json.dumps(request).encode() + b"\n")
            while True:
                reply = self._read_message(deadline)
                if "event" in reply:
                    self.events.append(reply)
                elif reply.get("id") == msg_id:
                    break
        except BaseException:
            self.close()
            raise
        if "error" in reply:
            err = reply["error"]
            raise QmpError(err.get("class", "GenericError"), err.get("desc", ""))
        return reply.get("return")

    def close(self) -> None:
        """Close the connection (idempotent)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> QmpClient:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _read_message(self, deadline: float) -> dict[str, Any]:
        assert self._sock is not None
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{self.path}: no answer from QEMU")
            self._sock.settimeout(remaining)
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                raise TimeoutError(f"{self.path}: no answer from QEMU") from None
            if not data:
                raise ConnectionError(f"{self.path}: QEMU closed the connection")
            self._buf += data
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)


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
        out = self._qemu_io(target, f"write -P 0x{pattern:02x} {offset} {length}")
        if f"wrote {length}/{length} bytes at offset {offset}" not in out:
            raise RuntimeError(f"{self.name}: write to {target} failed: {out.strip()}")

    def write_bytes(self, target: str, offset: int, data: bytes) -> None:
        """Write `data` at `offset` through the device, as a guest would (see `write`).

        qemu-io takes the bytes from a file (`write -s`), made beside the QEMU log and removed.
        """
        src = self.work_dir / f"{self.name}-{target}-write.bin"
        src.write_bytes(data)
        try:
            out = self._qemu_io(target, f"write -s {src} {offset} {len(data)}")
        finally:
            src.unlink(missing_ok=True)
        if f"wrote {len(data)}/{len(data)} bytes at offset {offset}" not in out:
            raise RuntimeError(f"{self.name}: write to {target} failed: {out.strip()}")

    def has_pattern(self, target: str, offset: int, length: int, pattern: int) -> bool:
        """Whether the guest sees `length` bytes of `pattern` at `offset` on `target`."""
        out = self._qemu_io(target, f"read -P 0x{pattern:02x} {offset} {length}")
        if f"read {length}/{length} bytes at offset {offset}" not in out:
            raise RuntimeError(f"{self.name}: read from {target} failed: {out.strip()}")
        return "Pattern verification failed" not in out

    def _qemu_io(self, target: str, command: str) -> str:
        # HMP's qemu-io prints its result on QEMU's stdout (our log file, flushed per
        # command), not into the monitor reply; the reply only carries HMP-level errors.
        with open(self.log_path, "rb") as log:
            start = log.seek(0, os.SEEK_END)
            reply = self.hmp(f'qemu-io -d /machine/peripheral/{target}/virtio-backend "{command}"')
            log.seek(start)
            return reply + log.read().decode(errors="replace")

    def block_nodes(self) -> list[dict[str, Any]]:
        """All block nodes (query-named-block-nodes flat=true)."""
        return self.qmp("query-named-block-nodes", flat=True)

    def bitmaps(self, target: str) -> dict[str, dict[str, Any]]:
        """The named bitmaps on the disk's format node (`<target>-format`), by name."""
        node_name = f"{target}-format"
        for node in self.block_nodes():
            if node["node-name"] == node_name:
                return {b["name"]: b for b in node.get("dirty-bitmaps", []) if b.get("name")}
        raise KeyError(f"{self.name}: no block node {node_name}")

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

    def restart(self) -> None:
        """Stop cleanly and start again on the same images."""
        self.stop()
        self.start()

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
def demo_vms(base_dir: Path) -> Iterator[tuple[Path, list[VM]]]:
    """Run two demo VMs `vm1` and `vm2`, each with qcow2 disks vda (256 MiB) and vdb (64 MiB).

    Each disk holds a few MiB of recognisable data (see DEMO_WRITES; VM n uses pattern + n).
    Yields (host_dir, vms); the VMs are always stopped and everything created is removed.
    """
    base_dir = Path(base_dir).absolute()
    made_base = not base_dir.exists()
    host_dir, work_dir = base_dir / "qmp", base_dir / "work"
    made = [d for d in (host_dir, work_dir) if not d.exists()]
    disks = [DiskSpec("vda", size=256 << 20), DiskSpec("vdb", size=64 << 20)]
    vms = [VM(f"vm{i}", host_dir, work_dir, disks) for i in (1, 2)]
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


# =================================================================================================
# Demo mount: run_demo() (added by the lead) goes below this line.
# =================================================================================================

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
