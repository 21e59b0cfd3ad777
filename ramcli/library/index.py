"""The SQLite index: which photos were tagged, with what, and by which model.

It is the ledger that makes `ramcli tag` incremental (skip unchanged files, recognise moved ones
by a content hash that survives metadata writes) and the data behind `ramcli search`. Its rules:

* One write transaction per batch (`BEGIN IMMEDIATE`), so a kill -9 at any moment leaves either
  the whole batch or none of it. WAL lets searches read while a `tag` run writes.
* Two writers never corrupt it: every write transaction, the ledger's too, starts as the writer
  (`write_transaction`); the second waits (and says so on stderr) until the first commits.
* The schema carries a version (`PRAGMA user_version`) and only ever migrates forward.
* Tag counts (`tags.photo_count`) are kept in the same transaction as the photo tags; search uses
  them to pick the most selective term of a query, `index check` verifies them.

Other modules keep their own tables in the same file (the metadata write ledger,
`ramcli.library.ledger`); this module only touches them where a photo moves or indexes are merged.

`merge` combines indexes that separate machines wrote (one per node of a multi-node run): one
transaction per source, the source ATTACHed read-only, every row copied by SQL on the attached
schema, so no value from a source ever becomes SQL text.

Paths are stored as text by `ramcli.pathnames.to_text` (lossless for names that are not valid
UTF-8) and handed out as file-system paths (`from_text`): callers never see the stored form.
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from datetime import datetime, timezone
from pathlib import Path

import simplemma
import sqlite_utils

from ramcli import config
from ramcli.errors import RamcliError
from ramcli.pathnames import from_text, is_uri, to_text
from ramcli.tagging.records import PhotoResult, TagScore

#: How long a writer waits for another process's transaction before giving up (seconds).
DEFAULT_BUSY_TIMEOUT = float(os.environ.get("RAMCLI_INDEX_TIMEOUT", "600"))
#: Waits shorter than this pass silently; longer ones print a message first.
_QUIET_WAIT_MS = 250


@dataclass(frozen=True)
class PhotoRecord:
    """One row of the `photos` table."""

    id: int
    path: str
    size: int | None
    mtime_ns: int | None
    content_hash: str | None
    width: int | None
    height: int | None
    taken_at: str | None
    tagged_at: str | None
    model_id: str | None
    vocab_version: str | None
    status: str
    error: str | None
    caption: str | None = None
    #: The symlink inside the tagged folders through which the photo was reached, when the photo
    #: itself lies outside them (metadata is then written only with --follow-links).
    link: str | None = None

    @classmethod
    def from_row(cls, row: Sequence) -> PhotoRecord:
        """A record from a `SELECT {_PHOTO_COLUMNS}` row, its paths as file-system paths."""
        record = cls(*row)
        link = from_text(record.link) if record.link is not None else None
        return replace(record, path=from_text(record.path), link=link)


_PHOTO_COLUMNS = ", ".join(f.name for f in fields(PhotoRecord))


@dataclass(frozen=True)
class MergeCounts:
    """What `Index.merge` did with one source's photos."""

    added: int = 0
    updated: int = 0
    unchanged: int = 0
    #: Rows of the source's write ledger that were not taken (see `Ledger.merge_from`).
    ledger_dropped: int = 0


def normalize_path(path: str | os.PathLike) -> str:
    """Paths are stored absolute and resolved, so one file has one row whatever the caller's cwd;
    an object-storage address (`s3://…`) is stored as given."""
    return path if is_uri(path) else os.path.realpath(os.fspath(path))


def path_key(path: str | os.PathLike) -> str:
    """The stored text of a photo's path: resolved, then `to_text` (SQL parameters only)."""
    return to_text(normalize_path(path))


def lemma(name: str) -> str:
    """The lemmatised, lower-case form of a tag name ('Christmas Trees' -> 'christmas tree').

    Used to resolve plural/singular query words to tags; simplemma leaves non-English words alone.
    """
    return " ".join(simplemma.lemmatize(word, lang="en").lower() for word in name.split())


# --- schema -------------------------------------------------------------------------------------


