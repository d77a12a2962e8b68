"""vcfs as a system tool: under a service manager, from /etc/fstab, watched and waited for.

- The systemd unit's own ExecStart= runs under a stand-in service manager that speaks the
  notify protocol: READY=1 only once the mount is usable, STOPPING=1 and a clean unmount on
  SIGTERM; `systemd-analyze verify` accepts the units.
- `mount -t fuse.vcfs`, the legacy `vcfs#HOST` form and an fstab line go through mount(8) and
  mount.fuse3 to `vcfs HOST MOUNTPOINT -o …`; `umount` ends them.
- `vcfs status` and `vcfs wait` against real push jobs (completed, cancelled).
- docs/tree.md against a real mount: every path shown is documented and every documented path
  is shown, with the documented type and mode.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import MOUNT_TIMEOUT, Mount
from tests.integration.test_cli import processes_using, wait_for
from tests.vm import DiskSpec
from vcfs import mountinfo
from vcfs.mountinfo import is_mounted

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "packaging/vcfs.service"
PATH_UNIT = REPO / "packaging/vcfs.path"
VCFS = [sys.executable, "-m", "vcfs"]
INSTALLED = Path("/usr/local/bin/vcfs")
"""Where mount(8)'s helper PATH and the unit's ExecStart= find vcfs."""
WRAPPER_MARK = "# vcfs test wrapper"
MiB = 1 << 20


def vcfs(*args: str | os.PathLike[str], timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*VCFS, *map(str, args)], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout)


# --- the unit under a stand-in service manager --------------------------------------------------


def unit_command(unit: Path, env: dict[str, str]) -> list[str]:
    """The unit's ExecStart= as argv, variables expanded the way systemd does: `${X}` is one
    word, `$X` splits on whitespace. Defaults come from its Environment= lines."""
    values: dict[str, str] = {}
    command = None
    for line in unit.read_text().splitlines():
        key, _, value = line.partition("=")
        if key == "Environment":
            for item in shlex.split(value):
                name, _, val = item.partition("=")
                values[name] = val
        elif key == "ExecStart":
            command = value
    assert command is not None
    values.update(env)
    argv: list[str] = []
    for word in command.split():
        if m := re.fullmatch(r"\$\{(\w+)\}", word):
            argv.append(values[m[1]])
        elif m := re.fullmatch(r"\$(\w+)", word):
            argv += values[m[1]].split()
        else:
            argv.append(word)
    if argv[0] == str(INSTALLED):
        argv[:1] = VCFS  # this checkout, not whatever is installed
    return argv


class Manager:
    """The notify side of a service manager: a datagram socket in $NOTIFY_SOCKET."""

    def __init__(self, address: str) -> None:
        self.env = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)

    def receive(self, timeout: float = MOUNT_TIMEOUT) -> dict[str, str]:
        self.sock.settimeout(timeout)
        data = self.sock.recv(4096).decode()
        return dict(line.split("=", 1) for line in data.splitlines())

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize("kind", ["path", "abstract"])
def test_unit_notifies_ready_once_usable_and_stopping_on_sigterm(vm, tmp_path, kind):
    base = tmp_path / "svc"
    m = Mount(vm.host_dir, base, [])
    # A unix socket path must fit in 108 bytes; pytest's tmp paths may not.
    address = f"/tmp/vcfs-notify-{uuid.uuid4().hex[:8]}.sock" if kind == "path" else \
        f"@vcfs-notify-{uuid.uuid4().hex}"
    manager = Manager(address)
    err = base / "stderr"
    argv = unit_command(UNIT, {
        "VCFS_HOST": str(vm.host_dir), "VCFS_MOUNTPOINT": str(m.path),
        "VCFS_OPTIONS": f"--state-dir {m.state_dir} --runtime-dir {m.runtime_dir}",
    })
    assert argv[len(VCFS):len(VCFS) + 2] == ["mount", "-f"]
    try:
        with open(err, "wb") as f:
            # stderr is "the journal": JOURNAL_STREAM names it, as systemd's does.
            st = os.fstat(f.fileno())
            env = {**os.environ, "NOTIFY_SOCKET": address,
                   "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
            m.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=f, stderr=f,
                                      env=env, start_new_session=True)
        msg = manager.receive()
        # READY=1 means usable: the mount is there and shows the VM, right now.
        assert is_mounted(m.path)
        assert os.listdir(m.path) == ["vm1"]
        assert msg["READY"] == "1", msg
        assert msg["MAINPID"] == str(m.proc.pid)
        assert str(m.path) in msg["STATUS"]
        os.mkdir(m.path / "vm1/checkpoints/c1")
        m.proc.send_signal(signal.SIGTERM)
        msg = manager.receive()
        assert msg["STOPPING"] == "1", msg
        assert m.proc.wait(MOUNT_TIMEOUT) == 0, err.read_text()
        assert not is_mounted(m.path)
    finally:
        m.close()
        manager.close()
        if kind == "path":
            os.unlink(address)
    # Journal-style lines: a syslog priority, no timestamp (journald adds its own).
    lines = err.read_text().splitlines()
    assert any(re.fullmatch(r"<6>INFO vcfs\.app: mounted .*", line) for line in lines), lines
    assert any(re.fullmatch(r"<6>INFO vcfs\.fs\.ops: mkdir vm1/checkpoints/c1 .*", line)
               for line in lines), lines
    assert all(line.startswith("<") for line in lines), lines
    assert "c1" in vm.bitmaps("vda")


@pytest.fixture
def installed_vcfs() -> Iterator[Path]:
    """/usr/local/bin/vcfs running this checkout, for mount(8) and systemd to find.

    mount(8) runs helpers with a fixed PATH (/usr/local/sbin:/usr/local/bin:/usr/sbin:…), so
    mount.fuse3's `sh -c 'vcfs …'` finds vcfs only there. Skips rather than replace a real
    installation; removes only its own wrapper.
    """
    if os.geteuid() != 0:
        pytest.skip("needs root (mount(8), /usr/local/bin)")
    if os.path.lexists(INSTALLED):
        pytest.skip(f"{INSTALLED} exists already: not replacing an installed vcfs")
    INSTALLED.write_text(f"#!/bin/sh\n{WRAPPER_MARK}\n"
                         f"PYTHONPATH={shlex.quote(str(REPO))} exec "
                         f"{shlex.quote(sys.executable)} -m vcfs \"$@\"\n")
    INSTALLED.chmod(0o755)
    try:
        yield INSTALLED
    finally:
        if WRAPPER_MARK in INSTALLED.read_text():
            INSTALLED.unlink()


@pytest.mark.skipif(not os.path.exists("/usr/bin/systemd-analyze"),
                    reason="systemd-analyze is not installed")
def test_systemd_analyze_verifies_the_units(installed_vcfs):
    # --man=no: vcfs(1) is installed by pip, not in this checkout's test environment.
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", str(UNIT), str(PATH_UNIT)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stderr == "", r.stderr


def test_background_mount_keeps_logging_to_the_journal(vm, tmp_path):
    # `vcfs mount` without -f under systemd (what a mount unit runs): the daemon drops the
    # caller's stdout but keeps a stderr that is the journal's stream.
    base = tmp_path / "bg"
    m = Mount(vm.host_dir, base, [])
    read_fd, write_fd = os.pipe()
    st = os.fstat(write_fd)
    try:
        r = subprocess.run(
            [*VCFS, "mount", "--state-dir", m.state_dir, "--runtime-dir", m.runtime_dir,
             vm.host_dir, m.path], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=write_fd, env={**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"},
            timeout=30)
        os.close(write_fd)
        assert r.returncode == 0
        os.mkdir(m.path / "vm1/checkpoints/c1")
        assert vcfs("umount", m.path).returncode == 0
        assert wait_for(lambda: not processes_using(base))
        with os.fdopen(read_fd) as pipe:
            lines = pipe.read().splitlines()  # EOF: the daemon has exited
    finally:
        m.close()
        for pid in processes_using(base):
            os.kill(pid, signal.SIGKILL)
    assert any(re.fullmatch(r"<6>INFO vcfs\.fs\.ops: mkdir vm1/checkpoints/c1 \(.* ms\)", line)
               for line in lines), lines
    assert any(re.fullmatch(r"<6>INFO vcfs\.app: unmounted .*", line) for line in lines), lines


# --- mount(8), mount.fuse3 and fstab --------------------------------------------------------------


@pytest.fixture
def helper_base(tmp_path: Path) -> Iterator[Path]:
    """A base dir for a mount made by mount(8); teardown always removes it and its process."""
    base = tmp_path / "fstab"
    for d in ("mnt", "state", "run"):
        (base / d).mkdir(parents=True)
    yield base
    mnt = base / "mnt"
    if is_mounted(mnt):
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
    for pid in processes_using(base):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.parametrize("form", ["type", "legacy", "fstab"])
def test_mount_helper_mounts_and_umount_ends_it(vm, installed_vcfs, helper_base, form):
    mnt, log = helper_base / "mnt", helper_base / "vcfs.log"
    opts = (f"state_dir={helper_base / 'state'},runtime-dir={helper_base / 'run'},"
            f"log_file={log},_netdev,nofail,x-systemd.automount,noexec")
    if form == "type":
        cmd = ["mount", "-t", "fuse.vcfs", str(vm.host_dir), str(mnt), "-o", opts]
    elif form == "legacy":
        cmd = ["mount", "-t", "fuse", f"vcfs#{vm.host_dir}", str(mnt), "-o", opts]
    else:
        fstab = helper_base / "fstab"
        fstab.write_text(f"# test\n{vm.host_dir}  {mnt}  fuse.vcfs  {opts}  0 0\n")
        cmd = ["mount", "--fstab", str(fstab), str(mnt)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert (r.returncode, r.stderr) == (0, ""), log.exists() and log.read_text()
    # mount(8) returned: the mount is there and serving.
    entry = mountinfo.find(mnt)
    assert entry is not None and entry.fstype == "fuse.vcfs"
    assert os.listdir(mnt) == ["vm1"]
    assert "noexec" in entry.options.split(","), entry  # a FUSE option made it through
    assert len(processes_using(helper_base)) == 1  # the background vcfs
    r = subprocess.run(["umount", str(mnt)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert not is_mounted(mnt)
    assert wait_for(lambda: not processes_using(helper_base)), "vcfs still runs after umount"
    text = log.read_text()
    assert "unmounted" in text and " ERROR " not in text and "Traceback" not in text, text


def test_mount_helper_failure_is_one_line_through_mount(installed_vcfs, helper_base):
    mnt = helper_base / "mnt"
    r = subprocess.run(["mount", "-t", "fuse.vcfs", str(helper_base / "nohost"), str(mnt), "-o",
                        f"state_dir={helper_base / 'state'}"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0
    assert r.stderr.strip().splitlines() == [f"vcfs: {helper_base / 'nohost'}: no such host "
                                             "directory"], r.stderr
    assert not is_mounted(mnt)


# --- vcfs status and vcfs wait ------------------------------------------------------------------


def push_doc(target: Path, disk: str = "vda") -> str:
    return (f"<domainbackup><disks><disk name='{disk}'><target file='{target}'/></disk>"
            "</disks></domainbackup>")


def begin_push(backups: Path, target: Path) -> Path:
    """Begin a push job of vda; its directory."""
    with open(backups / "new", "w") as f:
        f.write(push_doc(target))
    return backups / os.readlink(backups / "latest")


@pytest.fixture
def slow_vm(vm):
    """vm1 whose vda (64 MiB, all data) reads at 48 MiB/s: a push job of it takes ~1.3 s.

    A throttle filter goes between vda's qcow2 node and its file, so the job is slow from its
    first read on. (block-job-set-speed comes too late: QEMU starts a job with 64 MiB of
    copies in flight.)
    """
    vm.write("vda", 0, 64 * MiB, 0x5A)
    vm.qmp("object-add", qom_type="throttle-group", id="slow", limits={"bps-read": 48 * MiB})
    vm.qmp("blockdev-add", driver="throttle", node_name="vda-slow", throttle_group="slow",
           file="vda-file")
    vm.qmp("blockdev-reopen",
           options=[{"driver": "qcow2", "node-name": "vda-format", "file": "vda-slow"}])
    return vm


def test_status_and_wait_follow_a_push_job_to_completion(slow_vm, vcfs_mount, tmp_path):
    m = vcfs_mount(slow_vm.host_dir)
    dom = m.path / "vm1"
    os.mkdir(dom / "checkpoints/mon")
    os.mkdir(dom / "checkpoints/tue")
    job = begin_push(dom / "backups", tmp_path / "full.qcow2")
    waiter = subprocess.Popen([*VCFS, "wait", dom / "backups/latest"], text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    watcher = subprocess.Popen([*VCFS, "status", "--watch", "--interval", "0.2", m.path],
                               text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        time.sleep(0.3)
        assert waiter.poll() is None, "wait returned while the job runs"
        out, err = waiter.communicate(timeout=30)
        assert (waiter.returncode, out, err) == (0, "", "")
        assert (job / "status").read_text().startswith("state: completed\n")
        watched, err = watcher.communicate(timeout=30)
        assert watcher.returncode == 0, err
    finally:
        for p in (waiter, watcher):
            if p.poll() is None:
                p.kill()
                p.communicate()
    # The listing before the live part, progress lines with a bar, rate and time left, then
    # the job's end.
    lines = watched.splitlines()
    assert "vm1" in lines and "  checkpoints: mon, tue (current)" in lines, watched
    bars = [line for line in lines if line.startswith("vm1 backup 1 (push) vda [")]
    assert bars, watched
    assert any(re.search(r"\] +\d+%  [\d.]+ MiB/64\.0 MiB  [\d.]+ MiB/s  \d+:\d\d left$", line)
               for line in bars), watched
    assert re.fullmatch(r"vm1 backup 1: completed after \d+:\d\d", lines[-1]), watched

    r = vcfs("status", m.path)
    assert r.returncode == 0, r.stderr
    assert r.stdout == (
        "vm1\n"
        "  checkpoints: mon, tue (current)\n"
        "  backup 1: push, completed\n"
        "    vda  64.0 MiB / 64.0 MiB  100%\n"
    )
    # Without a mount point: every vcfs mount, each under its path. (Other mounts of this
    # machine may be listed too, or be unreadable: exit 1, but this one is still there.)
    r = vcfs("status")
    assert f"{m.path}:\nvm1\n" in r.stdout, r.stdout
    # Nothing running: --watch says so and returns.
    r = vcfs("status", "--watch", m.path / "vm1")
    assert r.returncode == 0 and r.stdout.endswith("no backup job is running\n"), r.stdout


def test_wait_exits_1_for_a_cancelled_job_and_2_for_a_non_backup(slow_vm, vcfs_mount,
                                                                  tmp_path):
    vm = slow_vm
    m = vcfs_mount(vm.host_dir)
    backups = m.path / "vm1/backups"
    target = tmp_path / "slow.qcow2"
    job = begin_push(backups, target)
    waiter = subprocess.Popen([*VCFS, "wait", job], text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    try:
        time.sleep(0.3)
        assert waiter.poll() is None
        vm.qmp("job-cancel", id=vm.qmp("query-jobs")[0]["id"])
        out, err = waiter.communicate(timeout=30)
    finally:
        if waiter.poll() is None:
            waiter.kill()
            waiter.communicate()
    assert waiter.returncode == 1, err
    assert err == "vcfs: backup 1 of vm1 cancelled\n"
    assert not target.exists()  # vcfs removed the unfinished target
    r = vcfs("status", m.path)
    assert "  backup 1: push, cancelled\n" in r.stdout, r.stdout
    # Not backups: exit 2, one line.
    for path in (m.path / "vm1/checkpoints", backups / "nope", tmp_path):
        r = vcfs("wait", path)
        assert r.returncode == 2, (path, r.stderr)
        assert r.stderr.startswith(f"vcfs: {path}: not a backup job directory"), r.stderr


# --- docs/tree.md against a real mount ------------------------------------------------------------

KINDS = {"directory": stat.S_IFDIR, "file": stat.S_IFREG, "symlink": stat.S_IFLNK}


def documented() -> list[tuple[str, int, int]]:
    """(path pattern, file type bits, permission bits) of every row of docs/tree.md's table."""
    rows = []
    for line in (REPO / "docs/tree.md").read_text().splitlines():
        m = re.match(r"\| `([^`]+)` \| (directory|file|symlink) \| `(0[0-7]{3})` \|", line)
        if m:
            rows.append((m[1].rstrip("/"), KINDS[m[2]], int(m[3], 8)))
    return rows


