"""Writing files so that a kill or a crash never leaves half of one.

Two ways to put new bytes into a file, for two kinds of file:

- `atomic_write(path, data)` for a file ramcli makes (a new sidecar, a cache, a journal record),
  and `atomic_output(path)` for one a library writes by name (a model file, a checkpoint, a
  shard): the bytes go to a temporary file in the same folder, are fsynced, and the temporary
  file is renamed to the final name (`exclusive=True`: linked, so that a file which appeared
  meanwhile is never replaced). Readers see the old file or the new one, never a part of one.
- `Journal` for a file the user owns (a photo, their sidecar): a rename would give it a new inode
  and so drop its hard links, extended attributes (KDE/Baloo and Finder tags), ACLs, SELinux label
  and owner. So the new content is copied *into* the existing file, under a redo journal: the new
  content and a record naming its target are made durable first, then the target is overwritten
  in place, then the record goes. A record that a dead process left behind is replayed (the copy
  done again; idempotent) when the next journal opens, before anything else writes. After a kill
  at any moment a target is therefore either its old self, untouched (no record yet), or, once
  replayed, its new self, whole.

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

try:
    import fcntl

    def _lock(fh, wait: bool = True) -> None:
        """An exclusive lock on an open file, held until it is closed; OSError if `wait` is False
        and another process holds it."""
        fcntl.flock(fh, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
except ImportError:  # Windows
    import msvcrt

    def _lock(fh, wait: bool = True) -> None:
        msvcrt.locking(fh.fileno(), msvcrt.LK_LOCK if wait else msvcrt.LK_NBLCK, 1)

_COPY_CHUNK = 1 << 20
# fsync waits on the disk, not on Python: a few at once let the file system merge their flushes.
_SYNC_THREADS = 8


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Read once: setting the umask to read it is not safe while other threads create files.
_UMASK = _read_umask()


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename or unlink in `folder` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, exclusive: bool = False, mode: int = 0o666):
    """A temporary file name beside `path`, for writers that want a name (torch.save, safetensors,
    tar writers). When the block ends normally the file is fsynced and renamed to `path`, so
    readers see the old file or the new one, never a part of one; on an error it is removed.

    `exclusive`: fail with FileExistsError instead of replacing a file that exists (then nothing
    is left behind)."""
    path = os.fspath(path)
    folder = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=".ramcli-", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDWR)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, mode & ~_UMASK)
        if exclusive:
            os.link(tmp, path)  # no-clobber, unlike rename
            os.unlink(tmp)
        else:
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(folder)


def atomic_write(path: str | os.PathLike, data: bytes, exclusive: bool = False, mode: int = 0o666) -> None:
    """Write `data` to `path` whole or not at all (temporary file, fsync, rename, fsync folder)."""
    with atomic_output(path, exclusive, mode) as tmp, open(tmp, "wb") as fh:
        fh.write(data)


def write_into(fd: int, source: str | os.PathLike, sync: bool = True) -> int:
    """Overwrite the open file `fd` with the content of `source`, in place (same inode), fsynced
    unless `sync` is False. Returns the new size."""
    size = 0
    os.lseek(fd, 0, os.SEEK_SET)
    with open(source, "rb") as src:
        while chunk := src.read(_COPY_CHUNK):
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view):]
            size += len(chunk)
    os.ftruncate(fd, size)
    if sync:
        os.fsync(fd)
    return size


@dataclass(frozen=True)
class Change:
    """New content for one file: `data` (a file inside the journal's batch folder) goes into
    `target`. `create`: the target is new (written with `atomic_write(exclusive=True)`); else it
    is overwritten in place. `mtime_ns`: the modification time to give it afterwards (None: now)."""

    target: str
    data: str
    create: bool = False
    mtime_ns: int | None = None


class Journal:
    """The redo journal of one process, in `root` (shared by every ramcli process of a home).

    `root/<session>/` belongs to one open journal, which holds an exclusive lock on its `lock` file
    as long as it lives; a session whose lock can be taken belongs to a dead process and is
    replayed, then removed, by the next journal that opens. A global `root/lock` keeps a replay
    from meeting a session that is still being set up."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._batches = itertools.count(1)
        self._retirer = ThreadPoolExecutor(1, thread_name_prefix="ramcli-journal")
        self._retiring: list[Future] = []
        with open(self.root / "lock", "a") as guard:
            _lock(guard)
            self.replayed = self._replay_abandoned()
            self.folder = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=self.root))
            self._lock = open(self.folder / "lock", "w")
            _lock(self._lock)

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

    def new_batch(self) -> Path:
        """A fresh folder for the new contents of one batch."""
        folder = self.folder / f"b{next(self._batches):06d}"
        folder.mkdir()
        return folder

    def commit(self, batch: Path, changes: Sequence[Change]) -> dict[str, str | None]:
        """Put every change of a batch into its target. Per target: None (done), or why not.

        A target that cannot be opened for writing is reported and left untouched; every other
        one is journalled, then written. A write cut short by an error (a full disk) keeps the
        journal record, so the next journal completes it; it is reported as 'interrupted'."""
        results: dict[str, str | None] = {}
        opened: list[tuple[Change, int | None]] = []
        for change in changes:
            if change.create:
                opened.append((change, None))
                continue
            try:
                fd = os.open(change.target, os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0))
            except OSError as exc:
                results[change.target] = f"cannot write: {(exc.strerror or str(exc)).lower()}"
                continue
            opened.append((change, fd))
        if not opened:
            return results
        try:
            with ThreadPoolExecutor(_SYNC_THREADS) as pool:
                list(pool.map(_fsync_file, [c.data for c, _ in opened]))
            fsync_dir(batch)
            record = batch.with_suffix(".json")
            atomic_write(record, json.dumps([_to_record(c, fd) for c, fd in opened]).encode())
            with ThreadPoolExecutor(_SYNC_THREADS) as pool:
                done = list(pool.map(lambda item: _apply(*item), opened))
        except BaseException:
            for _, fd in opened:
                if fd is not None:
                    os.close(fd)
            raise
        results.update({c.target: error for (c, _), error in zip(opened, done)})
        fds = [fd for _, fd in opened if fd is not None]
        if any(error and error.startswith("interrupted") for error in done):
            for fd in fds:
                os.close(fd)  # the record stays for the next journal
        else:
            self._retiring = [job for job in self._retiring if not job.done() or job.exception()]
            self._retiring.append(self._retirer.submit(_retire, record, batch, fds))
        return results

    def _replay_abandoned(self) -> int:
        """Complete the batches of sessions whose process died; the number of files rewritten."""
        rewritten = 0
        for session in sorted(p for p in self.root.iterdir() if p.is_dir()):
            try:
                lock = open(session / "lock", "a")
            except OSError:
                continue
            with lock:
                try:
                    _lock(lock, wait=False)
                except OSError:
                    continue  # alive
                for record in sorted(session.glob("b*.json")):
                    rewritten += _replay(record)
                shutil.rmtree(session, ignore_errors=True)
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


