"""Host and Domain over fakes: domains come and go with their sockets, a domain whose QEMU died
with a backup stays until the job is removed, a restart reports what recovery did, and the
fakes implement every member of the ports they stand in for."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import trio
import trio.testing

from tests.unit.fakes import FakeQemu, FakeStore, FakeSystem, disk, environment
from vcfs.domain.host import Host
from vcfs.domain.ports import CheckpointStore, LocalSystem, Qemu
from vcfs.errors import Disconnected


def port_members(protocol: type) -> set[str]:
    return {n for n in vars(protocol) if not n.startswith("_")}


@pytest.mark.parametrize(("fake", "protocol"), [
    (FakeQemu, Qemu), (FakeStore, CheckpointStore), (FakeSystem, LocalSystem),
])
def test_every_fake_implements_its_whole_port(fake, protocol):
    for name in port_members(protocol):
        assert hasattr(fake([]) if fake is FakeQemu else fake(), name), name
        want = getattr(protocol, name)
        if callable(want):
            got = getattr(fake, name)
            assert inspect.iscoroutinefunction(got) == inspect.iscoroutinefunction(want), name
            assert list(inspect.signature(got).parameters) == list(
                inspect.signature(want).parameters), name


class Lab:
    """A host directory whose sockets and QEMUs the test controls."""

    def __init__(self) -> None:
        self.env = environment(FakeStore())
        self.system = self.env.system
        assert isinstance(self.system, FakeSystem)
        self.qemus: dict[str, FakeQemu] = {}
        self.refused: set[str] = set()
        self.host = Host(Path("/host"), self.connect, self.env)

    async def connect(self, path: Path) -> FakeQemu:
        name = path.name.removesuffix(".qmp")
        if name in self.refused:
            raise Disconnected(f"nobody answers on {path}")
        self.qemus[name] = FakeQemu([disk("vda")])
        self.system.qemus.append(self.qemus[name])
        return self.qemus[name]

    def plug(self, name: str, ino: int = 1) -> None:
        self.system.socket_files[f"{name}.qmp"] = ino

    def unplug(self, name: str) -> None:
        del self.system.socket_files[f"{name}.qmp"]


def run(test) -> None:
    async def main() -> None:
        lab = Lab()
        async with trio.open_nursery() as nursery:
            await nursery.start(lab.host.run)
            await test(lab)
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_domains_follow_their_sockets():
    async def test(lab: Lab) -> None:
        lab.plug("vm1")
        lab.system.socket_files["notes.txt"] = 7
        await lab.host.scan()
        assert lab.host.names() == ["vm1"]
        lab.plug("vm2", 2)
        await trio.sleep(0.1)  # a listing rescans unless a scan has just run
        await lab.host.refresh(max_age=0.05)
        assert lab.host.names() == ["vm1", "vm2"]
        lab.unplug("vm1")
        await lab.host.scan()
        assert lab.host.names() == ["vm2"] and lab.qemus["vm1"].closed

    run(test)


def test_a_socket_nobody_answers_on_is_retried_rarely_or_when_replaced():
    async def test(lab: Lab) -> None:
        lab.refused.add("vm1")
        lab.plug("vm1", 1)
        await lab.host.scan()
        assert lab.host.names() == []
        lab.refused.clear()
        await lab.host.scan()
        assert lab.host.names() == []  # same socket, too soon
        lab.plug("vm1", 2)  # a new socket file: tried at once
        await lab.host.scan()
        assert lab.host.names() == ["vm1"]

    run(test)


def test_a_domain_whose_qemu_died_with_a_backup_stays_until_the_job_is_removed():
    async def test(lab: Lab) -> None:
        lab.plug("vm1")
        await lab.host.scan()
        dom = lab.host.get("vm1")
        assert dom is not None
        await dom.backups.begin_default("b")
        await lab.qemus["vm1"].close()
        await lab.host.scan()
        assert lab.host.names() == ["vm1"]
        assert (await dom.backups.status("b")).startswith(b"state: failed\n")
        await dom.backups.end("b")
        assert lab.qemus["vm1"].files == set()  # scratch files and socket removed
        lab.unplug("vm1")
        await lab.host.scan()
        assert lab.host.names() == []

    run(test)


def test_closing_the_host_ends_every_backup():
    async def test(lab: Lab) -> None:
        lab.plug("vm1")
        await lab.host.scan()
        dom = lab.host.get("vm1")
        assert dom is not None
        await dom.backups.begin_default("b")
        q = lab.qemus["vm1"]
        assert q.exports and q.nodes
        await lab.host.close()
        assert lab.host.names() == [] and q.closed
        assert q.exports == {} and q.nodes == {} and q.jobs_ == {} and q.files == set()

    run(test)


def test_a_restart_reports_what_recovery_did():
    async def test(lab: Lab) -> None:
        lab.env.store.put_intent("vm1", "checkpoint-create-x", {
            "op": "checkpoint-create", "name": "x", "disks": ["vda"]})
        lab.plug("vm1")
        await lab.host.scan()
        dom = lab.host.get("vm1")
        assert dom is not None
        errors = dom.errors.render().decode()
        assert "checkpoints/x RECOVER undid interrupted create of x" in errors
        assert lab.env.store.intents("vm1") == {}

    run(test)
