"""The tests' and benchmarks' VMs: the demo's `VM` (vcfs.demo.vms) plus what only tests inspect -
bitmaps and block nodes over the test monitor, guest-visible patterns, arbitrary guest writes,
restarts. Import VMs and their disk specs from here, not from the installed package.

Threading rule: as for vcfs.demo.vms.VM - blocking, one thread, never vcfs's event loop.
"""

from __future__ import annotations

import random
import subprocess
import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from vcfs.demo import vms
from vcfs.demo.qmpclient import QmpClient, QmpError
from vcfs.demo.vms import DEMO_WRITES, DiskSpec

__all__ = ["DEMO_WRITES", "VM", "DiskSpec", "GuestIO", "QmpClient", "QmpError", "demo_vms",
           "scattered_image"]


class GuestIO:
    """Guest-like I/O through a disk's virtio device, over a VM's `qemu_io` (HMP's qemu-io):
    writes dirty bitmaps exactly like guest I/O. Shared by the QMP tests' VM and the libvirt
    tests' domains (tests/libvirtd.py)."""

    name: str
    work_dir: Path

    def qemu_io(self, target: str, command: str) -> str:
        raise NotImplementedError

    def write(self, target: str, offset: int, length: int, pattern: int) -> None:
        """Write `length` bytes of `pattern` at `offset` through the device, as a guest would."""
        out = self.qemu_io(target, f"write -P 0x{pattern:02x} {offset} {length}")
        if f"wrote {length}/{length} bytes at offset {offset}" not in out:
            raise RuntimeError(f"{self.name}: write to {target} failed: {out.strip()}")

    def write_bytes(self, target: str, offset: int, data: bytes) -> None:
        """Write `data` at `offset` through the device, as a guest would (see `write`).

        qemu-io takes the bytes from a file (`write -s`), made in the work directory and removed.
        """
        src = self.work_dir / f"{self.name}-{target}-write.bin"
        src.write_bytes(data)
        try:
            out = self.qemu_io(target, f"write -s {src} {offset} {len(data)}")
        finally:
            src.unlink(missing_ok=True)
        if f"wrote {len(data)}/{len(data)} bytes at offset {offset}" not in out:
            raise RuntimeError(f"{self.name}: write to {target} failed: {out.strip()}")

    def has_pattern(self, target: str, offset: int, length: int, pattern: int) -> bool:
        """Whether the guest sees `length` bytes of `pattern` at `offset` on `target`."""
        out = self.qemu_io(target, f"read -P 0x{pattern:02x} {offset} {length}")
        if f"read {length}/{length} bytes at offset {offset}" not in out:
            raise RuntimeError(f"{self.name}: read from {target} failed: {out.strip()}")
        return "Pattern verification failed" not in out


class VM(vms.VM, GuestIO):
    """A demo VM that tests can inspect (see the module docstring)."""

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

    def take_events(self) -> list[dict[str, Any]]:
        """The events QEMU sent on the test monitor since the last call, oldest first.

        The client only reads events while it waits for a reply: send a command (e.g. with
        `wait_status`) first to collect the latest.
        """
        if self._mon is None:
            return []
        events, self._mon.events = self._mon.events, []
        return events

    def wait_status(self, status: str, timeout: float = 10.0) -> None:
        """Poll `query-status` until the VM's run state is `status`; TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        while (current := self.qmp("query-status")["status"]) != status:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: status is {current}, not {status}")
            time.sleep(0.01)

    def wait_exit(self, timeout: float = 10.0) -> int:
        """Wait for QEMU to exit by itself (e.g. after `guest_poweroff`); its exit status."""
        if self._proc is None:
            raise RuntimeError(f"{self.name} was never started")
        code = self._proc.wait(timeout)
        self._close()
        return code

    def restart(self) -> None:
        """Stop cleanly and start again on the same images."""
        self.stop()
        self.start()


def demo_vms(base_dir: Path) -> AbstractContextManager[tuple[Path, list[vms.VM]]]:
    """vcfs.demo.vms.demo_vms, with VMs tests can inspect (instances of VM above)."""
    return vms.demo_vms(base_dir, vm_class=VM)


def scattered_image(
    path: Path, size: int, count: int, seed: int, unit: int = 64 << 10
) -> list[tuple[int, int]]:
    """A new qcow2 image of `size` holding `count` extents of `unit` bytes at random places
    (the same ones for the same seed), each of one byte pattern: [(offset, pattern), …] in
    offset order. The huge sparse disks of the tests and benchmarks."""
    rng = random.Random(seed)
    offsets = sorted(rng.sample(range(size // unit), count))
    extents = [(o * unit, (i % 250) + 1) for i, o in enumerate(offsets)]
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)],
                   check=True)
    cmds = "".join(f"write -P {p} {o} {unit}\n" for o, p in extents)
    subprocess.run(["qemu-io", "-f", "qcow2", str(path)], input=cmds, text=True, check=True,
                   capture_output=True)
    return extents
