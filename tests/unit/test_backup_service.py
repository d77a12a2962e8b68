"""BackupService over fakes: begin and end of pull and push jobs, the rollback at every fault
point and every QEMU refusal, and recovery (adopt or release) from the intent records a crash
leaves at every step. The real-VM tests (tests/integration/test_backups.py, test_crash.py)
check the same against QEMU; these run in about a second."""

from __future__ import annotations

import copy
import logging

import pytest
import trio
import trio.testing

from tests.faultpoints import PULL_POINTS, PUSH_POINTS
from tests.unit.fakes import FakeQemu, FakeStore, disk, environment, make_domain
from vcfs.domain import faults
from vcfs.domain.backups import service as service_module
from vcfs.domain.backups import start as start_module
from vcfs.domain.backups.job import BackupJob
from vcfs.domain.host import Domain
from vcfs.domain.model import Bitmap
from vcfs.domain.ports import BlockdevBackup
from vcfs.errors import BackendError, Busy, InvalidInput, NoSpace, NotFound

QEMU_STEPS = ["create_image", "add_format_node", "add_cbw_node", "nbd_server_start", "pause",
              "transaction", "set_drive", "add_snapshot_access_node", "export_add"]
PULL_ONLY_STEPS = ("nbd_server_start", "export_add")
TARGET = "/targets/vda.qcow2"


class Crash(BaseException):
    """vcfs was SIGKILLed: nothing after this point runs in the dead process."""


def pull_doc(incremental: str | None = "mon", checkpoint: str | None = "tue") -> bytes:
    inc = f"<incremental>{incremental}</incremental>" if incremental else ""
    cp = (f"<domaincheckpoint><name>{checkpoint}</name></domaincheckpoint>" if checkpoint
          else "")
    return f"<domainbackup mode='pull'>{inc}{cp}</domainbackup>".encode()


def push_doc(incremental: str | None = "mon", checkpoint: str | None = "tue") -> bytes:
    inc = f"<incremental>{incremental}</incremental>" if incremental else ""
    cp = (f"<domaincheckpoint><name>{checkpoint}</name></domaincheckpoint>" if checkpoint
          else "")
    return (f"<domainbackup mode='push'>{inc}<disks><disk name='vda'><target file='{TARGET}'/>"
            f"</disk><disk name='vdb' backup='no'/></disks>{cp}</domainbackup>").encode()


class World:
    """A domain over fakes with a checkpoint `mon` on both disks, and a nursery for its tasks."""

    def __init__(self, nursery: trio.Nursery, tls: bool = False) -> None:
        self.nursery = nursery
        self.qemu = FakeQemu([disk("vda"), disk("vdb")])
        self.store = FakeStore()
        self.tls = tls
        self.dom = make_domain(self.qemu, self.store, nursery.start_soon, tls=tls)
        self.snapshot: tuple[FakeQemu, FakeStore] | None = None

    async def start(self) -> None:
        await self.dom.start()
        await self.dom.checkpoints.create_default("mon")

    @property
    def backups(self):  # noqa: ANN201 - the service under test
        return self.dom.backups

    def state(self) -> dict:
        return {**self.qemu.state(), "intents": sorted(self.store.pending),
                "checkpoints": self.dom.checkpoints.names()}

    def kill_at(self, point: str, monkeypatch: pytest.MonkeyPatch) -> None:
        """Make vcfs 'die' at `point`: what QEMU and the store hold then is the snapshot."""

        def fault_point(name: str) -> None:
            if name == point and self.snapshot is None:
                self.snapshot = copy.deepcopy((self.qemu, self.store))
                raise Crash(point)

        monkeypatch.setattr(service_module, "fault_point", fault_point)
        monkeypatch.setattr(start_module, "fault_point", fault_point)

    async def restart(self) -> None:
        """A new vcfs over what the dead one left (the snapshot)."""
        assert self.snapshot is not None
        self.qemu, self.store = self.snapshot
        self.dom = make_domain(self.qemu, self.store, self.nursery.start_soon, tls=self.tls)
        await self.dom.start()


def run(test, threshold: float = 0, **kw) -> None:
    """Run `test(world)` in trio with a clock that skips the watchers' sleeps. A pull job's
    watcher probes its exports in worker threads: a test that needs the probes' answers gives
    them `threshold` seconds of real time before the clock jumps past their timeout."""

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            world = World(nursery, **kw)
            await world.start()
            await test(world)
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=threshold))


