"""The `vcfs` command line as users and scripts meet it: real processes, real mounts.

Covers `--version`, the one-line start errors, background mounting (the command returns only once
the mount is usable) and `vcfs umount`, read-only mounts, and stopping a foreground mount with
SIGTERM or SIGINT. Background mounts are not children of the test, so their teardown is written
here: it always unmounts (lazily as a last resort) and kills whatever process is left.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import MOUNT_TIMEOUT, Mount
from vcfs import __version__, mountinfo
from vcfs.mountinfo import is_mounted

VCFS = [sys.executable, "-m", "vcfs"]


def vcfs(*args: str | os.PathLike[str], timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run the vcfs command line to completion and capture its output."""
    return subprocess.run(
        [*VCFS, *map(str, args)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def mount_args(base: Path, *extra: str) -> list[str]:
    """`mount` plus private state and runtime dirs under `base`, so no test touches ~/.local."""
    return ["mount", "--state-dir", str(base / "state"), "--runtime-dir", str(base / "run"), *extra]


def assert_one_line_error(r: subprocess.CompletedProcess[str], *words: str) -> None:
    """Exit status 1 and exactly one `vcfs: …` line on stderr naming `words`; nothing else."""
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("vcfs: "), r.stderr
    for word in words:
        assert word in lines[0], r.stderr


def processes_using(path: Path) -> set[int]:
    """Processes whose command line names `path`, or that have it (or a file under it) open.

    A background vcfs is reparented away from the test, so this is how to find it: its path
    arguments are unique to the test.
    """
    needle = str(path)
    pids: set[int] = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            links = [os.readlink(fd) for fd in (proc / "fd").iterdir()]
            links.append(os.readlink(proc / "cwd"))
        except OSError:
            continue  # Gone meanwhile, or a kernel thread.
        if needle in cmdline or any(
            link == needle or link.startswith(needle + "/") for link in links
        ):
            pids.add(int(proc.name))
    return pids


def wait_for(predicate: Callable[[], bool], timeout: float = MOUNT_TIMEOUT) -> bool:
    """Poll `predicate` until true or `timeout` passes; return its last value."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


# --- version and start errors ------------------------------------------------------------------


def test_version():
    r = vcfs("--version")
    assert (r.returncode, r.stdout, r.stderr) == (0, f"vcfs {__version__}\n", "")
    # The installed console script says the same (what users actually type).
    script = Path(sys.executable).with_name("vcfs")
    if script.exists():
        r = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=30)
        assert (r.returncode, r.stdout) == (0, f"vcfs {__version__}\n")


# Start errors are checked before a background mount forks, but both modes must say them alike.
MODES = [pytest.param(["-f"], id="foreground"), pytest.param([], id="background")]


@pytest.mark.parametrize("mode", MODES)
def test_missing_host_directory_is_one_line(tmp_path, mode):
    (tmp_path / "mnt").mkdir()
    r = vcfs(*mount_args(tmp_path, *mode), tmp_path / "nohost", tmp_path / "mnt")
    assert_one_line_error(r, "nohost", "no such host directory")
    # Refused before forking: no detached process lingers with the paths it was given.
    assert not processes_using(tmp_path)


# A missing mountpoint takes the same path as a file; one mode is enough for it.
@pytest.mark.parametrize(
    ("mode", "kind"),
    [(["-f"], "file"), ([], "file"), (["-f"], "missing")],
    ids=["foreground-file", "background-file", "foreground-missing"],
)
def test_mountpoint_not_a_directory_is_one_line(tmp_path, mode, kind):
    (tmp_path / "host").mkdir()
    mnt = tmp_path / "mnt"
    if kind == "file":
        mnt.write_text("")
    r = vcfs(*mount_args(tmp_path, *mode), tmp_path / "host", mnt)
    assert_one_line_error(r, str(mnt), "not a directory")
    assert not is_mounted(mnt)


@pytest.mark.parametrize("mode", MODES)
def test_mounting_twice_on_one_path_is_one_line_and_spares_the_first_mount(
    tmp_path, vm, vcfs_mount, mode
):
    m = vcfs_mount(vm.host_dir)
    r = vcfs(*mount_args(tmp_path / "second", *mode), vm.host_dir, m.path)
    assert_one_line_error(r, str(m.path), "already mounted")
    # The refused attempt neither stacked a mount nor disturbed the one being served.
    assert sum(e.mount_point == str(m.path) for e in mountinfo.read()) == 1
    assert os.listdir(m.path) == ["vm1"]
    assert m.returncode is None


def test_umount_of_something_not_mounted_is_one_line(tmp_path):
    r = vcfs("umount", tmp_path)
    assert_one_line_error(r, str(tmp_path))


@pytest.mark.parametrize("mode", MODES)
def test_libfuse_mount_failure_is_one_line(tmp_path, mode):
    (tmp_path / "host").mkdir()
    (tmp_path / "mnt").mkdir()
    # An option libfuse rejects is the simplest mount failure that passes vcfs's own checks.
    r = vcfs(*mount_args(tmp_path, *mode, "-o", "no_such_option"), tmp_path / "host",
             tmp_path / "mnt")  # fmt: skip
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    # libfuse prints its own complaint to stderr in the foreground; vcfs adds exactly one line,
    # which must carry libfuse's reason rather than a wrapper's.
    ours = [line for line in r.stderr.splitlines() if line.startswith("vcfs: ")]
    assert len(ours) == 1, r.stderr
    assert "fuse" in ours[0], r.stderr
    assert not is_mounted(tmp_path / "mnt")
    assert not processes_using(tmp_path / "mnt")


# --- background mode ---------------------------------------------------------------------------


@pytest.fixture
def background(tmp_path: Path) -> Iterator[Path]:
    """A base dir for a background mount (`base/mnt`); teardown always removes the mount.

    The background vcfs is found by its unique paths and killed if `vcfs umount` did not end it.
    """
    base = tmp_path / "bg"
    (base / "mnt").mkdir(parents=True)
    yield base
    mnt = base / "mnt"
    if is_mounted(mnt):
        r = subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)
        if r.returncode:
            subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True)
    for pid in processes_using(base):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_background_mount_is_ready_on_return_and_umount_ends_it(vm, background, sh):
    mnt, log = background / "mnt", background / "vcfs.log"
    r = vcfs(*mount_args(background, "--log-file", str(log)), vm.host_dir, mnt)
    assert (r.returncode, r.stdout, r.stderr) == (0, "", ""), log.exists() and log.read_text()
    # No waiting: the command returned, so the mount must already be there and serving.
    ls = sh(f"ls {mnt} {mnt}/vm1/checkpoints")
    assert ls.returncode == 0, ls.stderr
    assert ls.stdout.split() == [f"{mnt}:", "vm1", f"{mnt}/vm1/checkpoints:", "new", "redefine"]
    # The detached server (the command's own process has exited) holds the paths it serves.
    server = processes_using(background)
    assert len(server) == 1, server
    assert vcfs("umount", mnt).returncode == 0
    assert not is_mounted(mnt)
    assert wait_for(lambda: not processes_using(background)), "vcfs still runs after umount"
    text = log.read_text()
    assert "unmounted" in text
    assert " ERROR " not in text and "Traceback" not in text, text


# --- options and signals -----------------------------------------------------------------------


def test_read_only_mount_refuses_changes_with_erofs(vm, vcfs_mount):
    m = vcfs_mount(vm.host_dir, "-o", "ro")
    cps = m.path / "vm1/checkpoints"
    assert (m.path / "vm1/xml").read_text().startswith("<domain")
    with pytest.raises(OSError) as e:
        os.mkdir(cps / "c1")
    assert e.value.errno == errno.EROFS
    with pytest.raises(OSError) as e:
        os.open(cps / "new", os.O_WRONLY)
    assert e.value.errno == errno.EROFS
    assert vm.bitmaps("vda") == {} and vm.bitmaps("vdb") == {}
    assert sorted(os.listdir(cps)) == ["new", "redefine"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_foreground_mount_ends_cleanly_on_signal(vm, vcfs_mount, sig):
    m = vcfs_mount(vm.host_dir)
    # Using the mount first also guarantees vcfs is past start-up (see the race test below).
    os.mkdir(m.path / "vm1/checkpoints/c1")
    assert m.proc is not None
    m.proc.send_signal(sig)
    assert m.proc.wait(MOUNT_TIMEOUT) == 0, m.log_text()
    assert not is_mounted(m.path)
    assert f"got {sig.name}: unmounting" in m.log_text()
    # Stopping is not deleting: the checkpoint survives in QEMU and in vcfs's state.
    assert "c1" in vm.bitmaps("vda")
    m.start()
    assert "c1" in os.listdir(m.path / "vm1/checkpoints")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_signal_as_soon_as_the_mount_appears_still_ends_cleanly(tmp_path, sig):
    # What a service manager or a script's trap does: stop vcfs the moment the mount exists.
    # No VM is needed; an empty host dir mounts just as well. The window is well under a
    # millisecond, so the mount is polled without sleeping, a few times over.
    host = tmp_path / "host"
    host.mkdir()
    for attempt in range(5):
        m = Mount(host, tmp_path / f"race{attempt}", [])
        try:
            with open(m.log_path, "wb") as log:
                m.proc = subprocess.Popen(
                    m.command(),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            deadline = time.monotonic() + MOUNT_TIMEOUT
            while not is_mounted(m.path):
                assert m.proc.poll() is None, m.log_text()
                assert time.monotonic() < deadline, m.log_text()
            m.proc.send_signal(sig)
            assert m.proc.wait(MOUNT_TIMEOUT) == 0, m.log_text()
            assert not is_mounted(m.path)
        finally:
            m.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="only root may raise a mount's read-ahead")
def test_read_ahead_is_raised_on_a_mount_point_with_a_space(tmp_path):
    # mountinfo writes the space as \040; the mount once compared it unescaped and so kept the
    # kernel's 128 KiB. An empty host dir mounts just as well as one with VMs.
    host = tmp_path / "host"
    host.mkdir()
    m = Mount(host, tmp_path / "my vms", [])
    try:
        m.start()
        entry = mountinfo.find(m.path)
        assert entry is not None and " " in entry.mount_point
        ra = Path(f"/sys/class/bdi/{entry.device}/read_ahead_kb")
        assert wait_for(lambda: ra.read_text() == "1024\n"), (ra.read_text(), m.log_text())
        m.unmount()
    finally:
        m.close()


def test_a_dead_mount_on_the_mountpoint_is_one_line(tmp_path):
    # vcfs killed: its mount stays, and every stat of it fails with ENOTCONN. Mounting there
    # again once died in a traceback from that stat.
    host = tmp_path / "host"
    host.mkdir()
    m = Mount(host, tmp_path / "dead", [])
    try:
        m.start()
        assert m.proc is not None
        os.killpg(m.proc.pid, signal.SIGKILL)
        m.proc.wait()
        with pytest.raises(OSError) as e:
            os.stat(m.path)
        assert e.value.errno == errno.ENOTCONN
        for mode in MODES:
            r = vcfs(*mount_args(tmp_path / "again", *mode.values[0]), host, m.path)
            assert_one_line_error(r, str(m.path), "already mounted")
    finally:
        m.close()
