"""Overwriting an open file in place, its disk space reserved first.

The new content is copied *into* the file (same inode: its hard links, extended attributes,
ACLs and owner stay), and the space it needs is reserved before a byte changes, so a full disk
fails the copy before it starts, never in its middle.
"""

from __future__ import annotations

import ctypes
import errno
import os

_COPY_CHUNK = 1 << 20
# fallocate(2) mode: allocate the blocks, leave the file's size (and so what readers see) alone.
_FALLOC_FL_KEEP_SIZE = 1


def _find_fallocate():
    """Linux's fallocate(2) from the C library, or None where there is none (macOS, Windows)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except (OSError, TypeError):
        return None
    for name in ("fallocate64", "fallocate"):
        function = getattr(libc, name, None)
        if function is not None:
            function.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
            function.restype = ctypes.c_int
            return function
    return None


_FALLOCATE = _find_fallocate()


def reserve(fd: int, size: int) -> None:
    """Make sure that `size` bytes can be written into the open file `fd` from its start without
    running out of space, changing neither its content nor its size; OSError (ENOSPC, EDQUOT) if
    the space is not there.

    Where the file system can (Linux: ext4, XFS, btrfs, tmpfs), the missing blocks are allocated
    past the end of the file, where no reader sees them and no other program can take them
    (they stay with the file, so a replay after a kill finds them). Elsewhere the free space is
    checked, which another program could still take before the copy (Windows: not checked)."""
    have = os.fstat(fd).st_size
    if size <= have:
        return
    if _FALLOCATE is not None:
        if _FALLOCATE(fd, _FALLOC_FL_KEEP_SIZE, 0, size) == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise OSError(code, os.strerror(code))
    if not hasattr(os, "fstatvfs"):
        return
    free = os.fstatvfs(fd)
    if free.f_bavail * free.f_frsize < size - have:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def write_into(fd: int, source: str | os.PathLike, sync: bool = True) -> int:
    """Overwrite the open file `fd` with the content of `source`, in place (same inode), fsynced
    unless `sync` is False. Returns the new size.

    The space is reserved first (`reserve`): a full disk raises OSError before a byte of `fd`
    changes, never in the middle of the copy."""
    reserve(fd, os.path.getsize(source))
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