def errors(w: World) -> list[str]:
    return w.dom.errors.render().decode().splitlines()


async def settle() -> None:
    """Let the push watcher poll (the mock clock jumps its sleeps)."""
    await trio.sleep(1)


# ---- pull -----------------------------------------------------------------------------------


def test_pull_begin_makes_every_piece_and_end_releases_them():
    async def test(w: World) -> None:
        before = w.state()
        job_id = await w.backups.begin(pull_doc())
        job = w.backups.require(job_id)
        q = w.qemu
        # per disk: scratch file and format nodes, copy-before-write filter, snapshot access;
        # no block job (libvirt's blockdev-backup sync=none fails guest writes: issue 11)
        assert len(q.nodes) == 8 and len(q.jobs_) == 0 and len(q.exports) == 4
        d0 = job.disks[0]
        assert q.nodes[d0.cbw_node].file == "vda-format"
        assert q.nodes[d0.cbw_node].backing == d0.store_node  # the filter's target
        assert q.nodes[d0.store_node].backing == "vda-format"  # for the status export
        assert q.exports[d0.export_id][0] == d0.access_node
        assert q.exports[d0.status_export_id][0] == d0.store_node
        assert q.drives == {f"/machine/peripheral/{d.target}/virtio-backend": d.cbw_node
                            for d in job.disks}
        # the point in time: guest stopped around the transaction and the devices' switch
        begin = q.calls[q.calls.index("pause"):q.calls.index("resume") + 1]
        assert begin == ["pause", "transaction", "set_drive", "set_drive", "resume"]
        assert q.running
        assert not any(isinstance(a, BlockdevBackup) for t in q.transactions for a in t)
        assert q.server is not None and q.server.path in q.files
        assert w.dom.context.system.restricted == [q.server.path]
        assert sorted(q.files) == sorted([q.server.path] + [d.store_path for d in job.disks])
        # the export bitmap lives on the scratch node; the checkpoint's bitmaps on the disks
        assert [e[2] for e in q.exports.values()] == ["backup-vda", None, "backup-vdb", None]
        assert q.bitmap_names("vda") == ["mon", "tue"] and q.bitmap_names("vdb") == ["mon", "tue"]
        assert w.store.pending[f"backup-{job_id}"]["phase"] == "started"
        assert w.backups.names() == [job_id] and w.backups.latest == job_id
        assert all(d.views is not None for d in job.disks)
        await w.backups.end(job_id)
        after = w.state()
        assert after["bitmaps"] == {"vda-format": ["mon", "tue"], "vdb-format": ["mon", "tue"]}
        assert after["checkpoints"] == ["mon", "tue"]
        for key in ("nodes", "files", "jobs", "exports", "server", "objects", "intents",
                    "drives", "running"):
            assert after[key] == before[key], key
        assert w.backups.names() == [] and w.backups.latest is None
        assert job.state == "completed"

    run(test)


def test_default_pull_backup_and_status_lines():
    async def test(w: World) -> None:
        await w.backups.begin_default("b")
        status = await w.backups.status("b")
        size = 1 << 26
        job = w.backups.require("b")
        w.dom.context.system.usage[job.disks[0].store_path] = (196608, 1 << 30)
        status = await w.backups.status("b")
        assert status == (f"state: running\nmode: pull\ndisk vda: 0/{size}\n"
                          f"disk vdb: 0/{size}\nnbd-read: 0\n"
                          "scratch vda: 196608\nscratch vdb: 0\n").encode()
        with pytest.raises(Busy):
            await w.backups.begin_default("c")
        await w.backups.end("b")
        assert w.qemu.state()["nodes"] == []

    run(test)


