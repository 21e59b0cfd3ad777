"""`ramcli search`, `show`, `stats`, `index prune|check` through the real entry point."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest

from ramcli.cli.app import main
from ramcli.library.index import Index
from ramcli.library.ledger import Ledger, LedgerEntry
from ramcli.tagging.records import PhotoResult, TagScore

REPO = Path(__file__).resolve().parents[1]


def run(capsysbinary, *argv) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main([*argv])
        raise SystemExit(0)
    out, err = capsysbinary.readouterr()
    return exc.value.code or 0, out.decode(), err.decode()


@pytest.fixture
def library(tmp_path):
    lib = tmp_path / "lib"
    (lib / "2021").mkdir(parents=True)
    photos = {
        lib / "a.jpg": [("dog", "狗", 0.9), ("beach", "海滩", 0.7)],
        lib / "2021" / "b.jpg": [("cat", "猫", 0.8), ("night", "夜晚", 0.6)],
        lib / "2021" / "c d.jpg": [("dog", "狗", 0.6), ("night", "夜晚", 0.9), ("christmas tree", "圣诞树", 0.75)],
    }
    for p in photos:
        p.write_bytes(b"jpeg")
    with Index.open() as ix:
        ix.record_batch([
            PhotoResult(str(p), "tagged", 4, 1, taken_at=datetime(2020 + i, 3, 4), tags=[TagScore(*t) for t in tags])
            for i, (p, tags) in enumerate(photos.items())
        ])
        ix.record_batch([PhotoResult(str(lib / "broken.jpg"), "failed", error="cannot decode image")])
    return lib


def test_search_formats_and_exit_codes(capsysbinary, library):
    code, out, err = run(capsysbinary, "search", "dog", "-f", "table")
    assert code == 0 and "a.jpg" in out and "c d.jpg" in out and "2 photos" in err
    code, out, err = run(capsysbinary, "search", "dog")  # piped: one JSON object a line, as `tag`
    assert [json.loads(line)["path"] for line in out.splitlines()] == [str(library / "a.jpg"), str(library / "2021" / "c d.jpg")]
    code, out, _ = run(capsysbinary, "search", "dog", "--format", "paths")
    assert out.splitlines() == [str(library / "a.jpg"), str(library / "2021" / "c d.jpg")]
    code, out, _ = run(capsysbinary, "search", "dog", "--format", "paths", "-0")
    assert out.split("\0") == [str(library / "a.jpg"), str(library / "2021" / "c d.jpg"), ""]
    code, out, _ = run(capsysbinary, "search", "dog", "NOT", "night", "--format", "json")
    data = json.loads(out)
    assert [d["path"] for d in data] == [str(library / "a.jpg")]
    code, out, _ = run(capsysbinary, "search", "-f", "json", "--", "dog", "-night")
    assert [d["path"] for d in json.loads(out)] == [str(library / "a.jpg")]
    assert data[0]["tags"][0] == {"name": "dog", "name_zh": "狗", "score": 0.9}
    code, out, _ = run(capsysbinary, "search", "christmas tree", "--format", "csv")
    header, row = csv.reader(io.StringIO(out))
    assert header == ["path", "score", "taken_at", "tags", "scores", "caption"]
    assert row[0] == str(library / "2021" / "c d.jpg") and row[3].split("|") == ["night", "christmas tree", "dog"]
    assert row[4].split("|") == ["0.9000", "0.7500", "0.6000"] and row[5] == ""
    code, out, _ = run(capsysbinary, "search", "christmas tree", "--format", "tsv")
    assert list(csv.reader(io.StringIO(out), delimiter="\t")) == [header, row]
    code, out, _ = run(capsysbinary, "search", "dog", "OR", "cat", "--format", "paths", "--limit", "2")
    assert len(out.splitlines()) == 2
    code, out, err = run(capsysbinary, "search", "zebra")
    assert code == 2 and "unknown tag 'zebra'" in err
    code, out, err = run(capsysbinary, "search", "dog", "cat", "-f", "table")
    assert code == 1 and "0 photos" in err


def test_show_by_file_name_from_another_folder(capsysbinary, library, tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, out, _ = run(capsysbinary, "show", "b.jpg", "-f", "json")
    assert code == 0 and json.loads(out)["path"] == str(library / "2021" / "b.jpg")
    code, out, _ = run(capsysbinary, "show", "c d.jpg", "-f", "json")
    assert code == 0 and json.loads(out)["path"] == str(library / "2021" / "c d.jpg")
    code, _, err = run(capsysbinary, "show", "b_jpg")  # LIKE's wildcards are not wildcards here
    assert code == 1 and "not in the index" in err
    with Index.open() as ix:
        ix.record_batch([PhotoResult(str(library / "2021" / "a.jpg"), "tagged", 4, 1)])
    code, _, err = run(capsysbinary, "show", "a.jpg")
    assert code == 2 and "2 photos in the index are called a.jpg" in err


def test_search_options_are_options(capsysbinary, library):
    code, out, _ = run(capsysbinary, "search", "-h")
    assert code == 0 and "Usage: ramcli search" in out and "Examples" in out
    code, out, _ = run(capsysbinary, "search", "cat", "-f", "paths")
    assert code == 0 and out.splitlines() == [str(library / "2021" / "b.jpg")]
    code, _, err = run(capsysbinary, "search", "dog", "-night")
    assert code == 2 and err.startswith("error: No such option") and "not night" in err


def test_search_excludes_with_not_or_after_double_dash(capsysbinary, library):
    for argv in (["dog", "not", "night"], ["dog not night"], ["dog", "NOT", "night"], ["--", "dog", "-night"]):
        code, out, err = run(capsysbinary, "search", "-f", "paths", *argv)
        assert (code, out.splitlines()) == (0, [str(library / "a.jpg")]), (argv, err)
    code, out, _ = run(capsysbinary, "search", "-f", "paths", "not", "night")
    assert out.splitlines() == [str(library / "a.jpg")]


def test_search_filters(capsysbinary, library):
    code, out, _ = run(capsysbinary, "search", "狗", "--since", "2022-01-01", "--format", "paths")
    assert out.splitlines() == [str(library / "2021" / "c d.jpg")]
    code, out, _ = run(capsysbinary, "search", "dog", "--in", str(library / "2021"), "--format", "paths")
    assert out.splitlines() == [str(library / "2021" / "c d.jpg")]
    code, out, _ = run(capsysbinary, "search", "dog", "--min-score", "0.8", "--format", "paths")
    assert out.splitlines() == [str(library / "a.jpg")]
    code, _, err = run(capsysbinary, "search", "dog", "--since", "last week")
    assert code == 2 and "--since wants a date" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["'; DROP TABLE photos; --"], "unknown tag"),
        (['"dog'], "unbalanced quote"),
        ([""], "empty query"),
        (["dog " * 300], "too long"),
        (["dog", "--min-score", "2"], "--min-score must be between 0 and 1"),
        (["dog", "-0"], "-0 only goes with --format paths"),
    ],
)
def test_bad_queries_one_line_exit_2_nothing_lost(capsysbinary, library, args, message):
    code, out, err = run(capsysbinary, "search", *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    with Index.open() as ix:
        assert ix.db.execute("SELECT count(*) FROM photos").fetchone()[0] == 4


def test_corrupted_index(capsysbinary, tmp_path):
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"garbage" * 1000)
    for argv in (["search", "dog"], ["stats"], ["index", "check"], ["index", "prune"]):
        code, _, err = run(capsysbinary, *argv, "--index", str(bad))
        assert code == 1 and "damaged" in err and len(err.strip().splitlines()) == 1
    assert bad.read_bytes() == b"garbage" * 1000


def test_locked_index_gives_up_with_message(tmp_path, library):
    from ramcli.config import home

    holder = sqlite3.connect(home().index, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    env = {"RAMCLI_INDEX_TIMEOUT": "1", "PATH": "/usr/bin:/bin", "RAMCLI_HOME": str(home().root)}
    (library / "a.jpg").unlink()
    result = subprocess.run([sys.executable, "-m", "ramcli", "index", "prune"], capture_output=True, text=True, cwd=REPO, env=env)
    holder.execute("ROLLBACK")
    assert result.returncode == 1 and "busy" in result.stderr and "stayed locked" in result.stderr
    assert "Traceback" not in result.stderr
    # readers are not blocked by a writer (WAL)
    holder.execute("BEGIN IMMEDIATE")
    result = subprocess.run([sys.executable, "-m", "ramcli", "search", "cat", "--format", "paths"],
                            capture_output=True, text=True, cwd=REPO, env=env)
    holder.execute("ROLLBACK")
    assert result.returncode == 0 and result.stdout.strip() == str(library / "2021" / "b.jpg")


def test_show_stats_prune_check(capsysbinary, library):
    code, out, _ = run(capsysbinary, "show", str(library / "a.jpg"), "-f", "table")
    assert code == 0 and "dog" in out and "0.900" in out and "nothing written" in out
    assert "海滩" not in out  # Chinese names only when asked
    code, out, _ = run(capsysbinary, "show", str(library / "a.jpg"), "-f", "table", "--lang", "both")
    assert "海滩" in out and "beach" in out
    with Index.open() as ix:
        Ledger(ix.db).record([LedgerEntry(str(library / "a.jpg"), str(library / "a.xmp"), "XMP-dc:Subject", k, False)
                              for k in ("dog", "beach", "auto|dog", "auto|beach")])
    code, out, _ = run(capsysbinary, "show", str(library / "a.jpg"), "-f", "table")
    assert "XMP-dc:Subject" in out and "a.xmp" in out
    assert out.count("a.xmp") == 1 and out.count("XMP-dc:Subject") == 1 and "auto|beach" in out  # one row per file and field
    code, out, _ = run(capsysbinary, "show", str(library / "a.jpg"))  # piped: one JSON object
    shown = json.loads(out)
    assert shown["path"] == str(library / "a.jpg") and [t["name"] for t in shown["tags"]] == ["dog", "beach"]
    assert shown["written"] == [{"file": str(library / "a.xmp"), "field": "XMP-dc:Subject",
                                 "values": ["dog", "beach", "auto|dog", "auto|beach"], "ours": [True] * 4}]
    code, _, err = run(capsysbinary, "show", str(library / "nope.jpg"))
    assert code == 1 and "not in the index" in err
    code, out, _ = run(capsysbinary, "stats")
    assert "狗" not in out
    assert "photos: 4" in out and "1 failed" in out and "cannot decode image" in out
    assert out.index("dog") < out.index("beach")  # top tags by count
    code, out, _ = run(capsysbinary, "stats", "--format", "json", "--top", "2")
    stats = json.loads(out)
    assert stats["photos"] == 4 and stats["by_status"] == {"failed": 1, "tagged": 3}
    assert [t["name"] for t in stats["top_tags"]] == ["dog", "night"] and stats["top_tags"][0]["photos"] == 2
    assert stats["failures"] == [{"path": str(library / "broken.jpg"), "error": "cannot decode image"}]
    assert stats["tags"]["photo_tags"] == 7
    (library / "a.jpg").unlink()
    code, out, err = run(capsysbinary, "index", "prune", "--dry-run")
    # a.jpg and the never-existing broken.jpg, by path, one per line
    assert out.splitlines() == [str(library / "a.jpg"), str(library / "broken.jpg")] and "would forget 2" in err
    with Index.open(readonly=True) as ix:
        assert ix.lookup(str(library / "a.jpg")) is not None
    code, out, err = run(capsysbinary, "index", "prune")
    assert "forgot 2" in err
    code, out, _ = run(capsysbinary, "index", "check")
    assert code == 0 and out.startswith("ok")
    code, out, _ = run(capsysbinary, "search", "beach")
    assert code == 1


def test_show_names_the_photo_once_however_many_fields_were_written(capsysbinary, library):
    with Index.open() as ix:
        Ledger(ix.db).record([LedgerEntry(str(library / "a.jpg"), str(library / "a.jpg"), field, "dog", False)
                              for field in ("XMP-dc:Subject", "IPTC:Keywords", "XMP-lr:HierarchicalSubject")])
    code, out, _ = run(capsysbinary, "show", str(library / "a.jpg"), "-f", "table")
    assert code == 0 and out.count("IPTC:Keywords") == 1
    assert out.count(str(library / "a.jpg")) == 1 and out.count("(the photo)") == 1


def test_search_without_index(capsysbinary):
    code, _, err = run(capsysbinary, "search", "dog")
    assert code == 1 and "no index" in err


@pytest.fixture
def captioned(library):
    """The library, re-tagged with Tag2Text captions (and the same tags)."""
    captions = {
        library / "a.jpg": ("a dog running on the beach", [("dog", "狗", 0.9), ("beach", "海滩", 0.7)]),
        library / "2021" / "b.jpg": ("a cat on a well-known sofa at night", [("cat", "猫", 0.8), ("night", "夜晚", 0.6)]),
        library / "2021" / "c d.jpg": ("a dog next to a christmas tree at night", [("dog", "狗", 0.6), ("night", "夜晚", 0.9)]),
    }
    with Index.open() as ix:
        ix.record_batch([
            PhotoResult(str(p), "tagged", 4, 1, taken_at=datetime(2020 + i, 3, 4), caption=c,
                        tags=[TagScore(*t) for t in tags])
            for i, (p, (c, tags)) in enumerate(captions.items())
        ])
    return library


def test_search_by_caption_alone_and_with_tags(capsysbinary, captioned):
    lib = captioned
    code, out, _ = run(capsysbinary, "search", "--caption", "night", "--format", "paths")
    assert code == 0 and sorted(out.splitlines()) == [str(lib / "2021" / "b.jpg"), str(lib / "2021" / "c d.jpg")]
    code, out, _ = run(capsysbinary, "search", "dog", "--caption", "at night", "--format", "paths")
    assert out.splitlines() == [str(lib / "2021" / "c d.jpg")]  # both the tag and the caption
    code, out, _ = run(capsysbinary, "search", "dog", "--caption", "sofa")
    assert code == 1  # the caption matches b, the tag does not
    code, out, _ = run(capsysbinary, "search", "--caption", "night", "--in", str(lib / "2021"), "--since", "2022-01-01",
                       "--format", "paths")
    assert out.splitlines() == [str(lib / "2021" / "c d.jpg")]
    code, out, _ = run(capsysbinary, "search", "night", "--caption", "a", "--min-score", "0.7", "--format", "paths")
    assert out.splitlines() == [str(lib / "2021" / "c d.jpg")]
    code, out, _ = run(capsysbinary, "search", "--caption", '"christmas tree"', "--format", "json")
    data = json.loads(out)
    assert [(d["path"], d["caption"], d["score"]) for d in data] == [
        (str(lib / "2021" / "c d.jpg"), "a dog next to a christmas tree at night", None)]
    assert [t["name"] for t in data[0]["tags"]] == ["night", "dog"]
    code, out, _ = run(capsysbinary, "search", "dog", "--caption", "beach", "--format", "jsonl")
    rows = [json.loads(line) for line in out.splitlines()]
    assert [(r["path"], r["caption"], r["score"]) for r in rows] == [(str(lib / "a.jpg"), "a dog running on the beach", 0.9)]
    code, out, err = run(capsysbinary, "search", "--caption", "running", "-f", "table")
    assert code == 0 and "caption" in out and "a.jpg" in out and "1 photo" in err  # the table gets a caption column
    code, out, _ = run(capsysbinary, "search", "--caption", "night", "--limit", "1", "--format", "paths")
    assert len(out.splitlines()) == 1


def test_search_caption_gallery(capsysbinary, captioned, tmp_path):
    page = tmp_path / "g.html"
    code, _, err = run(capsysbinary, "search", "--caption", "beach", "--gallery", str(page), "--format", "paths")
    assert code == 0 and "gallery" in err
    html = page.read_text()
    assert "a.jpg" in html and "b.jpg" not in html and "--caption beach" in html


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "give tags, --caption TEXT or both"),
        (["--caption", ""], "--caption needs at least one word"),
        (["--caption", '"'], "--caption needs at least one word"),
        (["--caption", "- * ^"], "--caption needs at least one word"),
        (["--caption", "dog", "--min-score", "0.5"], "--min-score applies to tags"),
        (["zebra", "--caption", "dog"], "unknown tag 'zebra'"),
    ],
)
def test_bad_caption_searches_one_line_exit_2(capsysbinary, captioned, args, message):
    code, out, err = run(capsysbinary, "search", *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("text", ['dog "', "NEAR(dog", "dog OR", "-dog", "dog*", "^night", "dog AND NOT", "'; DROP TABLE photos; --"])
def test_fts5_syntax_in_caption_is_plain_words(capsysbinary, captioned, text):
    code, out, err = run(capsysbinary, "search", "--caption", text, "--format", "paths")
    assert code in (0, 1) and "Traceback" not in err and "error" not in err
    with Index.open() as ix:
        assert ix.db.execute("SELECT count(*) FROM photos").fetchone()[0] == 4
    if text in ('dog "', "-dog", "dog*"):  # the word dog, whatever punctuation surrounds it
        assert sorted(out.splitlines()) == [str(captioned / "2021" / "c d.jpg"), str(captioned / "a.jpg")]


def _node_index(path, photos, tagged_at="2024-01-01T00:00:00+00:00") -> Path:
    """An index as one node of a multi-node run writes it, tagged at `tagged_at`."""
    with Index.open(path) as ix:
        ix.record_batch([PhotoResult(str(p), "tagged", 4, 1, tags=[TagScore(*t) for t in tags], caption=c)
                         for p, tags, c in photos])
        ix.db.execute("UPDATE photos SET tagged_at = ?", [tagged_at])
    return path


def test_index_merge_combines_node_indexes(capsysbinary, tmp_path):
    n1 = _node_index(tmp_path / "node1.db", [(tmp_path / "a.jpg", [("dog", "狗", 0.9)], "a dog on grass"),
                                             (tmp_path / "b.jpg", [("cat", "猫", 0.8)], None)],
                     tagged_at="2024-02-01T00:00:00+00:00")
    n2 = _node_index(tmp_path / "node2.db", [(tmp_path / "c.jpg", [("dog", "狗", 0.7)], "a dog in snow"),
                                             (tmp_path / "b.jpg", [("cat", "猫", 0.6)], None)])  # b: older than node1's
    code, out, err = run(capsysbinary, "index", "merge", str(n1), str(n2))
    assert code == 0, err
    assert out.splitlines() == [f"{n1}: 2 added, 0 updated, 0 unchanged", f"{n2}: 1 added, 0 updated, 1 unchanged"]
    assert "merged 2 indexes into" in err
    code, out, _ = run(capsysbinary, "search", "dog", "--format", "paths")
    assert out.splitlines() == [str(tmp_path / "a.jpg"), str(tmp_path / "c.jpg")]
    code, out, _ = run(capsysbinary, "search", "--caption", "snow", "--format", "paths")
    assert out.splitlines() == [str(tmp_path / "c.jpg")]
    code, out, _ = run(capsysbinary, "search", "cat", "--format", "json")
    assert [(d["path"], d["score"]) for d in json.loads(out)] == [(str(tmp_path / "b.jpg"), 0.8)]  # node1's, newer
    code, out, _ = run(capsysbinary, "index", "check")
    assert code == 0
    code, out, _ = run(capsysbinary, "index", "merge", str(n1), str(n2))  # again: nothing new
    assert out.splitlines() == [f"{n1}: 0 added, 0 updated, 2 unchanged", f"{n2}: 0 added, 0 updated, 2 unchanged"]
    dest = tmp_path / "all.db"
    code, out, _ = run(capsysbinary, "index", "merge", str(n2), "--index", str(dest))
    assert code == 0 and out.startswith(f"{n2}: 2 added")
    code, out, _ = run(capsysbinary, "search", "cat", "--format", "paths", "--index", str(dest))
    assert out.splitlines() == [str(tmp_path / "b.jpg")]


def test_index_merge_bad_source_one_line_and_nothing_merged(capsysbinary, tmp_path):
    good = _node_index(tmp_path / "good.db", [(tmp_path / "a.jpg", [("dog", "狗", 0.9)], None)])
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"garbage" * 1000)
    for args, message in [([str(good), str(bad)], "not a ramcli index or is damaged"),
                          ([str(tmp_path / "none.db")], "no such file")]:
        code, out, err = run(capsysbinary, "index", "merge", *args)
        assert code == 1 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    code, _, err = run(capsysbinary, "index", "merge")
    assert code == 2
    code, _, _ = run(capsysbinary, "search", "dog")
    assert code == 1  # the good source was not merged either: bad sources are refused first
    assert bad.read_bytes() == b"garbage" * 1000
