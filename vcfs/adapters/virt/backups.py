"""`<dom>/backups/` over libvirt's backup API.

`new` and `mkdir` are one backupBegin with the backup XML and, where the document has a
`<domaincheckpoint>` child, the checkpoint XML in the same call (see `documents` for the
defaults vcfs fills in). A pull job's disks are read through the same views as the QMP
backend's (`vcfs.domain.views.DiskViews` over `ExportSource` and an NBD connection pool) on the
export libvirt made; `xml` is backupGetXMLDesc's document as it was when the job began;
`status` follows libvirt's job (jobInfo, and the job-completed event the host hands over);
`rmdir` aborts a running job.

libvirt runs one job per domain and makes a second backupBegin wait 30 s for the job lock
before failing: vcfs refuses a second backup at once (EBUSY) when a job of its own runs or
libvirt reports any job active.

A pull job found running when vcfs (re)connects — vcfs restarted, or libvirtd did — is adopted:
its directory (re)appears with the next free id, readable again.
Thread rule: trio tasks only; begin and end hold the domain's lock.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import libvirt
import trio

from vcfs.adapters.virt import documents
from vcfs.adapters.virt.checkpoints import LibvirtCheckpoints
from vcfs.adapters.virt.connection import Connection
from vcfs.adapters.virt.errors import is_no_backup, is_no_job
from vcfs.domain.host import Environment
from vcfs.domain.model import PULL, Disk
from vcfs.domain.names import check_job_name
from vcfs.domain.ports import NbdAddress
from vcfs.domain.reader import ExportSource
from vcfs.domain.status import CANCELLED, COMPLETED, FAILED, RUNNING, DiskProgress, JobStatus
from vcfs.domain.status import render as render_status
from vcfs.domain.views import DiskViews
from vcfs.errors import AlreadyExists, BackendError, Busy, NotFound, VcfsError

log = logging.getLogger(__name__)

BEGIN_TIMEOUT = 60.0
"""backupBegin creates scratch images and starts QEMU's jobs: allow it more than a query."""

ABORT_TIMEOUT = 20.0
"""How long an aborted job may take to go (libvirt removes scratch images and exports)."""

RECORD = "libvirt-backup"
"""The key (and `op`) of the note a running job leaves in the state directory."""

_END_STATES = {
    libvirt.VIR_DOMAIN_JOB_COMPLETED: COMPLETED,
    libvirt.VIR_DOMAIN_JOB_FAILED: FAILED,
    libvirt.VIR_DOMAIN_JOB_CANCELLED: CANCELLED,
}


@dataclass
class LibvirtDiskJob:
    """One backed-up disk of a job."""

    target: str
    size: int
    incremental: str | None
    scratch: str | None = None
    """Pull: the scratch file libvirt made, when this host can see it (a local URI)."""
    views: DiskViews | None = None


@dataclass
class LibvirtJob:
    """A libvirt backup job as the tree shows it (the tree's `BackupEntry`)."""

    id: str
    mode: str
    xml: bytes
    disks: list[LibvirtDiskJob]
    checkpoint: str | None = None
    socket: str | None = None
    """The export's unix socket, when in vcfs's runtime directory (removed at the end if
    QEMU left it behind)."""
    state: str = RUNNING
    error: str | None = None
    done: int = 0
    """Push: the bytes libvirt has copied, all disks together (its `disk_processed`)."""
    started: float = field(default_factory=time.time)

    def close_views(self) -> None:
        """End all reading of the job's disks: readers get EIO from now on."""
        for d in self.disks:
            if d.views is not None:
                d.views.close()


