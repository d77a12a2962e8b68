"""The `Qemu` port over QMP, with qemu.qmp hosted on the asyncio bridge.

Translates typed actions to QMP JSON and QMP replies to domain values; translates qemu.qmp
errors into the domain hierarchy (QmpCommandError, Disconnected). Every call has a deadline:
the kernel cannot interrupt a FUSE handler, so a stalled QEMU must not stall the filesystem.
Thread rule: methods are called from trio; qemu.qmp runs on the bridge's loop.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio
from qemu.qmp import (
    ConnectError,
    ExecInterruptedError,
    ExecuteError,
    QMPClient,
    Runstate,
    StateError,
)

from vcfs.adapters.bridge import AsyncioBridge
from vcfs.adapters.state import os_error
from vcfs.domain import qcow2
from vcfs.domain.model import Bitmap, Disk, DomainInfo
from vcfs.domain.ports import (
    Action,
    AddBitmap,
    BlockdevBackup,
    BlockJob,
    MergeBitmaps,
    NbdAddress,
    RemoveBitmap,
)
from vcfs.errors import AlreadyExists, BackendError, Disconnected, QmpCommandError

log = logging.getLogger(__name__)

# qemu.qmp reports a peer that hangs up as an ERROR with a traceback; for us QEMU quitting is an
# ordinary event that the host service reports itself.
logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)

CONNECT_TIMEOUT = 3.0
COMMAND_TIMEOUT = 10.0
EXPORT_GONE_TIMEOUT = 5.0
"""How long `export_del` waits for QEMU to let go of the export's node."""
NULL_UUID = "00000000-0000-0000-0000-000000000000"


def action_json(action: Action) -> dict[str, Any]:
    """One transaction action as QMP wants it."""
    if isinstance(action, AddBitmap):
        data: dict[str, Any] = {
            "node": action.node,
            "name": action.name,
            "persistent": action.persistent,
            "disabled": action.disabled,
        }
        if action.granularity:
            data["granularity"] = action.granularity
        return {"type": "block-dirty-bitmap-add", "data": data}
    if isinstance(action, RemoveBitmap):
        return {
            "type": "block-dirty-bitmap-remove",
            "data": {"node": action.node, "name": action.name},
        }
    if isinstance(action, MergeBitmaps):
        return {
            "type": "block-dirty-bitmap-merge",
            "data": {
                "node": action.node,
                "target": action.target,
                "bitmaps": [{"node": n, "name": b} for n, b in action.sources],
            },
        }
    if isinstance(action, BlockdevBackup):
        data = {
            "device": action.device,
            "job-id": action.job_id,
            "target": action.target,
            "sync": action.sync,
            "auto-finalize": True,
            "auto-dismiss": False,
            # QEMU's defaults, stated: a failing read or write fails the job, never pauses it
            # (`enospc`/`stop` would stop the guest too).
            "on-source-error": "report",
            "on-target-error": "report",
        }
        if action.bitmap:
            data["bitmap"] = action.bitmap
        if action.workers:
            data["x-perf"] = {"max-workers": action.workers}
        return {"type": "blockdev-backup", "data": data}
    raise TypeError(f"unknown action {action!r}")


def disk_target(device: dict[str, Any]) -> str:
    """The disk's name: the guest device id (`vda`), else the drive id, else the node name."""
    qdev = device.get("qdev") or ""
    parts = qdev.split("/")
    if qdev and "/" not in qdev:
        return qdev
    if len(parts) > 3 and parts[1] == "machine" and parts[2] == "peripheral":
        return parts[3]
    return device.get("device") or device["inserted"]["node-name"]


def parse_bitmap(raw: dict[str, Any]) -> Bitmap:
    """A bitmap from `query-named-block-nodes`; the name may be absent in QEMU 7.2."""
    return Bitmap(
        name=raw.get("name"),
        recording=raw.get("recording", True),
        persistent=raw.get("persistent", False),
        busy=raw.get("busy", False),
        inconsistent=raw.get("inconsistent", False),
        granularity=raw.get("granularity", 0),
        count=raw.get("count", 0),
    )


