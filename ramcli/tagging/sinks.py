"""The sinks that judge and write each batch before it is printed and recorded.

`Triage` comes first: it checks that each tagged photo's file is still the one decoded, and
judges each failure (broken until its file changes, or failed and retried). `MetadataSink`
then writes the tags into the photos' metadata through ExifTool. Both tally what they did in
the run's `Summary`, as `count_tagged` does the photos tagged. `Moves` decides a step earlier,
on each decoded photo, whether the index knows it under a path that is gone, and re-points
such photos as the first sink of their batch.
"""

from __future__ import annotations

import os
import stat

from ramcli.library.writeback import unwritten
from ramcli.media.discover import Found
from ramcli.pathnames import is_uri
from ramcli.tagging.listener import Summary
from ramcli.tagging.records import PhotoResult

#: Why a photo reached through a symlink that leaves the tagged folders keeps its metadata.
OUTSIDE_LINK = "symlink to a file outside the tagged folders: indexed, metadata not written (--follow-links writes it)"

#: Why a photo that changed between its decode and its write is neither written nor recorded.
CHANGED = "the file changed while it was being tagged: not written; tagged again next run"


class Triage:
    """The first sink: it checks each tagged photo's file and judges each failure, before
    anything is written, printed or recorded.

    A tagged photo whose file is no longer the one decoded (size, mtime or inode differ:
    replaced, edited, deleted) becomes a failure, so the old image's tags never land in the new
    one and the index never calls it up to date. A failure is 'broken' when it lasts until the
    file changes: the file reads, is the very file discovery found, and is no photo ramcli can
    decode (empty, not an image, truncated, a decoder's error); it is recorded with its size and
    mtime and not tried again until they change. Any other failure (unreadable, vanished, changed
    meanwhile) stays 'failed' and is retried next run. A failure is *known* when the index holds
    it already, with the same status and error; only new ones count as the run's problems.

    `photos`: what discovery found, taken (with each inode) before anything is decoded."""

    def __init__(self, photos: list[Found], index, summary: Summary):
        self.before = {str(f.path): _identity(f.path, f.size, f.mtime_ns) for f in photos}
        self.index, self.summary = index, summary

    def __call__(self, results: list[PhotoResult]) -> None:
        for r in results:
            if r.status == "tagged":
                if not self._changed(r):
                    continue
                r.status, r.error, r.tags, r.caption = "failed", CHANGED, [], None
            self.listed(r, self.judge(r))

    def judge(self, r: PhotoResult) -> bool:
        """Make a failure 'broken' or leave it 'failed'; whether the index knows it already."""
        before = self.before.get(r.path)
        if before is not None and _lasting(r.path, before):
            r.status, (r.size, r.mtime_ns) = "broken", before[:2]
        record = self.index.lookup(r.path) if self.index is not None else None
        return (record is not None and (record.status, record.error) == (r.status, r.error)
                and (r.status != "broken" or (record.size, record.mtime_ns) == (r.size, r.mtime_ns)))

    def listed(self, r: PhotoResult, known: bool) -> None:
        (self.summary.known_failed if known else self.summary.failed).append((r.path, r.error or r.status))

    def _changed(self, r: PhotoResult) -> bool:
        if is_uri(r.path):  # object storage (`--ray`): no local file to compare; never written
            return False
        before = self.before.get(r.path)
        now = _identity(r.path)
        return now is None or before is None or (now[0], now[1], now[2]) != (r.size, r.mtime_ns, before[2])