@pytest.mark.parametrize("full", [True, False])
def test_a_broken_snapshot_fails_the_backup_not_the_guest(full):
    """A copy-before-write that failed (here: the scratch's file system is full) breaks the
    snapshot: `status` says failed with the reason, `errors` has one line, reads fail, and the
    end releases everything as for any backup."""

    async def test(w: World) -> None:
        before = w.state()
        await w.backups.begin_default("b")
        job = w.backups.require("b")
        d = job.disks[0]
        if full:
            w.dom.context.system.usage[d.store_path] = (16 << 20, 4096)
        w.qemu.break_snapshot("vda")
        status = (await w.backups.status("b")).decode()
        assert status.startswith("state: failed\n"), status
        cause = ("scratch full at 16777216 bytes" if full
                 else f"a copy into scratch {d.store_path} failed or took over the 5 s")
        assert f"error: disk vda: fleecing snapshot broken: {cause}" in status
        assert [line.split()[1:3] for line in errors(w)] == [["backups/b", "FAILED"]]
        with pytest.raises(BackendError):
            await d.views.raw.read(0, 4096)
        await settle()
        assert len(errors(w)) == 1  # reported once
        await w.backups.end("b")
        assert w.state() == before

    run(test, threshold=0.05)


def test_a_broken_snapshot_shows_in_status_within_a_second():
    async def test(w: World) -> None:
        await w.backups.begin_default("b")
        w.qemu.break_snapshot("vdb")
        await trio.sleep(1)
        assert w.backups.require("b").state == "failed"
        assert "disk vdb" in w.backups.require("b").error
        await w.backups.end("b")

    run(test, threshold=0.05)


def test_exports_that_fail_because_qemu_exited_are_no_broken_snapshot():
    """QEMU exiting closes its exports before vcfs's scan notices: the watcher must not call
    that a broken snapshot (the scan fails the job saying QEMU is gone)."""

    async def test(w: World) -> None:
        await w.backups.begin_default("b")
        w.qemu.exports.clear()  # every probe now fails ...
        w.qemu.closed = True  # ... because QEMU is gone
        await trio.sleep(1)
        job = w.backups.require("b")
        assert job.state == "running" and errors(w) == []
        w.dom.backups.qemu_gone()
        assert job.state == "failed" and (job.error or "").startswith("QEMU is gone")

    run(test, threshold=0.05)


def test_the_cbw_timeout_of_the_mount_reaches_every_filter():
    async def test(w: World) -> None:
        await w.backups.begin_default("b")
        assert set(w.qemu.cbw_timeouts.values()) == {5}  # the default, CBW_TIMEOUT
        await w.backups.end("b")
        env = environment(w.store, w.qemu)
        env.cbw_timeout = 2
        dom = Domain("vm1", w.qemu, env, w.nursery.start_soon)
        await dom.start()
        await dom.backups.begin_default("c")
        job = dom.backups.require("c")
        assert [w.qemu.cbw_timeouts[d.cbw_node] for d in job.disks] == [2, 2]
        await dom.backups.end("c")

    run(test)


def domain_with(w: World, **options: object) -> Domain:
    """A second vcfs over the same QEMU, mounted with other options."""
    env = environment(w.store, w.qemu)
    for name, value in options.items():
        setattr(env, name, value)
    return Domain("vm1", w.qemu, env, w.nursery.start_soon)


@pytest.mark.parametrize("mode", ["pull", "push"])
def test_the_scratch_limit_bounds_every_scratch_and_nothing_else(mode):
    async def test(w: World) -> None:
        dom = domain_with(w, scratch_limit=8 << 20)
        await dom.start()
        job_id = await dom.backups.begin(pull_doc() if mode == "pull" else push_doc())
        job = dom.backups.require(job_id)
        assert w.qemu.limits == {d.scratch_node: 8 << 20 for d in job.disks}
        if mode == "push":  # the target is the user's: no limit but its file system's
            assert all(d.store_node not in w.qemu.limits for d in job.disks)
        await dom.backups.end(job_id)

    run(test)


def test_a_scratch_stopped_by_its_limit_says_so():
    async def test(w: World) -> None:
        dom = domain_with(w, scratch_limit=8 << 20)
        await dom.start()
        job_id = await dom.backups.begin(pull_doc())
        d = dom.backups.require(job_id).disks[0]
        dom.context.system.usage[d.scratch_path] = ((8 << 20) - (256 << 10), 1 << 30)
        w.qemu.break_snapshot(d.export_name)
        await trio.sleep(1)
        status = (await dom.backups.status(job_id)).decode()
        assert "state: failed\n" in status
        assert ("error: disk vda: fleecing snapshot broken: scratch limit of 8388608 bytes "
                "reached (8126464 bytes in use); the guest's writes went on") in status
        await dom.backups.end(job_id)

    run(test, threshold=0.05)


