"""The write ledger: what ramcli put into each file's metadata, so that it can take it out again.

A flat keyword `dog` that ramcli wrote looks exactly like a `dog` the user typed, so the files
themselves cannot say which keywords are ramcli's. The ledger can. It lives in the index database
(table `metadata_ledger`, created on first use) and holds one row per value ramcli wanted in one
metadata field of one target file:

- `path`: the photo; `target`: the file actually written (the photo itself, or its XMP sidecar);
- `field`: the ExifTool tag (`XMP-dc:Subject`, `XMP-lr:HierarchicalSubject`, `IPTC:Keywords`, ...);
- `value`: the keyword as written;
- `preexisting`: 1 when the value was already in the field before ramcli wrote there. Such a
  value is the user's: a re-tag or `ramcli untag` never removes it;
- `model_id`, `written_at`: provenance.

Rows are recorded only after ExifTool reported the file written, so the ledger never claims a
keyword that is not in the file because of ramcli.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import sqlite_utils

TABLE = "metadata_ledger"

# Sidecar of the photo `path` that a target name may be derived from (see metadata.sidecar_names).
_SIDECAR_SUFFIXES = (".xmp", ".XMP")


@dataclass(frozen=True)
class LedgerEntry:
    path: str
    target: str
    field: str
    value: str
    preexisting: bool
    model_id: str | None = None
    written_at: float | None = None


class Ledger:
    """The `metadata_ledger` table of an index database (any `sqlite_utils.Database`)."""

    def __init__(self, db: sqlite_utils.Database):
        self.db = db

    @property
    def _table(self) -> sqlite_utils.db.Table:
        table = self.db[TABLE]
        if not table.exists():
            table.create(
                {
                    "path": str,
                    "target": str,
                    "field": str,
                    "value": str,
                    "preexisting": int,
                    "model_id": str,
                    "written_at": float,
                },
                pk=("target", "field", "value"),
                not_null={"path", "target", "field", "value", "preexisting"},
            )
            table.create_index(["path"])
        return table

    def entries(self, path: str | os.PathLike) -> list[LedgerEntry]:
        """Every row for the photo `path` (all its targets), in insertion order."""
        return self._query("path = ?", [str(path)])

    def entries_under(self, folder: str | os.PathLike) -> list[LedgerEntry]:
        """Every row for photos inside `folder` (recursively)."""
        prefix = str(folder).rstrip(os.sep) + os.sep
        return self._query("substr(path, 1, ?) = ?", [len(prefix), prefix])

    def paths(self) -> list[str]:
        """Every photo the ledger knows."""
        rows = self.db.execute(f"select distinct path from [{TABLE}] order by path") if self.db[TABLE].exists() else []
        return [r[0] for r in rows]

    def record(self, entries: list[LedgerEntry]) -> None:
        """Remember values ramcli wrote (or confirmed) in a file. Existing rows keep `preexisting`."""
        if not entries:
            return
        now = time.time()
        rows = [
            {
                "path": e.path,
                "target": e.target,
                "field": e.field,
                "value": e.value,
                "preexisting": int(e.preexisting),
                "model_id": e.model_id,
                "written_at": e.written_at or now,
            }
            for e in entries
        ]
        with self.db.atomic():  # nests (as a savepoint) inside the index's own transaction
            self._table.insert_all(rows, ignore=True)  # a known value keeps its first row

    def forget(self, entries: list[LedgerEntry]) -> None:
        """Drop rows for values that ramcli removed (or that are no longer its concern)."""
        if not entries or not self.db[TABLE].exists():
            return
        with self.db.atomic():
            for e in entries:
                self.db.execute(
                    f"delete from [{TABLE}] where target = ? and field = ? and value = ?",
                    [e.target, e.field, e.value],
                )

    def move(self, old_path: str | os.PathLike, new_path: str | os.PathLike) -> int:
        """Re-point the rows of a photo that was moved or renamed (its sidecars moved with it).

        Returns the number of rows changed.
        """
        old, new = str(old_path), str(new_path)
        if not self.db[TABLE].exists():
            return 0
        changed = 0
        with self.db.atomic():
            for target in {e.target for e in self.entries(old)}:
                new_target = _moved_target(target, old, new)
                cur = self.db.execute(
                    f"update [{TABLE}] set path = ?, target = ? where path = ? and target = ?",
                    [new, new_target, old, target],
                )
                changed += cur.rowcount
        return changed

    def _query(self, where: str, params: list) -> list[LedgerEntry]:
        if not self.db[TABLE].exists():
            return []
        rows = self.db.execute(
            f"select path, target, field, value, preexisting, model_id, written_at from [{TABLE}] "
            f"where {where} order by rowid",
            params,
        ).fetchall()
        return [LedgerEntry(r[0], r[1], r[2], r[3], bool(r[4]), r[5], r[6]) for r in rows]


def _moved_target(target: str, old: str, new: str) -> str:
    """The new name of a target when its photo moves: the photo itself, `IMG.CR2.xmp` or `IMG.xmp`."""
    if target == old:
        return new
    for suffix in _SIDECAR_SUFFIXES:
        if target == old + suffix:
            return new + suffix
        if target == str(Path(old).with_suffix(suffix)):
            return str(Path(new).with_suffix(suffix))
    return target
