"""The columns of the index's `photos` table, generated from the fields of the photo record.

A field is a column unless its metadata says otherwise (`records.NOT_A_COLUMN`); `records.KEEP`
marks the columns where a missing value keeps the stored one. The few columns not stored as they
are (paths as `to_text`, the date taken as ISO 8601 text) have their codec in `_STORED`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import MISSING, fields
from datetime import datetime
from functools import partial
from typing import Any

from ramcli.pathnames import from_text, to_text
from ramcli.tagging.records import iso_time


def _parse_time(text: str | None) -> datetime | None:
    """A stored `taken_at`; text that is not ISO 8601 (an index from elsewhere) reads as unknown."""
    try:
        return datetime.fromisoformat(text) if text else None
    except (TypeError, ValueError):
        return None


def _path_or_none(text: str | None) -> str | None:
    return None if text is None else from_text(text)


#: How a column's value is stored, and read back, where it is not stored as it is.
_STORED: dict[str, tuple[Callable[[Any], Any], Callable[[Any], Any]]] = {
    "path": (to_text, from_text),
    "link": (lambda p: None if p is None else to_text(p), _path_or_none),
    "taken_at": (iso_time, _parse_time),
}


class PhotoColumns:
    """The `photos` table's columns, read off a photo record's fields (`PhotoRecord`): what
    every SELECT, INSERT and update of a photo names, so that a field added to the record (with
    its migration) is stored, read, merged and printed without another line here."""

    def __init__(self, record: type):
        init = fields(record)
        columns = [f for f in init if f.metadata.get("column", True)]
        #: Every column, in the record's field order (so a row is the record's positional arguments).
        self.all = tuple(f.name for f in columns)
        #: Every column but the row id, which SQLite assigns.
        self.stored = tuple(n for n in self.all if n != "id")
        #: Columns where a missing value keeps the stored one (`records.KEEP`).
        self.kept = frozenset(f.name for f in columns if f.metadata.get("keep"))
        self.record = record
        self._decoders = tuple((i, _STORED[n][1]) for i, n in enumerate(self.all) if n in _STORED)
        # The fields that are not columns but come before one (the tags): their defaults, by position.
        last = max(i for i, f in enumerate(init) if f in columns)
        self._fills = tuple((i, f.default_factory if f.default_factory is not MISSING else partial(_same, f.default))
                            for i, f in enumerate(init[:last]) if f not in columns)

    def names(self, table: str | None = None) -> str:
        """The stored columns as a SQL list, each prefixed with `table.` when given."""
        return ", ".join(f"{table}.{n}" if table else n for n in self.stored)

    def updates(self, new: str, old: str) -> str:
        """`SET` assignments that take a re-tagged or merged photo's values from the row `new`,
        where a missing value in a `KEEP` column keeps row `old`'s."""
        return ", ".join(f"{n} = coalesce({new}.{n}, {old}.{n})" if n in self.kept else f"{n} = {new}.{n}"
                         for n in self.stored if n != "path")

    def row(self, photo: Any, **given: Any) -> tuple:
        """The stored values of `photo`, in `stored` order; `given` supplies (already stored) the
        values the tagging result does not have."""
        return tuple(given[n] if n in given else _stored(n, getattr(photo, n)) for n in self.stored)

    def read(self, row: Sequence) -> Any:
        """A record from a `SELECT {PHOTO_COLUMNS.select}` row, its paths as file-system paths."""
        values = list(row)
        for i, decode in self._decoders:
            values[i] = decode(values[i])
        for i, default in self._fills:
            values.insert(i, default())
        return self.record(*values)

    @property
    def select(self) -> str:
        return ", ".join(self.all)


def _same(value: Any) -> Any:
    return value


def _stored(name: str, value: Any) -> Any:
    return _STORED[name][0](value) if name in _STORED else value
