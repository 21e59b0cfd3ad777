"""Every command's output: table, json, jsonl, csv, tsv or paths, to stdout or a file.

A command describes its records once, as a `Layout` (columns and a flat row, a JSON object, the
path of a record) and `RecordWriter` writes them in the format the user asked for. So the
conventions are the same for `tag`, `search`, `vocab list`, `models list` and `stats`:

- csv and tsv start with a header row. A list (tags, their scores, synonyms) is one cell, its
  items joined by `|`; parallel lists (`tags`, `scores`) line up item by item. tsv is csv with
  tabs: a value holding a tab, a newline or a quote is quoted, anything else is written as is.
- json is one array; jsonl one object per line, the same objects.
- paths: each record's path as raw bytes (a file name that is not UTF-8 survives), one a line,
  or NUL-terminated for `xargs -0`.
- a path in any other format is shown by `ramcli.pathnames.display`: bytes that are not UTF-8 and
  control characters escaped, so the text stays valid UTF-8 and one record stays one line.
- table: a rich table for people; cells are plain text, never markup, so a file named
  `[red]x.jpg` prints as it is.

jsonl, csv, tsv and paths stream: written and flushed batch by batch, so a killed run keeps
every line it printed. json and table need every record and are written at the end.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from rich.console import Console
from rich.table import Column, Table
from rich.text import Text

from ramcli.closing import Closing
from ramcli.errors import UsageError
from ramcli.pathnames import display
from ramcli.tagging.records import TAG_CELLS, TagScore, field_cell

FORMATS = ("table", "json", "jsonl", "csv", "tsv", "paths")
LIST_SEPARATOR = "|"


@dataclass(frozen=True)
class Layout:
    """How one kind of record looks in every format.

    `row` gives the csv/tsv cells in `columns` order: strings, numbers, None (empty) or lists
    (joined by `|`). `table_columns` and `table_row` give a terser view for people where the
    full row is too wide (a `Text` cell keeps its style); by default the table shows the row.
    Without `path` the layout has no `paths` format.
    """

    columns: tuple[str, ...]
    row: Callable[[Any], Sequence[Any]]
    json: Callable[[Any], dict]
    path: Callable[[Any], str] | None = None
    table_columns: tuple[str | Column, ...] | None = None
    table_row: Callable[[Any], Sequence[Any]] | None = None

    @property
    def formats(self) -> tuple[str, ...]:
        return FORMATS if self.path is not None else tuple(f for f in FORMATS if f != "paths")


def check_format(fmt: str, layout: Layout) -> str:
    if fmt not in layout.formats:
        raise UsageError(f"unknown format {fmt!r}; use one of {', '.join(layout.formats)}")
    return fmt


def cell(value: Any) -> str:
    """A csv/tsv cell: None is empty, a list is joined by `|`."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return LIST_SEPARATOR.join(cell(v) for v in value)
    return str(value)


def write_json(data: Any, stream: IO[str]) -> None:
    json.dump(data, stream, ensure_ascii=False, indent=2)
    stream.write("\n")


def make_table(columns: Iterable[str | Column], rows: Iterable[Sequence[Any]], title: str | None = None) -> Table:
    """A rich table of plain-text cells (a `Text` keeps its style; nothing is read as markup)."""
    table = Table(*columns, title=title, show_edge=False, header_style="bold")
    for row in rows:
        table.add_row(*(c if isinstance(c, Text) else Text(cell(c)) for c in row))
    return table