# Filters QEMU inserts above a disk's format node (copy-before-write during a backup, throttle):
# bitmaps and our operations belong to the format node beneath.
FILTER_DRIVERS = frozenset(
    {"copy-before-write", "throttle", "compress", "preallocate", "copy-on-read",
     "blkdebug", "blklogwrites", "blkverify", "snapshot-access"}
)
PROTOCOL_DRIVERS = frozenset(
    {"file", "host_device", "host_cdrom", "nbd", "nfs", "iscsi", "rbd", "ssh", "http", "https",
     "gluster", "null-co", "null-aio", "nvme", "io_uring"}
)


def format_node(inserted: dict[str, Any], nodes: list[dict[str, Any]]) -> dict[str, Any]:
    """The format node of a disk: the inserted node, or the one a filter sits on.

    query-named-block-nodes lists no parent/child edges, but a filter reports the same `file`
    as the node beneath it; among nodes with that file, the format node is the one that is
    neither a filter nor a protocol node.
    """
    if inserted.get("drv") not in FILTER_DRIVERS:
        return inserted
    for n in nodes:
        drv = n.get("drv")
        if n.get("file") == inserted.get("file") and drv not in FILTER_DRIVERS | PROTOCOL_DRIVERS:
            return n
    return inserted


def parse_domain_info(
    name: str, uuid: str | None, devices: list[dict[str, Any]], nodes: list[dict[str, Any]]
) -> DomainInfo:
    """Build a DomainInfo from the replies of `query-block` and `query-named-block-nodes`."""
    bitmaps = {n["node-name"]: n.get("dirty-bitmaps") or [] for n in nodes}
    disks = []
    for dev in devices:
        inserted = dev.get("inserted")
        if not inserted:
            continue  # no medium: nothing to checkpoint or back up
        inserted = format_node(inserted, nodes)
        image = inserted.get("image", {})
        specific = image.get("format-specific", {})
        node = inserted["node-name"]
        disks.append(
            Disk(
                target=disk_target(dev),
                node=node,
                driver=inserted.get("drv", ""),
                source=inserted.get("file", ""),
                size=image.get("virtual-size", 0),
                read_only=inserted.get("ro", False),
                qdev=dev.get("qdev", ""),
                qcow2_v3=specific.get("type") == "qcow2"
                and specific.get("data", {}).get("compat") != "0.10",
                cluster_size=image.get("cluster-size"),
                allocated=image.get("actual-size", 0),
                bitmaps=tuple(parse_bitmap(b) for b in bitmaps.get(node, [])),
            )
        )
    return DomainInfo(name=name, uuid=uuid, disks=tuple(disks))


