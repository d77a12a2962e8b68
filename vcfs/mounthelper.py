"""The mount helper form: what mount(8) and /etc/fstab run, translated into `vcfs mount`.

`mount -t fuse.vcfs HOST MOUNTPOINT -o OPTIONS` makes mount.fuse3 run `vcfs HOST MOUNTPOINT -o
OPTIONS`; `helper_argv` turns that into the equivalent `vcfs mount` command line: mount(8)'s own
options are dropped, vcfs's (`state_dir=…`) become flags, the rest are FUSE options. The option
tables here are also what the manual page lists.

Thread rule: pure functions, any thread.
"""

from __future__ import annotations

import argparse
from collections.abc import Collection
from typing import NoReturn

MOUNT_ONLY = ("rw", "dev", "suid", "exec", "auto", "noauto", "user", "nouser", "users", "owner",
              "group", "defaults", "_netdev", "nofail")
"""Options mount(8) and fstab pass along that mean nothing to a FUSE filesystem."""
MOUNT_ONLY_OPTIONS = frozenset(MOUNT_ONLY)
MOUNT_ONLY_PREFIXES = ("x-", "X-", "comment=")
VALUE_OPTIONS = {"state_dir": "--state-dir", "runtime_dir": "--runtime-dir",
                 "log_file": "--log-file", "tls_x509_dir": "--tls-x509-dir",
                 "image_cache": "--image-cache", "cbw_timeout": "--cbw-timeout",
                 "scratch_dir": "--scratch-dir", "scratch_limit": "--scratch-limit"}
"""vcfs's own `key=value` options and the `vcfs mount` flag each becomes."""
FLAG_OPTIONS = {"cache_images": "--cache-images", "debug": "--debug",
                "preserve_shutdown": "--preserve-shutdown"}
"""vcfs's own options without a value."""


class HelperError(Exception):
    """The helper's command line cannot be translated; reported as one line, exit status 1."""


def is_helper_form(argv: list[str], commands: Collection[str]) -> bool:
    """Whether `argv` is mount.fuse3's `HOST MOUNTPOINT [-o OPTIONS]` rather than one of the
    `commands`."""
    return bool(argv) and argv[0] not in commands and not argv[0].startswith("-")


class _HelperParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise HelperError(f"{message} (usage: vcfs HOST MOUNTPOINT [-o OPTIONS])")


def helper_argv(argv: list[str]) -> list[str]:
    """`vcfs HOST MOUNTPOINT -o OPTIONS` as the equivalent `vcfs mount` command line.

    The legacy source form `vcfs#HOST` is accepted. HelperError on a usage error.
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
                raise HelperError(f"option {key} needs a value ({key}=…)")
            out += [VALUE_OPTIONS[key], value]
        elif key in FLAG_OPTIONS and not eq:
            out.append(FLAG_OPTIONS[key])
        else:
            fuse.append(opt)
    if fuse:
        out += ["-o", ",".join(fuse)]
    return [*out, "--", source, args.mountpoint]
