"""The write ledger: what ramcli put into each file's metadata, so that it can take it out again.

A flat keyword `dog` that ramcli wrote looks exactly like a `dog` the user typed, so the files
themselves cannot say which keywords are ramcli's. The ledger can. It lives in the index database
(table `metadata_ledger`, created on first use) and holds one row per value ramcli wanted in one
metadata field of one target file:

- `path`: the photo; `target`: the file actually written (the photo itself, or its XMP sidecar);
- `field`: the ExifTool tag (`XMP-dc:Subject`, `XMP-lr:HierarchicalSubject`, `IPTC:Keywords`, ...;
  `XMP-dc:Description` for a caption; `ramcli:IPTCDigestBefore` for the IPTC digest state the
  photo had before ramcli first refreshed it);
- `value`: the keyword as written;
- `preexisting`: 1 when the value was already in the field before ramcli wrote there. Such a
  value is the user's: a re-tag or `ramcli untag` never removes it. 2 when the value is one of
  the user's keywords that ramcli copied from another field into a field it created, so that apps
  reading that field still show it (`seeded`): a re-tag keeps it, `untag` removes it;
- `model_id`, `written_at`: provenance.

Rows are recorded only after ExifTool reported the file written, so the ledger never claims a
keyword that ramcli failed to write.

The kill window. Between ExifTool renaming a rewritten file into place and the ledger commit, a
kill would leave ramcli's keywords in a file that the ledger does not know about: a re-run would
then take them for the user's (`preexisting`) and `untag` would never remove them. So every
ledger change that depends on a write is **staged** first (table `metadata_ledger_staged`,
committed before ExifTool starts) and **settled** after it (applied to the ledger and cleared in
one transaction). Staged rows that a killed process left behind are resolved against what the
files really hold (`MetadataWriter` does this when it starts): a value that the write was to add
is recorded if the file has it, one it was to remove is forgotten if the file lacks it.

Paths and targets are stored with `ramcli.pathnames.to_text`, like the index's, and handed out
as file-system paths. Every change is one write transaction that starts as the writer
(`ramcli.library.database.write_transaction`), so two runs on one index wait for each other, never fail.

A ledger from another machine (`ramcli index merge`) is evidence, not trust: `untag` acts on what
the ledger names. Only rows that ramcli itself could have written are merged: the target is the
photo or one of its sidecar names, the field is one the writer manages, the values are sane.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import sqlite_utils

from ramcli.library.database import write_transaction
from ramcli.pathnames import from_text, to_text

TABLE = "metadata_ledger"
STAGED_TABLE = "metadata_ledger_staged"
_COLUMNS = ("path", "target", "field", "value", "preexisting", "model_id", "written_at")
_PARAMS_PER_QUERY = 500  # well under SQLite's host-parameter limit
#: The longest value a merged row may carry (a caption is the longest value ramcli writes).
_MAX_VALUE_CHARS = 10_000

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
    seeded: bool = False  # stored as preexisting = 2 (see the module docstring)


@dataclass(frozen=True)
class Intent:
    """A ledger change that depends on an ExifTool write: staged before it, settled after it.

    `remove` False: after the write the file holds `entry.value` and the ledger has the row;
    True: the ledger drops the row. `pid`: the process that staged it (0 until staged).
    """

    entry: LedgerEntry
    remove: bool = False
    pid: int = 0


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
                if_not_exists=True,  # another process may create it at the same moment
            )
            table.create_index(["path"], if_not_exists=True)
        return table

    def merge_from(self, schema: str) -> int:
        """Copy the ledger of the database ATTACHed as `schema` (another node's index, `ramcli
        index merge`), so `untag` here can undo what that node wrote; rows this ledger already
        has keep their own values. `schema` is an attachment name chosen by the caller.

        Rows that ramcli cannot have written (`mergeable`) are dropped; returns their number."""
        has_ledger = self.db.execute(
            f"SELECT 1 FROM {schema}.sqlite_master WHERE type = 'table' AND name = ?", [TABLE]
        ).fetchone()
        if not has_ledger:
            return 0
        self._table  # noqa: B018 - creates the table on first use
        columns = ", ".join(_COLUMNS)
        rows = self.db.execute(f"SELECT {columns} FROM {schema}.{TABLE}")
        dropped = 0
        while chunk := rows.fetchmany(_PARAMS_PER_QUERY):
            good = [row for row in chunk if mergeable(row)]
            dropped += len(chunk) - len(good)
            self.db.conn.executemany(f"INSERT OR IGNORE INTO main.{TABLE} ({columns}) VALUES (?, ?, ?, ?, ?, ?, ?)", good)
        return dropped

    def entries(self, path: str | os.PathLike) -> list[LedgerEntry]:
        """Every row for the photo `path` (all its targets), in insertion order."""
        return self._query("path = ?", [to_text(path)])

    def entries_of(self, paths: list[str]) -> dict[str, list[LedgerEntry]]:
        """`entries` for many photos in a few queries (one batch of the writer)."""
        found: dict[str, list[LedgerEntry]] = {p: [] for p in paths}
        unique = [to_text(p) for p in found]
        for start in range(0, len(unique), _PARAMS_PER_QUERY):
            chunk = unique[start : start + _PARAMS_PER_QUERY]
            for e in self._query(f"path in ({','.join('?' * len(chunk))})", chunk):
                found[e.path].append(e)
        return found

    def entries_under(self, folder: str | os.PathLike) -> list[LedgerEntry]:
        """Every row for photos inside `folder` (recursively)."""
        prefix = to_text(folder).rstrip(os.sep) + os.sep
        return self._query("substr(path, 1, ?) = ?", [len(prefix), prefix])

    def paths(self) -> list[str]:
        """Every photo the ledger knows."""
        rows = self.db.execute(f"select distinct path from [{TABLE}] order by path") if self.db[TABLE].exists() else []
        return [from_text(r[0]) for r in rows]

    def record(self, entries: list[LedgerEntry]) -> None:
        """Remember values ramcli wrote (or confirmed) in a file. Existing rows keep `preexisting`."""
        if not entries:
            return
        with write_transaction(self.db.conn):  # a savepoint inside the index's own transaction
            self._table  # noqa: B018 - creates the table on first use
            self.db.conn.executemany(  # a known value keeps its first row
                f"insert or ignore into [{TABLE}] ({', '.join(_COLUMNS)}) values (?, ?, ?, ?, ?, ?, ?)",
                _rows(entries, time.time()),
            )

    def forget(self, entries: list[LedgerEntry]) -> None:
        """Drop rows for values that ramcli removed (or that are no longer its concern)."""
        if not entries or not self.db[TABLE].exists():
            return
        with write_transaction(self.db.conn):
            self.db.conn.executemany(
                f"delete from [{TABLE}] where target = ? and field = ? and value = ?",
                [(to_text(e.target), e.field, e.value) for e in entries],
            )

    # --- staging around a write (see the module docstring) --------------------------------------

    def stage(self, intents: list[Intent]) -> None:
        """Commit the intents of a write that is about to start, owned by this process.

        Call outside any open transaction: staged rows only protect the kill window once they
        are committed."""
        if not intents:
            return
        pid, now = os.getpid(), time.time()
        with write_transaction(self.db.conn):
            self._staged_table  # noqa: B018 - creates the table on first use
            self.db.conn.executemany(
                f"insert into [{STAGED_TABLE}] ({', '.join(_COLUMNS)}, remove, pid) "
                "values (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(*row, int(i.remove), pid) for i, row in zip(intents, _rows([i.entry for i in intents], now))],
            )

    def staged(self) -> list[Intent]:
        """Intents that a process which is no longer running staged and never settled."""
        if not self.db[STAGED_TABLE].exists():
            return []
        rows = self.db.execute(
            f"select {', '.join(_COLUMNS)}, remove, pid from [{STAGED_TABLE}] order by rowid"
        ).fetchall()
        alive: dict[int, bool] = {}
        out = []
        for r in rows:
            pid = r[8]
            if pid not in alive:
                alive[pid] = _running(pid)
            if not alive[pid]:
                out.append(Intent(_entry(r), bool(r[7]), pid))
        return out

    def settle(self, applied: list[Intent], cleared: list[Intent]) -> None:
        """In one transaction: apply `applied` to the ledger and drop the staged rows `cleared`."""
        with write_transaction(self.db.conn):
            self.record([i.entry for i in applied if not i.remove])
            self.forget([i.entry for i in applied if i.remove])
            if cleared and self.db[STAGED_TABLE].exists():
                self.db.conn.executemany(
                    f"delete from [{STAGED_TABLE}] where pid = ? and target = ? and field = ? and value = ? "
                    "and remove = ?",
                    [(i.pid or os.getpid(), to_text(i.entry.target), i.entry.field, i.entry.value, int(i.remove))
                     for i in cleared],
                )

    def move(self, old_path: str | os.PathLike, new_path: str | os.PathLike) -> int:
        """Re-point the rows of a photo that was moved or renamed (its sidecars moved with it).

        Returns the number of ledger rows changed (staged intents move along, uncounted).
        """
        old, new = str(old_path), str(new_path)
        ledger, staged = self.db[TABLE].exists(), self.db[STAGED_TABLE].exists()
        changed = 0
        with write_transaction(self.db.conn):
            for target in {e.target for e in self.entries(old)} | self._staged_targets(old):
                new_target = _moved_target(target, old, new)
                params = [to_text(new), to_text(new_target), to_text(old), to_text(target)]
                if ledger:
                    cur = self.db.execute(
                        f"update [{TABLE}] set path = ?, target = ? where path = ? and target = ?", params
                    )
                    changed += cur.rowcount
                if staged:
                    self.db.execute(
                        f"update [{STAGED_TABLE}] set path = ?, target = ? where path = ? and target = ?", params
                    )
        return changed

    def _staged_targets(self, path: str) -> set[str]:
        if not self.db[STAGED_TABLE].exists():
            return set()
        rows = self.db.execute(f"select target from [{STAGED_TABLE}] where path = ?", [to_text(path)])
        return {from_text(r[0]) for r in rows}

    @property
    def _staged_table(self) -> sqlite_utils.db.Table:
        table = self.db[STAGED_TABLE]
        if not table.exists():
            table.create(
                {**{c: str for c in _COLUMNS}, "preexisting": int, "written_at": float, "remove": int, "pid": int},
                not_null={"path", "target", "field", "value", "preexisting", "remove", "pid"},
                if_not_exists=True,
            )
            table.create_index(["target"], if_not_exists=True)
        return table

    def _query(self, where: str, params: list) -> list[LedgerEntry]:
        if not self.db[TABLE].exists():
            return []
        rows = self.db.execute(
            f"select path, target, field, value, preexisting, model_id, written_at from [{TABLE}] "
            f"where {where} order by rowid",
            params,
        ).fetchall()
        return [_entry(r) for r in rows]


_SEEDED = 2  # the `preexisting` column of a seeded value


def _entry(row: tuple) -> LedgerEntry:
    """A stored row (`_COLUMNS` order) as an entry."""
    return LedgerEntry(from_text(row[0]), from_text(row[1]), row[2], row[3], row[4] == 1, row[5], row[6],
                       seeded=row[4] == _SEEDED)


def _rows(entries: list[LedgerEntry], now: float) -> list[tuple]:
    return [
        (to_text(e.path), to_text(e.target), e.field, e.value, _SEEDED if e.seeded else int(e.preexisting),
         e.model_id, e.written_at or now)
        for e in entries
    ]


def mergeable(row: tuple) -> bool:
    """Whether a ledger row from another index (its stored columns, `_COLUMNS` order) is one
    ramcli could have written: an absolute, normalised photo path; a target that is the photo
    itself or one of the photo's sidecar names; a field the writer manages; a text value of sane
    length; a 0/1/2 `preexisting`; provenance of the right types."""
    from ramcli.metadata import CREATED_SIDECAR, DIGEST_BEFORE, MANAGED_FIELDS, sidecar_names  # the writer's own layout

    path, target, field, value, preexisting, model_id, written_at = row
    if not (isinstance(path, str) and isinstance(target, str) and isinstance(field, str) and isinstance(value, str)):
        return False
    photo = from_text(path)
    if not os.path.isabs(photo) or os.path.normpath(photo) != photo or "\0" in photo:
        return False
    target = from_text(target)
    if target != photo and target not in {str(p) for p in sidecar_names(Path(photo))}:
        return False
    if field == CREATED_SIDECAR:
        if target == photo or value != "1":
            return False
    elif field == DIGEST_BEFORE:
        if target != photo or not re.fullmatch(r"none|in-sync|[0-9a-f]{32}", value):
            return False
    elif field not in MANAGED_FIELDS or not value or len(value) > _MAX_VALUE_CHARS or "\0" in value:
        return False
    return (preexisting in (0, 1, _SEEDED) and (model_id is None or isinstance(model_id, str))
            and (written_at is None or isinstance(written_at, (int, float))))


def _running(pid: int) -> bool:
    """Whether the process `pid` still runs (so its staged rows are a write in flight, not
    leftovers). Where that cannot be asked cheaply (Windows), only this process counts as running."""
    if pid == os.getpid():
        return True
    if os.name == "nt":
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


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
