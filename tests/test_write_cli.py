"""`ramcli write` and `ramcli untag` end to end: a real index, real ExifTool, real files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from media import USER_KEYWORDS, make_photo, read_tags
from ramcli.library.index import Index
from ramcli.library.ledger import Ledger
from ramcli.tagging.records import PhotoResult, TagScore


def ramcli(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ramcli", *map(str, args)], capture_output=True, text=True, env=os.environ.copy()
    )


def indexed(tmp_path: Path) -> tuple[Path, Path, Path]:
    photos = tmp_path / "photos"
    photos.mkdir()
    jpg = make_photo(photos, "a", "jpg")
    raw = make_photo(photos, "b", "NEF")
    db = tmp_path / "index.db"
    with Index.open(db) as index:
        index.record_batch([
            PhotoResult(str(p), "tagged", size=p.stat().st_size, mtime_ns=p.stat().st_mtime_ns, model_id="m",
                        tags=[TagScore("dog", "狗", 0.9), TagScore("beach", "海滩", 0.6)])
            for p in (jpg, raw)
        ])
    return db, jpg, raw


def test_write_dry_run_then_write_then_untag(tmp_path):
    db, jpg, raw = indexed(tmp_path)
    before = jpg.read_bytes()

    dry = ramcli("write", "--index", db, "--dry-run", tmp_path / "photos")
    assert dry.returncode == 0, dry.stderr
    assert "a.jpg XMP-dc:Subject +dog +beach" in dry.stdout
    assert "b.xmp XMP-lr:HierarchicalSubject +auto|dog +auto|beach" in dry.stdout
    assert jpg.read_bytes() == before and not raw.with_suffix(".xmp").exists()

    done = ramcli("write", "--index", db, "--lang", "both")
    assert done.returncode == 0, done.stderr
    assert "2 written, 0 unchanged, 0 failed" in done.stdout
    assert read_tags(jpg, "XMP-dc:Subject")["XMP-dc:Subject"] == USER_KEYWORDS + ["dog", "狗", "beach", "海滩"]
    assert read_tags(raw.with_suffix(".xmp"), "XMP-dc:Subject")["XMP-dc:Subject"] == ["dog", "狗", "beach", "海滩"]
    with Index.open(db) as index:  # the index knows the rewritten file, so it is not re-tagged
        record = index.lookup(str(jpg))
        assert (record.size, record.mtime_ns) == (jpg.stat().st_size, jpg.stat().st_mtime_ns)

    again = ramcli("write", "--index", db, "--lang", "both", jpg)
    assert "0 written, 1 unchanged, 0 failed" in again.stdout

    gone = ramcli("untag", "--index", db, tmp_path / "photos")
    assert gone.returncode == 0, gone.stderr
    assert read_tags(jpg, "XMP-dc:Subject", "XMP-lr:HierarchicalSubject") == {"XMP-dc:Subject": USER_KEYWORDS}
    assert not raw.with_suffix(".xmp").exists()  # ramcli created it; now empty, so removed
    with Index.open(db) as index:
        assert Ledger(index.db).entries(str(jpg)) == []


def test_write_reports_failures_with_exit_1(tmp_path):
    db, jpg, _ = indexed(tmp_path)
    jpg.write_bytes(b"broken")
    result = ramcli("write", "--index", db)
    assert result.returncode == 1
    assert "a.jpg: not an image (text)" in result.stderr
    assert "1 written, 0 unchanged, 1 failed" in result.stdout
    assert "Traceback" not in result.stderr


def test_unknown_paths_are_clear_errors(tmp_path):
    db, _, _ = indexed(tmp_path)
    stray = make_photo(tmp_path, "stray", "png")
    result = ramcli("write", "--index", db, stray)
    assert result.returncode == 2 and "is not in the index" in result.stderr
    result = ramcli("untag", "--index", db, tmp_path / "nope.jpg")
    assert result.returncode == 2 and "no such file or folder" in result.stderr


def test_write_puts_the_indexed_caption_into_the_description(tmp_path):
    db, jpg, raw = indexed(tmp_path)
    with Index.open(db) as index:  # a later `ramcli tag --caption` run captioned the JPEG only
        index.record_batch([PhotoResult(str(jpg), "tagged", size=jpg.stat().st_size, mtime_ns=jpg.stat().st_mtime_ns,
                                        model_id="m", tags=[TagScore("dog", "狗", 0.9)], caption="a dog on the beach")])

    dry = ramcli("write", "--index", db, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert 'a.jpg XMP-dc:Description +"a dog on the beach"' in dry.stdout
    assert "Description" not in dry.stdout.split("b.xmp", 1)[1]

    done = ramcli("write", "--index", db)
    assert done.returncode == 0, done.stderr
    assert read_tags(jpg, "XMP-dc:Description") == {"XMP-dc:Description": ["a dog on the beach"]}
    assert "XMP-dc:Description" not in read_tags(raw.with_suffix(".xmp"), "XMP-dc:Description")

    gone = ramcli("untag", "--index", db, jpg)
    assert gone.returncode == 0, gone.stderr
    assert read_tags(jpg, "XMP-dc:Description", "XMP-dc:Subject") == {"XMP-dc:Subject": USER_KEYWORDS}