def _migration_1(db: sqlite_utils.Database) -> None:
    """The initial schema."""
    db.table("photos").create(
        {
            "id": int,
            "path": str,
            "size": int,
            "mtime_ns": int,
            "content_hash": str,
            "width": int,
            "height": int,
            "taken_at": str,
            "tagged_at": str,
            "model_id": str,
            "vocab_version": str,
            "status": str,
            "error": str,
        },
        pk="id",
        not_null={"path", "status"},
    )
    db.table("photos").create_index(["path"], unique=True)
    db.table("photos").create_index(["content_hash"])
    db.table("photos").create_index(["taken_at"])
    db.execute(
        "CREATE TABLE tags (id INTEGER PRIMARY KEY, name TEXT NOT NULL COLLATE NOCASE UNIQUE,"
        " name_zh TEXT, lemma TEXT NOT NULL, group_id INTEGER REFERENCES tags(id),"
        " source TEXT NOT NULL DEFAULT 'builtin', aliases TEXT NOT NULL DEFAULT '',"
        " photo_count INTEGER NOT NULL DEFAULT 0)"
    )
    db.table("tags").create_index(["lemma"])
    db.table("tags").create_index(["name_zh"])
    db.table("synonyms").create(
        {"alias": str, "tag_id": int}, pk="alias", foreign_keys=[("tag_id", "tags", "id")]
    )
    # Written by hand: sqlite-utils cannot declare WITHOUT ROWID or ON DELETE CASCADE. The primary
    # key serves "tags of a photo"; the second index serves "photos of a tag, best score first".
    db.execute(
        "CREATE TABLE photo_tags ("
        " photo_id INTEGER NOT NULL REFERENCES photos(id) ON DELETE CASCADE,"
        " tag_id INTEGER NOT NULL REFERENCES tags(id),"
        " score REAL NOT NULL,"
        " PRIMARY KEY (photo_id, tag_id)) WITHOUT ROWID"
    )
    db.execute("CREATE INDEX idx_photo_tags_tag_score ON photo_tags (tag_id, score DESC, photo_id)")
    db.table("tags").enable_fts(
        ["name", "name_zh", "aliases"], create_triggers=True, tokenize="unicode61 remove_diacritics 2"
    )


def _migration_2(db: sqlite_utils.Database) -> None:
    """Captions (`ramcli tag --caption`, Tag2Text), searchable by word through their own FTS table."""
    db.table("photos").add_column("caption", str)
    db.table("photos").enable_fts(["caption"], create_triggers=True, tokenize="unicode61 remove_diacritics 2")


def _migration_3(db: sqlite_utils.Database) -> None:
    """Paths stored with `to_text` (names that are not UTF-8 became storable; the few existing
    paths holding its reserved characters are re-encoded), and the `link` of photos reached
    through a symlink that leaves the tagged folders."""
    db.table("photos").add_column("link", str)
    tables = {"photos": ("path",), "metadata_ledger": ("path", "target"), "metadata_ledger_staged": ("path", "target")}
    for table, columns in tables.items():
        if not db[table].exists():
            continue
        for column in columns:
            rows = [
                (to_text(value), rowid)
                for rowid, value in db.execute(f"SELECT rowid, [{column}] FROM [{table}]")
                if isinstance(value, str) and to_text(value) != value
            ]
            db.conn.executemany(f"UPDATE [{table}] SET [{column}] = ? WHERE rowid = ?", rows)


#: Forward migrations: entry i takes the schema from version i to i + 1. Never edit a released one.
MIGRATIONS: list[Callable[[sqlite_utils.Database], None]] = [_migration_1, _migration_2, _migration_3]
SCHEMA_VERSION = len(MIGRATIONS)


