"""Command line: parse `vcfs mount|umount|status|wait|man|demo` (or the mount helper form `vcfs
HOST MOUNTPOINT -o OPTIONS`) and dispatch to the module that does the work; exit codes.

- `mount`, `umount`: vcfs.launch (checks, foreground or daemon); the helper form is first
  translated by vcfs.mounthelper.
- `status`, `wait`: vcfs.client, which reads a mount like any user.
- `man`: vcfs.manpage, rendered from `parser()`. `demo`: vcfs.demo.

Start-up errors are one line on stderr and exit status 1; Ctrl-C is 130. None of these modules
imports trio or pyfuse3 when imported (launch does when a mount starts), so the commands that
need no mount start fast and the manual page renders without them.

Thread rule: the main thread of the `vcfs` process.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from vcfs import __version__, client, demo, launch, manpage
from vcfs.launch import StartError
from vcfs.mounthelper import HelperError, helper_argv, is_helper_form

SUBCOMMANDS = ("mount", "umount", "status", "wait", "man", "demo")


def default_dirs() -> tuple[Path, Path]:
    """State and runtime directories: system ones for root, per-user ones otherwise."""
    if os.geteuid() == 0:
        return Path("/var/lib/vcfs"), Path("/run/vcfs")
    data = Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local/share"))
    runtime = Path(os.environ.get("XDG_RUNTIME_DIR", f"/tmp/vcfs-{os.getuid()}"))
    return data / "vcfs", runtime / "vcfs"


def parser() -> argparse.ArgumentParser:
    """The argument parser (also the source of the manual page: help texts must not depend on
    who runs it)."""
    state, runtime = default_dirs()
    p = argparse.ArgumentParser(
        prog="vcfs",
        description="A FUSE filesystem exposing checkpoints and backups of running QEMU VMs.",
        epilog="Also the mount helper: vcfs HOST MOUNTPOINT -o OPTIONS (see vcfs man).",
    )
    p.add_argument("--version", action="version", version=f"vcfs {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    m = sub.add_parser(
        "mount", help="mount a host: a directory of QMP sockets or a libvirt URI",
        description="Mount HOST on MOUNTPOINT: a directory of QMP sockets (NAME.qmp per "
        "domain), or a libvirt connection URI (qemu:///system, qemu+ssh://HOST/system), whose "
        "domains are served through libvirt's checkpoint and backup API. Without -f, the "
        "command returns once the mount is ready and vcfs serves it in the background; "
        "with -f it serves until unmounted, SIGTERM or SIGINT, and tells a service manager "
        "through $NOTIFY_SOCKET.",
    )
    # A string: a libvirt URI as a Path would lose its slashes (launch.is_libvirt_uri).
    m.add_argument("host", metavar="HOST",
                   help="directory of QMP sockets, NAME.qmp per domain; or a libvirt "
                   "connection URI (anything with ://)")
    m.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT", help="an empty directory")
    m.add_argument("-f", "--foreground", action="store_true",
                   help="stay in the foreground and log to stderr")
    m.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS",
                   help="FUSE mount options, comma separated (allow_other, ro, …)")
    m.add_argument("--state-dir", type=Path, default=state, metavar="DIR",
                   help="checkpoint metadata and backup scratch files (default /var/lib/vcfs "
                   "for root, else $XDG_DATA_HOME/vcfs)")
    m.add_argument("--runtime-dir", type=Path, default=runtime, metavar="DIR",
                   help="NBD sockets, mode 0700 (default /run/vcfs for root, else "
                   "$XDG_RUNTIME_DIR/vcfs)")
    m.add_argument("--tls-x509-dir", type=Path, metavar="DIR",
                   help="x509 credentials for backups with <server tls='yes'>: ca-cert.pem, "
                   "server-cert.pem and server-key.pem for QEMU's NBD server, client-cert.pem "
                   "and client-key.pem for vcfs's own connection")
    m.add_argument("--cache-images", action="store_true",
                   help="let the kernel page cache keep backup images (default: direct I/O, "
                   "faster for images read once)")
    m.add_argument("--image-cache", type=_mebibytes, default=256, metavar="MIB",
                   help="image data vcfs keeps in memory at most, all backup views together "
                   "(default 256); the data path holds at most this plus 128 MiB of blocks "
                   "being read")
    m.add_argument("--cbw-timeout", type=_seconds, default=5, metavar="SECONDS",
                   help="longest a backup's copy-before-write may hold one guest write "
                   "(default 5); past it, or when the scratch is full or fails, the backup "
                   "fails and the guest's write goes on")
    m.add_argument("--scratch-dir", type=Path, metavar="DIR",
                   help="where backups keep the guest's overwritten data while they run "
                   "(default STATE_DIR/scratch); a <scratch file=...> in a pull backup's XML "
                   "overrides it for one disk")
    m.add_argument("--scratch-limit", type=_scratch_mebibytes, metavar="MIB",
                   help="most scratch one disk of a backup may use; past it the backup fails "
                   "and the guest's writes go on (default: no limit but the file system's)")
    m.add_argument("--preserve-shutdown", action="store_true",
                   help="a guest that shuts down while a backup runs is paused instead of "
                   "exiting, so the backup can be read to the end; removing the last backup "
                   "completes the shutdown (libvirt's PRESERVE_SHUTDOWN_DOMAIN)")
    m.add_argument("--log-file", type=Path, metavar="FILE",
                   help="log here too; in the background the only log, unless stderr is the "
                   "journal")
    m.add_argument("--debug", action="store_true", help="log QMP traffic and every request")

    u = sub.add_parser("umount", help="unmount a vcfs mount",
                       description="Unmount MOUNTPOINT (fusermount3 -u); vcfs then ends every "
                       "backup job and exits.")
    u.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT", help="a vcfs mount point")

    s = sub.add_parser(
        "status", help="show domains, checkpoints and backup jobs",
        description="List the domains of a mount with their checkpoints (marking the "
        "current one) and backup jobs (mode, state, per-disk progress, error), reading the "
        "mount like any user. Without MOUNTPOINT, every vcfs mount. With --watch, redraw each "
        "running job as a progress bar (bytes, rate, time left) until none is running.",
    )
    s.add_argument("mountpoint", type=Path, nargs="?", metavar="MOUNTPOINT",
                   help="a vcfs mount, or one domain's directory in it")
    s.add_argument("-w", "--watch", action="store_true",
                   help="follow running jobs until none is running")
    s.add_argument("--interval", type=float, default=1.0, metavar="SECONDS",
                   help="time between two redraws with --watch (default 1)")

    w = sub.add_parser(
        "wait", help="wait for a backup job to finish",
        description="Poll BACKUP's status until the job is no longer running. Exit 0 if it "
        "completed; 1 if it failed or was cancelled (the error on stderr), or if its "
        "directory went away; 2 if BACKUP is not a backup job directory.",
    )
    w.add_argument("backup", type=Path, metavar="BACKUP",
                   help="MOUNTPOINT/DOMAIN/backups/ID (or backups/latest)")
    w.add_argument("--interval", type=float, default=0.2, metavar="SECONDS",
                   help="time between two polls (default 0.2)")

    mp = sub.add_parser("man", help="show the manual page",
                        description="Show this manual page (with man -l), or print its roff "
                        "source with --roff or when stdout is not a terminal.")
    mp.add_argument("--roff", action="store_true", help="print the roff source")

    d = sub.add_parser("demo", help="start two demo VMs, mount them, show a tour",
                       description="Start two small VMs, mount them, and show a tour; "
                       "Ctrl-C unmounts, stops the VMs and removes what the demo made.")
    d.add_argument("mountpoint", type=Path, nargs="?", default=Path("vcfs-demo"),
                   metavar="MOUNTPOINT", help="where to mount (default ./vcfs-demo)")
    return p


def _mebibytes_from(minimum: int, why: str = "") -> Callable[[str], int]:
    """An argparse type: a whole number of MiB, at least `minimum` (`why` says why, in the
    message)."""

    def mebibytes(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number of MiB: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"at least {minimum} MiB{why}, not {value}")
        return value

    return mebibytes


_mebibytes = _mebibytes_from(16, " (four blocks)")
# A qcow2 scratch's own metadata takes a few hundred KiB.
_scratch_mebibytes = _mebibytes_from(1)


def _seconds(text: str) -> int:
    """A whole number of seconds from 1 to 600 (argparse type): QEMU's cbw-timeout is whole
    seconds, 0 would mean no limit, and a guest write held for minutes is a hung disk."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number of seconds: {text!r}") from None
    if not 1 <= value <= 600:
        raise argparse.ArgumentTypeError(f"from 1 to 600 seconds, not {value}")
    return value


# ---- dispatch -------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `vcfs` console script."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if is_helper_form(argv, SUBCOMMANDS):
            argv = helper_argv(argv)
        args = parser().parse_args(argv)
        if args.command == "mount":
            return launch.run_mount(args)
        if args.command == "umount":
            return launch.run_umount(args)
        if args.command == "status":
            return client.status(args.mountpoint, watch=args.watch, interval=args.interval)
        if args.command == "wait":
            return client.wait(args.backup, interval=args.interval)
        if args.command == "man":
            return manpage.show(manpage.render(parser()), roff=args.roff)
        return demo.run_demo(args.mountpoint)
    except (StartError, HelperError) as e:
        print(f"vcfs: {e}", file=sys.stderr)
        return 1
    except RuntimeError as e:  # libfuse's mount failures
        print(f"vcfs: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
