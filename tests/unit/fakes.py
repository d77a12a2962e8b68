"""Fakes of the domain ports for unit tests of the services (never instead of real QEMU tests).

`FakeQemu` implements every member of the `Qemu` port with QEMU's refusals that matter to the
services: a node in use cannot be deleted, a job must conclude before it is dismissed, a second
NBD server is refused, transactions are atomic. `state()` is everything a backup could leave
behind, so a test compares it before and after. `FakeSystem` is the `LocalSystem` port over the
fake's file set.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NoReturn

from vcfs.adapters import xmlcodec
from vcfs.adapters.codec import XmlCodec
from vcfs.domain.extents import Extent
from vcfs.domain.host import Domain, Environment
from vcfs.domain.model import Bitmap, CheckpointDef, Disk, DomainInfo
from vcfs.domain.ports import (
    Action,
    AddBitmap,
    BlockdevBackup,
    BlockJob,
    MergeBitmaps,
    NbdAddress,
    RemoveBitmap,
)
from vcfs.errors import AlreadyExists, BackendError, Disconnected, NoSpace, QmpCommandError

CANCELLED_ERROR = "Operation canceled"


def disk(target: str, driver: str = "qcow2", **kw: object) -> Disk:
    """A disk as QEMU would report it."""
    kw.setdefault("qcow2_v3", driver == "qcow2")
    kw.setdefault("qdev", f"/machine/peripheral/{target}/virtio-backend")
    return Disk(target=target, node=f"{target}-format", driver=driver,
                source=f"/img/{target}.{driver}", size=1 << 26, **kw)  # type: ignore[arg-type]


@dataclass
class FakeNode:
    """A node vcfs added: its file (a protocol node's path, or a format node's file node)."""

    file: str
    backing: str | None = None
    bitmaps: list[Bitmap] = field(default_factory=list)


@dataclass
class FakeJob:
    id: str
    device: str
    target: str
    bitmap: str | None = None
    status: str = "running"
    current: int = 0
    total: int = 0
    error: str | None = None


def _refuse(command: str, desc: str) -> NoReturn:
    raise QmpCommandError(command, "GenericError", desc)


class FakeQemu:
    """An in-memory QEMU: disks with bitmaps, nodes, jobs, exports, NBD server, objects."""

    def __init__(self, disks: Sequence[Disk], uuid: str | None = None) -> None:
        self.disks = {d.node: d for d in disks}
        self.order = [d.node for d in disks]
        self.uuid = uuid
        self.transactions: list[list[Action]] = []
        self.closed = False
        self.fail_next: str | None = None
        """Refuse the next transaction with this message."""
        self.refuse: dict[str, str] = {}
        """Method name -> the error QEMU gives every call of it."""
        self.nodes: dict[str, FakeNode] = {}
        self.files: set[str] = set()
        self.jobs_: dict[str, FakeJob] = {}
        self.exports: dict[str, tuple[str, str, str | None]] = {}
        self.server: NbdAddress | None = None
        self.objects: set[str] = set()
        self.calls: list[str] = []
        self.drives: dict[str, str] = {}
        """Guest device (qdev) -> the node it writes through, when not its disk's own."""
        self.running = True
        """The guest's vCPUs run (`pause`/`resume`)."""
        self.cbw_timeouts: dict[str, int] = {}
        """Copy-before-write node -> its cbw-timeout."""
        self.broken: set[str] = set()
        """Export names whose copy-before-write snapshot broke: their reads fail."""
        self.limits: dict[str, int] = {}
        """Format node -> the most its file may grow to (`add_format_node`'s `limit`)."""
        self.shutdown_pauses = False
        """`set-action shutdown=pause` is in force (`preserve_shutdown`)."""
        self.guest_shut_down = False
        """The guest shut down and QEMU waits, paused."""

    # ---- test controls ----------------------------------------------------------------------

    def bitmap_names(self, target: str) -> list[str | None]:
        return [b.name for b in self.disks[f"{target}-format"].bitmaps]

    def set_bitmaps(self, target: str, *bitmaps: Bitmap) -> None:
        node = f"{target}-format"
        self.disks[node] = replace(self.disks[node], bitmaps=bitmaps)

    def conclude(self, job_id: str, error: str | None = None) -> None:
        """QEMU finishes a job (completed, or failed with `error`)."""
        j = self.jobs_[job_id]
        j.status, j.error, j.current = "concluded", error, j.total

    def state(self) -> dict[str, Any]:
        """Everything a backup could leave in QEMU or on disk."""
        return {
            "bitmaps": {n: [b.name for b in d.bitmaps] for n, d in self.disks.items()},
            "nodes": sorted(self.nodes), "files": sorted(self.files),
            "jobs": sorted(self.jobs_), "exports": sorted(self.exports),
            "server": self.server, "objects": sorted(self.objects),
            "drives": dict(self.drives), "running": self.running,
            "shutdown_pauses": self.shutdown_pauses,
        }

    def break_snapshot(self, target: str) -> None:
        """A copy-before-write into the scratch of disk `target` failed (break-snapshot)."""
        self.broken |= {name for _, name, _ in self.exports.values() if name == target}

    def _check(self, method: str) -> None:
        if self.closed:
            raise Disconnected("QEMU is gone")
        self.calls.append(method)
        if method in self.refuse:
            _refuse(method, self.refuse[method])

    def _node_exists(self, node: str) -> bool:
        return node in self.nodes or node in self.disks

    def _size(self, node: str) -> int:
        """A node's length: its disk's, down the chain of files (filters, snapshot-access)."""
        while node not in self.disks:
            if node not in self.nodes:
                return 0
            node = self.nodes[node].file
        return self.disks[node].size

    def _bitmaps(self, node: str) -> list[Bitmap]:
        if node in self.disks:
            return list(self.disks[node].bitmaps)
        return self.nodes[node].bitmaps

    # ---- the Qemu port ----------------------------------------------------------------------

    async def domain_info(self, name: str) -> DomainInfo:
        self._check("domain_info")
        return DomainInfo(name, self.uuid, tuple(self.disks[n] for n in self.order))

    async def transaction(self, actions: Sequence[Action]) -> None:
        self._check("transaction")
        if self.fail_next:
            msg, self.fail_next = self.fail_next, None
            _refuse("transaction", msg)
        bitmaps = {n: self._bitmaps(n) for n in [*self.disks, *self.nodes]}
        jobs = dict(self.jobs_)
        for a in actions:
            if not self._node_exists(a.node if not isinstance(a, BlockdevBackup) else a.device):
                _refuse("transaction", f"Cannot find device or node '{a}'")
            if isinstance(a, AddBitmap):
                names = [b.name for b in bitmaps[a.node]]
                if a.name in names:
                    _refuse("transaction", f"Bitmap already exists: {a.name}")
                d = self.disks.get(a.node)
                if a.persistent and (d is None or not d.qcow2_v3):
                    _refuse("transaction", "Cannot store dirty bitmaps in qcow2 v2 files")
                bitmaps[a.node] = [*bitmaps[a.node], Bitmap(a.name, persistent=a.persistent,
                                                           recording=not a.disabled)]
            elif isinstance(a, RemoveBitmap):
                if a.name not in [b.name for b in bitmaps[a.node]]:
                    _refuse("transaction", f"Dirty bitmap '{a.name}' not found")
                if any((j.device, j.bitmap) == (a.node, a.name) for j in jobs.values()
                       if j.status != "concluded"):
                    _refuse("transaction", f"Bitmap '{a.name}' is currently in use")
                bitmaps[a.node] = [b for b in bitmaps[a.node] if b.name != a.name]
            elif isinstance(a, MergeBitmaps):
                if a.target not in [b.name for b in bitmaps[a.node]]:
                    _refuse("transaction", f"Dirty bitmap '{a.target}' not found")
                for node, name in a.sources:
                    if name not in [b.name for b in bitmaps[node]]:
                        _refuse("transaction", f"Dirty bitmap '{name}' not found")
            elif isinstance(a, BlockdevBackup):
                if a.job_id in jobs:
                    _refuse("transaction", f"Job ID '{a.job_id}' already in use")
                if a.target not in self.nodes:
                    _refuse("transaction", f"Cannot find node '{a.target}'")
                if a.bitmap and a.bitmap not in [b.name for b in bitmaps[a.device]]:
                    _refuse("transaction", f"Bitmap '{a.bitmap}' could not be found")
                size = self._size(a.device)
                jobs[a.job_id] = FakeJob(a.job_id, a.device, a.target, a.bitmap, total=size)
        for n, bs in bitmaps.items():
            if n in self.disks:
                self.disks[n] = replace(self.disks[n], bitmaps=tuple(bs))
            else:
                self.nodes[n].bitmaps = bs
        self.jobs_ = jobs
        self.transactions.append(list(actions))

    async def close(self) -> None:
        self.closed = True

    async def create_image(
        self,
        path: str,
        file_node: str,
        fmt: str,
        size: int,
        cluster_size: int | None = None,
        backing: tuple[str, str] | None = None,
    ) -> None:
        self._check("create_image")
        if path in self.files:
            raise AlreadyExists(f"store '{path}' exists")
        if self._node_exists(file_node):
            _refuse("blockdev-add", f"Duplicate nodes with node-name='{file_node}'")
        self.files.add(path)
        self.nodes[file_node] = FakeNode(path)

    async def add_format_node(
        self, node: str, file_node: str, fmt: str, backing: str | None = None,
        limit: int | None = None,
    ) -> None:
        self._check("add_format_node")
        if limit is not None:
            self.limits[node] = limit
        if self._node_exists(node):
            _refuse("blockdev-add", f"Duplicate nodes with node-name='{node}'")
        if file_node not in self.nodes or (backing and not self._node_exists(backing)):
            _refuse("blockdev-add", "Cannot find device or node")
        self.nodes[node] = FakeNode(file_node, backing)

    async def delete_node(self, node: str) -> None:
        self._check("delete_node")
        if node not in self.nodes:
            _refuse("blockdev-del", f"Failed to find node with node-name='{node}'")
        users = [n for n, x in self.nodes.items() if node in (x.file, x.backing)]
        users += [j.id for j in self.jobs_.values() if node in (j.device, j.target)]
        users += [e for e, (n, _, _) in self.exports.items() if n == node]
        users += [q for q, n in self.drives.items() if n == node]
        if users:
            _refuse("blockdev-del", f"Node '{node}' is busy: used by {users}")
        del self.nodes[node]

    async def add_cbw_node(self, node: str, file: str, target: str, timeout: int) -> None:
        self._check("add_cbw_node")
        if self._node_exists(node):
            _refuse("blockdev-add", f"Duplicate nodes with node-name='{node}'")
        if not self._node_exists(file) or target not in self.nodes:
            _refuse("blockdev-add", "Cannot find device or node")
        self.nodes[node] = FakeNode(file, target)
        self.cbw_timeouts[node] = timeout

    async def add_snapshot_access_node(self, node: str, cbw_node: str) -> None:
        self._check("add_snapshot_access_node")
        if self._node_exists(node):
            _refuse("blockdev-add", f"Duplicate nodes with node-name='{node}'")
        if cbw_node not in self.nodes:
            _refuse("blockdev-add", "Cannot find device or node")
        self.nodes[node] = FakeNode(cbw_node)

    async def set_drive(self, qdev: str, node: str) -> None:
        self._check("set_drive")
        own = next((d.node for d in self.disks.values() if d.qdev == qdev), None)
        if own is None:
            _refuse("qom-set", f"Device '{qdev}' not found")
        if node == own:
            self.drives.pop(qdev, None)
        elif node in self.nodes:
            self.drives[qdev] = node
        else:
            _refuse("qom-set", f"Cannot find device or node '{node}'")

    async def pause(self) -> bool:
        self._check("pause")
        was, self.running = self.running, False
        return was

    async def resume(self) -> None:
        self._check("resume")
        self.running = True

    async def preserve_shutdown(self, on: bool) -> None:
        self._check("preserve_shutdown")
        self.shutdown_pauses = on

    async def shut_down(self) -> bool:
        self._check("shut_down")
        return self.guest_shut_down

    async def quit(self) -> None:
        self._check("quit")
        self.closed = True

    def guest_shutdown(self) -> None:
        """The guest powers off: QEMU pauses if told to, else exits."""
        if self.shutdown_pauses:
            self.guest_shut_down, self.running = True, False
        else:
            self.closed = True

    async def nbd_server_start(self, address: NbdAddress, tls_creds: str | None = None) -> None:
        self._check("nbd_server_start")
        if self.server is not None:
            _refuse("nbd-server-start", "NBD server already running")
        if tls_creds and tls_creds not in self.objects:
            _refuse("nbd-server-start", f"No TLS credentials with id '{tls_creds}'")
        self.server = address
        if address.path:
            self.files.add(address.path)

    async def tls_creds_add(self, object_id: str, directory: str) -> None:
        self._check("tls_creds_add")
        if object_id in self.objects:
            _refuse("object-add", f"attempt to add duplicate property '{object_id}'")
        self.objects.add(object_id)

    async def object_del(self, object_id: str) -> None:
        self._check("object_del")
        if object_id not in self.objects:
            _refuse("object-del", f"object '{object_id}' not found")
        self.objects.discard(object_id)

    async def nbd_server_stop(self) -> None:
        self._check("nbd_server_stop")
        if self.server is None:
            _refuse("nbd-server-stop", "NBD server not running")
        self.server = None  # QEMU leaves the socket file; vcfs removes it

    async def export_add(
        self, export_id: str, node: str, name: str, bitmap: str | None,
        bitmap_node: str | None = None,
    ) -> None:
        self._check("export_add")
        if self.server is None:
            _refuse("block-export-add", "NBD server not running")
        if export_id in self.exports or node not in self.nodes:
            _refuse("block-export-add", f"cannot export '{node}' as '{export_id}'")
        if bitmap and bitmap not in [b.name for b in self._bitmaps(bitmap_node or node)]:
            _refuse("block-export-add", f"Bitmap '{bitmap}' is not found")
        self.exports[export_id] = (node, name, bitmap)

    async def export_del(self, export_id: str) -> None:
        self._check("export_del")
        if export_id not in self.exports:
            _refuse("block-export-del", f"Export '{export_id}' is not found")
        del self.exports[export_id]

    async def export_ids(self) -> set[str]:
        self._check("export_ids")
        return set(self.exports)

    async def jobs(self) -> list[BlockJob]:
        self._check("jobs")
        return [BlockJob(j.id, j.status, j.current, j.total, j.error)
                for j in self.jobs_.values()]

    async def job_cancel(self, job_id: str) -> None:
        self._check("job_cancel")
        j = self.jobs_.get(job_id)
        if j is None or j.status == "concluded":
            _refuse("block-job-cancel", f"Block job '{job_id}' not found")
        j.status, j.error = "concluded", CANCELLED_ERROR

    async def job_dismiss(self, job_id: str) -> None:
        self._check("job_dismiss")
        j = self.jobs_.get(job_id)
        if j is None or j.status != "concluded":
            _refuse("job-dismiss", f"Job '{job_id}' in state '{j and j.status}' cannot "
                    "be dismissed")
        del self.jobs_[job_id]


