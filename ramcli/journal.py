"""Writing into the user's own files (a photo, their sidecar) under a redo journal.

A rename would give such a file a new inode and so drop its hard links, extended attributes
(KDE/Baloo and Finder tags), ACLs, SELinux label and owner. So the new content is copied *into*
the existing file (`ramcli.inplace`), under a redo journal: the new content and a record naming
its target are made durable first, then the target is overwritten in place, then the record goes.
A record that a dead process left behind is replayed (the copy done again; idempotent) when the
next journal opens, before anything else writes. After a kill at any moment a target is
therefore either its old self, untouched (no record yet), or, once replayed, its new self, whole.

The new content is fsynced before its record is written (else a crash could replay garbage).
The targets are fsynced, and the record retired, in a background thread while the caller goes
on: the record only has to outlive the targets' own flush, and the disk then flushes one batch
while ExifTool works on the next.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ramcli import inplace
from ramcli.fileio import atomic_write, fsync_dir, lock_file

# fsync waits on the disk, not on Python: a few at once let the file system merge their flushes.
_SYNC_THREADS = 8


@dataclass(frozen=True)
class Change:
    """New content for one file: `data` (a file inside the journal's batch folder) goes into
    `target`. `create`: the target is new (written with `atomic_write(exclusive=True)`); else it
    is overwritten in place. `mtime_ns`: the modification time to give it afterwards (None: now)."""

    target: str
    data: str
    create: bool = False
    mtime_ns: int | None = None


@dataclass(frozen=True)
class Waiting:
    """A target of a record that could not be completed yet, and why: no commit writes it until
    a journal completes that record."""

    target: str
    inode: tuple[int, int] | None  # None: a file to create
    reason: str


class Journal:
    """The redo journal of one process, in `root` (shared by every ramcli process of a home).

    `root/<session>/` belongs to one open journal, which holds an exclusive lock on its `lock` file
    as long as it lives; a session whose lock can be taken belongs to a dead process and is
    replayed, then removed, by the next journal that opens (a record that cannot be replayed yet
    stays, with its new contents, for the journal after). A global `root/lock` keeps a replay
    from meeting a session that is still being set up.

    `waiting`: the targets of records not completed yet (see `Waiting`)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._batches = itertools.count(1)
        self._retirer = ThreadPoolExecutor(1, thread_name_prefix="ramcli-journal")
        self._retiring: list[Future] = []
        self.waiting: list[Waiting] = []
        with open(self.root / "lock", "a") as guard:
            lock_file(guard)
            self.replayed = self._replay_abandoned()
            self.folder = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=self.root))
            self._lock = open(self.folder / "lock", "w")
            lock_file(self._lock)

    def close(self) -> None:
        """Wait for every batch to be flushed, remove this session and release it; a session with
        an interrupted batch is only released, so that the next journal completes that batch."""
        if self._lock.closed:
            return
        self._retirer.shutdown(wait=True)
        for job in self._retiring:
            job.result()
        if not any(self.folder.glob("b*.json")):
            shutil.rmtree(self.folder, ignore_errors=True)
        self._lock.close()

    @property
    def waiting_targets(self) -> set[str]:
        return {w.target for w in self.waiting}

    def new_batch(self) -> Path:
        """A fresh folder for the new contents of one batch."""
        folder = self.folder / f"b{next(self._batches):06d}"
        folder.mkdir()
        return folder

    def commit(self, batch: Path, changes: Sequence[Change]) -> dict[str, str | None]:
        """Put every change of a batch into its target. Per target: None (done), or why not.

        A target that cannot be opened for writing, that waits for an earlier record, or whose
        new content does not fit on its disk is reported and left untouched, as are all of them
        when the new contents or the record cannot be made durable; every other one is
        journalled, then written. A write cut short all the same (an I/O error) keeps the
        journal record, so the next journal completes it; it is reported as 'interrupted'."""
        results: dict[str, str | None] = {}
        opened: list[tuple[Change, int | None]] = []
        for change in changes:
            fd = None
            if not change.create:
                try:
                    fd = os.open(change.target, os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0))
                except OSError as exc:
                    results[change.target] = f"cannot write: {_reason(exc)}"
                    continue
            waits = self._waits_for(change, fd)
            if waits:
                results[change.target] = (f"not written: an earlier ramcli write into it waits to be completed "
                                          f"({waits.reason}); run ramcli again once that is fixed")
                if fd is not None:
                    os.close(fd)
                continue
            opened.append((change, fd))
        if not opened:
            return results
        ready: list[tuple[Change, int | None]] = []
        try:
            with ThreadPoolExecutor(_SYNC_THREADS) as pool:
                list(pool.map(_fsync_file, [c.data for c, _ in opened]))
            fsync_dir(batch)
            for change, fd in opened:
                try:
                    if fd is not None:
                        inplace.reserve(fd, os.path.getsize(change.data))
                except OSError as exc:
                    results[change.target] = f"not written: {_reason(exc)} (the file is unchanged)"
                else:
                    ready.append((change, fd))
            record = batch.with_suffix(".json")
            if ready:
                atomic_write(record, json.dumps([_to_record(c, fd) for c, fd in ready]).encode())
        except OSError as exc:  # the journal's own disk: no target was touched
            ready = []
            results.update({c.target: f"not written: cannot journal it ({_reason(exc)}); the file is unchanged"
                            for c, _ in opened})
        except BaseException:
            _close(fd for _, fd in opened)
            raise
        ready_fds = {fd for _, fd in ready}
        _close(fd for _, fd in opened if fd not in ready_fds)
        if not ready:
            return results
        try:
            with ThreadPoolExecutor(_SYNC_THREADS) as pool:
                done = list(pool.map(lambda item: _apply(*item), ready))
        except BaseException:
            _close(ready_fds)
            raise
        interrupted = []
        for (change, fd), why in zip(ready, done):
            if why is None:
                results[change.target] = None
            elif fd is None:
                results[change.target] = f"cannot create it: {why}"
            else:
                results[change.target] = f"interrupted ({why}); the next ramcli run completes it"
                interrupted.append((change, fd))
                self.waiting.append(Waiting(change.target, _identity(fd), why))
        fds = [fd for _, fd in ready if fd is not None]
        if interrupted:
            _keep_only(record, interrupted, [fd for (_, fd), why in zip(ready, done) if fd is not None and not why])
            _close(fds)
        else:
            self._retiring = [job for job in self._retiring if not job.done() or job.exception()]
            self._retiring.append(self._retirer.submit(_retire, record, batch, fds))
        return results

    def _waits_for(self, change: Change, fd: int | None) -> Waiting | None:
        """The kept record this change would overtake, if any (by inode: a hard link is the same file)."""
        if not self.waiting:
            return None
        inode = _identity(fd) if fd is not None else None
        return next((w for w in self.waiting if w.target == change.target or (inode and w.inode == inode)), None)

    def _replay_abandoned(self) -> int:
        """Complete the batches of sessions whose process died; the number of files rewritten.
        Entries that cannot be completed now stay in their (rewritten) record, with their new
        contents; everything else of such a session goes."""
        rewritten = 0
        for session in sorted(p for p in self.root.iterdir() if p.is_dir()):
            try:
                lock = open(session / "lock", "a")
            except OSError:
                continue
            with lock:
                try:
                    lock_file(lock, wait=False)
                except OSError:
                    continue  # alive
                kept: list[Path] = []
                for record in sorted(session.glob("b*.json")):
                    done, left = _replay(record)
                    rewritten += done
                    if left:
                        kept += [record, record.with_suffix("")]
                        with contextlib.suppress(OSError):  # else the whole record stays: replays are idempotent
                            atomic_write(record, json.dumps([entry for entry, _ in left]).encode())
                        self.waiting += [_waiting(entry, why) for entry, why in left]
                if not kept:
                    shutil.rmtree(session, ignore_errors=True)
                    continue
                for path in session.iterdir():  # a dead run's workspace links, finished batches
                    if path not in kept and path.name != "lock":
                        _remove(path)
        return rewritten