@pytest.mark.parametrize("mode", ["pull", "push"])
def test_preserve_shutdown_keeps_a_guest_that_shuts_down_until_the_backup_ends(mode):
    async def test(w: World) -> None:
        dom = domain_with(w, preserve_shutdown=True)
        await dom.start()
        job_id = await dom.backups.begin(pull_doc() if mode == "pull" else push_doc())
        job = dom.backups.require(job_id)
        assert w.qemu.shutdown_pauses
        w.qemu.guest_shutdown()
        assert not w.qemu.closed
        status = (await dom.backups.status(job_id)).decode()
        assert "state: running\n" in status and "guest: shut down; QEMU waits" in status
        if mode == "pull":
            await dom.backups.end(job_id)
        else:
            w.qemu.conclude(job.disks[0].job_id)
            await settle()
            assert job.state == "completed"
        # The last backup gone, the shutdown completes: QEMU quits; the action is back first.
        assert w.qemu.calls[-3:] == ["preserve_shutdown", "shut_down", "quit"]
        assert not w.qemu.shutdown_pauses and w.qemu.closed

    run(test, threshold=0.05)


def test_preserve_shutdown_lets_a_running_guest_run_and_undoes_a_failed_begin():
    async def test(w: World) -> None:
        dom = domain_with(w, preserve_shutdown=True)
        await dom.start()
        before = w.state()
        w.qemu.refuse["export_add"] = "refused"
        with pytest.raises(BackendError):
            await dom.backups.begin(pull_doc())
        del w.qemu.refuse["export_add"]
        assert w.state() == before and not w.qemu.shutdown_pauses
        job_id = await dom.backups.begin(pull_doc())
        await dom.backups.end(job_id)
        assert not w.qemu.shutdown_pauses and not w.qemu.closed and w.qemu.calls[-1] == "shut_down"

    run(test)


@pytest.mark.parametrize("point", ["backup.switch-device", "backup.export-add"])
def test_a_crash_during_a_begin_with_preserve_shutdown_lets_a_shut_down_guest_go(
    monkeypatch, point
):
    """The begin set `shutdown=pause`, then vcfs died and the guest shut down: the next vcfs
    cleans the job up, puts QEMU's default action back and completes the shutdown."""

    async def test(w: World) -> None:
        w.dom = domain_with(w, preserve_shutdown=True)
        await w.dom.start()
        w.kill_at(point, monkeypatch)
        with pytest.raises(Crash):
            await w.backups.begin(pull_doc())
        assert w.snapshot is not None and w.snapshot[0].shutdown_pauses
        w.snapshot[0].guest_shutdown()
        w.qemu, w.store = w.snapshot
        w.dom = domain_with(w, preserve_shutdown=True)
        await w.dom.start()
        assert any("RECOVER" in line and "cleaned up" in line for line in errors(w))
        assert any("RECOVER completed the guest's shutdown" in line for line in errors(w))
        assert not w.qemu.shutdown_pauses and w.qemu.closed  # QEMU quit
        assert w.qemu.nodes == {} and w.qemu.exports == {} and w.store.pending == {}

    run(test)


def test_a_mount_with_preserve_shutdown_leaves_a_guest_waiting_for_other_reasons_alone():
    async def test(w: World) -> None:
        w.qemu.shutdown_pauses = True  # QEMU started with -no-shutdown ...
        w.qemu.guest_shutdown()  # ... and its guest shut down, no backup involved
        dom = domain_with(w, preserve_shutdown=True)
        await dom.start()
        assert not w.qemu.closed and w.qemu.shutdown_pauses

    run(test)


def test_without_preserve_shutdown_the_action_is_never_touched_and_the_error_says_why():
    async def test(w: World) -> None:
        job_id = await w.backups.begin(pull_doc())
        w.qemu.guest_shutdown()
        w.dom.backups.qemu_gone()
        job = w.backups.require(job_id)
        assert job.state == "failed" and "--preserve-shutdown" in (job.error or "")
        assert "preserve_shutdown" not in w.qemu.calls and "shut_down" not in w.qemu.calls

    run(test)


