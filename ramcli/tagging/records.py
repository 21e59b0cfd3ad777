"""One photo, one record: what the tagging pipeline hands its sinks (output, index, metadata
writer), what the index stores, what search and `show` print.

`PhotoResult` is that record. Its fields are the columns of the index's `photos` table
(`ramcli.library.index.PhotoRecord` adds what only the index knows: the row id, when it was
tagged, the link it was reached through), and every output format writes them through
`photo_json`, which formats each field once, by `FORMATTERS` (csv/tsv cells by
`CELL_FORMATTERS`). The views (`TAG_JSON`, `TAG_CELLS`, `HIT_FIELDS`, `SHOWN`) only choose which
fields they print.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from ramcli.pathnames import display

#: Field metadata: a missing value (None) keeps what the index already holds for the photo
#: (a re-tag that could not read it, a merge from a machine that did not have it).
KEEP = {"keep": True}
#: Field metadata: not a column of `photos` (the tags live in their own table).
NOT_A_COLUMN = {"column": False}


@dataclass(frozen=True)
class TagScore:
    """One emitted tag: its English name, Chinese name and sigmoid score."""

    name: str
    name_zh: str
    score: float

    def to_json(self) -> dict:
        return {"name": self.name, "name_zh": self.name_zh, "score": round(float(self.score), 6)}


@dataclass
class PhotoResult:
    """The outcome of tagging one file.

    `status` is 'tagged', 'failed' (not tagged, see `error`; tried again next run) or 'broken'
    (not tagged, see `error`, and not tried again until the file changes). A tagged photo's
    `error` says why its metadata write failed. `content_hash` is a hash of the image data that
    survives metadata writes, so that moved or re-tagged files are recognised. `tags` are sorted
    by score, highest first.
    """

    path: str
    status: str
    size: int = 0
    mtime_ns: int = 0
    content_hash: str | None = field(default=None, metadata=KEEP)
    width: int | None = field(default=None, metadata=KEEP)
    height: int | None = field(default=None, metadata=KEEP)
    taken_at: datetime | None = field(default=None, metadata=KEEP)
    model_id: str | None = None
    vocab_version: str | None = None
    tags: list[TagScore] = field(default_factory=list, metadata=NOT_A_COLUMN)
    caption: str | None = field(default=None, metadata=KEEP)
    error: str | None = None

    def to_json(self) -> dict:
        """The JSONL contract of `ramcli tag --format jsonl`."""
        out = photo_json(self, TAG_JSON)
        if self.caption is None:
            del out["caption"]
        if self.status == "tagged":
            del out["status"]
            if self.error is None:
                del out["error"]
        return {"model" if name == "model_id" else name: value for name, value in out.items()}


def iso_time(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _shown_path(value: str | None) -> str | None:
    """A name that is not UTF-8 or holds a newline, escaped."""
    return None if value is None else display(value)


#: How a field is written in JSON (and from there in every other format); a field not named
#: here is written as it is.
FORMATTERS: dict[str, Callable[[Any], Any]] = {
    "path": _shown_path,
    "link": _shown_path,
    "taken_at": iso_time,
    "tags": lambda tags: [t.to_json() for t in tags],
    "score": lambda score: None if score is None else round(score, 6),
}

#: How a field is written in a csv/tsv cell where its JSON form does not serve (the tags are two
#: cells, names and scores: `ramcli.output.photo_cells`); a field not named here is written as it is.
CELL_FORMATTERS: dict[str, Callable[[Any], Any]] = {
    "path": _shown_path,
    "link": _shown_path,
    "taken_at": iso_time,
    "score": lambda score: None if score is None else f"{score:.3f}",
}

#: `ramcli tag --format jsonl|json`, in this order (`model_id` is written as "model"; caption,
#: status and error only where they say something).
TAG_JSON = ("path", "tags", "model_id", "caption", "status", "error")
#: `ramcli tag --format csv|tsv`, in this order.
TAG_CELLS = ("path", "status", "tags", "caption", "error")
#: `ramcli search --format jsonl|json|csv|tsv`, in this order.
HIT_FIELDS = ("path", "score", "taken_at", "tags", "caption")
#: `ramcli show`: the fields it prints after the path, in this order, where set.
SHOWN = ("status", "error", "size", "width", "height", "taken_at", "tagged_at", "model_id", "vocab_version",
         "content_hash", "caption", "link")


def photo_json(photo: object, names: tuple[str, ...]) -> dict:
    """The named fields of a photo record, each in its JSON form (`FORMATTERS`)."""
    return {name: FORMATTERS.get(name, _same)(getattr(photo, name)) for name in names}


def field_cell(photo: object, name: str) -> Any:
    """One field of a photo record in its csv/tsv form (`CELL_FORMATTERS`)."""
    return CELL_FORMATTERS.get(name, _same)(getattr(photo, name))


def _same(value: Any) -> Any:
    return value
