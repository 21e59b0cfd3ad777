"""The records that flow from the tagging pipeline to its sinks (output, index, metadata writer).

Kept in one small module so that producers and consumers agree on one shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from ramcli.pathnames import display


@dataclass(frozen=True)
class TagScore:
    """One emitted tag: its English name, Chinese name and sigmoid score."""

    name: str
    name_zh: str
    score: float


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
    content_hash: str | None = None
    width: int | None = None
    height: int | None = None
    taken_at: datetime | None = None
    model_id: str | None = None
    vocab_version: str | None = None
    tags: list[TagScore] = field(default_factory=list)
    caption: str | None = None
    error: str | None = None

    def to_json(self) -> dict:
        """The JSONL contract of `ramcli tag --format jsonl`."""
        out: dict = {
            "path": display(self.path),  # a name that is not UTF-8 or holds a newline, escaped
            "tags": [{"name": t.name, "name_zh": t.name_zh, "score": round(float(t.score), 6)} for t in self.tags],
            "model": self.model_id,
        }
        if self.caption is not None:
            out["caption"] = self.caption
        if self.status != "tagged":
            out["status"] = self.status
        if self.status != "tagged" or self.error is not None:
            out["error"] = self.error
        return out