def test_pull_with_tls_adds_and_removes_its_credentials():
    async def test(w: World) -> None:
        doc = (b"<domainbackup mode='pull'><server transport='tcp' tls='yes'/>"
               b"</domainbackup>")
        job_id = await w.backups.begin(doc)
        assert len(w.qemu.objects) == 1 and w.qemu.server.port == 10809
        await w.backups.end(job_id)
        assert w.qemu.objects == set() and w.qemu.server is None

    run(test, tls=True)


def test_requests_refused_before_anything_is_made():
    async def test(w: World) -> None:
        before = w.state()
        for doc, error in [
            (pull_doc(incremental="nope"), NotFound),
            (b"<domainbackup mode='pull'><disks><disk name='vda' backup='no'/>"
             b"<disk name='vdb' backup='no'/></disks></domainbackup>", InvalidInput),
        ]:
            with pytest.raises(error):
                await w.backups.begin(doc)
        w.qemu.set_bitmaps("vda", Bitmap("mon", recording=False))
        with pytest.raises(InvalidInput, match="broken"):
            await w.backups.begin(pull_doc())
        w.qemu.set_bitmaps("vda", Bitmap("mon"))
        assert w.state() == before and w.qemu.calls.count("create_image") == 0

    run(test)


# ---- push -----------------------------------------------------------------------------------


def test_push_completes_keeps_its_target_and_releases_the_rest():
    async def test(w: World) -> None:
        job_id = await w.backups.begin(push_doc())
        job = w.backups.require(job_id)
        (d,) = job.disks
        # The merged bitmap the job copies by lives on the snapshot-access node it reads.
        assert w.qemu.bitmap_names("vda") == ["mon", "tue"]
        assert [b.name for b in w.qemu.nodes[d.access_node].bitmaps] == ["backup-vda"]
        assert [b.name for b in w.qemu.nodes[d.fleece_node].bitmaps] == ["backup-vda"]
        assert w.qemu.drives == {d.disk.qdev: d.cbw_node}
        assert w.qemu.jobs_[d.job_id].device == d.access_node
        (backup,) = [a for a in w.qemu.transactions[-1] if isinstance(a, BlockdevBackup)]
        assert backup.workers == 16  # QEMU's 64 would take every I/O thread of the VM
        assert (await w.backups.status(job_id)).startswith(b"state: running\nmode: push\n")
        w.qemu.conclude(d.job_id)
        await settle()
        assert job.state == "completed" and job.finished.is_set()
        assert w.qemu.files == {TARGET} and w.qemu.nodes == {} and w.qemu.jobs_ == {}
        assert w.qemu.bitmap_names("vda") == ["mon", "tue"] and w.store.pending == {}
        assert await w.backups.status(job_id) == (
            f"state: completed\nmode: push\ndisk vda: {1 << 26}/{1 << 26}\n".encode())
        await w.backups.end(job_id)
        assert w.qemu.files == {TARGET} and w.backups.names() == []

    run(test)


def test_push_that_fails_removes_its_target():
    async def test(w: World) -> None:
        job_id = await w.backups.begin(push_doc(incremental=None, checkpoint=None))
        job = w.backups.require(job_id)
        w.qemu.conclude(job.disks[0].job_id, "No space left on device")
        await settle()
        assert job.state == "failed"
        assert job.error == "disk vda: No space left on device (the guest's writes went on)"
        assert w.qemu.files == set() and w.qemu.nodes == {} and w.qemu.drives == {}

    run(test)


def test_ending_a_running_push_cancels_it_and_removes_its_target():
    async def test(w: World) -> None:
        before = w.state()
        job_id = await w.backups.begin(push_doc(checkpoint=None))
        job = w.backups.require(job_id)
        await w.backups.end(job_id)
        assert job.state == "cancelled"
        assert w.state() == before

    run(test)


def test_a_push_job_dismissed_behind_vcfs_fails():
    async def test(w: World) -> None:
        job_id = await w.backups.begin(push_doc(checkpoint=None))
        job = w.backups.require(job_id)
        del w.qemu.jobs_[job.disks[0].job_id]
        await settle()
        assert job.state == "failed" and "vanished" in (job.error or "")
        assert w.qemu.files == set() and w.qemu.nodes == {}

    run(test)


