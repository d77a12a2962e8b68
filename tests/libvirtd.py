"""A private libvirtd for the tests, and transient domains with qcow2 disks and no OS under it.

`Libvirtd` runs `libvirtd` and `virtlogd` as root in a mount namespace of their own, where
libvirt's fixed system paths (/etc/libvirt, /run/libvirt, /var/lib/libvirt, /var/cache/libvirt,
/var/log/libvirt) are bind mounts of directories under the daemon's base directory. So it never
meets a system libvirtd, leaves nothing behind, and reads our own `qemu.conf`:

- `security_driver = "none"`, `dynamic_ownership = 0`, QEMU as root: libvirt must not relabel or
  chown the test's images (nor fail on a host without AppArmor/SELinux profiles);
- no cgroup controllers: a container has no systemd-machined to ask for them.

Debian's libvirt 9.0 looks up its built-in QEMU user `libvirt-qemu` before it reads qemu.conf,
and only the `libvirt-daemon-system` package creates that user; inside the namespace
/etc/passwd and /etc/group are bind mounts of copies that add it, so the host's users stay as
they are. Clients reach the daemon with `qemu:///system?socket=<base>/sock/libvirt-sock`, or
over TCP on 127.0.0.1 when started with `tcp_port`.

`LibvirtVM` is a transient domain whose firmware halts the CPU (as `tests.vm.VM`'s does): the
block layer, checkpoints, backups and guest-like writes (HMP `qemu-io` through the virtio device,
via libvirt's monitor pass-through) work without a guest OS, at no CPU cost.

Threading rule: blocking, one thread (pytest's), never vcfs's event loop.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import libvirt
import libvirt_qemu

from tests.vm import DiskSpec, GuestIO

_LIBVIRT_DIRS = ("etc", "run", "lib", "cache", "log")
"""Base subdirectories bound over /etc/libvirt, /run/libvirt, /var/lib/libvirt, … in order."""
_SYSTEM_DIRS = ("/etc/libvirt", "/run/libvirt", "/var/lib/libvirt", "/var/cache/libvirt",
                "/var/log/libvirt")
# libvirt prints every error on stderr unless told otherwise; the tests look at the exceptions.
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)

QEMU_USER_UID = 64055
"""Debian's usual uid/gid for libvirt-qemu; only ever seen inside the daemon's namespace."""


_running: weakref.WeakSet[Libvirtd] = weakref.WeakSet()


@atexit.register
def _stop_leftover_daemons() -> None:
    """A test run interrupted before its fixtures' teardown still leaves no daemon or QEMU."""
    for daemon in list(_running):
        daemon.stop()


def missing_prerequisites() -> list[str]:
    """What this machine lacks to run a private libvirtd (empty when nothing)."""
    missing = [f"{tool} (not on PATH)" for tool in ("libvirtd", "virtlogd", "unshare")
               if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists()]
    if os.geteuid() != 0:
        missing.append("root (libvirtd runs as root in its own mount namespace)")
    return missing


