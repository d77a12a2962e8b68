"""Command line: `vcfs mount`, `vcfs umount`, `vcfs demo`; logging; exit codes.

Start-up errors are one line on stderr and exit status 1. Without `-f`, `mount` forks, and the
parent exits only once the child reports the mount ready (or failed), so scripts can use the
mount right after the command returns.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from pathlib import Path

import trio

from vcfs import __version__
from vcfs.app import Config, serve

log = logging.getLogger("vcfs")


def default_dirs() -> tuple[Path, Path]:
    """State and runtime directories: system ones for root, per-user ones otherwise."""
    if os.geteuid() == 0:
        return Path("/var/lib/vcfs"), Path("/run/vcfs")
    data = Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local/share"))
    runtime = Path(os.environ.get("XDG_RUNTIME_DIR", f"/tmp/vcfs-{os.getuid()}"))
    return data / "vcfs", runtime / "vcfs"


def parser() -> argparse.ArgumentParser:
    """The argument parser (also the source of the manual page)."""
    state, runtime = default_dirs()
    p = argparse.ArgumentParser(
        prog="vcfs",
        description="A FUSE filesystem exposing checkpoints and backups of running QEMU VMs.",
    )
    p.add_argument("--version", action="version", version=f"vcfs {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("mount", help="mount a host directory of QMP sockets")
    m.add_argument("host", type=Path, help="directory of QMP sockets, NAME.qmp per domain")
    m.add_argument("mountpoint", type=Path)
    m.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground")
    m.add_argument("-o", dest="options", action="append", default=[],
                   help="FUSE mount options, comma separated (allow_other, ro, …)")
    m.add_argument("--state-dir", type=Path, default=state,
                   help=f"checkpoint metadata (default {state})")
    m.add_argument("--runtime-dir", type=Path, default=runtime,
                   help=f"NBD sockets and scratch (default {runtime})")
    m.add_argument("--cache-images", action="store_true",
                   help="let the kernel page cache keep backup images (default: direct I/O, "
                   "faster for images read once)")
    m.add_argument("--log-file", type=Path, help="log here (background mode logs nowhere else)")
    m.add_argument("--debug", action="store_true", help="log QMP traffic and every request")

    u = sub.add_parser("umount", help="unmount a vcfs mount")
    u.add_argument("mountpoint", type=Path)

    d = sub.add_parser("demo", help="start two demo VMs, mount them, show a tour")
    d.add_argument("mountpoint", type=Path, nargs="?", default=Path("vcfs-demo"))
    return p


def setup_logging(debug: bool, log_file: Path | None) -> None:
    """Log to stderr (and/or a file) in a format that names the level between spaces."""
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if log_file:
        handlers.append(logging.FileHandler(log_file))
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=handlers,
    )


class StartError(Exception):
    """A start-up problem, reported as one line."""


def check_mount_args(args: argparse.Namespace) -> None:
    """Refuse early, with one clear line, what would fail obscurely inside libfuse."""
    if not args.host.is_dir():
        raise StartError(f"{args.host}: no such host directory")
    if not args.mountpoint.is_dir():
        raise StartError(f"{args.mountpoint}: mountpoint is not a directory")
    if os.path.ismount(args.mountpoint):
        raise StartError(f"{args.mountpoint}: something is already mounted there")
    if not os.path.exists("/dev/fuse"):
        raise StartError("/dev/fuse is missing: load the fuse module or install fuse3")


def mount_config(args: argparse.Namespace) -> Config:
    """The app's configuration from the parsed command line."""
    options = [o for group in args.options for o in group.split(",") if o]
    return Config(
        host_dir=args.host.resolve(),
        mountpoint=args.mountpoint.resolve(),
        state_dir=args.state_dir.resolve(),
        runtime_dir=args.runtime_dir.resolve(),
        fuse_options=options,
        cache_images=args.cache_images,
    )


def run_mount(args: argparse.Namespace) -> int:
    """`vcfs mount`: foreground, or fork and wait for the child's readiness report."""
    check_mount_args(args)
    config = mount_config(args)
    if args.foreground:
        setup_logging(args.debug, args.log_file)
        trio.run(serve, config)
        return 0
    read_fd, write_fd = os.pipe()
    if os.fork():
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as pipe:
            report = pipe.read().decode(errors="replace")
        if report == "ok":
            return 0
        raise StartError(report or "mount failed (see the log)")
    os.close(read_fd)
    os.setsid()
    os.chdir("/")  # do not keep the caller's directory busy
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    setup_logging(args.debug, args.log_file)
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


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `vcfs` console script."""
    args = parser().parse_args(argv)
    try:
        if args.command == "mount":
            return run_mount(args)
        if args.command == "umount":
            return run_umount(args)
        from vcfs.demo import run_demo

        return run_demo(args.mountpoint)
    except StartError as e:
        print(f"vcfs: {e}", file=sys.stderr)
        return 1
    except RuntimeError as e:  # libfuse's mount failures
        print(f"vcfs: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
