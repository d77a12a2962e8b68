"""The host OS as the domain's `LocalSystem` port: unlink, chmod, a free TCP port, a socket scan.

Thread rule: any thread; every call is a short metadata operation.
"""

from __future__ import annotations

import logging
import os
import socket
import stat

log = logging.getLogger(__name__)


class OsSystem:
    """`LocalSystem` over the real file system and network stack."""

    def remove(self, path: str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    def restrict(self, path: str) -> None:
        os.chmod(path, 0o600)

    def free_tcp_port(self, host: str) -> int:
        # QEMU binds the port a few milliseconds later; nobody else is expected to race for it.
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.bind((host, 0))
            return int(s.getsockname()[1])

    def sockets(self, directory: str) -> dict[str, int]:
        found = {}
        try:
            entries = list(os.scandir(directory))
        except OSError as e:
            log.warning("cannot list host directory %s: %s", directory, e)
            return {}
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                st = entry.stat(follow_symlinks=True)
            except OSError:
                continue
            if stat.S_ISSOCK(st.st_mode):
                found[entry.name] = st.st_ino
        return found

    def disk_usage(self, path: str) -> tuple[int, int]:
        try:
            used = os.stat(path).st_blocks * 512
            fs = os.statvfs(path)
        except OSError:
            return 0, 0
        return used, fs.f_bavail * fs.f_frsize
