"""Command line: `vcfs mount|umount|status|wait|man|demo`, the mount helper form; logging; exit
codes.

Start-up errors are one line on stderr and exit status 1. Without `-f`, `mount` forks, and the
parent exits only once the child reports the mount ready (or failed), so scripts can use the
mount right after the command returns.

`vcfs HOST MOUNTPOINT -o OPTIONS` (no subcommand) is how mount.fuse3 runs vcfs for
`mount -t fuse.vcfs` and /etc/fstab: it is translated into `vcfs mount` (`helper_argv`).

The mount machinery (trio, pyfuse3) is imported only by `mount`, so the other commands start
fast and the manual page renders without it.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from vcfs import __version__

if TYPE_CHECKING:
    from vcfs.app import Config

log = logging.getLogger("vcfs")

SUBCOMMANDS = ("mount", "umount", "status", "wait", "man", "demo")

MOUNT_ONLY_OPTIONS = frozenset({
    "rw", "dev", "suid", "exec", "auto", "noauto", "user", "nouser", "users", "owner",
    "group", "defaults", "_netdev", "nofail",
})
"""Options mount(8) and fstab pass along that mean nothing to a FUSE filesystem."""
MOUNT_ONLY_PREFIXES = ("x-", "X-", "comment=")
VALUE_OPTIONS = {"state_dir": "--state-dir", "runtime_dir": "--runtime-dir",
                 "log_file": "--log-file", "tls_x509_dir": "--tls-x509-dir",
                 "image_cache": "--image-cache"}
FLAG_OPTIONS = {"cache_images": "--cache-images", "debug": "--debug"}

TIMESTAMPED = "%(asctime)s %(levelname)s %(name)s: %(message)s"
SYSLOG_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
                   logging.CRITICAL: 2}


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
        "mount", help="mount a host directory of QMP sockets",
        description="Mount HOST, a directory of QMP sockets (NAME.qmp per domain), on "
        "MOUNTPOINT. Without -f, the command returns once the mount is ready and vcfs serves "
        "it in the background; with -f it serves until unmounted, SIGTERM or SIGINT, and "
        "tells a service manager through $NOTIFY_SOCKET.",
    )
    m.add_argument("host", type=Path, metavar="HOST",
                   help="directory of QMP sockets, NAME.qmp per domain")
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


# ---- the mount helper form ----------------------------------------------------------------


class StartError(Exception):
    """A start-up problem, reported as one line."""


def is_helper_form(argv: list[str]) -> bool:
    """Whether `argv` is mount.fuse3's `HOST MOUNTPOINT [-o OPTIONS]` rather than a command."""
    return bool(argv) and argv[0] not in SUBCOMMANDS and not argv[0].startswith("-")


class _HelperParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise StartError(f"{message} (usage: vcfs HOST MOUNTPOINT [-o OPTIONS])")


def helper_argv(argv: list[str]) -> list[str]:
    """`vcfs HOST MOUNTPOINT -o OPTIONS` as the equivalent `vcfs mount` command line.

    mount(8)'s own options are dropped, vcfs's (`state_dir=…`) become flags, the rest are
    FUSE options. The legacy source form `vcfs#HOST` is accepted.
    """
    hp = _HelperParser(prog="vcfs", add_help=False)
    hp.add_argument("source")
    hp.add_argument("mountpoint")
    hp.add_argument("-o", dest="options", action="append", default=[])
    hp.add_argument("-f", dest="foreground", action="store_true")
    for flag in ("-n", "-v", "-s"):  # mount(8)'s helper flags: no mtab, verbose, sloppy
        hp.add_argument(flag, action="store_true")
    hp.add_argument("-t", dest="type")
    args = hp.parse_args(argv)
    source = args.source.removeprefix("vcfs#")
    out = ["mount"] + (["-f"] if args.foreground else [])
    fuse: list[str] = []
    for opt in (o for group in args.options for o in group.split(",") if o):
        key, eq, value = opt.partition("=")
        key = key.replace("-", "_")  # state-dir= as well as state_dir=
        if opt in MOUNT_ONLY_OPTIONS or opt.startswith(MOUNT_ONLY_PREFIXES):
            continue
        if key in VALUE_OPTIONS:
            if not eq or not value:
                raise StartError(f"option {key} needs a value ({key}=…)")
            out += [VALUE_OPTIONS[key], value]
        elif key in FLAG_OPTIONS and not eq:
            out.append(FLAG_OPTIONS[key])
        else:
            fuse.append(opt)
    if fuse:
        out += ["-o", ",".join(fuse)]
    return [*out, "--", source, args.mountpoint]