class FakeSystem:
    """The host OS over the fake QEMUs' file sets (the files vcfs and QEMU make)."""

    def __init__(self, qemu: FakeQemu | None = None) -> None:
        self.qemus = [qemu] if qemu else []
        """The QEMUs whose files this host holds."""
        self.restricted: list[str] = []
        self.fail_restrict: OSError | None = None
        self.socket_files: dict[str, int] = {}
        """What `sockets` reports: file name -> inode."""
        self.usage: dict[str, tuple[int, int]] = {}
        """What `disk_usage` reports for a path (default: nothing used, 1 GiB free)."""

    def remove(self, path: str) -> None:
        for q in self.qemus:
            q.files.discard(path)

    def restrict(self, path: str) -> None:
        assert not self.qemus or any(path in q.files for q in self.qemus), f"no file {path}"
        if self.fail_restrict:
            raise self.fail_restrict
        self.restricted.append(path)

    def free_tcp_port(self, host: str) -> int:
        return 10809

    def sockets(self, directory: str) -> dict[str, int]:
        return dict(self.socket_files)

    def disk_usage(self, path: str) -> tuple[int, int]:
        return self.usage.get(path, (0, 1 << 30))


class FakeStore:
    """An in-memory checkpoint store that round-trips through the real codec."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.current: str | None = None
        self.fail_saves = False
        self.pending: dict[str, dict[str, Any]] = {}

    def load(self, domain: str) -> tuple[list[CheckpointDef], str | None]:
        return [xmlcodec.parse_checkpoint(x, redefine=True) for x in self.files.values()], \
            self.current

    def save(self, domain: str, checkpoint: CheckpointDef) -> None:
        if self.fail_saves:
            raise NoSpace("cannot write metadata: no space left")
        assert checkpoint.name
        self.files[checkpoint.name] = xmlcodec.format_checkpoint(checkpoint)

    def remove(self, domain: str, name: str) -> None:
        self.files.pop(name, None)

    def set_current(self, domain: str, name: str | None) -> None:
        self.current = name

    def put_intent(self, domain: str, key: str, intent: dict[str, Any]) -> None:
        # Through a copy, as the real store does through JSON: no aliasing of the caller's dict.
        self.pending[key] = copy.deepcopy(intent)

    def intents(self, domain: str) -> dict[str, dict[str, Any]]:
        return copy.deepcopy(self.pending)

    def drop_intent(self, domain: str, key: str) -> None:
        self.pending.pop(key, None)


class FakeExport:
    """An NBD export of the fake QEMU: only its block status, which fails once the export is
    gone or its snapshot broke (what a pull job's watcher asks)."""

    def __init__(self, qemu: FakeQemu | None, name: str, size: int = 1 << 26) -> None:
        self.qemu = qemu
        self.name = name
        self.size = size

    def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        raise AssertionError("unit tests read no NBD data")

    def block_status(self, offset: int, length: int) -> list[Extent]:
        q = self.qemu
        if q is not None and (self.name in q.broken
                              or self.name not in {n for _, n, _ in q.exports.values()}):
            raise BackendError(f"NBD block status of '{self.name}' failed: Input/output error")
        return [Extent(offset, length, True, False, True)]

    def close(self) -> None:
        pass


def environment(store: FakeStore | None = None, qemu: FakeQemu | None = None) -> Environment:
    """The services' environment with fakes where I/O would be."""

    def open_export(address: NbdAddress, name: str, bitmap: str | None,
                    tls_dir: str | None, status_name: str | None) -> FakeExport:
        return FakeExport(qemu, name)

    return Environment(store or FakeStore(), XmlCodec(), Path("/nonexistent/run"),
                       Path("/nonexistent/scratch"), open_export, FakeSystem(qemu))


def make_domain(
    qemu: FakeQemu, store: FakeStore | None = None, spawn: Any = None, tls: bool = False
) -> Domain:
    """A Domain over fakes; background tasks are refused unless `spawn` is given."""

    def no_spawn(*args: object) -> NoReturn:
        raise AssertionError("unit tests spawn no background task")

    env = environment(store, qemu)
    if tls:
        env.tls_dir = Path("/nonexistent/tls")
    return Domain("vm1", qemu, env, spawn or no_spawn)
