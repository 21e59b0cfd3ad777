"""Which photos were deleted, moved or are only out of reach, for `ramcli watch`.

Only a deleted photo's records may be forgotten (`is_deleted`): a photo on a drive that is
unplugged keeps them, or `untag` would take ramcli's keywords for the user's once the drive is
back. A photo that vanished from one path and appears at another with the same size, mtime and
image data was renamed (`Deletions.renamed`) and is re-pointed without the model.
"""

from __future__ import annotations

import os
import stat
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from ramcli.media.discover import Found
from ramcli.tagging.listener import Summary

if TYPE_CHECKING:
    from ramcli.library.index import PhotoRecord


def is_deleted(path: str, mount_points: Iterable[str] = (), reported: bool = False) -> bool:
    """Whether the photo at `path` was deleted, rather than being out of reach (a drive that is
    unplugged, a share that is down): only a deleted photo's records may be forgotten, or `untag`
    would take ramcli's keywords for the user's once the drive is back.

    Out of reach: the path cannot be looked at (an I/O or permission error), a folder that a
    drive was mounted on is missing, or the nearest folder on the way that still exists cannot
    be read or is empty (what a drive's folder looks like while the drive is away). `reported`:
    the OS reported this very file gone (a drive that goes away reports no files), so being
    not there is enough."""
    try:
        os.lstat(path)
        return False
    except (FileNotFoundError, NotADirectoryError):
        pass
    except OSError:
        return False
    if any(path.startswith(m.rstrip(os.sep) + os.sep) and not os.path.lexists(m) for m in mount_points):
        return False
    if reported:
        return True
    folder = os.path.dirname(path)
    while True:
        try:
            st = os.stat(folder)
            break
        except (FileNotFoundError, NotADirectoryError):
            if os.path.dirname(folder) == folder:
                return False
            folder = os.path.dirname(folder)
        except OSError:
            return False
    if not stat.S_ISDIR(st.st_mode):
        return True  # a folder replaced by a file
    try:
        with os.scandir(folder) as entries:
            return next(entries, None) is not None
    except OSError:
        return False


def mount_points_under(root: Path) -> set[str]:
    """Folders under `root` on another device than their parent (symlinks not followed)."""
    found = set()
    try:
        stack = [(str(root), os.stat(root).st_dev)]
    except OSError:
        return found
    while stack:
        folder, device = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = list(it)
        except OSError:
            continue
        for entry in entries:
            try:
                if not entry.is_dir(follow_symlinks=False):
                    continue
                dev = entry.stat(follow_symlinks=False).st_dev
            except OSError:
                continue
            if dev != device:
                found.add(entry.path)
            stack.append((entry.path, dev))
    return found


class Deletions:
    """The index's view of paths that the OS reported gone, or that the catch-up pass looks at:
    `mount_points`, the drives' folders under the watched ones (see `watch.MountPoints`)."""

    def __init__(self, index, mount_points: Iterable[str] = ()):
        self.index, self.mount_points = index, set(mount_points)

    def vanished(self, paths: Iterable[str]) -> list[PhotoRecord]:
        """Index records at or under these paths whose files were deleted (`is_deleted`); a
        record at a path that the OS reported gone itself counts as deleted once it is not there."""
        index, out, seen = self.index, [], set()
        for path in paths:
            records = [(r, False) for r in index.iter_photos(under=Path(path))]
            if not os.path.lexists(path):
                records += [(r, True) for r in [index.lookup(path)] if r is not None]
            for r, reported in records:
                if r.path not in seen and is_deleted(r.path, self.mount_points, reported=reported):
                    seen.add(r.path)
                    out.append(r)
        return out

    def renamed(self, photos: list[Found], deleted: list[str], summary: Summary) -> list[Found]:
        """Re-point photos that were renamed or moved with their folder: a vanished record with
        the new file's size and mtime (a rename keeps both) and the same image data (a card's
        burst holds different photos of one size and minute). Returns the photos left for the
        incremental rule."""
        index = self.index
        by_stat = defaultdict(list)
        for r in self.vanished(deleted):
            if r.status == "tagged" and r.content_hash:
                by_stat[(r.size, r.mtime_ns)].append(r)
        if not by_stat:
            return photos
        rest = []
        for f in photos:
            candidates = by_stat.get((f.size, f.mtime_ns), [])
            old = _same_image(f, candidates) if candidates and index.lookup(str(f.path)) is None else None
            if old is None:
                rest.append(f)
                continue
            index.move(old.path, str(f.path), f.size, f.mtime_ns)
            candidates.remove(old)
            summary.moved += 1
        return rest

    def forget(self, deleted: list[str], summary: Summary, sweep: bool = False) -> None:
        """Drop the photos of deleted paths from the index. Their write-ledger rows stay while
        the file they describe exists (a RAW's sidecar outlives its photo) and go with it.

        The index and the ledger commit one after the other, so a watcher killed between the
        two leaves rows of photos the index has already forgotten; `sweep` (the catch-up pass)
        looks at every ledger row under the deleted paths, which finds those too."""
        from ramcli.library.ledger import Ledger

        gone = {r.path for r in self.vanished(deleted)}
        if gone:
            forgotten = self.index.prune(exists=lambda p: p not in gone or os.path.lexists(p))
            summary.removed += len(forgotten)
        photos = gone | {p for p in deleted if is_deleted(p, self.mount_points, reported=True)}
        photos |= {p[:-4] for p in photos if p.lower().endswith(".xmp")}  # a deleted IMG.CR2.xmp
        ledger = Ledger(self.index.db)
        rows = [e for entries in ledger.entries_of(sorted(photos)).values() for e in entries]
        if sweep:
            rows += [e for folder in deleted for e in ledger.entries_under(folder)]
        stale = [e for e in rows
                 if self.index.lookup(e.path) is None and is_deleted(e.target, self.mount_points)]
        ledger.forget(stale)


def _same_image(found: Found, candidates: list[PhotoRecord]) -> PhotoRecord | None:
    """The record among `candidates` with the image data of `found` (the one of the same name
    first), or None."""
    from ramcli.media.decode import ImageError, content_hash

    try:
        digest = content_hash(found.path)
    except ImageError:
        return None
    same = sorted((r for r in candidates if r.content_hash == digest),
                  key=lambda r: os.path.basename(r.path) != found.path.name)
    return same[0] if same else None