def _replay(record: Path) -> int:
    """Redo one batch record; returns how many targets were rewritten or created."""
    done = 0
    for entry in json.loads(record.read_text()):
        target = os.fsdecode(base64.b64decode(entry["target"]))
        data = record.with_suffix("") / entry["data"]
        if not data.exists():
            continue  # the batch finished and was being cleaned up
        with contextlib.suppress(OSError):  # a target that is gone or unwritable now is left as it is
            if entry["create"]:
                if not os.path.lexists(target):
                    atomic_write(target, data.read_bytes(), exclusive=True)
                    done += 1
                continue
            fd = os.open(target, os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0))
            try:
                st = os.fstat(fd)
                if [st.st_dev, st.st_ino] == entry["inode"]:  # still the file the record names
                    write_into(fd, data)
                    if entry["mtime_ns"] is not None:
                        os.utime(fd, ns=(st.st_atime_ns, entry["mtime_ns"]))
                    done += 1
            finally:
                os.close(fd)
    return done


def _apply(change: Change, fd: int | None) -> str | None:
    if change.create:
        try:
            with open(change.data, "rb") as fh:
                atomic_write(change.target, fh.read(), exclusive=True)
        except FileExistsError:
            return "cannot create it: a file of that name appeared meanwhile"
        except OSError as exc:
            return f"cannot create it: {(exc.strerror or str(exc)).lower()}"
        return None
    try:
        atime = os.fstat(fd).st_atime_ns
        write_into(fd, change.data, sync=False)  # flushed by `_retire`
        if change.mtime_ns is not None:
            os.utime(fd, ns=(atime, change.mtime_ns))
    except OSError as exc:
        return f"interrupted ({(exc.strerror or str(exc)).lower()}); the next ramcli run completes it"
    return None


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
