"""What `ramcli write` and `ramcli untag` do, without the command line: pick the photos, write
them in calls the index can follow, and keep the index's file stats in step with the rewrites."""

from __future__ import annotations

import os
from pathlib import Path

from ramcli.errors import UsageError
from ramcli.library.ledger import Ledger
from ramcli.metadata import MetadataWriter, WriteOutcome

# Writer batches per `write_batch` call: within a call, ExifTool reads the next batch while it
# writes one (docs/metadata.md); between calls the index learns the new file sizes and mtimes.
BATCHES_PER_CALL = 8


def indexed_photos(index, paths: list[Path]) -> tuple[list[str], dict[str, str]]:
    """The indexed photos named by `paths` (files or folders; none = all): (those in scope, those
    reached only through a symlink that leads out of the folders, each with that symlink).

    Scope: a folder means the photos under it, and those that a tag run reached through a symlink
    in it (the index keeps such a photo's `link`); the ones of those that lie outside the folder
    are returned apart, for the caller's symlink policy (`--follow-links`). A photo named as a
    file is always in scope."""
    from ramcli.library.index import normalize_path

    if not paths:
        records = list(index.iter_photos())
        return [r.path for r in records if r.link is None], {r.path: r.link for r in records if r.link is not None}
    found: list[str] = []
    linked: dict[str, str] = {}
    for p in paths:
        if p.is_dir():
            for r in index.iter_photos(under=p, links=True):
                if r.link is None or _within(r.path, p):
                    found.append(r.path)
                else:
                    linked[r.path] = r.link
        elif index.lookup(str(p)) is not None:
            found.append(normalize_path(p))
        else:
            raise UsageError(f"{p} is not in the index: tag it first (`ramcli tag {p}`)")
    found = list(dict.fromkeys(found))
    return found, {p: link for p, link in linked.items() if p not in found}


def ledger_photos(index, ledger: Ledger, paths: list[Path]) -> tuple[list[str], dict[str, str]]:
    """The photos named by `paths` (files or folders) that ramcli wrote keywords into, split like
    `indexed_photos`."""
    found: list[str] = []
    linked: dict[str, str] = {}
    for p in paths:
        real = os.path.realpath(p)
        if os.path.isdir(real):
            found += [e.path for e in ledger.entries_under(real)]
            linked.update((r.path, r.link) for r in index.iter_photos(under=Path(real), links=True)
                          if r.link is not None and not _within(r.path, real) and ledger.entries(r.path))
        elif os.path.exists(real) or ledger.entries(real):
            found.append(real)
        else:
            raise UsageError(f"{p}: no such file or folder")
    found = list(dict.fromkeys(found))
    return found, {p: link for p, link in linked.items() if p not in found}


def _within(path: str, folder: str | os.PathLike) -> bool:
    return path.startswith(os.path.realpath(folder).rstrip(os.sep) + os.sep)


def write_indexed(index, writer: MetadataWriter, items: list, captions: list) -> list[WriteOutcome]:
    """Write `items` ((path, tags) of indexed photos) with their `captions`, telling the index
    after each call the new file stats, and which writes failed (`ramcli tag` retries them)."""
    outcomes = []
    span = writer.options.batch_size * BATCHES_PER_CALL
    for start in range(0, len(items), span):
        batch = writer.write_batch(items[start : start + span], captions=captions[start : start + span])
        update_stats(index, batch)
        index.set_write_errors({o.path: unwritten(o.error) if o.status == "failed" else None for o in batch})
        outcomes += batch
    return outcomes


def unwritten(error: str | None) -> str:
    """A tagged photo's `error` when its metadata write failed, in the index and the output."""
    return f"metadata not written: {error or 'write failed'}"


def update_stats(index, outcomes: list[WriteOutcome]) -> None:
    """Tell the index the new size/mtime of rewritten photos, so they are not re-tagged."""
    for o in outcomes:
        if o.size is not None and index.lookup(o.path) is not None:
            index.update_stat(o.path, o.size, o.mtime_ns)
