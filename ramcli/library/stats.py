"""What the index holds (`ramcli stats`): photos by status, tag counts, top tags, failures."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ramcli.library.index import Index
from ramcli.pathnames import display, from_text


@dataclass(frozen=True)
class IndexStats:
    path: Path
    size: int  # bytes of the database file
    photos: dict[str, int]  # photos by status
    tags_known: int
    tags_in_use: int
    photo_tags: int
    top_tags: list[tuple[str, str, int]]  # (name, Chinese name, photos), most photos first
    failures: list[tuple[str, str]]  # (path, error) of the first photos by path that are not tagged

    def to_json(self) -> dict:
        return {
            "index": str(self.path), "size": self.size, "photos": sum(self.photos.values()),
            "by_status": dict(sorted(self.photos.items())),
            "tags": {"known": self.tags_known, "in_use": self.tags_in_use, "photo_tags": self.photo_tags},
            "top_tags": [{"name": n, "name_zh": zh, "photos": c} for n, zh, c in self.top_tags],
            "failures": [{"path": display(p), "error": e} for p, e in self.failures],
        }


def index_stats(index: Index, top: int = 15, failures: int = 10) -> IndexStats:
    """Photos by status, tag counts, the `top` most used tags and the first `failures` failures."""
    db = index.db
    by_status = dict(db.execute("SELECT status, count(*) FROM photos GROUP BY status").fetchall())
    known, used = db.execute("SELECT count(*), count(*) FILTER (WHERE photo_count > 0) FROM tags").fetchone()
    links = db.execute("SELECT coalesce(sum(photo_count), 0) FROM tags").fetchone()[0]
    top_tags = db.execute("SELECT name, coalesce(name_zh, ''), photo_count FROM tags WHERE photo_count > 0"
                          " ORDER BY photo_count DESC, name LIMIT ?", [top]).fetchall()
    failed = db.execute("SELECT path, coalesce(error, '') FROM photos WHERE status != 'tagged' ORDER BY path LIMIT ?",
                        [failures]).fetchall()
    return IndexStats(index.path, index.path.stat().st_size, by_status, known, used, links,
                      [tuple(r) for r in top_tags], [(from_text(p), e) for p, e in failed])