def _to_record(change: Change, fd: int | None) -> dict:
    """A journal record: the target as bytes (any file name), and the inode it must still be."""
    st = os.fstat(fd) if fd is not None else None
    return {
        "target": base64.b64encode(os.fsencode(change.target)).decode(),
        "data": os.path.basename(change.data),
        "create": change.create,
        "mtime_ns": change.mtime_ns,
        "inode": [st.st_dev, st.st_ino] if st else None,
    }


def _replay(record: Path) -> tuple[int, list[tuple[dict, str]]]:
    """Redo one batch record: how many targets were rewritten or created, and the entries that
    cannot be redone now (the disk is full), each with why. A target that is gone, another file
    now, or not writable any more is left as it is."""
    done, left = 0, []
    for entry in json.loads(record.read_text()):
        target = os.fsdecode(base64.b64decode(entry["target"]))
        data = record.with_suffix("") / entry["data"]
        if not data.exists():
            continue  # the batch finished and was being cleaned up
        if entry["create"]:
            if os.path.lexists(target):
                continue
            try:
                atomic_write(target, data.read_bytes(), exclusive=True)
                done += 1
            except FileExistsError:
                pass
            except OSError as exc:
                left.append((entry, _reason(exc)))
            continue
        try:
            fd = os.open(target, os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            continue
        try:
            st = os.fstat(fd)
            if [st.st_dev, st.st_ino] != entry["inode"]:
                continue  # not the file the record names any more
            inplace.write_into(fd, data)
            if entry["mtime_ns"] is not None:
                os.utime(fd, ns=(st.st_atime_ns, entry["mtime_ns"]))
            done += 1
        except OSError as exc:
            left.append((entry, _reason(exc)))
        finally:
            os.close(fd)
    return done, left


def _waiting(entry: dict, reason: str) -> Waiting:
    target = os.fsdecode(base64.b64decode(entry["target"]))
    return Waiting(target, None if entry["create"] else tuple(entry["inode"]), reason)


def _identity(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def _reason(exc: OSError) -> str:
    return (exc.strerror or str(exc)).lower()


def _close(fds) -> None:
    for fd in fds:
        if fd is not None:
            os.close(fd)


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def _apply(change: Change, fd: int | None) -> str | None:
    """Put one change into place: None, or why not (in place: why the copy was cut short)."""
    if change.create:
        try:
            with open(change.data, "rb") as fh:
                atomic_write(change.target, fh.read(), exclusive=True)
        except FileExistsError:
            return "a file of that name appeared meanwhile"
        except OSError as exc:
            return _reason(exc)
        return None
    try:
        atime = os.fstat(fd).st_atime_ns
        inplace.write_into(fd, change.data, sync=False)  # flushed by `_retire`
        if change.mtime_ns is not None:
            os.utime(fd, ns=(atime, change.mtime_ns))
    except OSError as exc:
        return _reason(exc)
    return None


def _keep_only(record: Path, interrupted: list[tuple[Change, int]], finished: list[int]) -> None:
    """After an interrupted copy: flush the targets that were finished, and leave in the record
    only what the next journal must complete (not a new file that could not be created, which
    was reported as not written). If that fails, the whole record stays for the next journal."""
    with contextlib.suppress(OSError):
        for fd in finished:
            os.fsync(fd)
        atomic_write(record, json.dumps([_to_record(c, fd) for c, fd in interrupted]).encode())


def _retire(record: Path, batch: Path, fds: list[int]) -> None:
    """Flush a batch's targets, then drop its record and new contents: from now on the targets
    themselves hold the batch."""
    try:
        with ThreadPoolExecutor(_SYNC_THREADS) as pool:
            list(pool.map(os.fsync, fds))
    finally:
        for fd in fds:
            os.close(fd)
    os.unlink(record)
    shutil.rmtree(batch, ignore_errors=True)


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
