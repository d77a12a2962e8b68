"""Fixtures of the integration tests that run vcfs over libvirt: a private libvirtd (one per
test session: it starts in a fraction of a second, but its first domain costs seconds of QEMU
capability probing) and transient domains under it, all torn down at the end.

Threading rule: synchronous, pytest's main thread.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from tests.conftest import _test_failed
from tests.libvirtd import Libvirtd, LibvirtVM, missing_prerequisites
from tests.vm import DiskSpec


@pytest.fixture(scope="session")
def libvirtd() -> Iterator[Libvirtd]:
    """A private libvirtd + virtlogd (see tests.libvirtd); skips where they cannot run."""
    missing = missing_prerequisites()
    if missing:
        pytest.skip("libvirt tests need " + ", ".join(missing))
    daemon = Libvirtd()
    try:
        daemon.start()
    except BaseException:
        print(daemon.log_text())
        daemon.stop()
        raise
    yield daemon
    daemon.stop()


@pytest.fixture
def lv_factory(
    libvirtd: Libvirtd, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., LibvirtVM]]:
    """`lv_factory(name, disks, persistent=False, start=True) -> LibvirtVM`: libvirt domains
    (`start=False`: not yet started, so that a test can make its images first).

    Teardown destroys (and undefines) each one, and prints libvirtd's log if the test failed.
    """
    vms: list[LibvirtVM] = []
    if not libvirtd.running:
        libvirtd.start()  # a test stopped it and failed before starting it again

    def make(name: str = "lv1", disks: Sequence[DiskSpec] = (DiskSpec("vda"),),
             persistent: bool = False, start: bool = True) -> LibvirtVM:
        vm = LibvirtVM(libvirtd, name, tmp_path / "lvwork", disks)
        vms.append(vm)
        if start:
            vm.start(persistent=persistent)
        return vm

    yield make
    for vm in vms:
        vm.close()
    if _test_failed(request):
        print(f"\n----- libvirtd log -----\n{libvirtd.log_text()}")
    shutil.rmtree(tmp_path / "lvwork", ignore_errors=True)