class LibvirtBackups:
    """The backup jobs of one libvirt domain (the tree's `Backups`)."""

    def __init__(
        self,
        conn: Connection,
        uuid: str,
        name: str,
        lock: trio.Lock,
        env: Environment,
        spawn: Callable[..., None],
        report: Callable[[str, str, str], None],
        checkpoints: LibvirtCheckpoints,
        remote_host: str | None = None,
    ) -> None:
        self._conn = conn
        self._remote_host = remote_host
        """The hypervisor's host name when the URI is remote: exports must be reached over
        TCP there (a unix socket would be on the hypervisor, not here)."""
        self._uuid = uuid
        self._name = name
        self._lock = lock
        self._env = env
        self._spawn = spawn
        self._report = report
        self._checkpoints = checkpoints
        self._jobs: dict[str, LibvirtJob] = {}
        self._next_id = 1
        self.latest: str | None = None

    # ---- reading ----------------------------------------------------------------------------

    def names(self) -> list[str]:
        return list(self._jobs)

    def get(self, job_id: str) -> LibvirtJob | None:
        return self._jobs.get(job_id)

    def _require(self, job_id: str) -> LibvirtJob:
        job = self._jobs.get(job_id)
        if job is None:
            raise NotFound(f"no backup '{job_id}'")
        return job

    def xml(self, job_id: str) -> bytes:
        """libvirt's backup-dumpxml of the job, as it was when the job began."""
        return self._require(job_id).xml

    def views(self, job_id: str, target: str) -> DiskViews:
        job = self._require(job_id)
        for d in job.disks:
            if d.target == target and d.views is not None:
                return d.views
        raise NotFound(f"backup '{job_id}' exports no disk '{target}'")

    async def status(self, job_id: str) -> bytes:
        """State from libvirt's job; a pull disk's progress is what its views have served."""
        job = self._require(job_id)
        if job.state == RUNNING:
            await self._poll(job)
        disks = []
        for d in job.disks:
            if job.mode == PULL:
                served = d.views.bytes_served if d.views else 0
                disks.append(DiskProgress(d.target, min(served, d.size), d.size))
            else:
                # libvirt counts a push job's bytes for all its disks together: each disk
                # shows its share of them, complete when the job is.
                total = sum(x.size for x in job.disks) or 1
                share = d.size if job.state == COMPLETED else job.done * d.size // total
                disks.append(DiskProgress(d.target, min(share, d.size), d.size))
        nbd = sum(d.views.nbd_bytes for d in job.disks if d.views) if job.mode == PULL else None
        # What the guest's writes have made QEMU copy so far: the host's count of the scratch
        # file's blocks, as for QMP hosts.
        scratch = {d.target: self._env.system.disk_usage(d.scratch)[0] for d in job.disks
                   if d.scratch and job.state == RUNNING}
        return render_status(
            JobStatus(job.state, job.mode, disks, nbd, job.error, scratch)).encode()

    async def _poll(self, job: LibvirtJob) -> None:
        """Ask libvirt how the running job is doing (in case an event was missed)."""
        def stats(dom: libvirt.virDomain) -> tuple[dict[str, Any], dict[str, Any] | None]:
            active = dom.jobStats(0)
            if active.get("type", libvirt.VIR_DOMAIN_JOB_NONE) != libvirt.VIR_DOMAIN_JOB_NONE:
                return active, None
            # KEEP_COMPLETED: reading them must not take them from `virsh domjobinfo
            # --completed` (libvirt otherwise forgets them once read).
            return active, dom.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED
                                        | libvirt.VIR_DOMAIN_JOB_STATS_KEEP_COMPLETED)

        try:
            active, completed = await self._conn.on_domain(self._uuid, stats, "job stats")
        except VcfsError as e:
            log.debug("domain %s: job stats: %s", self._name, e)
            return
        if completed is None:
            job.done = int(active.get("disk_processed", job.done))
        else:
            self._finished(job, completed)

    def job_completed(self, params: dict[str, Any]) -> None:
        """libvirt's job-completed event for this domain: ask how the job ended.

        libvirt 9.0's event says `success` but not whether a failed job was cancelled; the
        completed job's statistics say (`type`)."""
        job = next((j for j in self._jobs.values() if j.state == RUNNING), None)
        if job is not None and params.get("operation") == libvirt.VIR_DOMAIN_JOB_OPERATION_BACKUP:
            self._spawn(self._poll, job)

    def _finished(self, job: LibvirtJob, params: dict[str, Any]) -> None:
        if "type" in params:
            state = _END_STATES.get(params["type"], FAILED)
        else:
            state = COMPLETED if params.get("success") else FAILED
        if job.state != RUNNING:
            return
        job.state = state
        job.done = int(params.get("disk_processed", job.done))
        if state == FAILED:
            job.error = str(params.get("errmsg") or "libvirt reports the backup job failed")
            self._report(f"backups/{job.id}", "EIO", job.error)
        if job.mode == PULL:
            # A pull job ends only when aborted (here, by `virsh domjobabort`) or when it
            # fails: its exports are gone, so reads must fail now rather than time out.
            job.close_views()
        log.info("domain %s: backup %s %s", self._name, job.id, job.state)

    # ---- beginning --------------------------------------------------------------------------

    async def begin(self, document: bytes) -> str:
        """`new`: backupBegin with the document (and its checkpoint); returns the job's id."""
        async with self._lock:
            job_id = str(self._next_id)
            while job_id in self._jobs:
                self._next_id += 1
                job_id = str(self._next_id)
            await self._begin(job_id, document)
            self._next_id += 1
        return job_id

    async def begin_default(self, job_id: str) -> None:
        """`mkdir ID`: a full pull backup of every disk."""
        check_job_name(job_id)
        async with self._lock:
            if job_id in self._jobs:
                raise AlreadyExists(f"backup '{job_id}' already exists")
            await self._begin(job_id, None)

    async def _begin(self, job_id: str, document: bytes | None) -> None:
        running = next((j for j in self._jobs.values() if j.state == RUNNING), None)
        if running is not None:
            raise Busy(f"backup '{running.id}' is already running on domain {self._name}")
        server = {"transport": "unix",
                  "socket": str(self._env.runtime_dir / f"{self._name}-{job_id}.sock")}
        if self._remote_host is not None:
            server = {"transport": "tcp", "name": self._remote_host}
            if self._env.tls_dir is not None:  # `--tls-x509-dir`: the export wants TLS too
                server["tls"] = "yes"
        scratch_dir = self._env.scratch_dir
        serial = int(time.time())

        def scratch_file(target: str) -> str:
            # libvirt creates it and removes it when the job ends (or fails to begin).
            return str(scratch_dir / f"{self._name}-{job_id}-{serial}-{target}.qcow2")

        def begin(dom: libvirt.virDomain) -> tuple[str, documents.BackupRequest, dict[str, int]]:
            # Any job of libvirt's (a backup begun with virsh, a migration) would make
            # backupBegin wait 30 s for the job lock and then fail: refuse at once instead.
            if dom.jobInfo()[0] != libvirt.VIR_DOMAIN_JOB_NONE:
                raise _Busy()
            disks = documents.domain_disks(dom.XMLDesc(0))
            request = documents.backup_request(document, disks, server, scratch_file,
                                               self._env.system.free_tcp_port)
            dom.backupBegin(request.backup_xml, request.checkpoint_xml, 0)
            try:
                xml = dom.backupGetXMLDesc(0)
                sizes = {d.target: dom.blockInfo(d.target)[0] for d in disks
                         if d.backup_capable}
            except libvirt.libvirtError:
                _abort_quietly(dom)
                raise
            return xml, request, sizes

        try:
            xml, request, sizes = await self._conn.on_domain(self._uuid, begin, "backup begin",
                                                             BEGIN_TIMEOUT)
        except _Busy:
            raise Busy(f"a job is already running on domain {self._name} (libvirt)") from None
        job = self._job(job_id, xml, request.mode, sizes, request.checkpoint)
        if request.checkpoint is not None:
            self._checkpoints.created(request.checkpoint)
        try:
            await self._checkpoints.refresh()
        except VcfsError as e:
            log.warning("domain %s: checkpoints after backup %s: %s", self._name, job_id, e)
        self._jobs[job_id] = job
        self.latest = job_id
        self._remember(job)
        log.info("domain %s: began %s backup %s", self._name, job.mode, job_id)

    def _remember(self, job: LibvirtJob) -> None:
        """Note the job's id and the checkpoint it made in the state directory: libvirt's
        backup XML says neither, and a vcfs restarted while the job runs shows it again under
        the same id, its qcow2 image named after that checkpoint. Best effort: without the
        note the job is still adopted, under a new id."""
        try:
            self._env.store.put_intent(self._name, RECORD, {
                "op": RECORD, "id": job.id, "checkpoint": job.checkpoint,
                "xml": job.xml.decode()})
        except VcfsError as e:
            log.warning("domain %s: backup %s: cannot note it: %s", self._name, job.id, e)

    def _forget(self) -> None:
        try:
            self._env.store.drop_intent(self._name, RECORD)
        except VcfsError as e:
            log.warning("domain %s: cannot drop the backup note: %s", self._name, e)

    def _job(self, job_id: str, xml: str, mode: str, sizes: dict[str, int],
             checkpoint: str | None) -> LibvirtJob:
        """The job for libvirt's backup XML, with the views of a pull job's disks."""
        server, disks = documents.backup_facts(xml)
        local = self._remote_host is None
        # vcfs removes a socket left behind only where it makes them: its runtime directory.
        socket = (server.socket if server and server.socket and local
                  and Path(server.socket).parent == self._env.runtime_dir else None)
        job = LibvirtJob(job_id, mode, xml.encode(),
                         [LibvirtDiskJob(d.target, sizes.get(d.target, 0), d.incremental,
                                         d.scratch if local and mode == PULL else None)
                          for d in disks], checkpoint, socket)
        if mode != PULL or server is None:
            return job
        if server.transport == "unix":
            address = NbdAddress("unix", path=server.socket)
        else:
            address = NbdAddress("tcp", host=server.host or "localhost", port=server.port)
        tls_dir = str(self._env.tls_dir) if server.tls and self._env.tls_dir else None
        for d, facts in zip(job.disks, disks, strict=True):
            opener = _opener(self._env.open_export, address, facts.export_name or d.target,
                             facts.export_bitmap, tls_dir)
            source = ExportSource(d.size, opener)
            # The naming convention of the QMP backend's images (README, scripts/vcfs-backup).
            backing = f"{d.target}-{d.incremental}.qcow2" if d.incremental else None
            saved = f"{d.target}-{checkpoint}.qcow2" if checkpoint else None
            disk = Disk(d.target, "", "qcow2", "", d.size)
            d.views = DiskViews(disk, source, self._spawn, bool(d.incremental), backing,
                                self._env.cache, saved)
        return job

    # ---- ending -------------------------------------------------------------------------------

    async def end(self, job_id: str) -> None:
        """`rmdir`: abort the job if it still runs, then forget it."""
        async with self._lock:
            job = self._require(job_id)
            job.close_views()
            if job.state == RUNNING:
                def abort(dom: libvirt.virDomain) -> None:
                    try:
                        dom.abortJob()
                    except libvirt.libvirtError as e:
                        # Ended meanwhile (libvirt says no job is active): nothing to abort.
                        if not is_no_job(e):
                            raise
                    # abortJob returns before libvirt has torn the job down (measured: a
                    # three-disk pull job still ran right after it); the next backup must not
                    # find it running.
                    deadline = time.monotonic() + ABORT_TIMEOUT
                    while dom.jobInfo()[0] != libvirt.VIR_DOMAIN_JOB_NONE:
                        if time.monotonic() > deadline:
                            raise BackendError(
                                f"libvirt still runs the aborted job after {ABORT_TIMEOUT:.0f} s")
                        time.sleep(0.02)

                try:
                    await self._conn.on_domain(self._uuid, abort, "backup abort")
                except BackendError:
                    if self._conn.alive:
                        raise
                    # libvirtd is away: QEMU keeps the job; the next adoption shows it again.
                job.state = CANCELLED
            del self._jobs[job_id]
            self._forget()
            if job.socket:
                self._env.system.remove(job.socket)
            if self.latest == job_id:
                self.latest = next(reversed(self._jobs), None)
        log.info("domain %s: ended backup %s", self._name, job_id)

    async def abandon(self) -> None:
        """The mount ends or the domain went away: end every job."""
        for job_id in list(self._jobs):
            try:
                await self.end(job_id)
            except VcfsError as e:
                log.warning("domain %s: ending backup %s: %s", self._name, job_id, e)
                self._jobs.pop(job_id).close_views()

    def domain_gone(self) -> None:
        """QEMU stopped: every running job failed; readers fail at once."""
        for job in self._jobs.values():
            if job.state == RUNNING:
                job.state, job.error = FAILED, "the domain stopped"
                job.close_views()

    # ---- adoption -----------------------------------------------------------------------------

    async def adopt(self) -> None:
        """Show a pull backup libvirt runs that vcfs does not know (after a restart of vcfs or
        of libvirtd); forget vcfs's running jobs that libvirt no longer has."""
        def facts(dom: libvirt.virDomain) -> tuple[str, dict[str, int]] | None:
            if not dom.isActive():
                return None
            # Asked first because it is silent: backupGetXMLDesc without a backup logs an
            # error in libvirtd's log, at every scan.
            stats = dom.jobStats(0)
            if stats.get("operation") != libvirt.VIR_DOMAIN_JOB_OPERATION_BACKUP:
                return None
            try:
                xml = dom.backupGetXMLDesc(0)
            except libvirt.libvirtError as e:
                if is_no_backup(e):
                    return None
                raise
            disks = documents.domain_disks(dom.XMLDesc(0))
            return xml, {d.target: dom.blockInfo(d.target)[0] for d in disks
                         if d.backup_capable}

        if self._lock.locked():
            return  # a begin or an end is under way: the next scan looks again
        async with self._lock:
            found = await self._conn.on_domain(self._uuid, facts, "backup adoption")
            running = next((j for j in self._jobs.values() if j.state == RUNNING), None)
            if found is None:
                if running is not None:
                    await self._poll(running)
                return
            if running is not None:
                return  # still ours
            xml, sizes = found
            mode = "pull" if "mode='pull'" in xml or 'mode="pull"' in xml else "push"
            note = self._env.store.intents(self._name).get(RECORD, {})
            if note.get("xml") == xml and note.get("id") not in self._jobs:
                job_id, checkpoint = str(note["id"]), note.get("checkpoint")
            else:  # begun by someone else (virsh), or the note is of an older job
                job_id, checkpoint = str(self._next_id), None
                while job_id in self._jobs:
                    self._next_id += 1
                    job_id = str(self._next_id)
            if job_id.isdigit():
                self._next_id = max(self._next_id, int(job_id) + 1)
            job = self._job(job_id, xml, mode, sizes, checkpoint)
            self._jobs[job_id] = job
            self.latest = job_id
            self._remember(job)
            message = f"adopted the {mode} backup libvirt runs as backup {job_id}"
            log.warning("domain %s: %s", self._name, message)
            self._report(f"backups/{job_id}", "RECOVER", message)


class _Busy(Exception):
    """Raised in the worker thread: libvirt has a job active on the domain."""


def _abort_quietly(dom: libvirt.virDomain) -> None:
    try:
        dom.abortJob()
    except libvirt.libvirtError:
        pass


def _opener(open_export: Any, address: NbdAddress, name: str, bitmap: str | None,
            tls_dir: str | None) -> Callable[[], Any]:
    return lambda: open_export(address, name, bitmap, tls_dir, None)
