"""What `ramcli write` and `ramcli untag` do, without the command line: pick the photos, write
them in calls the index can follow, and keep the index's file stats in step with the rewrites."""

from __future__ import annotations

import os
from pathlib import Path

from ramcli.errors import UsageError
from ramcli.ledger import Ledger
from ramcli.metadata import MetadataWriter, WriteOutcome

# Writer batches per `write_batch` call: within a call, ExifTool reads the next batch while it
# writes one (docs/metadata.md); between calls the index learns the new file sizes and mtimes.
BATCHES_PER_CALL = 8


def indexed_photos(index, paths: list[Path]) -> list[str]:
    """The indexed photos named by `paths` (files or folders; none = all)."""
    from ramcli.index import normalize_path

    if not paths:
        return [r.path for r in index.iter_photos()]
    found: list[str] = []
    for p in paths:
        if p.is_dir():
            found += [r.path for r in index.iter_photos(under=p)]
        elif index.lookup(str(p)) is not None:
            found.append(normalize_path(p))
        else:
            raise UsageError(f"{p} is not in the index: tag it first (`ramcli tag {p}`)")
    return list(dict.fromkeys(found))


def ledger_photos(ledger: Ledger, paths: list[Path]) -> list[str]:
    """The photos named by `paths` (files or folders) that ramcli wrote keywords into."""
    found: list[str] = []
    for p in paths:
        real = os.path.realpath(p)
        if os.path.isdir(real):
            found += [e.path for e in ledger.entries_under(real)]
        elif os.path.exists(real) or ledger.entries(real):
            found.append(real)
        else:
            raise UsageError(f"{p}: no such file or folder")
    return list(dict.fromkeys(found))


def write_indexed(index, writer: MetadataWriter, items: list, captions: list) -> list[WriteOutcome]:
    """Write `items` ((path, tags) of indexed photos) with their `captions`, telling the index
    the new file stats after each call."""
    outcomes = []
    span = writer.options.batch_size * BATCHES_PER_CALL
    for start in range(0, len(items), span):
        batch = writer.write_batch(items[start : start + span], captions=captions[start : start + span])
        update_stats(index, batch)
        outcomes += batch
    return outcomes


def update_stats(index, outcomes: list[WriteOutcome]) -> None:
    """Tell the index the new size/mtime of rewritten photos, so they are not re-tagged."""
    for o in outcomes:
        if o.size is not None and index.lookup(o.path) is not None:
            index.update_stat(o.path, o.size, o.mtime_ns)