# ---- rollback -------------------------------------------------------------------------------


@pytest.mark.parametrize(("point", "mode"), [(p, "pull") for p in PULL_POINTS]
                         + [(p, "push") for p in PUSH_POINTS])
def test_a_fault_at_any_step_leaves_nothing(monkeypatch, caplog, point, mode):
    monkeypatch.setattr(faults, "_ACTIVE", frozenset({point}))

    async def test(w: World) -> None:
        before = w.state()
        with pytest.raises(BackendError, match=f"injected fault at {point}"):
            await w.backups.begin(pull_doc() if mode == "pull" else push_doc())
        assert w.state() == before
        assert w.backups.names() == []
        monkeypatch.setattr(faults, "_ACTIVE", frozenset())
        job_id = await w.backups.begin(pull_doc() if mode == "pull" else push_doc())
        await w.backups.end(job_id)

    run(test)
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


@pytest.mark.parametrize("method", QEMU_STEPS)
@pytest.mark.parametrize("mode", ["pull", "push"])
def test_qemu_refusing_any_step_leaves_nothing(caplog, method, mode):
    async def test(w: World) -> None:
        before = w.state()
        w.qemu.refuse[method] = "refused"
        with pytest.raises(BackendError, match="refused"):
            await w.backups.begin(pull_doc() if mode == "pull" else push_doc())
        del w.qemu.refuse[method]
        assert w.state() == before

    if mode == "push" and method in PULL_ONLY_STEPS:
        return  # a push job starts no NBD server, no export
    run(test)
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_a_socket_that_cannot_be_restricted_stops_the_server_again():
    async def test(w: World) -> None:
        before = w.state()
        w.dom.context.system.fail_restrict = PermissionError(1, "Operation not permitted")
        with pytest.raises(PermissionError):
            await w.backups.begin(pull_doc())
        assert w.state() == before

    run(test)


@pytest.mark.parametrize("mode", ["pull", "push"])
def test_a_failing_checkpoint_commit_is_undone_once(caplog, mode):
    """The checkpoint service removes its own bitmaps when its metadata cannot be written; the
    backup's rollback must not remove them a second time (it used to, logging an ERROR)."""

    async def test(w: World) -> None:
        before = w.state()
        w.store.fail_saves = True
        with pytest.raises(NoSpace):
            await w.backups.begin(pull_doc() if mode == "pull" else push_doc())
        assert w.state() == before

    run(test)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


# ---- crash recovery ------------------------------------------------------------------------


@pytest.mark.parametrize(("point", "mode"), [(p, "pull") for p in PULL_POINTS]
                         + [(p, "push") for p in PUSH_POINTS])
def test_killed_at_any_step_of_a_begin_recovery_leaves_nothing(monkeypatch, point, mode):
    async def test(w: World) -> None:
        before = w.state()
        w.kill_at(point, monkeypatch)
        with pytest.raises(Crash):
            await w.backups.begin(pull_doc() if mode == "pull" else push_doc())
        await w.restart()
        assert w.state() == before
        assert any("RECOVER" in line for line in errors(w))
        assert w.backups.names() == []
        job_id = await w.backups.begin(pull_doc())  # and the next backup works
        await w.backups.end(job_id)

    run(test)


def test_a_running_pull_backup_is_adopted_after_a_crash():
    async def test(w: World) -> None:
        before = w.state()
        await w.backups.begin_default("b")
        xml = w.backups.xml("b")
        w.snapshot = copy.deepcopy((w.qemu, w.store))
        await w.restart()
        assert w.backups.names() == ["b"] and w.backups.latest == "b"
        assert w.backups.xml("b") == xml
        assert all(d.views is not None for d in w.backups.require("b").disks)
        assert any("adopted pull backup b" in line for line in errors(w))
        with pytest.raises(Busy):
            await w.backups.begin(pull_doc(checkpoint=None))
        await w.backups.end("b")
        assert w.state() == before

    run(test)


def test_a_pull_backup_whose_export_vanished_is_released_not_adopted():
    async def test(w: World) -> None:
        before = w.state()
        await w.backups.begin_default("b")
        w.snapshot = copy.deepcopy((w.qemu, w.store))
        w.snapshot[0].exports.clear()
        await w.restart()
        assert w.backups.names() == []
        assert w.state() == before

    run(test)


