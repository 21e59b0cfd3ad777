"""One photo record: the index's columns, its SQL and every output are read off its fields."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime

from ramcli.library.columns import PhotoColumns
from ramcli.library.index import PHOTO_COLUMNS, Index, PhotoRecord
from ramcli.output import cell_columns, photo_cells
from ramcli.tagging.records import KEEP, PhotoResult, TagScore, photo_json


def test_the_record_is_the_photos_table(tmp_path):
    """A field added to the record without its migration (or a column without its field) fails here."""
    with Index.open(tmp_path / "i.db") as index:
        table = [name for _, name, *_ in index.db.execute("PRAGMA table_info(photos)")]
    assert sorted(PHOTO_COLUMNS.all) == sorted(table)


@dataclass
class RatedRecord(PhotoRecord):
    """What adding a field looks like: the field, a formatter only where the value is not its
    JSON form, and a migration that adds the column."""

    rating: int | None = field(default=None, metadata=KEEP)


def test_a_new_field_is_stored_read_kept_and_printed(tmp_path):
    columns = PhotoColumns(RatedRecord)
    assert "rating = coalesce(new.rating, old.rating)" in columns.updates("new", "old")
    record = RatedRecord("/p/a.jpg", "tagged", taken_at=datetime(2024, 5, 1, 12), rating=4,
                         tags=[TagScore("dog", "狗", 0.5)])
    with Index.open(tmp_path / "i.db") as index:
        with index.write():
            index.db.execute("ALTER TABLE photos ADD COLUMN rating INTEGER")  # its migration
            index.db.execute(f"INSERT INTO photos ({columns.names()}) VALUES ({', '.join('?' * len(columns.stored))})",
                             columns.row(record))
        (stored,) = index.db.execute("SELECT rating FROM photos").fetchone()
        read = columns.read(index.db.execute(f"SELECT {columns.select} FROM photos").fetchone())
    assert stored == 4 and read == replace(record, id=1, tags=[])
    assert photo_json(read, ("path", "rating", "taken_at")) == {
        "path": "/p/a.jpg", "rating": 4, "taken_at": "2024-05-01T12:00:00"}
    view = ("path", "rating", "tags")  # a csv view naming it
    assert cell_columns(view) == ("path", "rating", "tags", "scores")
    assert photo_cells(record, view) == ["/p/a.jpg", 4, ["dog"], ["0.5000"]]


def test_a_taken_at_that_is_not_a_date_reads_as_unknown(tmp_path):
    """An index from elsewhere is not trusted to hold ISO dates."""
    with Index.open(tmp_path / "i.db") as index:
        index.record_batch([PhotoResult("/p/a.jpg", "tagged", taken_at=datetime(2024, 5, 1))])
        with index.write():
            index.db.execute("UPDATE photos SET taken_at = 'yesterday\n'")
        assert index.lookup("/p/a.jpg").taken_at is None
