"""The vcfs(1) manual page in roff, rendered so that it cannot drift from the code.

The OPTIONS and COMMANDS sections come from the argument parser `render` is given
(`vcfs.cli.parser()`), the FILES and ERRORS sections from vcfs.treedoc, the mount helper's
option lists from vcfs.mounthelper. Nothing here imports the command line (it imports this) or
pyfuse3, or touches a mount. `python -m vcfs.manpage` (this package's __main__) prints the page:

    python -m vcfs.manpage > packaging/vcfs.1
    python -m vcfs.manpage --tree-md > docs/tree.md

Thread rule: pure functions, any thread; `show` runs man(1) and waits for it.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

from vcfs import __version__
from vcfs.mounthelper import FLAG_OPTIONS, MOUNT_ONLY, MOUNT_ONLY_PREFIXES, VALUE_OPTIONS
from vcfs.treedoc import DIR, ERRNO_TABLE, TREE, TREE_INTRO

# ---- roff -----------------------------------------------------------------------------------


def roff(text: str, code: bool = False) -> str:
    """Escape `text` for roff: backslashes, leading dots, non-ASCII; in code, minus signs."""
    text = text.replace("\\", "\\e")
    if code:
        text = text.replace("-", "\\-")
    text = "".join(c if ord(c) < 128 else f"\\[u{ord(c):04X}]" for c in text)
    return "\n".join(
        "\\&" + line if line.startswith((".", "'")) else line for line in text.split("\n")
    )


def inline(text: str) -> str:
    """Markdown-ish `code` spans as bold, the rest escaped."""
    parts = text.split("`")
    return "".join(
        f"\\fB{roff(p, code=True)}\\fR" if i % 2 else roff(p) for i, p in enumerate(parts)
    )


def _metavar(action: argparse.Action) -> str:
    if action.metavar is not None:
        return str(action.metavar)
    return action.dest.upper() if action.option_strings else action.dest


def _takes_value(action: argparse.Action) -> bool:
    return action.nargs != 0


def _synopsis_item(action: argparse.Action) -> str:
    if action.option_strings:
        flag = f"\\fB{roff(action.option_strings[0], code=True)}\\fR"
        if _takes_value(action):
            flag += f" \\fI{roff(_metavar(action))}\\fR"
        return f"[{flag}]"
    item = f"\\fI{roff(_metavar(action))}\\fR"
    return f"[{item}]" if action.nargs == "?" else item


def _option_entry(action: argparse.Action) -> list[str]:
    names = []
    for s in action.option_strings:
        name = f"\\fB{roff(s, code=True)}\\fR"
        if _takes_value(action):
            name += f" \\fI{roff(_metavar(action))}\\fR"
        names.append(name)
    head = ", ".join(names) if names else f"\\fI{roff(_metavar(action))}\\fR"
    text = action.help or ""
    if text is argparse.SUPPRESS:
        return []
    text = text.replace("%(prog)s", "vcfs")
    return [".TP", head, inline(str(text))]


def subcommands(p: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    """(name, help, parser) of every subcommand of `p`, in order."""
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            return [(name, helps.get(name, ""), sp) for name, sp in action.choices.items()]
    return []


MOUNT_HELPER = """\
vcfs is also the FUSE mount helper of filesystem type `fuse.vcfs`. `mount -t fuse.vcfs HOST \
MOUNTPOINT -o OPTIONS` (or an /etc/fstab line) makes mount(8) run mount.fuse3(8), which runs \
`vcfs HOST MOUNTPOINT -o OPTIONS`, finding `vcfs` on the fixed PATH mount(8) gives helpers \
(/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin): a `pip install` as root puts \
it in /usr/local/bin; from a virtualenv, link it there. The legacy source form `vcfs#HOST` with \
type `fuse` works too. vcfs then mounts in the background like `vcfs mount` without `-f`."""


def helper_options(p: argparse.ArgumentParser) -> str:
    """The mount helper's option rules, from vcfs.mounthelper's tables (and the metavars of the
    `vcfs mount` flags they become), so the page lists exactly what the helper does."""
    mount = next(sp for name, _, sp in subcommands(p) if name == "mount")
    metavars = {s: _metavar(a) for a in mount._actions for s in a.option_strings}
    dropped = [*MOUNT_ONLY, *(f"{prefix}*" for prefix in MOUNT_ONLY_PREFIXES)]
    own = [f"`{key}={metavars[flag]}`" for key, flag in VALUE_OPTIONS.items()]
    own += [f"`{key}`" for key in FLAG_OPTIONS]
    return (f"Options mount(8) adds ({', '.join(f'`{o}`' for o in dropped)}) are dropped; "
            f"{', '.join(own[:-1])} and {own[-1]} are vcfs's own options (`-` may stand for "
            "`_`); the rest (`ro`, `allow_other`, `noexec`, ...) go to libfuse.")

FSTAB_EXAMPLE = "/run/vms  /mnt/vms  fuse.vcfs  allow_other,state_dir=/var/lib/vcfs,_netdev  0 0"

SERVICE = """\
packaging/vcfs.service runs `vcfs mount -f` with `Type=notify`: vcfs sends READY=1 to \
$NOTIFY_SOCKET once the mount is usable and STOPPING=1 when it unmounts; SIGTERM unmounts \
cleanly. packaging/vcfs.path starts it once the VMs' sockets directory exists. Logs go to \
stderr in the foreground (to the journal under systemd, without timestamps, which journald \
adds), and to `--log-file` in the background."""