# ---- logging --------------------------------------------------------------------------------


def stderr_is_journal() -> bool:
    """Whether stderr is the journal's stream ($JOURNAL_STREAM names its device and inode)."""
    value = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    try:
        st = os.fstat(2)
        return bool(value) and (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (OSError, ValueError):
        return False


class JournalFormatter(logging.Formatter):
    """`<6>INFO vcfs.x: message`: journald reads the priority and adds the time itself."""

    def __init__(self) -> None:
        super().__init__("%(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        priority = SYSLOG_PRIORITY.get(record.levelno, 6)
        return f"<{priority}>{super().format(record)}"


def setup_logging(debug: bool, log_file: Path | None, to_stderr: bool = True) -> None:
    """Log to stderr (journal-style when stderr is the journal) and/or a file; each line
    names the level between spaces."""
    handlers: list[logging.Handler] = []
    if to_stderr:
        handler = logging.StreamHandler()
        handler.setFormatter(
            JournalFormatter() if stderr_is_journal() else logging.Formatter(TIMESTAMPED)
        )
        handlers.append(handler)
    if log_file:
        handler = logging.FileHandler(log_file)
        handler.setFormatter(logging.Formatter(TIMESTAMPED))
        handlers.append(handler)
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(logging.DEBUG if debug else logging.INFO)


# ---- mount and umount -----------------------------------------------------------------------


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


def _mebibytes(text: str) -> int:
    """A positive whole number of MiB (argparse type)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number of MiB: {text!r}") from None
    if value < 16:
        raise argparse.ArgumentTypeError(f"at least 16 MiB (four blocks), not {value}")
    return value


def mount_config(args: argparse.Namespace) -> Config:
    """The app's configuration from the parsed command line."""
    from vcfs.app import Config

    options = [o for group in args.options for o in group.split(",") if o]
    return Config(
        host_dir=args.host.resolve(),
        mountpoint=args.mountpoint.resolve(),
        state_dir=args.state_dir.resolve(),
        runtime_dir=args.runtime_dir.resolve(),
        fuse_options=options,
        cache_images=args.cache_images,
        image_cache=args.image_cache << 20,
        tls_dir=args.tls_x509_dir.resolve() if args.tls_x509_dir else None,
    )


def _log_start(config: Config) -> None:
    log.info("vcfs %s starting: host %s, mountpoint %s, state %s, runtime %s, options %s",
             __version__, config.host_dir, config.mountpoint, config.state_dir,
             config.runtime_dir, ",".join(config.fuse_options) or "-")


def run_mount(args: argparse.Namespace) -> int:
    """`vcfs mount`: foreground, or fork and wait for the child's readiness report."""
    import trio

    from vcfs.app import serve

    check_mount_args(args)
    config = mount_config(args)
    if args.foreground:
        setup_logging(args.debug, args.log_file)
        _log_start(config)
        trio.run(serve, config)
        return 0
    journal = stderr_is_journal()
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


def run_man(args: argparse.Namespace) -> int:
    """`vcfs man`: page through vcfs(1), or print its roff source."""
    from vcfs.manpage import render

    page = render(parser())
    if args.roff or not sys.stdout.isatty():
        sys.stdout.write(page)
        return 0
    try:
        return subprocess.run(["man", "-l", "-"], input=page, text=True).returncode
    except FileNotFoundError:
        sys.stdout.write(page)
        return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `vcfs` console script."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if is_helper_form(argv):
            argv = helper_argv(argv)
        args = parser().parse_args(argv)
        if args.command == "mount":
            return run_mount(args)
        if args.command == "umount":
            return run_umount(args)
        if args.command in ("status", "wait"):
            from vcfs import tools

            if args.command == "status":
                return tools.status(args.mountpoint, watch=args.watch, interval=args.interval)
            return tools.wait(args.backup, interval=args.interval)
        if args.command == "man":
            return run_man(args)
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