class QmpQemu:
    """A connected QEMU monitor implementing the `Qemu` port."""

    def __init__(self, bridge: AsyncioBridge, client: QMPClient, path: Path) -> None:
        self._bridge = bridge
        self._client = client
        self._path = path
        self._closed = False
        self._uuid: str | None = None

    @classmethod
    async def connect(cls, bridge: AsyncioBridge, path: Path) -> QmpQemu:
        """Connect to the QMP socket at `path`; BackendError if nobody answers in time."""
        client = QMPClient(path.stem)
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                await bridge.run(client.connect(str(path)))
        except (ConnectError, OSError, EOFError) as e:
            raise BackendError(f"cannot connect to {path}: {e}") from None
        except trio.TooSlowError:
            await bridge.run(_quiet_disconnect(client))
            raise BackendError(f"no QMP greeting from {path} (another client?)") from None
        return cls(bridge, client, path)

    @property
    def closed(self) -> bool:
        # The reader task moves the runstate away from RUNNING when QEMU hangs up.
        return self._closed or self._client.runstate != Runstate.RUNNING

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run one QMP command with a deadline."""
        if self._closed:
            raise Disconnected(f"QEMU at {self._path} is gone")
        log.debug("qmp %s -> %s %s", self._path.stem, command, arguments or "")
        try:
            with trio.fail_after(COMMAND_TIMEOUT):
                reply = await self._bridge.run(self._client.execute(command, arguments))
        except ExecuteError as e:
            log.debug("qmp %s <- %s: %s", self._path.stem, e.error_class, e)
            raise QmpCommandError(command, e.error_class, str(e)) from None
        except (ExecInterruptedError, StateError, EOFError, OSError) as e:
            self._closed = True
            raise Disconnected(f"QEMU at {self._path} is gone ({command}: {e})") from None
        except trio.TooSlowError:
            msg = f"QEMU did not answer {command} in {COMMAND_TIMEOUT:.0f} s"
            raise BackendError(msg) from None
        log.debug("qmp %s <- %s", self._path.stem, reply)
        return reply

    async def domain_info(self, name: str) -> DomainInfo:
        if self._uuid is None:
            uuid = (await self.execute("query-uuid")).get("UUID", "")
            self._uuid = uuid if uuid and uuid != NULL_UUID else ""
        devices = await self.execute("query-block")
        nodes = await self.execute("query-named-block-nodes", {"flat": True})
        return parse_domain_info(name, self._uuid or None, devices, nodes)

    async def transaction(self, actions: Sequence[Action]) -> None:
        if actions:
            await self.execute("transaction", {"actions": [action_json(a) for a in actions]})

    async def create_image(
        self,
        path: str,
        file_node: str,
        fmt: str,
        size: int,
        cluster_size: int | None = None,
        backing: tuple[str, str] | None = None,
    ) -> None:
        # Writing the few metadata clusters of an empty qcow2 ourselves takes microseconds;
        # QEMU's blockdev-create job costs a job round trip and flushes (≈ 25 ms measured).
        content = b"" if fmt == "raw" else qcow2.empty_image(size, cluster_size or 65536, backing)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise AlreadyExists(f"store '{path}' exists") from None
        except OSError as e:
            raise os_error(f"cannot create {path}", e) from None
        try:
            os.write(fd, content)
            if fmt == "raw":
                os.ftruncate(fd, size)
        except OSError as e:
            os.unlink(path)
            raise os_error(f"cannot write {path}", e) from None
        finally:
            os.close(fd)
        try:
            await self.execute(
                "blockdev-add", {"driver": "file", "node-name": file_node, "filename": path}
            )
        except BackendError:
            os.unlink(path)
            raise

    async def add_format_node(
        self, node: str, file_node: str, fmt: str, backing: str | None = None,
        limit: int | None = None,
    ) -> None:
        options: dict[str, Any] = {"driver": fmt, "node-name": node, "file": file_node}
        if limit is not None:
            # A raw window of `limit` bytes over the (sparse, so still free) file: a write past
            # it fails with ENOSPC inside QEMU, exactly as a full file system would. The window
            # is an implicit child of the format node and goes with it.
            await self.execute("block_resize", {"node-name": file_node, "size": limit})
            options["file"] = {"driver": "raw", "file": file_node, "offset": 0, "size": limit}
        if fmt == "qcow2":
            # Without a backing node, never open the backing file named in the header.
            options["backing"] = backing
        await self.execute("blockdev-add", options)

    async def delete_node(self, node: str) -> None:
        await self.execute("blockdev-del", {"node-name": node})

    async def add_cbw_node(self, node: str, file: str, target: str, timeout: int) -> None:
        await self.execute("blockdev-add", {
            "driver": "copy-before-write", "node-name": node, "file": file, "target": target,
            # A failed copy breaks the backup, never the guest's write (QEMU's default, `break-
            # guest-write`, fails the guest's I/O: issue 11).
            "on-cbw-error": "break-snapshot", "cbw-timeout": timeout,
        })

    async def add_snapshot_access_node(self, node: str, cbw_node: str) -> None:
        await self.execute("blockdev-add", {
            "driver": "snapshot-access", "node-name": node, "file": cbw_node,
        })

    async def set_drive(self, qdev: str, node: str) -> None:
        # query-block names a device with an id by its id or by its QOM path (virtio devices:
        # the backend child, which is the object holding the `drive` property).
        path = qdev if qdev.startswith("/") else f"/machine/peripheral/{qdev}"
        # QEMU 7.2 aborts (assertion `old_bs != new_bs`, measured) when a device is switched
        # to the node it already uses: crash recovery may not know whether the switch happened.
        for dev in await self.execute("query-block"):
            if dev.get("qdev") in (qdev, path) and (dev.get("inserted") or {}).get(
                    "node-name") == node:
                return
        await self.execute("qom-set", {"path": path, "property": "drive", "value": node})

    async def pause(self) -> bool:
        if (await self.execute("query-status")).get("status") != "running":
            return False
        await self.execute("stop")
        return True

    async def resume(self) -> None:
        await self.execute("cont")

    async def preserve_shutdown(self, on: bool) -> None:
        await self.execute("set-action", {"shutdown": "pause" if on else "poweroff"})

    async def shut_down(self) -> bool:
        return bool((await self.execute("query-status")).get("status") == "shutdown")

    async def quit(self) -> None:
        try:
            await self.execute("quit")
        except Disconnected:
            pass  # QEMU may close the monitor before its answer is read

    async def nbd_server_start(self, address: NbdAddress, tls_creds: str | None = None) -> None:
        if address.transport == "unix":
            addr: dict[str, Any] = {"type": "unix", "data": {"path": address.path}}
        else:
            addr = {"type": "inet", "data": {"host": address.host, "port": str(address.port)}}
        args: dict[str, Any] = {"addr": addr}
        if tls_creds:
            args["tls-creds"] = tls_creds
        await self.execute("nbd-server-start", args)

    async def tls_creds_add(self, object_id: str, directory: str) -> None:
        # verify-peer: only clients holding a certificate signed by the CA may read backups.
        await self.execute("object-add", {
            "qom-type": "tls-creds-x509", "id": object_id, "dir": directory,
            "endpoint": "server", "verify-peer": True,
        })

    async def object_del(self, object_id: str) -> None:
        await self.execute("object-del", {"id": object_id})

    async def nbd_server_stop(self) -> None:
        await self.execute("nbd-server-stop")

    async def export_add(
        self, export_id: str, node: str, name: str, bitmap: str | None,
        bitmap_node: str | None = None,
    ) -> None:
        args: dict[str, Any] = {
            "type": "nbd", "id": export_id, "node-name": node, "name": name, "writable": False,
        }
        if bitmap:
            # A node-qualified bitmap (QEMU >= 7.1) keeps the context name qemu:dirty-bitmap:NAME.
            args["bitmaps"] = [{"node": bitmap_node, "name": bitmap} if bitmap_node else bitmap]
        await self.execute("block-export-add", args)

    async def export_del(self, export_id: str) -> None:
        await self.execute("block-export-del", {"id": export_id, "mode": "hard"})
        # QEMU removes the export once its clients are gone, after the command returns: until
        # then its node is in use and a blockdev-del of it fails (measured: a pull backup's
        # snapshot-access node, deleted right after its export, left the whole fleecing chain
        # in place and the next backup failed).
        with trio.move_on_after(EXPORT_GONE_TIMEOUT):
            while export_id in await self.export_ids():
                await trio.sleep(0.005)

    async def export_ids(self) -> set[str]:
        return {e["id"] for e in await self.execute("query-block-exports")}

    async def jobs(self) -> list[BlockJob]:
        return [
            BlockJob(j["id"], j["status"], j.get("current-progress", 0),
                     j.get("total-progress", 0), j.get("error"))
            for j in await self.execute("query-jobs")
        ]

    async def job_cancel(self, job_id: str) -> None:
        await self.execute("block-job-cancel", {"device": job_id, "force": True})

    async def job_dismiss(self, job_id: str) -> None:
        await self.execute("job-dismiss", {"id": job_id})

    async def close(self) -> None:
        self._closed = True
        with trio.move_on_after(CONNECT_TIMEOUT):
            await self._bridge.run(_quiet_disconnect(self._client))


async def _quiet_disconnect(client: QMPClient) -> None:
    # After QEMU quits, disconnect() re-raises the reader's EOFError: the normal end.
    try:
        await client.disconnect()
    except Exception:  # noqa: BLE001 - any error here means the connection is already gone
        pass
