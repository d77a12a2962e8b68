"""mountinfo parsing (vcfs.mountinfo) and its users that need no mount: the read-ahead tuning."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from vcfs import mountinfo
from vcfs.fs.mount import set_read_ahead
from vcfs.mountinfo import MountEntry

SAMPLE = (
    "22 1 0:21 / /proc rw,nosuid - proc proc rw\n"
    "90 22 0:50 / /mnt/vms rw,nosuid,nodev shared:1 master:2 - fuse.vcfs vcfs rw,user_id=0\n"
    "91 22 0:51 / /mnt/my\\040vms rw - fuse.vcfs /srv/a\\011b rw\n"
    "92 22 0:52 /sub /mnt/back\\134slash rw - fuse.sshfs x rw\n"
    "93 90 0:53 / /mnt/vms rw,noexec - fuse.vcfs vcfs rw\n"
    "garbage\n"
)


def test_parse_unescapes_paths_and_skips_optional_fields():
    entries = mountinfo.parse(SAMPLE)
    assert entries[1] == MountEntry("0:50", "/", "/mnt/vms", "rw,nosuid,nodev", "fuse.vcfs",
                                    "vcfs")
    assert (entries[2].mount_point, entries[2].source) == ("/mnt/my vms", "/srv/a\tb")
    assert (entries[3].root, entries[3].mount_point) == ("/sub", "/mnt/back\\slash")
    assert len(entries) == 5  # the garbage line is skipped


def test_find_returns_the_mount_on_top(tmp_path):
    info = tmp_path / "mountinfo"
    info.write_text(SAMPLE)
    found = mountinfo.find("/mnt/vms", info)
    assert found is not None and found.device == "0:53"  # mounted over 0:50
    assert mountinfo.find("/mnt/my vms", info).device == "0:51"
    assert mountinfo.find("/mnt/none", info) is None


def test_mount_point_of_resolves_only_the_parent(tmp_path):
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "link")
    os.symlink("elsewhere", tmp_path / "real" / "last")
    assert mountinfo.mount_point_of(tmp_path / "link" / "last") == str(tmp_path / "real/last")


def test_a_real_mount_is_found():
    assert mountinfo.is_mounted("/proc")
    assert not mountinfo.is_mounted("/proc/self")


def read_ahead_setup(tmp_path: Path, mount_point: str) -> tuple[Path, Path]:
    """A mountinfo naming `mount_point` (escaped as the kernel does) and a fake bdi dir."""
    escaped = mount_point.replace("\\", "\\134").replace(" ", "\\040").replace("\t", "\\011")
    info = tmp_path / "mountinfo"
    info.write_text(f"90 22 0:50 / {escaped} rw - fuse.vcfs vcfs rw\n")
    bdi = tmp_path / "bdi"
    (bdi / "0:50").mkdir(parents=True, exist_ok=True)
    (bdi / "0:50" / "read_ahead_kb").write_text("128\n")
    return info, bdi / "0:50" / "read_ahead_kb"


def test_read_ahead_is_raised_on_a_mount_point_with_a_space(tmp_path):
    # The bug: mountinfo's `\040` was compared unescaped, so such a mount kept 128 KiB.
    for name in ("plain", "my vms", "tab\there"):
        mnt = tmp_path / name
        mnt.mkdir()
        info, ra = read_ahead_setup(tmp_path, str(mnt))
        set_read_ahead(mnt, 1024, mountinfo_path=str(info), bdi_dir=str(tmp_path / "bdi"))
        assert ra.read_text() == "1024\n", name


def test_read_ahead_of_an_unknown_mount_is_left_alone(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    info, ra = read_ahead_setup(tmp_path, "/elsewhere")
    set_read_ahead(tmp_path, 1024, mountinfo_path=str(info), bdi_dir=str(tmp_path / "bdi"))
    assert ra.read_text() == "128\n"
    assert "cannot raise read-ahead" in caplog.text
