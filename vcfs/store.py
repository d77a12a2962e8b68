"""The backup store that `vcfs-backup` fills, and the two tools that keep it: `vcfs-prune`
(retention) and `vcfs-verify` (integrity).

A store is one directory per domain:

```
<disk>-NAME.qcow2          the image of each disk at restore point NAME (a checkpoint, UTC time);
                           an incremental names <disk>-PREV.qcow2 as its backing file
<disk>-NAME.qcow2.sha256   its checksum, in sha256sum format
chain                      the points of the current chain, oldest (the full backup) first
chain.LAST                 an earlier chain, ending with LAST (vcfs-backup had to start anew)
lock                       flock(2)ed: vcfs-backup, vcfs-prune exclusive; vcfs-verify shared
```

and, only while a prune runs or after one was killed, `merging` (the journal of one merge:
DROPPED NEXT) and `chain.LAST.deleting` (an earlier chain being deleted).

Retention merges the oldest restore point into the next one: `qemu-img commit -d` of the next
incremental into the older image, then the older image is renamed over the incremental, so the
names every later incremental carries as backing file stay valid. Crash safety rests on one
order: a point leaves its chain file (atomically, after its journal is written) before its
image is touched, and every step after that is idempotent, so the next run of vcfs-prune
finishes it. At every instant each point still listed restores to exactly its content.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from vcfs import sha256sum

CHAIN = "chain"
JOURNAL = "merging"
LOCK = "lock"
DELETING = ".deleting"
IMAGE_SUFFIX = ".qcow2"
SUM_SUFFIX = ".sha256"
NEW_SUFFIX = ".new"

QEMU_LOCK_BYTES = (100, 200)
"""QEMU's image locking: a process that opened an image holds OFD locks on bytes 100 + bit
(permissions it uses) and 200 + bit (permissions it does not share). Any lock there means a
QEMU (a VM on an instant-recovery overlay, a qemu-img) has the image open."""

KILL_ENV = "VCFS_KILL"
"""`VCFS_KILL=LABEL` makes vcfs-prune SIGKILL itself right after the step LABEL, as a crash
would there (the tests walk every label; see STEPS)."""
STEPS = ("unlist-chain", "delete-file", "journal", "unlist", "commit", "checksum", "rename",
         "merged", "cleanup")
"""Labels of the crash points, in order; per-disk ones are written `LABEL DISK`."""


class StoreError(Exception):
    """A store, or a request on it, that vcfs-prune or vcfs-verify cannot act on."""


@dataclass
class Chain:
    """One chain list file of a store: `chain` (the current one) or `chain.LAST`."""

    path: Path
    names: list[str]


# --- small durable file operations -----------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    """Replace `path` by `text` so that a crash leaves the old or the new content, never half."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _step(label: str) -> None:
    if os.environ.get(KILL_ENV) == label:
        os.kill(os.getpid(), signal.SIGKILL)


def sha256_of(path: Path) -> str:
    """The sha256 of a file's bytes, hex."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def in_use(path: Path) -> bool:
    """Whether some process holds QEMU's image lock on `path` (it has the image open)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        for start in QEMU_LOCK_BYTES:
            # struct flock: l_type, l_whence, (pad), l_start, l_len, l_pid, (pad); l_pid must be
            # 0 for open file description locks, which are the ones QEMU takes.
            query = struct.pack("@hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, start, 64, 0)
            answer = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, query)
            if struct.unpack("@hhqqi4x", answer)[0] != fcntl.F_UNLCK:
                return True
        return False
    finally:
        os.close(fd)


def backing_of(image: Path) -> str | None:
    """The backing file name `image` carries in its header, None for a self-contained one."""
    r = _qemu_img("info", "-U", "-f", "qcow2", "--output=json", image)
    return json.loads(r.stdout).get("backing-filename")


