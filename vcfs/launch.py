"""Starting and stopping a mount from the command line: the early checks, the app's Config,
serving in the foreground or as a daemon, and `umount`.

Without `-f`, `run_mount` forks; the parent exits only once the child reports the mount ready
(or failed) through a pipe, so scripts can use the mount right after the command returns.
Start-up problems are `StartError`s, which the command line prints as one line.

The mount machinery (trio, pyfuse3, the app) is imported only when a mount starts, so the other
commands start fast.

Thread rule: runs in the main thread of the `vcfs` process, before and around `trio.run`.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

from vcfs import __version__, mountinfo
from vcfs.errors import VcfsError
from vcfs.logsetup import setup_logging, stderr_is_journal

if TYPE_CHECKING:
    from vcfs.app import Config

log = logging.getLogger("vcfs")


class StartError(Exception):
    """A start-up problem, reported as one line."""


def is_libvirt_uri(host: str) -> bool:
    """Whether HOST names a libvirt connection (`qemu:///system`, `qemu+ssh://h/system`)
    rather than a directory of QMP sockets: every libvirt URI has `://`, and no sane socket
    directory does."""
    return "://" in host


def check_mount_args(args: argparse.Namespace) -> None:
    """Refuse early, with one clear line, what would fail obscurely inside libfuse."""
    try:
        if not is_libvirt_uri(args.host) and not Path(args.host).is_dir():
            raise StartError(f"{args.host}: no such host directory")
        # mountinfo first, not stat: on a dead FUSE mount (its server killed) every stat fails
        # with ENOTCONN, which once ended here in a traceback.
        if mountinfo.is_mounted(args.mountpoint):
            raise StartError(f"{args.mountpoint}: something is already mounted there")
        if not args.mountpoint.is_dir():
            raise StartError(f"{args.mountpoint}: mountpoint is not a directory")
    except OSError as e:  # e.g. EACCES on a parent directory
        raise StartError(f"{e.filename}: {e.strerror}") from None
    if not os.path.exists("/dev/fuse"):
        raise StartError("/dev/fuse is missing: load the fuse module or install fuse3")


def mount_config(args: argparse.Namespace) -> Config:
    """The app's configuration from the parsed `vcfs mount` command line."""
    from vcfs.app import Config

    options = [o for group in args.options for o in group.split(",") if o]
    uri = args.host if is_libvirt_uri(args.host) else None
    return Config(
        # A URI as a Path would lose its slashes (qemu:///system -> qemu:/system).
        host_dir=Path(args.host) if uri else Path(args.host).resolve(),
        libvirt_uri=uri,
        mountpoint=args.mountpoint.resolve(),
        state_dir=args.state_dir.resolve(),
        runtime_dir=args.runtime_dir.resolve(),
        fuse_options=options,
        cache_images=args.cache_images,
        image_cache=args.image_cache << 20,
        cbw_timeout=args.cbw_timeout,
        scratch_dir=args.scratch_dir.resolve() if args.scratch_dir else None,
        scratch_limit=args.scratch_limit << 20 if args.scratch_limit else None,
        preserve_shutdown=args.preserve_shutdown,
        tls_dir=args.tls_x509_dir.resolve() if args.tls_x509_dir else None,
    )


def _log_start(config: Config) -> None:
    log.info("vcfs %s starting: host %s, mountpoint %s, state %s, runtime %s, options %s",
             __version__, config.libvirt_uri or config.host_dir, config.mountpoint,
             config.state_dir, config.runtime_dir, ",".join(config.fuse_options) or "-")


def run_mount(args: argparse.Namespace) -> int:
    """`vcfs mount`: foreground, or fork and wait for the child's readiness report."""
    import trio

    from vcfs.app import serve

    check_mount_args(args)
    config = mount_config(args)
    if args.foreground:
        setup_logging(args.debug, args.log_file)
        _log_start(config)
        try:
            trio.run(serve, config)
        except VcfsError as e:  # e.g. a libvirt URI nobody answers: one line, as a daemon says
            raise StartError(f"mount failed: {e}") from None
        return 0
    journal = stderr_is_journal()
    read_fd, write_fd = os.pipe()
    if os.fork():
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as reader:
            report = reader.read().decode(errors="replace")
        if report == "ok":
            return 0
        raise StartError(report or "mount failed (see the log)")
    os.close(read_fd)
    os.setsid()
    os.chdir("/")  # do not keep the caller's directory busy
    null = os.open(os.devnull, os.O_RDWR)
    # Under systemd (a mount unit running mount(8)) stderr is the journal: keep logging there.
    for fd in (0, 1) if journal else (0, 1, 2):
        os.dup2(null, fd)
    setup_logging(args.debug, args.log_file, to_stderr=journal)
    _log_start(config)
    pipe = os.fdopen(write_fd, "wb", buffering=0)

    def ready() -> None:
        pipe.write(b"ok")
        pipe.close()

    try:
        trio.run(serve, config, ready)
    except BaseException as e:
        if not pipe.closed:
            pipe.write(f"mount failed: {e}".encode())
        log.exception("vcfs stopped")
        os._exit(1)
    os._exit(0)


def run_umount(args: argparse.Namespace) -> int:
    """`vcfs umount`: the FUSE unmount helper."""
    r = subprocess.run(["fusermount3", "-u", str(args.mountpoint)], capture_output=True, text=True)
    if r.returncode:
        raise StartError(r.stderr.strip() or f"cannot unmount {args.mountpoint}")
    return 0
