"""Combining indexes that separate machines wrote (one per node of a multi-node run), and
checking an index's health.

A merge is one transaction per source, the source ATTACHed read-only and every row copied by SQL
on the attached schema, so no value from a source ever becomes SQL text. The photo columns it
copies, and which of them a missing value leaves alone, are the index's own (`PhotoRecord`).
"""

from __future__ import annotations

import sqlite3
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import sqlite_utils

from ramcli.errors import RamcliError
from ramcli.library import tags
from ramcli.library.database import connect
from ramcli.library.index import PHOTO_COLUMNS, Index
from ramcli.library.schema import SCHEMA_VERSION, migrate


@dataclass(frozen=True)
class MergeCounts:
    """What `merge` did with one source's photos."""

    added: int = 0
    updated: int = 0
    unchanged: int = 0
    #: Rows of the source's write ledger that were not taken (see `Ledger.merge_from`).
    ledger_dropped: int = 0


def merge(index: Index, source: Path) -> MergeCounts:
    """Copy another index's photos, tags, scores, captions, vocabulary links and write ledger
    into `index`, in ONE transaction; the source is only read.

    A path in both keeps the record with the later `tagged_at`, the way a re-tag would store
    it (`Index.record_batch`): a winning failure keeps the photo's tags (the loser's, unless it
    has none) and a missing hash, size or caption keeps the other's. Merging the same source
    twice changes nothing. An older source schema is migrated in a temporary copy (next to
    this index) first; a newer one, a non-ramcli file or a damaged one is refused."""
    source = Path(source)
    version = check_merge_source(source, index.path)
    with _migrated(source, version, index.path.parent) as readable:
        uri = f"{readable.resolve().as_uri()}?mode=ro"
        try:
            index.db.execute("ATTACH DATABASE ? AS merge_src", [uri])
        except sqlite3.DatabaseError as exc:
            raise _source_error(source, exc) from exc
        try:
            with index.write():
                return _merge_attached(index.db)
        except sqlite3.DatabaseError as exc:
            raise _source_error(source, exc) from exc
        finally:
            index.db.execute("DROP TABLE IF EXISTS temp.merge_tag_map")
            index.db.execute("DROP TABLE IF EXISTS temp.merge_photos")
            index.db.execute("DETACH DATABASE merge_src")


@contextmanager
def _migrated(source: Path, version: int, scratch: Path) -> Iterator[Path]:
    """`source` itself when its schema is current, else a migrated temporary copy of it."""
    if version == SCHEMA_VERSION:
        yield source
        return
    with tempfile.TemporaryDirectory(prefix=".ramcli-merge-", dir=scratch) as tmp:
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
        db = sqlite_utils.Database(connect(copy, readonly=False, timeout=5.0))
        try:
            migrate(db, copy)
        finally:
            db.close()
        yield copy


def _merge_attached(db: sqlite_utils.Database) -> MergeCounts:
    """The merge of the attached `merge_src` (inside a write transaction)."""
    run = db.execute
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
    _merge_vocabulary(db)
    run(
        "CREATE TEMP TABLE merge_photos AS SELECT s.id AS src_id, s.path, d.id AS dst_id,"
        " CASE WHEN d.id IS NULL THEN 'added'"
        "  WHEN coalesce(s.tagged_at, '') > coalesce(d.tagged_at, '') THEN 'updated'"
        "  ELSE 'unchanged' END AS outcome,"
        " d.id IS NULL OR s.status = 'tagged'"
        "  OR NOT EXISTS (SELECT 1 FROM main.photo_tags pt WHERE pt.photo_id = d.id) AS take_tags"
        " FROM merge_src.photos s LEFT JOIN main.photos d ON d.path = s.path"
    )
    columns = PHOTO_COLUMNS
    run(
        f"UPDATE main.photos SET {columns.updates('s', 'photos')}"
        " FROM merge_src.photos s JOIN temp.merge_photos m ON m.src_id = s.id"
        " WHERE m.outcome = 'updated' AND photos.id = m.dst_id"
    )
    run(
        "DELETE FROM main.photo_tags WHERE photo_id IN"
        " (SELECT dst_id FROM temp.merge_photos WHERE outcome = 'updated' AND take_tags)"
    )
    run(
        f"INSERT INTO main.photos ({columns.names()})"
        f" SELECT {columns.names('s')}"
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
    dropped = _merge_ledger(db)
    counts = dict(run("SELECT outcome, count(*) FROM temp.merge_photos GROUP BY outcome").fetchall())
    return MergeCounts(**counts, ledger_dropped=dropped)


def _merge_vocabulary(db: sqlite_utils.Database) -> None:
    """The source's synonyms (this index's win a conflict) and tag groups (joined)."""
    db.execute(
        "INSERT INTO main.synonyms (alias, tag_id) SELECT s.alias, m.dst_id FROM merge_src.synonyms s"
        " JOIN temp.merge_tag_map m ON m.src_id = s.tag_id WHERE true ON CONFLICT (alias) DO NOTHING"
    )
    for (tag_id,) in db.execute(
        "SELECT DISTINCT m.dst_id FROM merge_src.synonyms s JOIN temp.merge_tag_map m ON m.src_id = s.tag_id"
    ).fetchall():
        tags.refresh_aliases(db, tag_id)
    pairs = db.execute(
        "SELECT m.dst_id, g.dst_id FROM temp.merge_tag_map m JOIN temp.merge_tag_map g ON g.src_id = m.src_group"
        " WHERE m.src_group IS NOT NULL AND m.src_group != m.src_id"
    ).fetchall()
    for tag_id, leader_id in pairs:
        (group, other) = db.execute(
            "SELECT (SELECT coalesce(group_id, id) FROM tags WHERE id = ?),"
            " (SELECT coalesce(group_id, id) FROM tags WHERE id = ?)",
            [leader_id, tag_id],
        ).fetchone()
        if group != other:
            tags.join_groups(db, group, other)


def _merge_ledger(db: sqlite_utils.Database) -> int:
    """What the source's machine wrote into photos' metadata (`ramcli.library.ledger`), so that
    `ramcli untag` here can take it out again. A row this index has already keeps its own;
    rows that cannot be ramcli's are dropped and counted."""
    from ramcli.library.ledger import Ledger

    return Ledger(db).merge_from("merge_src")


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


def check(index: Index) -> list[str]:
    """Problems found by SQLite's integrity and foreign-key checks and the index's own invariants."""
    db = index.db
    problems = [row[0] for row in db.execute("PRAGMA integrity_check") if row[0] != "ok"]
    problems += [
        f"foreign key violation in {table} row {rowid} -> {parent}"
        for table, rowid, parent, _ in db.execute("PRAGMA foreign_key_check")
    ]
    problems += [
        f"tag '{name}' counts {stored} photos but has {actual}"
        for name, stored, actual in db.execute(
            "SELECT t.name, t.photo_count, (SELECT count(*) FROM photo_tags pt WHERE pt.tag_id = t.id) AS actual"
            " FROM tags t WHERE t.photo_count != actual"
        )
    ]
    try:
        db.execute("INSERT INTO tags_fts(tags_fts, rank) VALUES ('integrity-check', 1)")
    except sqlite3.DatabaseError as exc:
        problems.append(f"tag search index: {exc}")
    return problems