def _qemu_img(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(["qemu-img", *map(str, args)], capture_output=True, text=True,
                       stdin=subprocess.DEVNULL)
    if check and r.returncode != 0:
        msg = r.stderr.strip() or r.stdout.strip() or f"exit status {r.returncode}"
        raise StoreError(f"qemu-img {args[0]}: {msg}")
    return r


# --- the store ---------------------------------------------------------------------------------


class Store:
    """A directory of chains saved by vcfs-backup."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def image(self, disk: str, name: str) -> Path:
        """The image of `disk` at restore point `name`."""
        return self.path / f"{disk}-{name}{IMAGE_SUFFIX}"

    def disks(self, name: str) -> list[str]:
        """The disks that have an image at restore point `name`."""
        tail = f"-{name}{IMAGE_SUFFIX}"
        return sorted(p.name[: -len(tail)] for p in self.path.iterdir()
                      if p.name.endswith(tail) and len(p.name) > len(tail))

    def chains(self) -> list[Chain]:
        """Every chain list, oldest first; the current `chain` is last."""
        found = []
        for p in self.path.iterdir():
            if p.name == CHAIN or (p.name.startswith(CHAIN + ".") and not p.name.endswith(
                    (DELETING, ".tmp"))):
                names = p.read_text().split()
                if not names:
                    raise StoreError(f"{p}: an empty chain list")
                if len(set(names)) != len(names):
                    raise StoreError(f"{p}: a restore point listed twice")
                found.append(Chain(p, names))
        found.sort(key=lambda c: (c.path.name == CHAIN, c.names[0]))
        return found

    @contextlib.contextmanager
    def locked(self, exclusive: bool) -> Iterator[None]:
        """Hold the store's lock; StoreError at once if another tool holds it."""
        lock = self.path / LOCK
        if not exclusive and not lock.exists():
            yield  # a read-only check creates nothing
            return
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StoreError(f"{self.path}: in use by another vcfs-backup, vcfs-prune or "
                                 "vcfs-verify") from None
            yield
        finally:
            os.close(fd)


def open_store(path: str | Path) -> Store:
    """The store at `path`; StoreError if it is not one."""
    p = Path(path)
    if not p.is_dir():
        raise StoreError(f"{p}: no such directory")
    if not (p / CHAIN).is_file():
        raise StoreError(f"{p}: not a backup store (no chain file)")
    return Store(p.absolute())


# --- prune -------------------------------------------------------------------------------------


def _check_link(store: Store, disk: str, older: str, newer: str) -> None:
    """Refuse to merge unless `newer`'s image of `disk` is backed by `older`'s (or is full)."""
    top = store.image(disk, newer)
    base = store.image(disk, older)
    backing = backing_of(top)
    if base.exists() and backing != base.name:
        raise StoreError(f"{top.name}: backing file {backing!r}, expected {base.name!r}")
    if not base.exists() and backing is not None:
        raise StoreError(f"{top.name}: its backing file {backing} is missing")


def _refuse_in_use(files: list[Path]) -> None:
    for f in files:
        if f.exists() and in_use(f):
            raise StoreError(f"{f}: open in another process (a VM on an instant-recovery "
                             "overlay? make it permanent or stop it first)")


def _merge_disk(store: Store, disk: str, older: str, newer: str, recovering: bool) -> None:
    """Fold `older`'s image of `disk` into `newer`'s; idempotent, so a rerun finishes it."""
    base, top = store.image(disk, older), store.image(disk, newer)
    top_sum = top.with_name(top.name + SUM_SUFFIX)
    new_sum = top.with_name(top_sum.name + NEW_SUFFIX)
    if base.exists():
        if recovering:
            # A commit killed half-way leaves at worst leaked clusters in the base (QEMU writes
            # refcounts before the L2 entries that use them): reclaim them, refuse worse.
            r = _qemu_img("check", "-q", "-f", "qcow2", "-r", "leaks", base, check=False)
            if r.returncode not in (0, 3):
                raise StoreError(f"{base.name}: damaged, cannot finish merging it: "
                                 f"{(r.stderr or r.stdout).strip()}")
        # -d: the incremental is left as is, so until the rename below it alone still answers
        # for `newer` wherever it has clusters, and `base` holds `newer`'s content elsewhere.
        # Images copied from the mount are read-only (0400): commit needs to write the base.
        mode = base.stat().st_mode & 0o7777
        base.chmod(mode | 0o200)
        _qemu_img("commit", "-q", "-f", "qcow2", "-d", top)
        base.chmod(mode)
        _fsync_file(base)
        _step(f"commit {disk}")
        _write_atomic(new_sum, sha256sum.line(sha256_of(base), top.name))
        _step(f"checksum {disk}")
        os.replace(base, top)  # every later incremental's backing name now opens the merge
        _fsync_dir(store.path)
        _step(f"rename {disk}")
    if new_sum.exists():
        # Written, complete, before the rename above: it is the merged image's checksum.
        os.replace(new_sum, top_sum)
        _fsync_dir(store.path)
    _step(f"merged {disk}")


def _finish_merge(store: Store, older: str, newer: str, recovering: bool) -> None:
    # The chain is found by content, not by file name: vcfs-backup may have started a new chain
    # (renaming `chain`) since the journal was written.
    for c in store.chains():
        if c.names[:2] == [older, newer]:
            _write_atomic(c.path, "".join(n + "\n" for n in c.names[1:]))
    _step("unlist")
    for disk in store.disks(newer):
        _merge_disk(store, disk, older, newer, recovering)
    for disk in store.disks(newer):
        store.path.joinpath(f"{disk}-{older}{IMAGE_SUFFIX}{SUM_SUFFIX}").unlink(missing_ok=True)
    for disk in store.disks(older):
        # A disk the domain no longer had at `newer`: nothing later builds on its image.
        image = store.image(disk, older)
        image.with_name(image.name + SUM_SUFFIX).unlink(missing_ok=True)
        image.unlink()
    _step("cleanup")
    (store.path / JOURNAL).unlink()
    _fsync_dir(store.path)


def _delete_chain(store: Store, listed: Path) -> None:
    """Delete every file of the chain whose list is `listed` (renamed to *.deleting first)."""
    names = listed.read_text().split()
    for name in names:
        for disk in store.disks(name):
            image = store.image(disk, name)
            for f in (image.with_name(image.name + SUM_SUFFIX + NEW_SUFFIX),
                      image.with_name(image.name + SUM_SUFFIX), image):
                if f.exists():
                    f.unlink()
                    _step("delete-file")
    listed.unlink()
    _fsync_dir(store.path)


def recover(store: Store, say: Callable[[str], None]) -> None:
    """Finish what a killed vcfs-prune left: chains being deleted, a merge under way."""
    for listed in sorted(store.path.glob(f"{CHAIN}.*{DELETING}")):
        _delete_chain(store, listed)
        say(f"finished deleting {listed.name[: -len(DELETING)]}")
    journal = store.path / JOURNAL
    if journal.exists():
        words = journal.read_text().split()
        if len(words) != 2:
            raise StoreError(f"{journal}: not a merge journal: {journal.read_text()!r}")
        older, newer = words
        _refuse_in_use([store.image(d, n) for n in (older, newer) for d in store.disks(n)])
        _finish_merge(store, older, newer, recovering=True)
        say(f"finished merging {older} into {newer}")


def prune(path: str | Path, keep: int, say: Callable[[str], None] = print) -> list[str]:
    """Keep the newest `keep` restore points of the store at `path`; return the points kept.

    Earlier chains go first, wholly (their list is renamed `*.deleting` before any file goes);
    then the oldest points of the chain that keeps some are merged one by one into the next.
    """
    if keep < 1:
        raise StoreError(f"{keep}: the number of restore points to keep must be at least 1")
    store = open_store(path)
    with store.locked(exclusive=True):
        recover(store, say)
        chains = store.chains()
        points = [n for c in chains for n in c.names]
        drop = len(points) - keep
        if drop <= 0:
            say(f"{len(points)} restore points in {store.path}: nothing to prune")
            return points
        plan: list[tuple[Chain, int]] = []  # (chain, how many of its oldest points go)
        left = drop
        for c in chains:
            if left == 0:
                break
            plan.append((c, min(left, len(c.names))))
            left -= plan[-1][1]
        # Everything is checked before anything changes: a chain that is not what it says, or
        # an image a VM has open, and nothing is pruned.
        touched: list[Path] = []
        for c, n in plan:
            touched += [store.image(d, name) for name in c.names[: n + 1]
                        for d in store.disks(name)]
            if n < len(c.names):
                for older, newer in zip(c.names[:n], c.names[1 : n + 1], strict=True):
                    for disk in store.disks(newer):
                        _check_link(store, disk, older, newer)
        _refuse_in_use(touched)

        for c, n in plan:
            if n == len(c.names):
                deleting = c.path.with_name(c.path.name + DELETING)
                os.replace(c.path, deleting)
                _fsync_dir(store.path)
                _step("unlist-chain")
                _delete_chain(store, deleting)
                say(f"deleted the earlier chain {c.names[0]} … {c.names[-1]}")
                continue
            for older, newer in zip(c.names[:n], c.names[1 : n + 1], strict=True):
                start = time.monotonic()
                _write_atomic(store.path / JOURNAL, f"{older} {newer}\n")
                _step("journal")
                _finish_merge(store, older, newer, recovering=False)
                say(f"merged {older} into {newer} ({time.monotonic() - start:.1f} s)")
        kept = [n for c in store.chains() for n in c.names]
        say(f"kept {len(kept)} restore points in {store.path}: {' '.join(kept)}")
        return kept


# --- verify ------------------------------------------------------------------------------------


@dataclass
class Report:
    """What vcfs-verify found: problems make it fail, notes do not."""

    problems: list[str]
    notes: list[str]
    images: int = 0
    bytes_read: int = 0
    points: int = 0


def verify(path: str | Path) -> Report:
    """Check a whole store: each image's checksum and `qemu-img check`, each chain's links."""
    store = open_store(path)
    report = Report([], [])
    bad = report.problems.append
    with store.locked(exclusive=False):
        if (store.path / JOURNAL).exists():
            bad(f"{store.path / JOURNAL}: a prune was interrupted; run vcfs-prune to finish it")
        for listed in store.path.glob(f"{CHAIN}.*{DELETING}"):
            bad(f"{listed}: a prune was interrupted; run vcfs-prune to finish it")
        listed_images: set[str] = set()
        for c in store.chains():
            for i, name in enumerate(c.names):
                report.points += 1
                disks = store.disks(name)
                if not disks:
                    bad(f"{c.path.name}: restore point {name} has no image")
                for disk in disks:
                    image = store.image(disk, name)
                    listed_images.add(image.name)
                    try:
                        backing = backing_of(image)
                    except StoreError as e:
                        bad(f"{image.name}: unreadable: {e}")
                        continue
                    prev = store.image(disk, c.names[i - 1]).name if i else None
                    if backing is None:
                        continue  # a full image (a disk new to the chain may start one)
                    if backing != prev:
                        bad(f"{image.name}: backing file {backing}, but {c.path.name} has "
                            f"{prev or 'nothing'} before it")
                    elif not (store.path / backing).is_file():
                        bad(f"{image.name}: its backing file {backing} is missing")
        images = sorted(p for p in store.path.iterdir() if p.name.endswith(IMAGE_SUFFIX))
        for image in images:
            report.images += 1
            if image.name not in listed_images:
                report.notes.append(f"{image.name}: in no chain list")
            _verify_image(image, report)
        for s in store.path.glob(f"*{IMAGE_SUFFIX}{SUM_SUFFIX}"):
            if not s.with_name(s.name[: -len(SUM_SUFFIX)]).exists():
                bad(f"{s.name}: a checksum of a missing image")
    return report


def _verify_image(image: Path, report: Report) -> None:
    bad = report.problems.append
    sums = image.with_name(image.name + SUM_SUFFIX)
    if not sums.exists():
        bad(f"{image.name}: no checksum file {sums.name}")
    else:
        try:
            digest, named = sha256sum.parse(sums.read_text())
        except ValueError as e:
            bad(f"{sums.name}: {e}")
        else:
            if named != image.name:
                bad(f"{sums.name}: names {named}, not {image.name}")
            report.bytes_read += image.stat().st_size
            if sha256_of(image) != digest:
                bad(f"{image.name}: checksum mismatch: the image changed after it was saved")
    r = _qemu_img("check", "-U", "-q", "-f", "qcow2", image, check=False)
    if r.returncode != 0:
        msg = " ".join((r.stderr + r.stdout).split()) or f"exit status {r.returncode}"
        bad(f"{image.name}: qemu-img check: {msg}")


# --- command line ------------------------------------------------------------------------------


def _fail(prog: str, message: str, status: int = 1) -> int:
    print(f"{prog}: {message}", file=sys.stderr)
    return status


def prune_main(argv: list[str] | None = None) -> int:
    """`vcfs-prune DESTDIR N`: keep the newest N restore points of a store."""
    p = argparse.ArgumentParser(prog="vcfs-prune", description=(
        "Keep the newest N restore points of a store saved by vcfs-backup: older points are "
        "merged into the next one (earlier chains deleted), every later point stays "
        "restorable. Killed at any step, the next run finishes the job."))
    p.add_argument("destdir", help="the store (vcfs-backup's DESTDIR)")
    p.add_argument("keep", metavar="N", help="how many restore points to keep (at least 1)")
    args = p.parse_args(argv)
    try:
        keep = int(args.keep)
    except ValueError:
        return _fail("vcfs-prune", f"{args.keep!r}: not a number of restore points", 2)
    try:
        prune(args.destdir, keep, lambda line: print(line, flush=True))
    except (StoreError, OSError) as e:
        return _fail("vcfs-prune", str(e))
    return 0


def verify_main(argv: list[str] | None = None) -> int:
    """`vcfs-verify DESTDIR`: check every image, checksum and chain link of a store."""
    p = argparse.ArgumentParser(prog="vcfs-verify", description=(
        "Check a store saved by vcfs-backup: every image against its .sha256 file, with "
        "qemu-img check, and every chain link names an image that is there. Exit 0 when all "
        "is well, 1 listing each problem."))
    p.add_argument("destdir", help="the store (vcfs-backup's DESTDIR)")
    args = p.parse_args(argv)
    start = time.monotonic()
    try:
        report = verify(args.destdir)
    except (StoreError, OSError) as e:
        return _fail("vcfs-verify", str(e))
    for note in report.notes:
        print(f"vcfs-verify: note: {note}", file=sys.stderr)
    for problem in report.problems:
        print(f"vcfs-verify: {problem}", file=sys.stderr)
    verdict = "FAILED" if report.problems else "ok"
    print(f"{verdict}: {report.images} images, {report.points} restore points, "
          f"{report.bytes_read} bytes checked in {time.monotonic() - start:.1f} s"
          + (f", {len(report.problems)} problems" if report.problems else ""))
    return 1 if report.problems else 0


def main(argv: list[str] | None = None) -> int:
    """`python -m vcfs.store prune|verify …`, for when the console scripts are not installed."""
    args = sys.argv[1:] if argv is None else argv
    commands = {"prune": prune_main, "verify": verify_main}
    if not args or args[0] not in commands:
        return _fail("vcfs.store", "usage: python -m vcfs.store prune|verify ARGS", 2)
    return commands[args[0]](args[1:])


if __name__ == "__main__":
    sys.exit(main())
