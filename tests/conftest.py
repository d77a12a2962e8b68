"""Shared pytest fixtures: real QEMU VMs, a real vcfs mount, and a shell runner.

Integration tests drive vcfs the way users do - a mounted filesystem, shell commands - against
VMs from `tests.vm`. Fixture teardown is defensive: VMs are always killed, mounts always
unmounted (lazily as a last resort), and the QEMU and vcfs logs are printed when a test fails.

Threading rule: everything here is synchronous and runs in pytest's main thread.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests import conformance
from tests.vm import VM, DiskSpec
from vcfs.mountinfo import is_mounted

INTEGRATION_DIR = Path(__file__).parent / "integration"
MOUNT_TIMEOUT = 10.0

_REPORTS = pytest.StashKey[dict[str, pytest.TestReport]]()


def pytest_configure(config: pytest.Config) -> None:
    """Register the markers used by the fixtures."""
    config.addinivalue_line(
        "markers", "allow_errors: the vcfs log may contain ERROR lines or tracebacks"
    )


def _missing_prerequisites() -> list[str]:
    missing = [
        f"{tool} (not on PATH)"
        for tool in ("qemu-system-x86_64", "qemu-img")
        if shutil.which(tool) is None
    ]
    if not os.path.exists("/dev/fuse"):
        missing.append("/dev/fuse")
    return missing


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark tests/integration as `integration`, and skip it when QEMU or FUSE is absent."""
    missing = _missing_prerequisites()
    skip = pytest.mark.skip(reason="integration tests need " + ", ".join(missing))
    for item in items:
        if INTEGRATION_DIR in item.path.parents:
            item.add_marker(pytest.mark.integration)
            if missing:
                item.add_marker(skip)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Keep each phase's report on the item so fixture teardown knows whether the test failed."""
    report = yield
    item.stash.setdefault(_REPORTS, {})[report.when] = report
    return report


def _test_failed(request: pytest.FixtureRequest) -> bool:
    reports = request.node.stash.get(_REPORTS, {})
    return any(r.failed for r in reports.values())


# --- libvirt's test data -----------------------------------------------------------------------


@pytest.fixture
def libvirt_data() -> Path:
    """libvirt's `tests/` folder (see tests/conformance.py); skips the test when it is absent,
    or fails it where the data is required (.ci/run)."""
    reason = conformance.missing_reason()
    if reason is not None:
        if conformance.required():
            pytest.fail(f"{reason}; {conformance.REQUIRE_ENV} is set: these tests must run here",
                        pytrace=False)
        pytest.skip(reason)
    return conformance.tests_dir()


# --- shell -------------------------------------------------------------------------------------


