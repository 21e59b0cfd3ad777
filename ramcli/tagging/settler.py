"""Files wait here until they are complete: until their size and mtime have stayed the same
for a while (a copy in progress, a camera import). Deletions wait as long, so that the addition
half of a move is handled first. `ramcli watch` hands the settled files to its pass.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class _Pending:
    size: int
    mtime_ns: int
    since: float  # when this size and mtime were first seen (the settler's clock)


class Settler:
    """Files wait here until their size and mtime have not changed for `settle` seconds;
    deleted paths wait as long and for the files noted with them, so that the addition half of
    a move is handled first."""

    def __init__(self, settle: float, clock: Callable[[], float] = time.monotonic):
        self.settle, self.clock = settle, clock
        self.files: dict[str, _Pending] = {}
        self.deleted: dict[str, float] = {}

    def touch(self, path: str) -> None:
        """Something happened to the file `path`: it settles again from now, unless its size and
        mtime are still those it is waiting with (a look at it again is no change)."""
        self.deleted.pop(path, None)
        try:
            st = os.stat(path)
        except OSError:
            self.files.pop(path, None)
            return
        pending = self.files.get(path)
        if pending is None or (pending.size, pending.mtime_ns) != (st.st_size, st.st_mtime_ns):
            self.files[path] = _Pending(st.st_size, st.st_mtime_ns, self.clock())

    def delete(self, path: str) -> None:
        self.files.pop(path, None)
        self.deleted.setdefault(path, self.clock())

    def next_due(self) -> float | None:
        """When the next file or deletion may be ready (the settler's clock), None if none waits."""
        times = [p.since for p in self.files.values()] + list(self.deleted.values())
        return min(times) + self.settle if times else None

    def ready(self) -> tuple[list[str], list[str]]:
        """(files stable for `settle` seconds, deletions as old), both removed from the waiting."""
        now = self.clock()
        files = []
        for path, pending in list(self.files.items()):
            if now - pending.since < self.settle:
                continue
            try:
                st = os.stat(path)
            except OSError:
                del self.files[path]  # gone meanwhile: its deletion event follows
                continue
            if (st.st_size, st.st_mtime_ns) != (pending.size, pending.mtime_ns):
                self.files[path] = _Pending(st.st_size, st.st_mtime_ns, now)
                continue
            del self.files[path]
            files.append(path)
        # A deletion waits for the files that were waiting when it was due: the addition half
        # of a move is noted a moment after it. A file that keeps changing stops holding it up.
        held_until = min((p.since for p in self.files.values()), default=float("inf"))
        deleted = [p for p, since in self.deleted.items() if now - since >= self.settle and held_until > since + self.settle]
        for path in deleted:
            del self.deleted[path]
        return sorted(files), sorted(deleted)
