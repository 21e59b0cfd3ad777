"""The index's vocabulary: tags, their lemmas, synonyms and groups.

A tag group is what one search word finds: a tag and every tag merged into it by a synonym that
names another tag (`vocab synonym`). `tags.aliases` copies each tag's synonyms so that the FTS
index (and Datasette) can search them. The writing functions here run inside the caller's write
transaction (`Index.write`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable

import simplemma
import sqlite_utils

from ramcli.errors import RamcliError

SOURCES = ("builtin", "custom")


def lemma(name: str) -> str:
    """The lemmatised, lower-case form of a tag name ('Christmas Trees' -> 'christmas tree').

    Used to resolve plural/singular query words to tags; simplemma leaves non-English words alone.
    """
    return " ".join(simplemma.lemmatize(word, lang="en").lower() for word in name.split())


def upsert_tags(db: sqlite_utils.Database, names: Iterable[str], names_zh: Iterable[str | None], source: str) -> None:
    """Register tag names so search and did-you-mean know them before any photo has them."""
    if source not in SOURCES:
        raise ValueError(f"source must be 'builtin' or 'custom', not {source!r}")
    rows = [(n, zh or None, lemma(n), source) for n, zh in zip(names, names_zh, strict=True)]
    db.conn.executemany(
        "INSERT INTO tags (name, name_zh, lemma, source) VALUES (?, ?, ?, ?)"
        " ON CONFLICT (name) DO UPDATE SET name_zh = coalesce(excluded.name_zh, name_zh),"
        " source = excluded.source",
        rows,
    )


def add_synonym(db: sqlite_utils.Database, alias: str, tag_name: str) -> None:
    """Make `alias` find `tag_name`'s photos. If the alias is itself a tag, the two tags' groups
    merge, so searching either finds both."""
    alias = alias.strip()
    if not alias:
        raise RamcliError("a synonym cannot be empty")
    target = db.execute("SELECT id, coalesce(group_id, id) FROM tags WHERE name = ?", [tag_name]).fetchone()
    if target is None:
        raise RamcliError(f"unknown tag '{tag_name}': add it to the vocabulary first")
    tag_id, group = target
    other = db.execute("SELECT coalesce(group_id, id) FROM tags WHERE name = ?", [alias]).fetchone()
    if other is not None:
        join_groups(db, group, other[0])
        return
    previous = db.execute("SELECT tag_id FROM synonyms WHERE alias = ?", [alias]).fetchone()
    db.execute(
        "INSERT INTO synonyms (alias, tag_id) VALUES (?, ?) ON CONFLICT (alias) DO UPDATE SET tag_id = excluded.tag_id",
        [alias, tag_id],
    )
    for affected in {tag_id, previous[0] if previous else tag_id}:
        refresh_aliases(db, affected)


def join_groups(db: sqlite_utils.Database, group: int, other: int) -> None:
    """Make every tag of group `other` a member of `group`."""
    db.execute("UPDATE tags SET group_id = ? WHERE coalesce(group_id, id) IN (?, ?)", [group, group, other])


def refresh_aliases(db: sqlite_utils.Database, tag_id: int) -> None:
    """Copy a tag's synonyms into `tags.aliases`, which the FTS index (and Datasette) search."""
    aliases = [a for (a,) in db.execute("SELECT alias FROM synonyms WHERE tag_id = ? ORDER BY alias", [tag_id])]
    db.execute("UPDATE tags SET aliases = ? WHERE id = ?", [" | ".join(aliases), tag_id])


def ensure_tags(db: sqlite_utils.Database, names: dict[str, str], known: dict[str, int],
                new_ids: dict[str, int]) -> dict[str, int]:
    """Ids of these tag names (by casefolded name), inserting unknown ones; `known` is a cache of
    ids by casefolded name, and the ids looked up or inserted here go into `new_ids`."""
    ids = {}
    missing = {}
    for name, zh in names.items():
        key = name.casefold()
        if key in known:
            ids[key] = known[key]
        else:
            missing[name] = zh
    if missing:
        db.conn.executemany(
            "INSERT INTO tags (name, name_zh, lemma) VALUES (?, ?, ?)"
            " ON CONFLICT (name) DO UPDATE SET name_zh = coalesce(name_zh, excluded.name_zh)",
            [(n, zh or None, lemma(n)) for n, zh in missing.items()],
        )
        for tag_id, name in db.execute(
            "SELECT id, name FROM tags WHERE name IN (SELECT value FROM json_each(?))", [json.dumps(list(missing))]
        ):
            ids[name.casefold()] = new_ids[name.casefold()] = tag_id
        for name in missing:  # a case variant of an existing tag maps to that tag
            key = name.casefold()
            if key not in ids:
                (tag_id,) = db.execute("SELECT id FROM tags WHERE name = ?", [name]).fetchone()
                ids[key] = new_ids[key] = tag_id
    return ids