def _identity(path: str | os.PathLike, size: int | None = None, mtime_ns: int | None = None) -> tuple | None:
    """(size, mtime_ns, (device, inode)) of a file now; given size and mtime replace the stat's."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_size if size is None else size, st.st_mtime_ns if mtime_ns is None else mtime_ns,
            (st.st_dev, st.st_ino))


def _lasting(path: str, before: tuple) -> bool:
    """Whether a failure lasts until the file changes: the file is a regular file, still the one
    discovery found (`before`, from `_identity`), and readable."""
    now = _identity(path)
    if now is None or now != before or not stat.S_ISREG(os.stat(path).st_mode):
        return False
    try:
        with open(path, "rb") as fh:
            fh.read(1)
    except OSError:
        return False
    return True


class MetadataSink:
    """Writes each batch's tags into the photos' metadata before the index records the batch.

    The results are updated with the files' size and mtime after the write, so the index keeps
    the post-write state and the next run does not take ramcli's own write for a change. A
    result whose write failed keeps the reason as its `error` (the output shows it; the index
    keeps it, so the next run writes the photo again).
    `left_alone`: result paths not to write, with the reason (symlinks out of the tagged folders).
    `found`: what discovery found each path is, so that the writer does not sniff it again.
    """

    def __init__(self, writer, model_id: str, summary: Summary, index=None,
                 left_alone: dict[str, str] | None = None):
        self.writer, self.model_id, self.summary, self.index = writer, model_id, summary, index
        self.left_alone = left_alone or {}
        self.found: dict[str, Found] = {}

    def __call__(self, results: list[PhotoResult]) -> None:
        tagged = []
        for r in results:
            if r.status == "tagged" and r.path in self.left_alone:
                self.summary.not_written.append((r.path, self.left_alone[r.path]))
            elif r.status == "tagged":
                tagged.append(r)
        if not tagged:
            return
        outcomes = self.writer.write_batch([(r.path, r.tags) for r in tagged], model_id=self.model_id,
                                           captions=[r.caption for r in tagged],
                                           kinds=[self.found.get(r.path) for r in tagged])
        for result, outcome in zip(tagged, outcomes):
            if outcome.status == "written":
                self.summary.written += 1
                if outcome.size is not None:
                    result.size, result.mtime_ns = outcome.size, outcome.mtime_ns
            elif outcome.status == "failed":
                result.error = unwritten(outcome.error)
                record = self.index.lookup(result.path) if self.index is not None else None
                known = record is not None and (record.status, record.error) == ("tagged", result.error)
                (self.summary.still_unwritten if known else self.summary.write_failed).append(
                    (result.path, outcome.error or "write failed"))

    def close(self) -> None:
        self.writer.close()


def count_tagged(results: list[PhotoResult], summary: Summary) -> None:
    summary.tagged += sum(r.status == "tagged" for r in results)  # failures: `Triage`


class Moves:
    """Photos the index knows under a path that is gone were moved: `skip`, asked for each
    decoded photo, decides, and the moves are recorded by the first sink of the batch (and by
    `apply` after the last batch), so that only sinks write the index.

    Only the very file moves with its size and mtime (a rename keeps both), so only then does
    the write ledger follow it and the photo skip the model. Any other file with that image
    data (a copy restored from before ramcli wrote, an edited copy) takes the record over but
    not the ledger, and is tagged and written like a new photo: the ledger's rows describe
    the old file, and against the copy they would say the user deleted ramcli's tags. A record
    goes to one new path only, though copies of it come in the same run."""

    def __init__(self, index, summary: Summary):
        self.index, self.summary = index, summary
        self.pending: list[tuple[str, str, int, int, bool]] = []
        self.claimed: set[str] = set()

    def skip(self, item) -> bool:
        if self.index.lookup(str(item.path)) is not None:
            return False
        old = self.index.find_moved(item.content_hash, exclude=self.claimed)
        if old is None:
            return False
        same_file = (old.size, old.mtime_ns) == (item.size, item.mtime_ns)
        self.claimed.add(old.path)
        self.pending.append((old.path, str(item.path), item.size, item.mtime_ns, same_file))
        return same_file

    def __call__(self, results: list[PhotoResult]) -> None:
        """Before anything else records the batch: a copy's result then lands on the record it
        took over."""
        self.apply()

    def apply(self) -> None:
        for old, new, size, mtime_ns, same_file in self.pending:
            self.index.move(old, new, size, mtime_ns, with_ledger=same_file)
            if same_file:
                self.summary.moved += 1
        self.pending.clear()