class Libvirtd:
    """libvirtd + virtlogd in a private mount namespace, rooted at a short base directory.

    The base is made under /tmp with a short name: unix socket paths must stay under 108 bytes.
    """

    def __init__(self, tcp_port: int | None = None, backup_tls_dir: Path | None = None) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="lvd", dir="/tmp"))
        self.tcp_port = tcp_port
        """When set, libvirtd also listens (no authentication) on 127.0.0.1:tcp_port."""
        self.backup_tls_dir = backup_tls_dir
        """When set, QEMU's NBD servers of backups with `tls='yes'` use these x509
        credentials (ca-cert.pem, server-cert.pem, server-key.pem) and require a client
        certificate."""
        self.proc: subprocess.Popen[bytes] | None = None
        for d in (*_LIBVIRT_DIRS, "sock"):
            (self.base / d).mkdir(mode=0o700)
        self._write_config()

    @property
    def uri(self) -> str:
        """The connection URI of this daemon over its unix socket."""
        return f"qemu:///system?socket={self.base}/sock/libvirt-sock"

    @property
    def tcp_uri(self) -> str:
        """The connection URI over loopback TCP (only when started with `tcp_port`)."""
        assert self.tcp_port is not None
        return f"qemu+tcp://127.0.0.1:{self.tcp_port}/system"

    @property
    def log_path(self) -> Path:
        return self.base / "libvirtd.log"

    def _write_config(self) -> None:
        etc = self.base / "etc"
        conf = [
            f'unix_sock_dir = "{self.base}/sock"',
            'unix_sock_rw_perms = "0700"',
            'auth_unix_rw = "none"',
            'auth_unix_ro = "none"',
            # Warnings and errors only: the log is printed when a test fails.
            f'log_outputs = "3:file:{self.log_path}"',
            "keepalive_interval = 2",
        ]
        if self.tcp_port is not None:
            conf += ["listen_tcp = 1", "listen_tls = 0", f'tcp_port = "{self.tcp_port}"',
                     'listen_addr = "127.0.0.1"', 'auth_tcp = "none"']
        (etc / "libvirtd.conf").write_text("\n".join(conf) + "\n")
        (etc / "virtlogd.conf").write_text(f'log_outputs = "3:file:{self.base}/virtlogd.log"\n')
        tls = (f'backup_tls_x509_cert_dir = "{self.backup_tls_dir}"\n'
               "backup_tls_x509_verify = 1\n") if self.backup_tls_dir else ""
        (etc / "qemu.conf").write_text(
            'security_driver = "none"\n'
            "dynamic_ownership = 0\n"
            'user = "root"\n'
            'group = "root"\n'
            "cgroup_controllers = [ ]\n"
            'stdio_handler = "logd"\n' + tls
        )
        passwd = Path("/etc/passwd").read_text()
        group = Path("/etc/group").read_text()
        if "\nlibvirt-qemu:" not in "\n" + passwd:
            passwd += (f"libvirt-qemu:x:{QEMU_USER_UID}:{QEMU_USER_UID}:libvirt qemu:"
                       "/var/lib/libvirt:/usr/sbin/nologin\n")
        if "\nlibvirt-qemu:" not in "\n" + group:
            group += f"libvirt-qemu:x:{QEMU_USER_UID}:\n"
        (self.base / "passwd").write_text(passwd)
        (self.base / "group").write_text(group)
        binds = [f"mount --bind {self.base}/{d} {target}"
                 for d, target in zip(_LIBVIRT_DIRS, _SYSTEM_DIRS, strict=True)]
        listen = " --listen" if self.tcp_port is not None else ""
        (self.base / "start.sh").write_text("\n".join([
            "set -e",
            # Mount points for the binds; empty directories on the host, if not there already.
            "mkdir -p " + " ".join(_SYSTEM_DIRS),
            *binds,
            f"mount --bind {self.base}/passwd /etc/passwd",
            f"mount --bind {self.base}/group /etc/group",
            f"virtlogd --pid-file {self.base}/virtlogd.pid &",
            f"exec libvirtd{listen} --pid-file {self.base}/libvirtd.pid "
            f"--config {etc}/libvirtd.conf",
        ]) + "\n")

    def start(self, timeout: float = 30.0) -> None:
        """Start both daemons and wait until libvirtd answers."""
        with open(self.base / "daemon.out", "ab") as out:
            self.proc = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "sh",
                 str(self.base / "start.sh")],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _running.add(self)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"libvirtd exited with {self.proc.returncode}:\n"
                                   + self.log_text())
            try:
                libvirt.open(self.uri).close()
                return
            except libvirt.libvirtError:
                if time.monotonic() > deadline:
                    raise TimeoutError("libvirtd did not answer:\n" + self.log_text()) from None
                time.sleep(0.05)

    @property
    def running(self) -> bool:
        """Whether libvirtd runs."""
        return self.proc is not None and self.proc.poll() is None

    def connect(self) -> libvirt.virConnect:
        """A new client connection (the caller closes it)."""
        return libvirt.open(self.uri)

    def stop_daemon(self) -> None:
        """Stop libvirtd only (domains keep running, as after `systemctl stop libvirtd`)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        self._kill_pidfile(self.base / "virtlogd.pid", signal.SIGTERM)

    def restart(self) -> None:
        """Stop libvirtd and virtlogd and start them again; running domains stay."""
        self.stop_daemon()
        for pidfile in ("libvirtd.pid", "virtlogd.pid"):
            (self.base / pidfile).unlink(missing_ok=True)
        self.start()

    def stop(self) -> None:
        """Destroy every domain, stop both daemons, kill any QEMU left, remove the base."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                conn = self.connect()
                for dom in conn.listAllDomains():
                    try:
                        if dom.isActive():
                            dom.destroy()
                        if dom.isPersistent():
                            dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)
                    except libvirt.libvirtError:
                        pass
                conn.close()
            except libvirt.libvirtError:
                pass
        self.stop_daemon()
        # QEMUs outlive libvirtd (it daemonizes them): any left has its pid file here.
        for pidfile in (self.base / "run/qemu").glob("*.pid"):
            self._kill_pidfile(pidfile, signal.SIGKILL)
        shutil.rmtree(self.base, ignore_errors=True)
        _running.discard(self)

    @staticmethod
    def _kill_pidfile(pidfile: Path, sig: int) -> None:
        try:
            pid = int(pidfile.read_text().strip())
            os.kill(pid, sig)
        except (OSError, ValueError):
            pass

    def log_text(self) -> str:
        """libvirtd's and virtlogd's logs."""
        parts = []
        for name in ("daemon.out", "libvirtd.log", "virtlogd.log"):
            try:
                parts.append(f"--- {name}\n" + (self.base / name).read_text(errors="replace"))
            except OSError:
                pass
        return "\n".join(parts)


