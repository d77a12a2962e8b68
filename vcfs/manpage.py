"""The vcfs(1) manual page and docs/tree.md, generated so that neither can drift.

The OPTIONS and COMMANDS sections come from `vcfs.cli.parser()`, the FILES section from `TREE`
below, which is also the source of docs/tree.md (tests compare that file with `tree_markdown()`
and with a real mount). Nothing here imports pyfuse3 or touches a mount.

    python -m vcfs.manpage > vcfs.1              # the roff source
    python -m vcfs.manpage --tree-md > docs/tree.md

Thread rule: pure functions, any thread.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from vcfs import __version__

# ---- the tree -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TreeEntry:
    """One path pattern of the tree: `<dom>` and friends stand for any name; dirs end in '/'."""

    path: str
    kind: str
    """`directory`, `file` or `symlink`."""
    mode: int
    summary: str
    read: str
    write: str = ""
    errors: str = ""


DIR, FILE, LINK = "directory", "file", "symlink"

TREE: tuple[TreeEntry, ...] = (
    TreeEntry(
        "<dom>/", DIR, 0o755,
        "one directory per running QEMU whose monitor socket `<dom>.qmp` is in HOST",
        "`xml`, `errors`, `checkpoints`, `backups`. A domain appears once vcfs has "
        "connected to its socket (looking it up connects at once) and vanishes when QEMU "
        "exits, unless a backup job of it is left to read the status of.",
        "`mkdir` and `rmdir` here, or at the root, fail with EPERM.",
        "ENOENT: no connected domain of that name.",
    ),
    TreeEntry(
        "<dom>/xml", FILE, 0o444,
        "the domain as libvirt-style `<domain>` XML",
        "name, uuid, and one `<disk>` per block device: target (the device id, e.g. vda), "
        "driver type, source file, virtual size. A hot-plugged or removed disk shows within a "
        "second.",
        "",
        "EIO: QEMU is gone or the QMP query failed.",
    ),
    TreeEntry(
        "<dom>/errors", FILE, 0o444,
        "the domain's recent failed requests, newest last",
        "one line per failure (the last 200): UTC time, the path relative to the domain, the "
        "errno name, the whole message. Checkpoint metadata that disagrees with QEMU's bitmaps "
        "when the domain appears is reported here too, as `RECONCILE`.",
    ),
    TreeEntry(
        "<dom>/checkpoints/", DIR, 0o755,
        "the domain's checkpoints",
        "`new`, `redefine`, `current` (when there is one) and one directory per checkpoint.",
        "`mkdir NAME` creates checkpoint NAME with defaults: a bitmap on every disk that can "
        "hold one, the other disks `checkpoint='no'` (where no disk can, a checkpoint of no "
        "disk, as libvirt allows). `rmdir NAME` deletes it: its bitmaps go, "
        "its children re-parent to its parent.",
        "mkdir: EEXIST (name taken), EINVAL (bad or reserved name: `new`, `redefine`, "
        "`current`, `latest`), EIO. rmdir: ENOENT (a "
        "bitmap of it is missing: the checkpoint is broken, see `delete`), EIO.",
    ),
    TreeEntry(
        "<dom>/checkpoints/new", FILE, 0o200,
        "control file: creates a checkpoint",
        "",
        "a libvirt `<domaincheckpoint>` document creates that checkpoint, as `virsh "
        "checkpoint-create` does. Without `<name>` it is named after the current Unix time; "
        "without `<disks>` it covers every disk. The `write()` completing the document "
        "returns the result.",
        "EINVAL (malformed XML, schema violation, bad name), EEXIST, ENOENT (unknown disk), "
        "EOPNOTSUPP (a disk that cannot hold a bitmap: raw, qcow2 v2, read-only), EFBIG "
        "(over 1 MiB), EIO.",
    ),
    TreeEntry(
        "<dom>/checkpoints/redefine", FILE, 0o200,
        "control file: re-creates checkpoint metadata for existing bitmaps",
        "",
        "a full checkpoint XML (as a checkpoint's `xml` shows it) re-creates that "
        "checkpoint's metadata, or updates it, after validating that every bitmap it names "
        "exists and is usable (libvirt's REDEFINE_VALIDATE).",
        "EINVAL (a bitmap missing or unusable, malformed XML, a parent cycle), ENOENT "
        "(unknown parent), EFBIG, EIO.",
    ),
    TreeEntry(
        "<dom>/checkpoints/current", LINK, 0o777,
        "-> the checkpoint a new one takes as its parent",
        "the name of the current checkpoint; absent when there is none.",
    ),
    TreeEntry(
        "<dom>/checkpoints/<checkpoint>/", DIR, 0o755,
        "one checkpoint",
        "`xml`, `size`, `delete`, and `parent` unless it is a root.",
    ),
    TreeEntry(
        "<dom>/checkpoints/<checkpoint>/xml", FILE, 0o444,
        "like `virsh checkpoint-dumpxml` (with `<domain>`)",
        "the checkpoint's `<domaincheckpoint>`. A broken checkpoint (a bitmap missing or "
        "inconsistent, e.g. QEMU was killed) carries a `<!-- broken: ... -->` comment.",
        "",
        "EIO: QEMU is gone.",
    ),
    TreeEntry(
        "<dom>/checkpoints/<checkpoint>/size", FILE, 0o444,
        "per disk: bytes dirtied since this checkpoint",
        "one line per disk, `vda 3145728` (like `virsh checkpoint-dumpxml --size`); a disk "
        "whose bitmap is missing or broken is left out.",
        "",
        "EIO: QEMU is gone.",
    ),
    TreeEntry(
        "<dom>/checkpoints/<checkpoint>/parent", LINK, 0o777,
        "-> `../<parent>`",
        "the checkpoint's parent; absent for a root.",
    ),
    TreeEntry(
        "<dom>/checkpoints/<checkpoint>/delete", FILE, 0o200,
        "control file: the other delete modes",
        "",
        "a line of `children`, `children-only`, `metadata-only` (combinable, separated by "
        "spaces or commas): delete the checkpoint and its descendants, only its descendants, "
        "or only the metadata (bitmaps stay; the way to drop a broken checkpoint). A delete of "
        "several checkpoints is all or nothing.",
        "EINVAL (unknown mode, children with children-only), ENOENT (a bitmap is missing: "
        "use metadata-only), EIO.",
    ),
    TreeEntry(
        "<dom>/backups/", DIR, 0o755,
        "the domain's backup jobs",
        "`new`, `latest` (when there is a job) and one directory per job.",
        "`mkdir ID` begins a full pull backup of every eligible disk, all defaults, as job "
        "ID. `rmdir ID` ends the job: a pull job's exports, scratch files and QEMU jobs go "
        "(aborting it if running); a running push job is cancelled and its unfinished target "
        "removed; a finished push job is forgotten, its target kept.",
        "mkdir: EBUSY (a job is running on the domain), EEXIST, EINVAL (bad or reserved "
        "name), EIO. rmdir: EIO.",
    ),
    TreeEntry(
        "<dom>/backups/new", FILE, 0o200,
        "control file: begins a backup job",
        "",
        "a libvirt `<domainbackup>` document begins that job (pull or push, `<incremental>`, "
        "per-disk `backupmode`, `exportname`, `<scratch>`, `<target>`, `<server>`); its id is "
        "the next integer and `latest` points to it. A `<domaincheckpoint>` child creates that "
        "checkpoint in the backup's own QMP transaction.",
        "EINVAL (malformed XML, schema violation, pull with a non-qcow2 scratch), ENOENT "
        "(unknown disk or incremental checkpoint), EEXIST (the checkpoint, or a push target "
        "file, exists), EOPNOTSUPP, EBUSY (a job is running on the domain), EFBIG, EIO.",
    ),
    TreeEntry(
        "<dom>/backups/latest", LINK, 0o777,
        "-> the most recently begun job",
        "the id of the latest job still listed; absent when there is none.",
    ),
    TreeEntry(
        "<dom>/backups/<id>/", DIR, 0o755,
        "one backup job",
        "`xml`, `status`, `disks`. A finished push job stays until `rmdir`.",
    ),
    TreeEntry(
        "<dom>/backups/<id>/xml", FILE, 0o444,
        "like `virsh backup-dumpxml`",
        "the job's `<domainbackup>` with every default vcfs chose filled in (scratch files, "
        "export names, the NBD server).",
    ),
    TreeEntry(
        "<dom>/backups/<id>/status", FILE, 0o444,
        "the job's state and progress, as `key: value` lines",
        "`state:` running, completed, failed or cancelled; `mode:` pull or push; one "
        "`disk <name>: <done>/<total>` line per disk (push: QEMU's progress; pull: bytes read "
        "through `disks/`); `nbd-read:` bytes fetched from the export (pull); `error:` why it "
        "failed. `vcfs status` and `vcfs wait` read this file.",
        "",
        "EIO: QEMU is gone while a push job runs.",
    ),
    TreeEntry(
        "<dom>/backups/<id>/disks/", DIR, 0o755,
        "the images of a pull job",
        "three files per disk of a pull job; empty for a push job.",
    ),
    TreeEntry(
        "<dom>/backups/<id>/disks/<disk>", FILE, 0o400,
        "pull: the raw point-in-time image",
        "the disk as it was when the job began, while the guest keeps writing; reads go to "
        "QEMU's NBD export, zero extents never do. Its size is the virtual size, its blocks "
        "the allocated bytes, and `lseek(SEEK_DATA/SEEK_HOLE)` answers from the extents, so "
        "`cp` and `tar --sparse` copy only the data and make a sparse copy.",
        "",
        "EIO: QEMU or the export failed, or the job ended.",
    ),
    TreeEntry(
        "<dom>/backups/<id>/disks/<disk>.qcow2", FILE, 0o400,
        "pull: a qcow2 image of it, synthesized while read",
        "full job: the allocated clusters; incremental: only the changed clusters, with "
        "backing file `<disk>-<base>.qcow2` (save the base's image under that name beside it).",
        "",
        "EIO: as for the raw image.",
    ),
    TreeEntry(
        "<dom>/backups/<id>/disks/<disk>.map", FILE, 0o444,
        "pull: the extent map",
        "a JSON list of `{\"start\", \"length\", \"zero\", \"dirty\"}` objects covering the "
        "disk (ovirt-imageio's schema), adjacent equal extents merged; in a full job every "
        "non-zero extent is dirty.",
        "",
        "EIO: as for the raw image.",
    ),
    TreeEntry(
        "<dom>/backups/<id>/disks/<disk>.sha256", FILE, 0o444,
        "pull: the raw image's sha256",
        "one `sha256sum` line naming `<disk>`: so `cp` of both, then `sha256sum -c`, proves "
        "the copy. Taken while a reader streams the image from start to end (holes skipped "
        "with SEEK_DATA count as zeros) at no extra read; if none has, reading this file "
        "reads the image once.",
        "",
        "EIO: as for the raw image.",
    ),
    TreeEntry(
        "<dom>/backups/<id>/disks/<disk>.qcow2.sha256", FILE, 0o444,
        "pull: the qcow2 image's sha256",
        "as `<disk>.sha256`, for `<disk>.qcow2`, naming it as it is saved: "
        "`<disk>-<checkpoint>.qcow2` when the job creates a checkpoint, else `<disk>.qcow2`.",
        "",
        "EIO: as for the raw image.",
    ),
)

ERRNO_TABLE = (
    ("malformed XML, schema violation, bad or reserved name", "EINVAL"),
    ("name already exists", "EEXIST"),
    ("unknown disk, checkpoint, parent or incremental base; a bitmap missing on delete",
     "ENOENT"),
    ("disk cannot hold a bitmap (raw, qcow2 v2, read-only)", "EOPNOTSUPP"),
    ("a backup already running on the domain", "EBUSY"),
    ("QEMU gone, QMP or NBD failure", "EIO"),
    ("request over 1 MiB", "EFBIG"),
    ("state directory full", "ENOSPC"),
    ("mkdir or rmdir where the tree has no such operation; a change to a file's mode",
     "EPERM"),
    ("opening a control file for reading and writing, or any other file for writing",
     "EACCES"),
    ("any change on a read-only (`-o ro`) mount", "EROFS"),
)

TREE_INTRO = """\
The mount's root holds one directory per domain. Control files (`w`) act at the `write()` that
completes a request - a whole XML document, or a newline-terminated line - and that `write()`
returns the error, so `echo ... > new` reports it; a request still incomplete at `close()` fails
there (EINVAL). Each open handle has its own buffer; opening with `O_TRUNC` works. Read, a
control file is empty, so `rsync -a`, `cp -a` and `tar` copy it as an empty file. Every other
file's size is what a read returns (XML, status and maps are rendered for `stat` too); an open
handle reads one snapshot, and its `fstat` agrees with it. Every failure also leaves one line
in `<dom>/errors` and the log, and changes nothing. Modes matter with `-o allow_other` (vcfs
then adds `default_permissions`); without it only the mounting user sees the tree."""


def mode_string(kind: str, mode: int) -> str:
    """`drwxr-xr-x` for (DIR, 0o755), as `ls -l` shows it."""
    letters = "".join(
        ch if mode & (1 << (8 - i)) else "-" for i, ch in enumerate("rwxrwxrwx")
    )
    return {DIR: "d", FILE: "-", LINK: "l"}[kind] + letters


def tree_markdown() -> str:
    """docs/tree.md."""
    out = [
        "# The vcfs tree",
        "",
        "<!-- Generated by `python -m vcfs.manpage --tree-md > docs/tree.md` from "
        "vcfs/manpage.py; tests check it against that source and against a real mount. -->",
        "",
        "Every path a vcfs mount can show, relative to the mount point. `<dom>`, "
        "`<checkpoint>`, `<id>` and `<disk>` stand for any name; directories end in `/`.",
        "",
        TREE_INTRO,
        "",
        "| path | type | mode | |",
        "|---|---|---|---|",
    ]
    for e in TREE:
        out.append(f"| `{e.path}` | {e.kind} | `{e.mode:04o}` | {e.summary} |")
    out.append("")
    for e in TREE:
        out += [f"## `{e.path}`", "", f"{e.kind}, `{mode_string(e.kind, e.mode)}` "
                f"(`{e.mode:04o}`): {e.summary}.", ""]
        verb = "List" if e.kind == DIR else "Read"
        if e.read:
            out.append(f"- **{verb}:** {e.read}")
        if e.write:
            out.append(f"- **Write:** {e.write}")
        if e.errors:
            out.append(f"- **Errors:** {e.errors}")
        out.append("")
    out += ["## Errors", "", "| condition | errno |", "|---|---|"]
    out += [f"| {cond} | {code} |" for cond, code in ERRNO_TABLE]
    return "\n".join(out) + "\n"


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
type `fuse` works too. vcfs then mounts in the background like `vcfs mount` without `-f`. \
Options mount(8) adds (`rw`, `dev`, `suid`, `exec`, `auto`, `noauto`, `user`, `nouser`, \
`users`, `defaults`, `_netdev`, `nofail`, `x-*`) are dropped; `state_dir=DIR`, \
`runtime_dir=DIR`, `log_file=FILE`, `cache_images` and `debug` are vcfs's own options; the \
rest (`ro`, `allow_other`, `noexec`, ...) go to libfuse."""

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


def render(p: argparse.ArgumentParser | None = None) -> str:
    """The whole vcfs(1) page, in roff."""
    if p is None:
        from vcfs.cli import parser

        p = parser()
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
    out += ['.SH "MOUNT HELPER AND FSTAB"', inline(MOUNT_HELPER), ".PP", ".nf", ".RS",
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


def main(argv: list[str] | None = None) -> int:
    """`python -m vcfs.manpage [--tree-md]`: print the roff page (or docs/tree.md)."""
    ap = argparse.ArgumentParser(prog="python -m vcfs.manpage")
    ap.add_argument("--tree-md", action="store_true", help="print docs/tree.md instead")
    args = ap.parse_args(argv)
    sys.stdout.write(tree_markdown() if args.tree_md else render())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
