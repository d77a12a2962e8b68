"""The reference of the vcfs tree: every path a mount shows, its mode, what reading, writing and
failing do; the errno table. Data, and its rendering as docs/tree.md.

This is the one source of the tree's documentation: the manual page's FILES and ERRORS sections
(vcfs.manpage) and docs/tree.md are generated from it; tests compare docs/tree.md with
`tree_markdown()`, the modes with vcfs.tree's node kinds, and the paths with a real mount.

    python -m vcfs.manpage --tree-md > docs/tree.md

Thread rule: constants and pure functions, any thread.
"""

from __future__ import annotations

from dataclasses import dataclass


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
        "through `disks/`); `nbd-read:` bytes fetched from the export (pull); one "
        "`scratch <name>: <bytes>` line per disk, the host disk space its scratch file uses "
        "while it exists; `guest:` when the guest shut down and QEMU waits for the backup "
        "(--preserve-shutdown); `error:` why it failed (the fleecing snapshot broke, e.g. "
        "scratch full or its limit reached; push: the target is full; QEMU is gone). "
        "`vcfs status` and `vcfs wait` read this file.",
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
        "vcfs/treedoc.py; tests check it against that source and against a real mount. -->",
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
