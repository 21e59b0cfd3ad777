"""The index's schema and its forward migrations.

The schema carries a version (`PRAGMA user_version`) and only ever migrates forward: entry i of
`MIGRATIONS` takes it from version i to i + 1, and a released migration is never edited. The
photos table's columns are the fields of `PhotoRecord` (`ramcli.library.index`); a new one comes
with a migration here.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import sqlite_utils

from ramcli.errors import RamcliError
from ramcli.library.database import write_transaction
from ramcli.pathnames import to_text


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


def migrate(db: sqlite_utils.Database, path: Path, *, readonly: bool = False,
            on_wait: Callable[[str], None] | None = None) -> None:
    """Bring the database at `path` to `SCHEMA_VERSION` in one write transaction; a newer schema
    or a read-only database that needs an upgrade is a one-line error."""
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise RamcliError(
            f"the index {path} has schema version {version}, newer than this ramcli "
            f"({SCHEMA_VERSION}): upgrade ramcli"
        )
    if version == SCHEMA_VERSION:
        return
    if readonly:
        raise RamcliError(f"the index {path} needs an upgrade: run any writing command first")
    with write_transaction(db.conn, on_wait):
        # Re-read inside the write lock: another process may have migrated meanwhile.
        version = db.execute("PRAGMA user_version").fetchone()[0]
        for step in range(version, SCHEMA_VERSION):
            MIGRATIONS[step](db)
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
