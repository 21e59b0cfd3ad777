"""Writing a file whole or not at all, so that a kill or a crash never leaves half of one.

For a file ramcli makes (a new sidecar, a cache, a journal record) `atomic_write(path, data)`,
and for one a library writes by name (a model file, a checkpoint, a shard) `atomic_output(path)`:
the bytes go to a temporary file in the same folder, are fsynced, and the temporary file is
renamed to the final name (`exclusive=True`: linked, so that a file which appeared meanwhile is
never replaced). Readers see the old file or the new one, never a part of one.

A file the user owns is never replaced this way (a rename gives it a new inode):
`ramcli.journal` copies new content into it in place. `lock_file` is the one file lock (the
journal's, and the private folders of ramcli.models.scratch).
"""

from __future__ import annotations

import contextlib
import os
import tempfile

try:
    import fcntl

    def lock_file(fh, wait: bool = True) -> None:
        """An exclusive lock on an open file, held until it is closed; OSError if `wait` is False
        and another process holds it."""
        fcntl.flock(fh, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
except ImportError:  # Windows
    import msvcrt

    def lock_file(fh, wait: bool = True) -> None:
        msvcrt.locking(fh.fileno(), msvcrt.LK_LOCK if wait else msvcrt.LK_NBLCK, 1)


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
