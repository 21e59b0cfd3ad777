"""The SQLite index: which photos were tagged, with what, and by which model.

It is the ledger that makes `ramcli tag` incremental (skip unchanged files, recognise moved ones
by a content hash that survives metadata writes) and the data behind `ramcli search`. Its rules:

* One write transaction per batch (`Index.write`, see `ramcli.library.database`), so a kill -9
  leaves either the whole batch or none of it, and a second writer waits for the first.
* The schema only ever migrates forward (`ramcli.library.schema`). The photos table's columns
  are the fields of `PhotoRecord`, the one photo record (`ramcli.tagging.records`) plus what only
  the index knows; every statement on them is generated from those fields (`PHOTO_COLUMNS`).
* Tag counts (`tags.photo_count`) are kept in the same transaction as the photo tags; search uses
  them to pick the most selective term of a query, `ramcli index check` verifies them.

Other modules keep their own tables in the same file (the metadata write ledger,
`ramcli.library.ledger`); this module only touches them where a photo moves. The vocabulary is
`ramcli.library.tags`, merging and checking indexes `ramcli.library.merge`.

Paths are stored as text by `ramcli.pathnames.to_text` (lossless for names that are not valid
UTF-8) and handed out as file-system paths (`from_text`): callers never see the stored form.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections import Counter
from collections.abc import Callable, Container, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import sqlite_utils

from ramcli import config
from ramcli.closing import Closing
from ramcli.errors import RamcliError
from ramcli.library import tags
from ramcli.library.columns import PhotoColumns
from ramcli.library.database import DEFAULT_BUSY_TIMEOUT, connect, database_error, print_wait, write_transaction
from ramcli.library.schema import migrate
from ramcli.pathnames import from_text, is_uri, to_text
from ramcli.tagging.records import PhotoResult, TagScore


@dataclass
class PhotoRecord(PhotoResult):
    """A photo as the index holds it: the record of its tagging plus the row id and when it was
    tagged. Its fields are the columns of `photos` (`PHOTO_COLUMNS`)."""

    id: int = 0
    tagged_at: str | None = None
    #: The symlink inside the tagged folders through which the photo was reached, when the photo
    #: itself lies outside them (metadata is then written only with --follow-links).
    link: str | None = None


PHOTO_COLUMNS = PhotoColumns(PhotoRecord)


def normalize_path(path: str | os.PathLike) -> str:
    """Paths are stored absolute and resolved, so one file has one row whatever the caller's cwd;
    an object-storage address (`s3://…`) is stored as given."""
    return path if is_uri(path) else os.path.realpath(os.fspath(path))


def path_key(path: str | os.PathLike) -> str:
    """The stored text of a photo's path: resolved, then `to_text` (SQL parameters only)."""
    return to_text(normalize_path(path))