@pytest.mark.parametrize("concluded", [None, "failed", "completed"])
def test_a_running_push_backup_is_adopted_and_watched_to_its_end(concluded):
    async def test(w: World) -> None:
        job_id = await w.backups.begin(push_doc())
        job_ids = [d.job_id for d in w.backups.require(job_id).disks]
        w.snapshot = copy.deepcopy((w.qemu, w.store))
        if concluded:  # QEMU ended the job while vcfs was dead
            w.snapshot[0].conclude(job_ids[0], "I/O error" if concluded == "failed" else None)
        await w.restart()
        job = w.backups.require(job_id)
        if not concluded:
            w.qemu.conclude(job_ids[0])
        await settle()
        assert job.state == (concluded or "completed")
        assert w.qemu.files == (set() if concluded == "failed" else {TARGET})
        assert w.qemu.nodes == {} and w.qemu.jobs_ == {} and w.store.pending == {}
        assert w.qemu.bitmap_names("vda") == ["mon", "tue"]

    run(test)


@pytest.mark.parametrize("phase", ["started", "starting"])
def test_a_push_left_by_a_crash_keeps_its_target_only_if_begun_and_completed(phase):
    """A disk that left the domain makes the job unadoptable: it is released, keeping the
    targets QEMU completed, but only of a begin that had finished."""

    async def test(w: World) -> None:
        job_id = await w.backups.begin(push_doc(checkpoint=None))
        (d,) = w.backups.require(job_id).disks
        q, store = w.snapshot = copy.deepcopy((w.qemu, w.store))
        store.pending[f"backup-{job_id}"]["phase"] = phase
        q.conclude(d.job_id)
        q.order.remove("vdb-format")  # vdb was unplugged; vda's job completed
        del q.disks["vdb-format"]
        store.pending[f"backup-{job_id}"]["disks"].append(
            {**store.pending[f"backup-{job_id}"]["disks"][0], "target": "vdb", "job": "x",
             "store": "/targets/vdb.qcow2", "nodes": ["xs", "xf"]})
        await w.restart()
        assert w.backups.names() == []
        assert w.qemu.files == ({TARGET} if phase == "started" else set())
        assert w.qemu.nodes == {} and w.qemu.jobs_ == {} and w.store.pending == {}
        assert w.qemu.bitmap_names("vda") == ["mon"]
        if phase == "started":
            assert any(f"kept completed targets {TARGET}" in line for line in errors(w))

    run(test)


@pytest.mark.parametrize("point", ["backup.end.start", "backup.end.done"])
def test_killed_while_ending_a_pull_backup(monkeypatch, point):
    async def test(w: World) -> None:
        before = w.state()
        await w.backups.begin_default("b")
        w.kill_at(point, monkeypatch)
        with pytest.raises(Crash):
            await w.backups.end("b")
        await w.restart()
        if point == "backup.end.start":  # the end never happened: the job is adopted
            assert w.backups.names() == ["b"]
            monkeypatch.setattr(service_module, "fault_point", lambda name: None)
            await w.backups.end("b")
        assert w.backups.names() == []
        assert w.state() == before

    run(test)


# ---- QEMU going away ------------------------------------------------------------------------


def test_qemu_gone_fails_jobs_and_abandon_removes_our_files():
    async def test(w: World) -> None:
        await w.backups.begin_default("b")
        job = w.backups.require("b")
        await w.qemu.close()
        w.backups.qemu_gone()
        assert job.state == "failed" and (job.error or "").startswith("QEMU is gone (the guest")
        await w.backups.abandon()
        assert w.backups.names() == []
        assert w.qemu.files == set()  # scratch files and socket: ours to remove

    run(test)


def test_a_record_round_trips():
    async def test(w: World) -> None:
        await w.backups.begin(pull_doc())
        job = w.backups.require("1")
        record = job.to_record(w.dom.backups._codec)
        again = BackupJob.from_record(record, await w.dom.info(0), w.dom.backups._codec)
        assert again.to_record(w.dom.backups._codec) == record
        assert again.disks[0].disk == job.disks[0].disk.__class__(**{
            **job.disks[0].disk.__dict__, "bitmaps": again.disks[0].disk.bitmaps})

    run(test)