class Index:
    """The index database. Open with `Index.open()`; use as a context manager or call `close()`."""

    def __init__(self, db: sqlite_utils.Database, path: Path, readonly: bool, busy_timeout: float):
        self.db = db
        self.path = path
        self.readonly = readonly
        self.busy_timeout = busy_timeout
        self._tag_ids: dict[str, int] = {}
        #: Called with a message when a write has to wait for another process.
        self.on_wait: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr, flush=True)

    # --- opening --------------------------------------------------------------------------------

    @classmethod
    def open(
        cls, path: Path | None = None, *, readonly: bool = False, busy_timeout: float | None = None
    ) -> Index:
        """Open (creating and migrating if needed) the index at `path` (default: the home's)."""
        path = Path(path) if path is not None else config.home().index
        timeout = DEFAULT_BUSY_TIMEOUT if busy_timeout is None else busy_timeout
        if readonly:
            if not path.exists():
                raise RamcliError(f"no index at {path}: run `ramcli tag` first")
            uri = f"{path.resolve().as_uri()}?mode=ro"
            connect = lambda: sqlite3.connect(uri, uri=True, timeout=timeout)  # noqa: E731
        else:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise RamcliError(f"cannot create the index folder {path.parent}: {exc.strerror}") from exc
            connect = lambda: sqlite3.connect(path, timeout=timeout)  # noqa: E731
        try:
            conn = connect()
            # Transactions are explicit (BEGIN IMMEDIATE per batch), never implicit.
            conn.isolation_level = None
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute("PRAGMA cache_size = -65536")
            if not readonly:
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("PRAGMA synchronous = NORMAL")
            index = cls(sqlite_utils.Database(conn), path, readonly, timeout)
            index._migrate()
        except sqlite3.DatabaseError as exc:
            raise database_error(path, exc) from exc
        return index

    def _migrate(self) -> None:
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise RamcliError(
                f"the index {self.path} has schema version {version}, newer than this ramcli "
                f"({SCHEMA_VERSION}): upgrade ramcli"
            )
        if version == SCHEMA_VERSION:
            return
        if self.readonly:
            raise RamcliError(f"the index {self.path} needs an upgrade: run any writing command first")
        with self._write():
            # Re-read inside the write lock: another process may have migrated meanwhile.
            version = self.db.execute("PRAGMA user_version").fetchone()[0]
            for step in range(version, SCHEMA_VERSION):
                MIGRATIONS[step](self.db)
            self.db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- transactions ---------------------------------------------------------------------------

    def _write(self):
        if self.readonly:
            raise RamcliError(f"the index {self.path} is open read-only")
        return write_transaction(self.db.conn, self.on_wait)

    # --- photos ---------------------------------------------------------------------------------

    def lookup(self, path: str) -> PhotoRecord | None:
        row = self.db.execute(f"SELECT {_PHOTO_COLUMNS} FROM photos WHERE path = ?", [path_key(path)]).fetchone()
        return PhotoRecord.from_row(row) if row else None

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
            with self._write():
                self.db.conn.executemany(
                    "UPDATE photos SET error = ? WHERE path = ? AND status = 'tagged'",
                    [(error, path_key(path)) for path, error in errors.items()],
                )

    def find_moved(self, content_hash: str) -> PhotoRecord | None:
        """A record with this content hash whose file is gone: the photo was moved or renamed."""
        rows = self.db.execute(
            f"SELECT {_PHOTO_COLUMNS} FROM photos WHERE content_hash = ? AND status = 'tagged'",
            [content_hash],
        ).fetchall()
        for row in rows:
            record = PhotoRecord.from_row(row)
            if not is_uri(record.path) and not os.path.exists(record.path):
                return record
        return None

    def move(self, old_path: str, new_path: str, size: int, mtime_ns: int, *, with_ledger: bool = True) -> None:
        """Re-point a moved photo, keeping its tags (one transaction).

        `with_ledger`: the metadata ledger's rows move along. Pass False when the file at the new
        path is not the one ramcli wrote (a copy restored from before the write): the rows say
        what ramcli put into the old file, and read against the copy they would claim that the
        user deleted those values. They stay with the old path instead."""
        old, new = normalize_path(old_path), normalize_path(new_path)
        with self._write():
            self._delete_photos(self.db.execute("SELECT id FROM photos WHERE path = ?", [to_text(new)]).fetchall())
            cur = self.db.execute(
                "UPDATE photos SET path = ?, size = ?, mtime_ns = ?, link = NULL WHERE path = ?",
                [to_text(new), size, mtime_ns, to_text(old)],
            )
            if cur.rowcount == 0:
                raise RamcliError(f"cannot move {old}: it is not in the index")
            if with_ledger:
                from ramcli.library.ledger import Ledger  # the metadata writer's table; re-pointed in this transaction

                Ledger(self.db).move(old, new)

    def update_stat(self, path: str, size: int, mtime_ns: int) -> None:
        """Record a file's new size and mtime after a metadata write, so it is not re-tagged."""
        with self._write():
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
        with self._write():
            tag_ids = self._ensure_tags(
                {t.name: t.name_zh for r in latest.values() if r.status == "tagged" for t in r.tags}, new_tag_ids
            )
            self.db.conn.executemany(
                "INSERT INTO photos (path, size, mtime_ns, content_hash, width, height, taken_at,"
                " tagged_at, model_id, vocab_version, status, error, caption, link)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (path) DO UPDATE SET size = excluded.size, mtime_ns = excluded.mtime_ns,"
                " content_hash = coalesce(excluded.content_hash, content_hash),"
                " width = coalesce(excluded.width, width), height = coalesce(excluded.height, height),"
                " taken_at = coalesce(excluded.taken_at, taken_at), tagged_at = excluded.tagged_at,"
                " model_id = excluded.model_id, vocab_version = excluded.vocab_version,"
                " status = excluded.status, error = excluded.error,"
                " caption = coalesce(excluded.caption, caption), link = excluded.link",
                [
                    (
                        path, r.size, r.mtime_ns, r.content_hash, r.width, r.height,
                        r.taken_at.isoformat() if r.taken_at else None, now, r.model_id,
                        r.vocab_version, r.status, r.error, r.caption, link_of.get(path),
                    )
                    for path, r in latest.items()
                ],
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
            cur = self.db.execute(f"SELECT {_PHOTO_COLUMNS} FROM photos ORDER BY path")
        else:
            low, high = folder_range(under)
            cur = self.db.execute(
                f"SELECT {_PHOTO_COLUMNS} FROM photos WHERE path >= ? AND path < ?"
                + (" OR (link >= ? AND link < ?)" if links else "") + " ORDER BY path",
                [low, high] * (2 if links else 1),
            )
        for row in cur:
            yield PhotoRecord.from_row(row)

    def prune(self, exists: Callable[[str], bool] = os.path.exists, dry_run: bool = False) -> list[str]:
        """Forget photos whose files are gone (only list them with `dry_run`); returns their paths.
        Photos on object storage are kept: their existence is not the local file system's to say."""
        rows = self.db.execute("SELECT id, path FROM photos ORDER BY path")
        missing = [(pid, path) for pid, path in ((pid, from_text(text)) for pid, text in rows)
                   if not is_uri(path) and not exists(path)]
        if missing and not dry_run:
            with self._write():
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
        if source not in ("builtin", "custom"):
            raise ValueError(f"source must be 'builtin' or 'custom', not {source!r}")
        rows = [(n, zh or None, lemma(n), source) for n, zh in zip(names, names_zh, strict=True)]
        with self._write():
            self.db.conn.executemany(
                "INSERT INTO tags (name, name_zh, lemma, source) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (name) DO UPDATE SET name_zh = coalesce(excluded.name_zh, name_zh),"
                " source = excluded.source",
                rows,
            )

    def add_synonym(self, alias: str, tag_name: str) -> None:
        """Make `alias` find `tag_name`'s photos. If the alias is itself a tag, the two tags' groups
        merge, so searching either finds both."""
        alias = alias.strip()
        if not alias:
            raise RamcliError("a synonym cannot be empty")
        with self._write():
            target = self.db.execute(
                "SELECT id, coalesce(group_id, id) FROM tags WHERE name = ?", [tag_name]
            ).fetchone()
            if target is None:
                raise RamcliError(f"unknown tag '{tag_name}': add it to the vocabulary first")
            tag_id, group = target
            other = self.db.execute("SELECT coalesce(group_id, id) FROM tags WHERE name = ?", [alias]).fetchone()
            if other is not None:
                self._join_groups(group, other[0])
                return
            previous = self.db.execute("SELECT tag_id FROM synonyms WHERE alias = ?", [alias]).fetchone()
            self.db.execute(
                "INSERT INTO synonyms (alias, tag_id) VALUES (?, ?) ON CONFLICT (alias) DO UPDATE SET tag_id = excluded.tag_id",
                [alias, tag_id],
            )
            for affected in {tag_id, previous[0] if previous else tag_id}:
                self._refresh_aliases(affected)

    def _join_groups(self, group: int, other: int) -> None:
        """Make every tag of group `other` a member of `group` (inside a write transaction)."""
        self.db.execute("UPDATE tags SET group_id = ? WHERE coalesce(group_id, id) IN (?, ?)", [group, group, other])

    def _refresh_aliases(self, tag_id: int) -> None:
        """Copy a tag's synonyms into `tags.aliases`, which the FTS index (and Datasette) search."""
        aliases = [a for (a,) in self.db.execute("SELECT alias FROM synonyms WHERE tag_id = ? ORDER BY alias", [tag_id])]
        self.db.execute("UPDATE tags SET aliases = ? WHERE id = ?", [" | ".join(aliases), tag_id])

    def _ensure_tags(self, names: dict[str, str], new_ids: dict[str, int]) -> dict[str, int]:
        """Ids of these tag names (by casefolded name), inserting unknown ones (inside a write)."""
        ids = {}
        missing = {}
        for name, zh in names.items():
            key = name.casefold()
            if key in self._tag_ids:
                ids[key] = self._tag_ids[key]
            else:
                missing[name] = zh
        if missing:
            self.db.conn.executemany(
                "INSERT INTO tags (name, name_zh, lemma) VALUES (?, ?, ?)"
                " ON CONFLICT (name) DO UPDATE SET name_zh = coalesce(name_zh, excluded.name_zh)",
                [(n, zh or None, lemma(n)) for n, zh in missing.items()],
            )
            for tag_id, name in self.db.execute(
                "SELECT id, name FROM tags WHERE name IN (SELECT value FROM json_each(?))", [json.dumps(list(missing))]
            ):
                ids[name.casefold()] = new_ids[name.casefold()] = tag_id
            for name in missing:  # a case variant of an existing tag maps to that tag
                key = name.casefold()
                if key not in ids:
                    (tag_id,) = self.db.execute("SELECT id FROM tags WHERE name = ?", [name]).fetchone()
                    ids[key] = new_ids[key] = tag_id
        return ids

    # --- merging -------------------------------------------------------------------------------

    def merge(self, source: Path) -> MergeCounts:
        """Copy another index's photos, tags, scores, captions, vocabulary links and write ledger
        into this one, in ONE transaction; the source is only read.

        A path in both keeps the record with the later `tagged_at`, the way a re-tag would store
        it (`record_batch`): a winning failure keeps the photo's tags (the loser's, unless it has
        none) and a missing hash, size or caption keeps the other's. Merging the same source
        twice changes nothing. An older source schema is migrated in a temporary copy (next to
        this index) first; a newer one, a non-ramcli file or a damaged one is refused."""
        source = Path(source)
        version = check_merge_source(source, self.path)
        with self._migrated(source, version) as readable:
            uri = f"{readable.resolve().as_uri()}?mode=ro"
            try:
                self.db.execute("ATTACH DATABASE ? AS merge_src", [uri])
            except sqlite3.DatabaseError as exc:
                raise _source_error(source, exc) from exc
            try:
                with self._write():
                    return self._merge_attached()
            except sqlite3.DatabaseError as exc:
                raise _source_error(source, exc) from exc
            finally:
                self.db.execute("DROP TABLE IF EXISTS temp.merge_tag_map")
                self.db.execute("DROP TABLE IF EXISTS temp.merge_photos")
                self.db.execute("DETACH DATABASE merge_src")

    @contextmanager
    def _migrated(self, source: Path, version: int) -> Iterator[Path]:
        """`source` itself when its schema is current, else a migrated temporary copy of it."""
        if version == SCHEMA_VERSION:
            yield source
            return
        with tempfile.TemporaryDirectory(prefix=".ramcli-merge-", dir=self.path.parent) as tmp:
            copy = Path(tmp) / "source.db"
            reader = sqlite3.connect(f"{source.resolve().as_uri()}?mode=ro", uri=True)
            writer = sqlite3.connect(copy)
            try:
                reader.backup(writer)  # a consistent snapshot, WAL content included
            except sqlite3.DatabaseError as exc:
                raise _source_error(source, exc) from exc
            finally:
                reader.close()
                writer.close()
            Index.open(copy).close()  # migrates forward
            yield copy

    def _merge_attached(self) -> MergeCounts:
        """The merge of the attached `merge_src` (inside a write transaction)."""
        run = self.db.execute
        # Tags by name (case-insensitive, like everywhere); this index's Chinese name and source win.
        run(
            "INSERT INTO main.tags (name, name_zh, lemma, source)"
            " SELECT name, name_zh, lemma, source FROM merge_src.tags WHERE true"
            " ON CONFLICT (name) DO UPDATE SET name_zh = coalesce(tags.name_zh, excluded.name_zh)"
        )
        run(
            "CREATE TEMP TABLE merge_tag_map AS SELECT s.id AS src_id, d.id AS dst_id, s.group_id AS src_group"
            " FROM merge_src.tags s JOIN main.tags d ON d.name = s.name"
        )
        self._merge_vocabulary()
        run(
            "CREATE TEMP TABLE merge_photos AS SELECT s.id AS src_id, s.path, d.id AS dst_id,"
            " CASE WHEN d.id IS NULL THEN 'added'"
            "  WHEN coalesce(s.tagged_at, '') > coalesce(d.tagged_at, '') THEN 'updated'"
            "  ELSE 'unchanged' END AS outcome,"
            " d.id IS NULL OR s.status = 'tagged'"
            "  OR NOT EXISTS (SELECT 1 FROM main.photo_tags pt WHERE pt.photo_id = d.id) AS take_tags"
            " FROM merge_src.photos s LEFT JOIN main.photos d ON d.path = s.path"
        )
        run(
            "UPDATE main.photos SET size = s.size, mtime_ns = s.mtime_ns,"
            " content_hash = coalesce(s.content_hash, photos.content_hash),"
            " width = coalesce(s.width, photos.width), height = coalesce(s.height, photos.height),"
            " taken_at = coalesce(s.taken_at, photos.taken_at), tagged_at = s.tagged_at,"
            " model_id = s.model_id, vocab_version = s.vocab_version, status = s.status, error = s.error,"
            " caption = coalesce(s.caption, photos.caption), link = s.link"
            " FROM merge_src.photos s JOIN temp.merge_photos m ON m.src_id = s.id"
            " WHERE m.outcome = 'updated' AND photos.id = m.dst_id"
        )
        run(
            "DELETE FROM main.photo_tags WHERE photo_id IN"
            " (SELECT dst_id FROM temp.merge_photos WHERE outcome = 'updated' AND take_tags)"
        )
        run(
            "INSERT INTO main.photos (path, size, mtime_ns, content_hash, width, height, taken_at, tagged_at,"
            " model_id, vocab_version, status, error, caption, link)"
            " SELECT s.path, s.size, s.mtime_ns, s.content_hash, s.width, s.height, s.taken_at, s.tagged_at,"
            " s.model_id, s.vocab_version, s.status, s.error, s.caption, s.link"
            " FROM merge_src.photos s JOIN temp.merge_photos m ON m.src_id = s.id WHERE m.outcome = 'added'"
        )
        run(
            "UPDATE temp.merge_photos SET dst_id = (SELECT id FROM main.photos p WHERE p.path = merge_photos.path)"
            " WHERE outcome = 'added'"
        )
        run(
            "INSERT INTO main.photo_tags (photo_id, tag_id, score)"
            " SELECT m.dst_id, tm.dst_id, st.score FROM temp.merge_photos m"
            " JOIN merge_src.photo_tags st ON st.photo_id = m.src_id"
            " JOIN temp.merge_tag_map tm ON tm.src_id = st.tag_id"
            " WHERE m.outcome != 'unchanged' AND m.take_tags"
        )
        run(
            "UPDATE main.tags SET photo_count = c.n FROM"
            " (SELECT t.id, (SELECT count(*) FROM main.photo_tags pt WHERE pt.tag_id = t.id) AS n FROM main.tags t) c"
            " WHERE c.id = tags.id AND tags.photo_count != c.n"
        )
        dropped = self._merge_ledger()
        counts = dict(run("SELECT outcome, count(*) FROM temp.merge_photos GROUP BY outcome").fetchall())
        return MergeCounts(**counts, ledger_dropped=dropped)

    def _merge_vocabulary(self) -> None:
        """The source's synonyms (this index's win a conflict) and tag groups (joined)."""
        self.db.execute(
            "INSERT INTO main.synonyms (alias, tag_id) SELECT s.alias, m.dst_id FROM merge_src.synonyms s"
            " JOIN temp.merge_tag_map m ON m.src_id = s.tag_id WHERE true ON CONFLICT (alias) DO NOTHING"
        )
        for (tag_id,) in self.db.execute(
            "SELECT DISTINCT m.dst_id FROM merge_src.synonyms s JOIN temp.merge_tag_map m ON m.src_id = s.tag_id"
        ).fetchall():
            self._refresh_aliases(tag_id)
        pairs = self.db.execute(
            "SELECT m.dst_id, g.dst_id FROM temp.merge_tag_map m JOIN temp.merge_tag_map g ON g.src_id = m.src_group"
            " WHERE m.src_group IS NOT NULL AND m.src_group != m.src_id"
        ).fetchall()
        for tag_id, leader_id in pairs:
            (group, other) = self.db.execute(
                "SELECT (SELECT coalesce(group_id, id) FROM tags WHERE id = ?),"
                " (SELECT coalesce(group_id, id) FROM tags WHERE id = ?)",
                [leader_id, tag_id],
            ).fetchone()
            if group != other:
                self._join_groups(group, other)

    def _merge_ledger(self) -> int:
        """What the source's machine wrote into photos' metadata (`ramcli.library.ledger`), so that
        `ramcli untag` here can take it out again. A row this index has already keeps its own;
        rows that cannot be ramcli's are dropped and counted."""
        from ramcli.library.ledger import Ledger

        return Ledger(self.db).merge_from("merge_src")

    # --- health ---------------------------------------------------------------------------------

    def check(self) -> list[str]:
        """Problems found by SQLite's integrity and foreign-key checks and our own invariants."""
        problems = [row[0] for row in self.db.execute("PRAGMA integrity_check") if row[0] != "ok"]
        problems += [
            f"foreign key violation in {table} row {rowid} -> {parent}"
            for table, rowid, parent, _ in self.db.execute("PRAGMA foreign_key_check")
        ]
        problems += [
            f"tag '{name}' counts {stored} photos but has {actual}"
            for name, stored, actual in self.db.execute(
                "SELECT t.name, t.photo_count, (SELECT count(*) FROM photo_tags pt WHERE pt.tag_id = t.id) AS actual"
                " FROM tags t WHERE t.photo_count != actual"
            )
        ]
        try:
            self.db.execute("INSERT INTO tags_fts(tags_fts, rank) VALUES ('integrity-check', 1)")
        except sqlite3.DatabaseError as exc:
            problems.append(f"tag search index: {exc}")
        return problems


@contextmanager
def write_transaction(conn: sqlite3.Connection, on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
    """One write transaction on an index database, for the index and for the tables other
    modules keep in it (the write ledger).

    It starts as the writer (`BEGIN IMMEDIATE`): a transaction that reads first and writes later
    would fail with "database is locked", without waiting, whenever another process committed
    in between (in WAL mode, SQLite cannot move a reader's snapshot forward). A wait for another
    process passes silently when short, else `on_wait` hears why (default: a line on stderr), and
    it lasts up to the connection's busy timeout; then a one-line `RamcliError` says that another
    process holds the index. Inside an open transaction it is a savepoint of that transaction.
    """
    if conn.in_transaction:
        name = f"ramcli_{os.urandom(8).hex()}"
        conn.execute(f"SAVEPOINT {name}")
        try:
            yield
        except BaseException:
            if conn.in_transaction:  # an error can end the whole transaction, savepoints included
                conn.execute(f"ROLLBACK TO SAVEPOINT {name}")
                conn.execute(f"RELEASE SAVEPOINT {name}")
            raise
        conn.execute(f"RELEASE SAVEPOINT {name}")
        return
    _begin_immediate(conn, on_wait or (lambda msg: print(msg, file=sys.stderr, flush=True)))
    try:
        yield
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    try:
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _begin_immediate(conn: sqlite3.Connection, on_wait: Callable[[str], None]) -> None:
    """`BEGIN IMMEDIATE`, waiting for another writer: quietly at first, then with a message."""
    timeout_ms = conn.execute("PRAGMA busy_timeout").fetchone()[0]
    path = next((file for _, name, file in conn.execute("PRAGMA database_list") if name == "main"), "") or "in memory"
    conn.execute(f"PRAGMA busy_timeout = {min(_QUIET_WAIT_MS, timeout_ms)}")
    try:
        try:
            conn.execute("BEGIN IMMEDIATE")
            return
        except sqlite3.OperationalError as exc:
            if not _is_locked(exc):
                raise
            if timeout_ms <= _QUIET_WAIT_MS:
                raise _held(path, timeout_ms / 1000) from exc
        on_wait(f"the index {path} is busy (another ramcli process is writing); waiting up to {timeout_ms / 1000:.0f} s...")
        conn.execute(f"PRAGMA busy_timeout = {timeout_ms}")
        started = time.monotonic()
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if _is_locked(exc):
                raise _held(path, time.monotonic() - started) from exc
            raise
    finally:
        conn.execute(f"PRAGMA busy_timeout = {timeout_ms}")


def _held(path: str, waited: float) -> RamcliError:
    return RamcliError(f"the index {path} stayed locked by another process for {waited:.0f} s; "
                       "try again when it has finished")


def check_merge_source(source: Path, destination: Path) -> int:
    """The schema version of an index to merge from; a one-line error when it is not one, is
    newer than this ramcli, or is the destination itself. Opens it read-only."""
    if not source.is_file():
        raise RamcliError(f"cannot merge {source}: no such file")
    if destination.exists() and source.samefile(destination):
        raise RamcliError(f"cannot merge {source} into itself")
    try:
        conn = sqlite3.connect(f"{source.resolve().as_uri()}?mode=ro", uri=True)
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        raise _source_error(source, exc) from exc
    if version < 1 or not {"photos", "tags", "photo_tags", "synonyms"} <= tables:
        raise RamcliError(f"cannot merge {source}: it is not a ramcli index")
    if version > SCHEMA_VERSION:
        raise RamcliError(
            f"cannot merge {source}: its schema version {version} is newer than this ramcli ({SCHEMA_VERSION}); "
            "upgrade ramcli"
        )
    return version


def _source_error(source: Path, exc: sqlite3.DatabaseError) -> RamcliError:
    if "not a database" in str(exc) or "malformed" in str(exc):
        return RamcliError(f"cannot merge {source}: it is not a ramcli index or is damaged ({exc})")
    return RamcliError(f"cannot merge {source}: {exc}")


def _is_locked(exc: sqlite3.OperationalError) -> bool:
    return "locked" in str(exc) or "busy" in str(exc)


def database_error(path: Path, exc: sqlite3.DatabaseError) -> RamcliError:
    """A one-line, actionable message for a database that cannot be opened."""
    if isinstance(exc, sqlite3.OperationalError) and _is_locked(exc):
        return RamcliError(f"the index {path} is locked by another process; try again when it has finished")
    if "not a database" in str(exc) or "malformed" in str(exc):
        return RamcliError(
            f"the index {path} is damaged ({exc}); move it aside and run `ramcli tag` again to rebuild it"
        )
    return RamcliError(f"cannot open the index {path}: {exc}")


def folder_range(folder: str | os.PathLike) -> tuple[str, str]:
    """The [low, high) range of the stored paths of everything under `folder`, usable with the
    path index (`to_text` maps character by character, so prefixes stay prefixes)."""
    base = path_key(folder).rstrip(os.sep) + os.sep
    return base, base[:-1] + chr(ord(os.sep) + 1)