EXIT_STATUS = (
    ("0", "success; for `wait`, the backup completed."),
    ("1", "a one-line error on stderr (start-up, mount, unmount); for `wait`, the backup "
          "failed or was cancelled, or its directory went away."),
    ("2", "usage error; for `wait`, the path is not a backup job directory."),
    ("130", "interrupted (Ctrl-C)."),
)

ENVIRONMENT = (
    ("NOTIFY_SOCKET", "where to send READY=1 and STOPPING=1 (a path, or an abstract socket "
                      "if it starts with @)."),
    ("JOURNAL_STREAM", "when it names stderr, log lines carry syslog priorities and no "
                       "timestamps, and a background mount keeps logging there."),
    ("XDG_DATA_HOME, XDG_RUNTIME_DIR", "the default state and runtime directories of a user "
                                       "other than root."),
)


def render(p: argparse.ArgumentParser) -> str:
    """The whole vcfs(1) page, in roff, for the command line `p` (`vcfs.cli.parser()`)."""
    subs = subcommands(p)
    out = [
        f'.TH VCFS 1 "" "vcfs {__version__}" "User Commands"',
        ".SH NAME",
        "vcfs \\- " + roff((p.description or "").rstrip(".")[:1].lower()
                           + (p.description or "").rstrip(".")[1:]),
        ".SH SYNOPSIS",
    ]
    for name, _, sp in subs:
        items = [_synopsis_item(a) for a in sp._actions
                 if not isinstance(a, argparse._HelpAction)]
        out += [".br", f"\\fBvcfs {roff(name, code=True)}\\fR " + " ".join(items)]
    out += [".br", "\\fBvcfs\\fR \\fIHOST\\fR \\fIMOUNTPOINT\\fR [\\fB\\-o\\fR "
                   "\\fIOPTIONS\\fR]",
            ".br", "\\fBvcfs \\-\\-version\\fR"]
    out += [
        ".SH DESCRIPTION",
        inline("vcfs is a FUSE filesystem. Mount a directory of QMP sockets (HOST: `NAME.qmp` "
               "is the monitor of domain NAME; start QEMU with "
               "`-qmp unix:HOST/NAME.qmp,server=on,wait=off`) and every running QEMU is a "
               "directory: `mkdir` a checkpoint, `cat` its XML, `echo` a `<domainbackup>` "
               "into `backups/new`, `cp` the point-in-time disk image out, `rmdir` the job. "
               "The semantics are libvirt's domain checkpoints and backups, done directly over "
               "QMP."),
        ".SH OPTIONS",
    ]
    for action in p._actions:
        if not isinstance(action, argparse._SubParsersAction):
            out += _option_entry(action)
    out.append(".SH COMMANDS")
    for name, help_text, sp in subs:
        out += [f".SS \\fBvcfs {roff(name, code=True)}\\fR", inline(help_text[:1].upper()
                                                                     + help_text[1:] + ".")]
        if sp.description:
            out += [".PP", inline(sp.description)]
        for action in sp._actions:
            if not isinstance(action, argparse._HelpAction):
                out += _option_entry(action)
    out += ['.SH "MOUNT HELPER AND FSTAB"', inline(MOUNT_HELPER + " " + helper_options(p)),
            ".PP", ".nf", ".RS",
            roff(FSTAB_EXAMPLE), ".RE", ".fi"]
    out += [".SH SERVICE", inline(SERVICE)]
    out += [".SH FILES", inline(TREE_INTRO.replace("\n", " "))]
    for e in TREE:
        out += [".TP", f"\\fB{roff(e.path, code=True)}\\fR  ({e.kind}, {e.mode:04o})",
                inline(e.summary[:1].upper() + e.summary[1:] + ".")]
        verb = "List" if e.kind == DIR else "Read"
        for label, text in ((verb, e.read), ("Write", e.write), ("Errors", e.errors)):
            if text:
                out += [".br", f"\\fI{label}:\\fR " + inline(text)]
    out += [".SH ERRORS", inline("A failed request returns one of these errno values, and "
                                 "leaves a line in `<dom>/errors` and the log:")]
    for cond, code in ERRNO_TABLE:
        out += [".TP", f"\\fB{code}\\fR", inline(cond[:1].upper() + cond[1:] + ".")]
    out += ['.SH "EXIT STATUS"']
    for code, text in EXIT_STATUS:
        out += [".TP", f"\\fB{code}\\fR", inline(text)]
    out += [".SH ENVIRONMENT"]
    for name, text in ENVIRONMENT:
        out += [".TP", f"\\fB{roff(name, code=True)}\\fR", inline(text)]
    out += [
        ".SH EXAMPLES",
        ".nf",
        ".RS",
        roff("vcfs mount /run/vms /mnt/vms\n"
             "mkdir /mnt/vms/vm1/checkpoints/monday\n"
             "echo \"<domainbackup mode='pull'/>\" > /mnt/vms/vm1/backups/new\n"
             "cp /mnt/vms/vm1/backups/1/disks/vda.qcow2 /srv/vda.qcow2\n"
             "rmdir /mnt/vms/vm1/backups/1\n"
             "echo \"<domainbackup><disks><disk name='vda'><target file='/srv/vda.qcow2'/>"
             "</disk></disks></domainbackup>\" > /mnt/vms/vm1/backups/new\n"
             "vcfs status --watch /mnt/vms\n"
             "vcfs wait /mnt/vms/vm1/backups/latest && echo done\n"
             "vcfs umount /mnt/vms", code=True),
        ".RE",
        ".fi",
        '.SH "SEE ALSO"',
        "\\fBmount.fuse3\\fR(8), \\fBfusermount3\\fR(1), \\fBfstab\\fR(5), "
        "\\fBsystemd.service\\fR(5), \\fBqemu-img\\fR(1), \\fBvirsh\\fR(1)",
    ]
    return "\n".join(out) + "\n"


def show(page: str, *, roff: bool = False) -> int:
    """`vcfs man`: page through `page` with man(1), or print its roff source when asked to, when
    stdout is not a terminal, or when there is no man."""
    if roff or not sys.stdout.isatty():
        sys.stdout.write(page)
        return 0
    try:
        return subprocess.run(["man", "-l", "-"], input=page, text=True).returncode
    except FileNotFoundError:
        sys.stdout.write(page)
        return 0