class Index(Closing):
    """The index database. Open with `Index.open()`; use as a context manager or call `close()`."""

    def __init__(self, db: sqlite_utils.Database, path: Path, readonly: bool, busy_timeout: float):
        self.db = db
        self.path = path
        self.readonly = readonly
        self.busy_timeout = busy_timeout
        self._tag_ids: dict[str, int] = {}
        #: Called with a message when a write has to wait for another process.
        self.on_wait: Callable[[str], None] = print_wait

    @classmethod
    def open(
        cls, path: Path | None = None, *, readonly: bool = False, busy_timeout: float | None = None
    ) -> Index:
        """Open (creating and migrating if needed) the index at `path` (default: the home's)."""
        path = Path(path) if path is not None else config.home().index
        timeout = DEFAULT_BUSY_TIMEOUT if busy_timeout is None else busy_timeout
        if readonly and not path.exists():
            raise RamcliError(f"no index at {path}: run `ramcli tag` first")
        if not readonly:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise RamcliError(f"cannot create the index folder {path.parent}: {exc.strerror}") from exc
        try:
            index = cls(sqlite_utils.Database(connect(path, readonly=readonly, timeout=timeout)), path, readonly, timeout)
            migrate(index.db, path, readonly=readonly, on_wait=index.on_wait)
        except sqlite3.DatabaseError as exc:
            raise database_error(path, exc) from exc
        return index

    def close(self) -> None:
        self.db.close()

    def write(self) -> AbstractContextManager[None]:
        """One write transaction (a savepoint inside an open one), for the index's tables and
        those other modules keep in the same file; it waits for another process's (see
        `ramcli.library.database.write_transaction`)."""
        if self.readonly:
            raise RamcliError(f"the index {self.path} is open read-only")
        return write_transaction(self.db.conn, self.on_wait)

    # --- photos ---------------------------------------------------------------------------------

    def lookup(self, path: str) -> PhotoRecord | None:
        row = self.db.execute(f"SELECT {PHOTO_COLUMNS.select} FROM photos WHERE path = ?", [path_key(path)]).fetchone()
        return PHOTO_COLUMNS.read(row) if row else None

    def find_by_name(self, name: str) -> list[str]:
        """Paths of the photos whose file name is `name` (for `show IMG.jpg` from another folder)."""
        pattern = "%/" + to_text(name).replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        rows = self.db.execute("SELECT path FROM photos WHERE path LIKE ? ESCAPE '\\'", [pattern])
        return [path for path in (from_text(r[0]) for r in rows) if os.path.basename(path) == name]

    def needs_tagging(self, path: str, size: int, mtime_ns: int, model_id: str, vocab_version: str) -> bool:
        """False only when the file is unchanged and was tagged by this model and vocabulary, or
        is broken and unchanged since (see `state`)."""
        return self.state(path, size, mtime_ns, model_id, vocab_version) == "due"

    def state(self, path: str, size: int, mtime_ns: int, model_id: str, vocab_version: str) -> str:
        """'current': unchanged and tagged by this model and vocabulary; 'broken': unchanged since
        it failed in a way that lasts until the file changes (status 'broken'); else 'due'."""
        record = self.lookup(path)
        if record is None or (record.size, record.mtime_ns) != (size, mtime_ns):
            return "due"
        if record.status == "broken":
            return "broken"
        current = record.status == "tagged" and (record.model_id, record.vocab_version) == (model_id, vocab_version)
        return "current" if current else "due"

    def pending_writes(self) -> dict[str, str]:
        """Tagged photos whose last metadata write failed, with why (`set_write_errors`)."""
        rows = self.db.execute("SELECT path, error FROM photos WHERE status = 'tagged' AND error IS NOT NULL")
        return {from_text(path): error for path, error in rows}

    def set_write_errors(self, errors: Mapping[str, str | None]) -> None:
        """Remember for tagged photos why their metadata write failed (None: written), so the next
        `ramcli tag` writes them again: a tagged photo's `error` is its failed write."""
        if errors:
            with self.write():
                self.db.conn.executemany(
                    "UPDATE photos SET error = ? WHERE path = ? AND status = 'tagged'",
                    [(error, path_key(path)) for path, error in errors.items()],
                )

    def find_moved(self, content_hash: str, exclude: Container[str] = ()) -> PhotoRecord | None:
        """A record with this content hash whose file is gone: the photo was moved or renamed.
        `exclude`: paths of records already claimed by another photo."""
        rows = self.db.execute(
            f"SELECT {PHOTO_COLUMNS.select} FROM photos WHERE content_hash = ? AND status = 'tagged'",
            [content_hash],
        ).fetchall()
        for row in rows:
            record = PHOTO_COLUMNS.read(row)
            if record.path not in exclude and not is_uri(record.path) and not os.path.exists(record.path):
                return record
        return None

    def move(self, old_path: str, new_path: str, size: int, mtime_ns: int, *, with_ledger: bool = True) -> None:
        """Re-point a moved photo, keeping its tags (one transaction).

        `with_ledger`: the metadata ledger's rows move along. Pass False when the file at the new
        path is not the one ramcli wrote (a copy restored from before the write): the rows say
        what ramcli put into the old file, and read against the copy they would claim that the
        user deleted those values. They stay with the old path instead."""
        old, new = normalize_path(old_path), normalize_path(new_path)
        with self.write():
            self._delete_photos(self.db.execute("SELECT id FROM photos WHERE path = ?", [to_text(new)]).fetchall())
            cur = self.db.execute(
                "UPDATE photos SET path = ?, size = ?, mtime_ns = ?, link = NULL WHERE path = ?",
                [to_text(new), size, mtime_ns, to_text(old)],
            )
            if cur.rowcount == 0:
                raise RamcliError(f"cannot move {old}: it is not in the index")
            if with_ledger:
                from ramcli.library.ledger import (
                    Ledger,  # the metadata writer's table; re-pointed in this transaction
                )

                Ledger(self.db).move(old, new)

    def update_stat(self, path: str, size: int, mtime_ns: int) -> None:
        """Record a file's new size and mtime after a metadata write, so it is not re-tagged."""
        with self.write():
            self.db.execute("UPDATE photos SET size = ?, mtime_ns = ? WHERE path = ?", [size, mtime_ns, path_key(path)])

    def record_batch(self, results: list[PhotoResult], links: Mapping[str, str] | None = None) -> None:
        """Store a batch of tagging results in ONE transaction (idempotent).

        Tagged results replace the photo's tags; failed ones record status and error and keep
        whatever tags an earlier successful run stored. `links` maps the result paths (as given)
        that were reached through a symlink leading out of the tagged folders to their place
        inside those folders (`Found.link`), kept as the photo's `link`; any other result clears
        it (the photo was reached inside the folders).
        """
        if not results:
            return
        latest: dict[str, PhotoResult] = {path_key(r.path): r for r in results}
        link_of = {path_key(r.path): to_text(links[r.path]) for r in results if links and r.path in links}
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        new_tag_ids: dict[str, int] = {}
        with self.write():
            names = {t.name: t.name_zh for r in latest.values() if r.status == "tagged" for t in r.tags}
            tag_ids = tags.ensure_tags(self.db, names, self._tag_ids, new_tag_ids)
            columns = PHOTO_COLUMNS
            self.db.conn.executemany(
                f"INSERT INTO photos ({columns.names()}) VALUES ({', '.join('?' * len(columns.stored))})"
                f" ON CONFLICT (path) DO UPDATE SET {columns.updates('excluded', 'photos')}",
                [columns.row(r, path=path, tagged_at=now, link=link_of.get(path)) for path, r in latest.items()],
            )
            tagged_paths = [p for p, r in latest.items() if r.status == "tagged"]
            photo_ids = dict(
                self.db.execute(
                    "SELECT path, id FROM photos WHERE path IN (SELECT value FROM json_each(?))",
                    [json.dumps(tagged_paths)],
                ).fetchall()
            )
            ids_json = json.dumps(list(photo_ids.values()))
            delta: Counter[int] = Counter()
            for tag_id, count in self.db.execute(
                "SELECT tag_id, count(*) FROM photo_tags WHERE photo_id IN (SELECT value FROM json_each(?))"
                " GROUP BY tag_id",
                [ids_json],
            ):
                delta[tag_id] -= count
            self.db.execute("DELETE FROM photo_tags WHERE photo_id IN (SELECT value FROM json_each(?))", [ids_json])
            rows = []
            for path in tagged_paths:
                best: dict[int, float] = {}
                for t in latest[path].tags:
                    tag_id = tag_ids[t.name.casefold()]
                    best[tag_id] = max(best.get(tag_id, 0.0), float(t.score))
                photo_id = photo_ids[path]
                rows.extend((photo_id, tag_id, score) for tag_id, score in best.items())
                delta.update(best.keys())
            self.db.conn.executemany("INSERT INTO photo_tags (photo_id, tag_id, score) VALUES (?, ?, ?)", rows)
            self.db.conn.executemany(
                "UPDATE tags SET photo_count = photo_count + ? WHERE id = ?",
                [(d, tag_id) for tag_id, d in delta.items() if d],
            )
        self._tag_ids.update(new_tag_ids)

    def photo_tags(self, path: str) -> list[TagScore]:
        """A photo's tags, best score first."""
        rows = self.db.execute(
            "SELECT t.name, coalesce(t.name_zh, ''), pt.score FROM photo_tags pt"
            " JOIN tags t ON t.id = pt.tag_id JOIN photos p ON p.id = pt.photo_id"
            " WHERE p.path = ? ORDER BY pt.score DESC, t.name",
            [path_key(path)],
        ).fetchall()
        return [TagScore(name, zh, score) for name, zh, score in rows]

    def iter_photos(self, under: Path | None = None, *, links: bool = False) -> Iterator[PhotoRecord]:
        """All photos, by path; `under` limits them to one folder (recursively), and with `links`
        also to the photos reached through a symlink in that folder."""
        if under is None:
            cur = self.db.execute(f"SELECT {PHOTO_COLUMNS.select} FROM photos ORDER BY path")
        else:
            low, high = folder_range(under)
            cur = self.db.execute(
                f"SELECT {PHOTO_COLUMNS.select} FROM photos WHERE path >= ? AND path < ?"
                + (" OR (link >= ? AND link < ?)" if links else "") + " ORDER BY path",
                [low, high] * (2 if links else 1),
            )
        for row in cur:
            yield PHOTO_COLUMNS.read(row)

    def prune(self, exists: Callable[[str], bool] = os.path.exists, dry_run: bool = False) -> list[str]:
        """Forget photos whose files are gone (only list them with `dry_run`); returns their paths.
        Photos on object storage are kept: their existence is not the local file system's to say."""
        rows = self.db.execute("SELECT id, path FROM photos ORDER BY path")
        missing = [(pid, path) for pid, path in ((pid, from_text(text)) for pid, text in rows)
                   if not is_uri(path) and not exists(path)]
        if missing and not dry_run:
            with self.write():
                self._delete_photos([(pid,) for pid, _ in missing])
        return [path for _, path in missing]

    def _delete_photos(self, ids: Sequence[tuple[int]]) -> None:
        """Delete photos and their tags, keeping tag counts right (inside a write transaction)."""
        if not ids:
            return
        ids_json = json.dumps([i for (i,) in ids])
        self.db.conn.executemany(
            "UPDATE tags SET photo_count = photo_count - ? WHERE id = ?",
            [
                (count, tag_id)
                for tag_id, count in self.db.execute(
                    "SELECT tag_id, count(*) FROM photo_tags WHERE photo_id IN (SELECT value FROM json_each(?))"
                    " GROUP BY tag_id",
                    [ids_json],
                )
            ],
        )
        self.db.execute("DELETE FROM photos WHERE id IN (SELECT value FROM json_each(?))", [ids_json])

    # --- tags -----------------------------------------------------------------------------------

    def upsert_tags(self, names: Iterable[str], names_zh: Iterable[str | None], source: str) -> None:
        """Register tag names so search and did-you-mean know them before any photo has them."""
        with self.write():
            tags.upsert_tags(self.db, names, names_zh, source)

    def add_synonym(self, alias: str, tag_name: str) -> None:
        """Make `alias` find `tag_name`'s photos (see `ramcli.library.tags.add_synonym`)."""
        with self.write():
            tags.add_synonym(self.db, alias, tag_name)


def folder_range(folder: str | os.PathLike) -> tuple[str, str]:
    """The [low, high) range of the stored paths of everything under `folder`, usable with the
    path index (`to_text` maps character by character, so prefixes stay prefixes)."""
    base = path_key(folder).rstrip(os.sep) + os.sep
    return base, base[:-1] + chr(ord(os.sep) + 1)