class RecordWriter(Closing):
    """A sink for records in one of the layout's formats; call it with each batch, then `close`.

    `output` is a file to write instead of stdout; `append` keeps what a file already holds
    (a resumed `tag` run adds to its JSONL). `null` ends each path with NUL (paths only).
    """

    def __init__(self, fmt: str, layout: Layout, output: Path | None = None, null: bool = False,
                 append: bool = False):
        self.fmt, self.layout, self.null = check_format(fmt, layout), layout, null
        if null and fmt != "paths":
            raise UsageError("-0 only goes with --format paths")
        self._owned = output is not None
        try:
            if fmt == "paths":
                self._stream: IO = open(output, "ab" if append else "wb") if output else sys.stdout.buffer
            else:
                self._stream = (open(output, "a" if append else "w", encoding="utf-8", newline="")
                                if output else sys.stdout)
        except OSError as exc:
            raise UsageError(f"cannot write {output}: {exc.strerror}") from None
        if fmt == "paths" and not self._owned:
            sys.stdout.flush()  # text written earlier goes first
        self._records: list = []
        self._csv = None
        if fmt in ("csv", "tsv"):
            dialect = {"delimiter": "\t", "lineterminator": "\n"} if fmt == "tsv" else {}
            self._csv = csv.writer(self._stream, **dialect)
            if not (append and self._stream.tell()):
                self._csv.writerow(layout.columns)

    def __call__(self, records: Iterable) -> None:
        if self.fmt == "jsonl":
            for r in records:
                self._stream.write(json.dumps(self.layout.json(r), ensure_ascii=False) + "\n")
        elif self._csv is not None:
            self._csv.writerows([cell(v) for v in self.layout.row(r)] for r in records)
        elif self.fmt == "paths":
            end = b"\0" if self.null else b"\n"
            for r in records:
                self._stream.write(os.fsencode(self.layout.path(r)) + end)
        else:
            self._records.extend(records)
            return
        self._stream.flush()

    def close(self) -> None:
        if self.fmt == "json":
            write_json([self.layout.json(r) for r in self._records], self._stream)
        elif self.fmt == "table" and self._records:
            layout = self.layout
            table_row = layout.table_row or layout.row
            table = make_table(layout.table_columns or layout.columns, (table_row(r) for r in self._records))
            Console(file=self._stream, soft_wrap=False).print(table)
        self._stream.flush()
        if self._owned:
            self._stream.close()


def write_records(records: Iterable, fmt: str, layout: Layout, output: Path | None = None, null: bool = False) -> None:
    """All of a command's records in one call (list commands)."""
    with RecordWriter(fmt, layout, output, null=null) as writer:
        writer(records)


def default_format(output: Path | None = None, piped: str = "jsonl") -> str:
    """A table for a person at a terminal; `piped` (a line-oriented format) for scripts and files."""
    return "table" if output is None and sys.stdout.isatty() else piped


# ---------------------------------------------------------------------- `ramcli tag`
LANGS = ("en", "zh", "both")


def tag_label(name: str, name_zh: str, lang: str) -> str:
    if lang == "zh":
        return name_zh or name
    if lang == "both":
        return f"{name} ({name_zh})" if name_zh and name_zh != name else name
    return name


def tag_cells(tags: Sequence[TagScore], lang: str = "en") -> list[list[str]]:
    """The `tags` and `scores` cells of a photo's csv/tsv row: parallel lists, item by item."""
    return [[tag_label(t.name, t.name_zh, lang) for t in tags], [f"{t.score:.4f}" for t in tags]]


def cell_columns(names: Sequence[str]) -> tuple[str, ...]:
    """The csv/tsv header of a view of photo fields: `tags` is two columns, tags and scores."""
    return tuple(column for name in names for column in (("tags", "scores") if name == "tags" else (name,)))


def photo_cells(photo, names: Sequence[str], lang: str = "en") -> list:
    """A photo record's csv/tsv row for a view of its fields, in `cell_columns(names)` order."""
    cells: list = []
    for name in names:
        cells += tag_cells(photo.tags, lang) if name == "tags" else [field_cell(photo, name)]
    return cells


def photo_result_layout(lang: str = "en") -> Layout:
    """`ramcli tag`'s records (PhotoResult); json is the JSONL contract of `PhotoResult.to_json`."""
    if lang not in LANGS:
        raise UsageError(f"unknown language {lang!r}; use one of {', '.join(LANGS)}")

    def table_row(r) -> list:
        if r.status != "tagged":
            return [display(r.path), Text(r.error or r.status, style="red")]
        return [display(r.path), ", ".join(f"{tag_label(t.name, t.name_zh, lang)} {t.score:.2f}" for t in r.tags)]

    return Layout(columns=cell_columns(TAG_CELLS), row=lambda r: photo_cells(r, TAG_CELLS, lang),
                  json=lambda r: r.to_json(), path=lambda r: r.path,
                  table_columns=("photo", "tags"), table_row=table_row)


def result_writer(fmt: str, output: Path | None = None, lang: str = "en") -> RecordWriter:
    """The sink of `ramcli tag`; a JSONL file given with --output is appended to, so a resumed run
    keeps the lines of the run it resumes."""
    return RecordWriter(fmt, photo_result_layout(lang), output, append=fmt == "jsonl")
