"""Tests of the VM fixture itself, and of the QEMU 7.2 behaviour the vcfs tests rely on.

These pin down facts vcfs is designed around: guest writes dirty bitmaps, persistent bitmaps
survive a clean restart, and an unclean stop leaves them inconsistent.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from tests.vm import DEMO_WRITES, VM, DiskSpec, QmpClient, QmpError, demo_vms

MiB = 1 << 20
KiB = 1 << 10


def image_bitmaps(vm: VM, target: str) -> dict[str, list[str]]:
    """The bitmaps qemu-img sees in a qcow2 image, name -> flags (-U: QEMU may hold it)."""
    out = subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", str(vm.image(target))],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    data = json.loads(out)["format-specific"]["data"]
    return {b["name"]: b["flags"] for b in data.get("bitmaps", [])}


def test_vm_starts_with_both_monitors(vm: VM) -> None:
    assert vm.running and vm.pid
    assert vm.qmp("query-status")["status"] == "running"
    # accel=kvm:tcg: KVM when usable, TCG otherwise; either is fine for the tests.
    assert isinstance(vm.qmp("query-kvm")["enabled"], bool)
    assert vm.qmp("query-uuid")["UUID"] == vm.uuid
    assert VM("vm1", Path("/x"), Path("/y"), []).uuid == vm.uuid  # stable across instances
    assert uuid.UUID(vm.uuid).version == 5

    # The vcfs monitor is a separate, free QMP monitor.
    with QmpClient(vm.qmp_path) as mon:
        assert mon.execute("query-name") == {"name": "vm1"}

    drivers = {n["node-name"]: n["drv"] for n in vm.block_nodes()}
    assert drivers["vda-format"] == "qcow2"
    assert drivers["vdc-format"] == "raw"
    assert drivers["vdc-file"] == "file"

    with pytest.raises(QmpError) as exc:
        vm.qmp("no-such-command")
    assert exc.value.error_class == "CommandNotFound"


def test_write_dirties_bitmap(vm: VM) -> None:
    vm.qmp("block-dirty-bitmap-add", node="vda-format", name="b0")
    assert vm.bitmaps("vda")["b0"]["count"] == 0

    vm.write("vda", 0, MiB, 0xAB)
    vm.write("vda", 4 * MiB, 128 * KiB, 0xCD)

    b0 = vm.bitmaps("vda")["b0"]
    assert b0["count"] == MiB + 128 * KiB
    assert b0["recording"] and not b0["persistent"] and b0["granularity"] == 64 * KiB
    assert vm.bitmaps("vdb") == {}
    assert vm.has_pattern("vda", 0, MiB, 0xAB)
    assert not vm.has_pattern("vda", 0, MiB, 0xCD)

    # A write smaller than the granularity dirties a whole granule.
    vm.write("vda", 8 * MiB + 1, 1, 0x01)
    assert vm.bitmaps("vda")["b0"]["count"] == MiB + 128 * KiB + 64 * KiB


def test_restart_keeps_persistent_bitmap(vm: VM) -> None:
    vm.qmp("block-dirty-bitmap-add", node="vda-format", name="p", persistent=True)
    vm.qmp("block-dirty-bitmap-add", node="vda-format", name="t")
    vm.write("vda", 0, MiB, 0x11)
    old_pid = vm.pid

    vm.stop()
    # A clean quit stores the bitmap and removes QEMU's socket files.
    assert image_bitmaps(vm, "vda") == {"p": ["auto"]}
    assert not vm.qmp_path.exists()

    vm.start()
    assert vm.pid != old_pid
    bitmaps = vm.bitmaps("vda")
    assert set(bitmaps) == {"p"}  # the non-persistent one is gone
    assert bitmaps["p"]["persistent"] and bitmaps["p"]["recording"]
    assert bitmaps["p"]["count"] == MiB
    assert "inconsistent" not in bitmaps["p"]
    # While QEMU has the image open the bitmap is marked in use.
    assert image_bitmaps(vm, "vda") == {"p": ["in-use", "auto"]}
    assert vm.has_pattern("vda", 0, MiB, 0x11)


def test_kill_leaves_persistent_bitmap_inconsistent(vm: VM) -> None:
    vm.qmp("block-dirty-bitmap-add", node="vda-format", name="p", persistent=True)
    # QEMU writes a new persistent bitmap to the image only at a clean shutdown.
    vm.restart()
    vm.write("vda", 0, MiB, 0x22)

    vm.kill()
    # The stale socket stays behind, refusing connections.
    assert vm.qmp_path.exists()
    with socket.socket(socket.AF_UNIX) as s, pytest.raises(ConnectionRefusedError):
        s.connect(str(vm.qmp_path))
    assert image_bitmaps(vm, "vda") == {"p": ["in-use", "auto"]}

    vm.start()
    p = vm.bitmaps("vda")["p"]
    assert p["inconsistent"] is True
    assert p["recording"] is False and p["count"] == 0 and p["persistent"]
    with pytest.raises(QmpError, match="inconsistent and cannot be used"):
        vm.qmp("block-dirty-bitmap-clear", node="vda-format", name="p")
    with pytest.raises(QmpError, match="already exists"):
        vm.qmp("block-dirty-bitmap-add", node="vda-format", name="p", persistent=True)

    # A clean restart does not repair it; only removing it does.
    vm.restart()
    assert vm.bitmaps("vda")["p"]["inconsistent"] is True
    vm.qmp("block-dirty-bitmap-remove", node="vda-format", name="p")
    vm.stop()
    assert image_bitmaps(vm, "vda") == {}


def test_bitmap_added_then_killed_is_lost(vm: VM) -> None:
    vm.qmp("block-dirty-bitmap-add", node="vda-format", name="p", persistent=True)
    vm.write("vda", 0, MiB, 0x33)
    vm.kill(remove_socket=True)
    assert not vm.qmp_path.exists()
    vm.start()
    assert vm.bitmaps("vda") == {}


def test_raw_and_qcow2_v2_refuse_persistent_bitmaps(vm_factory) -> None:
    vm = vm_factory(
        "vm1", [DiskSpec("vda", compat="0.10"), DiskSpec("vdc", fmt="raw", size=16 << 20)]
    )
    with pytest.raises(QmpError, match="Cannot store dirty bitmaps in qcow2 v2 files"):
        vm.qmp("block-dirty-bitmap-add", node="vda-format", name="p", persistent=True)
    with pytest.raises(QmpError, match="Can't store persistent bitmaps to vdc-format"):
        vm.qmp("block-dirty-bitmap-add", node="vdc-format", name="p", persistent=True)
    # Both still take non-persistent bitmaps.
    for target in ("vda", "vdc"):
        vm.qmp("block-dirty-bitmap-add", node=f"{target}-format", name="t")
        vm.write(target, 0, MiB, 0x44)
        assert vm.bitmaps(target)["t"]["count"] == MiB


def test_demo_vms(tmp_path: Path) -> None:
    base = tmp_path / "demo"
    with demo_vms(base) as (host_dir, vms):
        assert sorted(p.name for p in host_dir.iterdir()) == ["vm1.qmp", "vm2.qmp"]
        for i, vm in enumerate(vms, 1):
            assert vm.running
            for target, offset, length, pattern in DEMO_WRITES:
                assert vm.has_pattern(target, offset, length, pattern + i)
        pids = [vm.pid for vm in vms]
    assert not base.exists()
    assert all(not vm.running for vm in vms) and all(pids)


class TcgVM(VM):
    """A VM forced onto TCG, for what must hold whichever accelerator the host offers."""

    def command(self) -> list[str]:
        return [a.replace("accel=kvm:tcg", "accel=tcg") for a in super().command()]


def cpu_seconds(vm: VM) -> float:
    """User + system CPU time QEMU has used so far."""
    fields = Path(f"/proc/{vm.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.parametrize("accel", ["default", "tcg"])
def test_guest_poweroff_exits_qemu(accel: str, vm_factory, tmp_path: Path) -> None:
    if accel == "tcg":
        vm = TcgVM("tcg", tmp_path / "qmp", tmp_path / "work", [DiskSpec("vda")])
        vm.start()
    else:
        vm = vm_factory("vm1")
    try:
        # The firmware idles in `hlt` with interrupts off, as before it could power off.
        before = cpu_seconds(vm)
        time.sleep(1.0)
        assert cpu_seconds(vm) - before < 0.2
        assert "HLT=1" in vm.hmp("info registers")

        log_start = len(vm.log_text())
        vm.guest_poweroff()
        # The default shutdown action: QEMU exits as after an OS's `poweroff`, cleanly.
        assert vm.wait_exit() == 0
        assert "error" not in vm.log_text()[log_start:].lower()
    finally:
        vm.kill()


def test_guest_poweroff_with_shutdown_pause_stays(vm: VM) -> None:
    vm.qmp("set-action", shutdown="pause")
    vm.take_events()
    vm.guest_poweroff()
    vm.wait_status("shutdown")
    shutdowns = [e["data"] for e in vm.take_events() if e["event"] == "SHUTDOWN"]
    assert shutdowns == [{"guest": True, "reason": "guest-shutdown"}]
    # The block layer still serves I/O while the guest is stopped: a backup can go on.
    assert vm.has_pattern("vda", 0, MiB, 0x00)
    time.sleep(0.2)
    assert vm.running and vm.qmp("query-status")["status"] == "shutdown"
    vm.stop()
    assert not vm.running