class LibvirtVM(GuestIO):
    """A domain of a `Libvirtd` with virtio disks (`DiskSpec`s) and no guest OS."""

    def __init__(self, daemon: Libvirtd, name: str, work_dir: Path,
                 disks: Sequence[DiskSpec]) -> None:
        self.daemon = daemon
        self.name = name
        self.work_dir = Path(work_dir)
        self.disks = list(disks)
        self.uuid = str(uuid.uuid4())
        self.conn = daemon.connect()
        self._dom: libvirt.virDomain | None = None

    @property
    def host_dir(self) -> str:
        """What vcfs mounts to serve this domain (as `tests.vm.VM.host_dir`): the daemon's URI."""
        return self.daemon.uri

    def image(self, target: str) -> Path:
        """The image file of the disk `target`."""
        spec = next(d for d in self.disks if d.target == target)
        return self.work_dir / f"{self.name}-{target}.{spec.fmt}"

    def _create_images(self) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        for disk in self.disks:
            path = self.image(disk.target)
            if not path.exists():
                opts = ["-o", f"compat={disk.compat}"] if disk.fmt == "qcow2" else []
                subprocess.run(["qemu-img", "create", "-q", "-f", disk.fmt, *opts, str(path),
                                str(disk.size)], check=True, capture_output=True)

    def _halt_bios(self) -> Path:
        path = self.work_dir / "halt-bios.bin"
        if not path.exists():
            firmware = bytearray(64 << 10)
            firmware[-16:-12] = b"\xfa\xf4\xeb\xfd"  # at 0xFFFFFFF0: cli; hlt; jmp back to hlt
            path.write_bytes(bytes(firmware))
        return path

    def xml(self) -> str:
        """The domain definition."""
        kind = "kvm" if os.access("/dev/kvm", os.R_OK | os.W_OK) else "qemu"
        disks = "".join(
            f"<disk type='file' device='disk'><driver name='qemu' type='{d.fmt}'/>"
            f"<source file='{self.image(d.target)}'/><target dev='{d.target}' bus='virtio'/>"
            "</disk>"
            for d in self.disks
        )
        return (
            f"<domain type='{kind}'><name>{self.name}</name><uuid>{self.uuid}</uuid>"
            "<memory unit='MiB'>32</memory><vcpu>1</vcpu>"
            "<os><type arch='x86_64' machine='pc'>hvm</type>"
            f"<loader type='rom'>{self._halt_bios()}</loader></os>"
            "<devices><emulator>/usr/bin/qemu-system-x86_64</emulator>"
            f"{disks}<video><model type='none'/></video><memballoon model='none'/>"
            "</devices></domain>"
        )

    def start(self, persistent: bool = False) -> None:
        """Create the images and start the domain (transient unless `persistent`)."""
        self._create_images()
        if persistent:
            self._dom = self.conn.defineXML(self.xml())
            self._dom.create()
        else:
            self._dom = self.conn.createXML(self.xml(), 0)

    @property
    def dom(self) -> libvirt.virDomain:
        assert self._dom is not None, "not started"
        return self._dom

    def reconnect(self) -> None:
        """A new connection to the daemon (after `Libvirtd.restart`)."""
        self.conn = self.daemon.connect()
        self._dom = self.conn.lookupByUUIDString(self.uuid)

    def destroy(self) -> None:
        """Stop QEMU at once (a transient domain vanishes from libvirt)."""
        try:
            self.dom.destroy()
        except libvirt.libvirtError:
            pass

    def kill(self) -> None:
        """SIGKILL the domain's QEMU behind libvirt's back, as a crash would (libvirt notices
        its monitor closing; a transient domain then vanishes)."""
        pidfile = self.daemon.base / "run" / "qemu" / f"{self.name}.pid"
        pid = int(pidfile.read_text().strip())
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while True:
            try:
                if not self.dom.isActive():
                    return
            except libvirt.libvirtError:
                return  # transient: gone from libvirt
            if time.monotonic() > deadline:
                raise TimeoutError(f"libvirt still runs {self.name} after its QEMU was killed")
            time.sleep(0.02)

    def qmp(self, cmd: str, **args: Any) -> Any:
        """A QMP command through libvirt's monitor pass-through; its `return`."""
        reply = libvirt_qemu.qemuMonitorCommand(
            self.dom, json.dumps({"execute": cmd, "arguments": args}), 0)
        answer = json.loads(reply)
        if "error" in answer:
            raise RuntimeError(f"{cmd}: {answer['error']}")
        return answer["return"]

    def _alias(self, target: str) -> str:
        """libvirt's device alias of a disk (`virtio-disk0`), from the live XML."""
        from lxml import etree

        root = etree.fromstring(self.dom.XMLDesc(0).encode())
        for disk in root.iter("disk"):
            t = disk.find("target")
            if t is not None and t.get("dev") == target:
                return str(disk.find("alias").get("name"))
        raise KeyError(target)

    def qemu_io(self, target: str, command: str) -> str:
        """Run a qemu-io `command` through the disk's virtio device; return its output.

        HMP's qemu-io prints its result on QEMU's stdout, which virtlogd keeps in the
        domain's log (as for `tests.vm.VM`, whose log is a file of its own)."""
        device = f"/machine/peripheral/{self._alias(target)}/virtio-backend"
        log = self.daemon.base / "log" / "qemu" / f"{self.name}.log"
        with open(log, "rb") as f:
            start = f.seek(0, os.SEEK_END)
            reply = self.qmp("human-monitor-command",
                             **{"command-line": f'qemu-io -d {device} "{command}"'})
            deadline = time.monotonic() + 5
            while True:  # virtlogd writes the output a moment later
                f.seek(start)
                out = f.read().decode(errors="replace")
                if out or time.monotonic() > deadline:
                    return str(reply) + out
                time.sleep(0.01)

    def flush(self, target: str) -> None:
        """Make QEMU write the disk's cached qcow2 metadata to its image file."""
        self.qemu_io(target, "flush")

    def block_nodes(self) -> list[dict[str, Any]]:
        """All of QEMU's block nodes (query-named-block-nodes flat=true): libvirt's names
        (`libvirt-N-format`, `libvirt-N-storage`), so tests tell them apart by `file`."""
        nodes: list[dict[str, Any]] = self.qmp("query-named-block-nodes", flat=True)
        return nodes

    def checkpoint_names(self) -> list[str]:
        """The domain's checkpoints as libvirt lists them, sorted."""
        return sorted(c.getName() for c in self.dom.listAllCheckpoints())

    def job_type(self) -> int:
        """libvirt's job on the domain (`VIR_DOMAIN_JOB_NONE` when none)."""
        return int(self.dom.jobInfo()[0])

    def bitmaps(self, target: str) -> dict[str, dict[str, Any]]:
        """The named dirty bitmaps on the disk image's format node, by name (QEMU's own view).

        Found by the image's file name: during a pull backup the device's top node is
        libvirt's fleecing filter, not the node that carries the bitmaps."""
        image = str(self.image(target))
        for n in self.qmp("query-named-block-nodes", flat=True):
            if n.get("drv") == "qcow2" and n.get("file") == image:
                return {b["name"]: b for b in n.get("dirty-bitmaps", []) if b.get("name")}
        raise KeyError(image)

    def close(self) -> None:
        """Destroy the domain (if it runs) and drop the connection."""
        if self._dom is not None:
            try:
                if self._dom.isActive():
                    self._dom.destroy()
                if self._dom.isPersistent():
                    self._dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)
            except libvirt.libvirtError:
                pass
        try:
            self.conn.close()
        except libvirt.libvirtError:
            pass