def pattern_regex(pattern: str) -> re.Pattern[str]:
    parts = re.split(r"(<[a-z]+>)", pattern)
    return re.compile("".join("[^/]+" if p.startswith("<") else re.escape(p) for p in parts))


def test_docs_tree_md_matches_a_real_mount(vm_factory, vcfs_mount):
    vm = vm_factory("vm1", [DiskSpec("vda", size=16 * MiB), DiskSpec("vdb", size=16 * MiB)])
    m = vcfs_mount(vm.host_dir)
    dom = m.path / "vm1"
    os.mkdir(dom / "checkpoints/mon")
    os.mkdir(dom / "checkpoints/tue")  # a parent link needs a child checkpoint
    with open(dom / "backups/new", "w") as f:
        f.write("<domainbackup mode='pull'><incremental>mon</incremental></domainbackup>")
    assert (dom / "backups/1/status").read_text().startswith("state: running\n")
    rows = documented()
    assert len(rows) >= 20
    regexes = [(pattern_regex(p), p, kind, mode) for p, kind, mode in rows]
    seen: set[str] = set()
    found = []
    for parent, dirs, files in os.walk(m.path):
        for name in dirs + files:
            path = Path(parent, name)
            rel = str(path.relative_to(m.path))
            st = os.lstat(path)
            matches = [(p, kind, mode) for rx, p, kind, mode in regexes if rx.fullmatch(rel)]
            assert matches, f"{rel} is not in docs/tree.md"
            # The most specific pattern wins: `<disk>.qcow2` over `<disk>`.
            p, kind, mode = max(matches, key=lambda t: len(re.sub(r"<[a-z]+>", "", t[0])))
            assert stat.S_IFMT(st.st_mode) == kind, (rel, p)
            assert stat.S_IMODE(st.st_mode) == mode, (rel, p, oct(st.st_mode))
            seen.add(p)
            found.append(rel)
    missing = [p for p, _, _ in rows if p not in seen]
    assert not missing, f"documented but not in the mount: {missing}\nmount: {found}"
    # `vcfs status` shows the running pull job, its progress read through the tree.
    with open(dom / "backups/1/disks/vda", "rb") as f:
        f.read(1 * MiB)
    r = vcfs("status", m.path)
    assert r.returncode == 0, r.stderr
    assert "  checkpoints: mon, tue (current)\n  backup 1: pull, running (" in r.stdout, r.stdout
    assert re.search(r"\n    vda  1\.0 MiB / 16\.0 MiB +6%\n", r.stdout), r.stdout