def run_sh(
    cmd: str,
    *,
    cwd: str | os.PathLike[str] | None = None,
    input: str | None = None,
    timeout: float = 30.0,
) -> subprocess.CompletedProcess[str]:
    """Run `sh -c cmd`; return its output and return code (no exception on failure).

    The shell gets its own process group so that a timeout kills the whole pipeline, including
    a `cat` stuck on a hung mount.
    """
    with subprocess.Popen(
        ["sh", "-c", cmd],
        cwd=cwd,
        text=True,
        start_new_session=True,
        stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as proc:
        try:
            out, err = proc.communicate(input, timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.fixture
def sh() -> Callable[..., subprocess.CompletedProcess[str]]:
    """`sh("echo x > f")` runs a shell command and returns the CompletedProcess."""
    return run_sh


# --- QEMU VMs ----------------------------------------------------------------------------------


@pytest.fixture
def vm_factory(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., VM]]:
    """`vm_factory(name, disks, start=True) -> VM`: VMs whose vcfs sockets share one host dir.

    The host dir (what vcfs mounts) is `vm.host_dir`. Teardown kills every VM, and prints its
    QEMU log if the test failed.
    """
    vms: list[VM] = []

    def make(
        name: str = "vm1", disks: Sequence[DiskSpec] = (DiskSpec("vda"),), start: bool = True
    ) -> VM:
        vm = VM(name, tmp_path / "qmp", tmp_path / "work", disks)
        vms.append(vm)
        if start:
            vm.start()
        return vm

    yield make
    failed = _test_failed(request)
    for vm in vms:
        vm.kill()
        if failed:
            print(f"\n----- QEMU log of {vm.name} -----\n{vm.log_text()}")


BACKENDS = ("qmp", "libvirt")
"""`@pytest.mark.parametrize("vm", BACKENDS, indirect=True)` runs a test over both backends."""


@pytest.fixture
def vm(vm_factory: Callable[..., VM], request: pytest.FixtureRequest) -> Any:
    """A running `vm1` with disks vda (qcow2 64 MiB), vdb (qcow2 32 MiB) and vdc (raw 16 MiB).

    A QEMU of its own behind a QMP socket (`tests.vm.VM`), or, where a test is parametrized
    with "libvirt" for `vm` (indirectly), a transient domain of the tests' private libvirtd
    (`tests.libvirtd.LibvirtVM`). Both have `host_dir` (what vcfs mounts), `write`, `bitmaps`
    and `image`; tests parametrized so use only those.
    """
    disks = [
        DiskSpec("vda", size=64 << 20),
        DiskSpec("vdb", size=32 << 20),
        DiskSpec("vdc", fmt="raw", size=16 << 20),
    ]
    if getattr(request, "param", "qmp") == "libvirt":
        return request.getfixturevalue("lv_factory")("vm1", disks)
    return vm_factory("vm1", disks)


# --- vcfs mounts -------------------------------------------------------------------------------


class Mount:
    """A `vcfs mount -f` child process and its mount point."""

    def __init__(
        self,
        host_dir: Path | str,
        base: Path,
        extra_args: Sequence[str],
        env: Mapping[str, str] | None = None,
    ) -> None:
        # A libvirt URI stays a string: as a Path, `qemu:///system` would lose its slashes.
        self.host_dir: Path | str = host_dir if "://" in str(host_dir) else Path(host_dir)
        self.path = base / "mnt"
        self.state_dir = base / "state"
        self.runtime_dir = base / "run"
        self.log_path = base / "vcfs.log"
        self.extra_args = list(extra_args)
        self.env = dict(env or {})
        """Extra environment variables of the vcfs process (e.g. VCFS_FAULT), kept on restart."""
        self.proc: subprocess.Popen[bytes] | None = None
        for d in (self.path, self.state_dir, self.runtime_dir):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)

    def command(self) -> list[str]:
        """The vcfs command line."""
        return [
            sys.executable,
            "-m",
            "vcfs",
            "mount",
            "-f",
            "--state-dir",
            str(self.state_dir),
            "--runtime-dir",
            str(self.runtime_dir),
            *self.extra_args,
            str(self.host_dir),
            str(self.path),
        ]

    @property
    def returncode(self) -> int | None:
        """vcfs's exit status once it has exited."""
        return None if self.proc is None else self.proc.poll()

    def start(self, timeout: float = MOUNT_TIMEOUT) -> None:
        """Run vcfs and wait until the mount is up; fail the test with the log otherwise."""
        cmd = self.command()
        with open(self.log_path, "ab") as log:
            log.write(f"=== {time.strftime('%H:%M:%S')} start: {' '.join(cmd)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONFAULTHANDLER": "1", **self.env},
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while not is_mounted(self.path):
            if self.proc.poll() is not None:
                pytest.fail(
                    f"vcfs exited with {self.proc.returncode} before mounting:\n{self.log_text()}"
                )
            if time.monotonic() > deadline:
                self.close()
                pytest.fail(f"vcfs did not mount within {timeout} s:\n{self.log_text()}")
            time.sleep(0.02)

    def unmount(self, timeout: float = MOUNT_TIMEOUT) -> None:
        """Unmount with `fusermount3 -u` and wait for vcfs to exit; fail the test if it does not.

        Retries while the mount is busy (a just-finished shell may still hold a file open).
        """
        deadline = time.monotonic() + timeout
        err = ""
        while is_mounted(self.path):
            res = subprocess.run(
                ["fusermount3", "-u", str(self.path)], capture_output=True, text=True
            )
            if res.returncode == 0:
                break
            err = res.stderr.strip()
            if time.monotonic() > deadline:
                self.close()
                pytest.fail(f"could not unmount {self.path}: {err}\n{self.log_text()}")
            time.sleep(0.1)
        if self.proc is not None:
            try:
                self.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.close()
                pytest.fail(f"vcfs did not exit after unmount:\n{self.log_text()}")

    def restart(self) -> None:
        """Unmount and mount again with the same state and runtime dirs."""
        self.unmount()
        self.start()

    def close(self) -> None:
        """Tear down whatever is left, never failing: lazy unmount, then SIGKILL."""
        if is_mounted(self.path):
            res = subprocess.run(["fusermount3", "-u", str(self.path)], capture_output=True)
            if res.returncode != 0:
                subprocess.run(["fusermount3", "-uz", str(self.path)], capture_output=True)
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.wait(2.0)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def log_text(self) -> str:
        """vcfs's stdout and stderr of every start so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def error_lines(self) -> list[str]:
        """Log lines that show vcfs logged an error or crashed."""
        return [
            line
            for line in self.log_text().splitlines()
            if " ERROR " in line or "Traceback" in line
        ]


@pytest.fixture
def vcfs_mount(
    tmp_path: Path, request: pytest.FixtureRequest, vm_factory: Callable[..., VM]
) -> Iterator[Callable[..., Mount]]:
    """`vcfs_mount(host_dir, *extra_args, env={}) -> Mount`: vcfs mounted in the foreground.

    `env` adds variables to vcfs's environment (e.g. `{"VCFS_FAULT": "backup.commit"}`).

    Depends on vm_factory only so that mounts are torn down before the VMs are killed. A test
    fails if the vcfs log has ERROR lines or tracebacks, unless marked `allow_errors`.
    """
    mounts: list[Mount] = []

    def mount(
        host_dir: str | os.PathLike[str], *extra_args: str, env: Mapping[str, str] | None = None
    ) -> Mount:
        m = Mount(host_dir, tmp_path / f"vcfs{len(mounts)}", extra_args, env)
        mounts.append(m)
        m.start()
        return m

    yield mount
    for m in mounts:
        m.close()
    if _test_failed(request):
        for i, m in enumerate(mounts):
            print(f"\n----- vcfs log {i} -----\n{m.log_text()}")
        return
    if request.node.get_closest_marker("allow_errors") is None:
        errors = [line for m in mounts for line in m.error_lines()]
        if errors:
            logs = "\n".join(m.log_text() for m in mounts)
            pytest.fail(
                "vcfs logged errors (mark the test allow_errors if expected):\n"
                + "\n".join(errors)
                + f"\n----- full vcfs log -----\n{logs}",
                pytrace=False,
            )
