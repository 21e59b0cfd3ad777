"""The index: schema and migrations, batches, moves, prune, integrity, concurrency, kill -9."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import pytest

from ramcli.errors import RamcliError
from ramcli.library.index import Index
from ramcli.library.ledger import Ledger, LedgerEntry
from ramcli.library.merge import MergeCounts, check, merge
from ramcli.library.schema import SCHEMA_VERSION
from ramcli.tagging.listener import Summary
from ramcli.tagging.records import PhotoResult, TagScore
from ramcli.tagging.sinks import Moves

REPO = Path(__file__).resolve().parents[1]


def result(path, tags, **kw) -> PhotoResult:
    kw.setdefault("size", 100)
    kw.setdefault("mtime_ns", 5)
    kw.setdefault("model_id", "m1")
    kw.setdefault("vocab_version", "v1")
    return PhotoResult(str(path), "tagged", tags=[TagScore(n, zh, s) for n, zh, s in tags], **kw)


@pytest.fixture
def index(tmp_path):
    with Index.open(tmp_path / "index.db") as ix:
        yield ix


def test_open_creates_schema_in_home_with_wal_and_foreign_keys():
    with Index.open() as ix:
        assert ix.path.parent.is_dir()
        assert ix.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert ix.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert ix.db.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        assert {"photos", "tags", "photo_tags", "synonyms", "tags_fts"} <= set(ix.db.table_names())
    with Index.open() as ix:  # reopening migrates nothing and keeps data
        assert check(ix) == []


def test_newer_schema_is_refused(tmp_path):
    Index.open(tmp_path / "i.db").close()
    conn = sqlite3.connect(tmp_path / "i.db")
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(RamcliError, match="newer than this ramcli"):
        Index.open(tmp_path / "i.db")


def test_corrupted_file_gives_one_line_error(tmp_path):
    bad = tmp_path / "i.db"
    bad.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(RamcliError, match="damaged"):
        Index.open(bad)
    assert bad.read_bytes() == b"this is not sqlite" * 100  # nothing overwritten


def test_record_batch_upserts_replaces_tags_and_is_idempotent(index, tmp_path):
    a, b = tmp_path / "a.jpg", tmp_path / "b.jpg"
    index.record_batch([
        result(a, [("dog", "狗", 0.9), ("beach", "海滩", 0.7)], content_hash="h1", width=4, height=3,
               taken_at=datetime(2021, 5, 1, 12)),
        result(b, [("dog", "狗", 0.6)]),
    ])
    rec = index.lookup(str(a))
    assert (rec.content_hash, rec.width, rec.taken_at, rec.status) == ("h1", 4, datetime(2021, 5, 1, 12), "tagged")
    assert [t.name for t in index.photo_tags(str(a))] == ["dog", "beach"]
    # re-tag a: its tags are replaced, not added; doing it twice changes nothing
    for _ in range(2):
        index.record_batch([result(a, [("cat", "猫", 0.8)], content_hash="h1")])
    assert index.photo_tags(str(a)) == [TagScore("cat", "猫", 0.8)]
    counts = dict(index.db.execute("SELECT name, photo_count FROM tags").fetchall())
    assert counts == {"dog": 1, "beach": 0, "cat": 1}
    assert check(index) == []


def test_failed_result_records_error_and_keeps_earlier_tags(index, tmp_path):
    a = tmp_path / "a.jpg"
    index.record_batch([result(a, [("dog", "狗", 0.9)])])
    index.record_batch([PhotoResult(str(a), "failed", size=1, mtime_ns=2, error="cannot decode")])
    rec = index.lookup(str(a))
    assert (rec.status, rec.error) == ("failed", "cannot decode")
    assert [t.name for t in index.photo_tags(str(a))] == ["dog"]
    assert index.needs_tagging(str(a), 1, 2, "m1", "v1")


def test_a_broken_photo_waits_for_its_file_to_change(index, tmp_path):
    a = tmp_path / "a.jpg"
    index.record_batch([PhotoResult(str(a), "broken", size=10, mtime_ns=20, error="not an image (text)")])
    assert index.state(str(a), 10, 20, "m1", "v1") == "broken"
    assert not index.needs_tagging(str(a), 10, 20, "m1", "v1")
    assert index.state(str(a), 11, 20, "m1", "v1") == "due"  # the file changed: try again
    index.record_batch([PhotoResult(str(a), "failed", size=10, mtime_ns=20, error="permission denied")])
    assert index.state(str(a), 10, 20, "m1", "v1") == "due"  # a failure that may pass is retried


def test_a_failed_write_is_pending_until_written(index, tmp_path):
    a, b = tmp_path / "a.jpg", tmp_path / "b.jpg"
    index.record_batch([result(a, [("dog", "狗", 0.9)]), result(b, [("cat", "猫", 0.9)])])
    assert index.pending_writes() == {}
    index.set_write_errors({str(a): "metadata not written: read-only file"})
    assert index.pending_writes() == {str(a): "metadata not written: read-only file"}
    assert index.state(str(a), 100, 5, "m1", "v1") == "current"  # the photo itself is tagged
    index.set_write_errors({str(a): None})
    assert index.pending_writes() == {}


def test_needs_tagging(index, tmp_path):
    a = tmp_path / "a.jpg"
    assert index.needs_tagging(str(a), 100, 5, "m1", "v1")
    index.record_batch([result(a, [("dog", "狗", 0.9)])])
    assert not index.needs_tagging(str(a), 100, 5, "m1", "v1")
    assert index.needs_tagging(str(a), 101, 5, "m1", "v1")  # changed file
    assert index.needs_tagging(str(a), 100, 6, "m1", "v1")
    assert index.needs_tagging(str(a), 100, 5, "m2", "v1")  # other model
    assert index.needs_tagging(str(a), 100, 5, "m1", "v2")  # other vocabulary


def test_paths_are_stored_resolved(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    index.record_batch([result("sub/../a.jpg", [("dog", "狗", 0.9)])])
    assert index.lookup(str(tmp_path / "a.jpg")).path == str((tmp_path / "a.jpg").resolve())


def test_moved_photo_is_found_by_hash_and_keeps_tags_and_ledger(index, tmp_path):
    old, new = tmp_path / "old.jpg", tmp_path / "new.jpg"
    old.write_bytes(b"x")
    index.record_batch([result(old, [("dog", "狗", 0.9)], content_hash="h1")])
    Ledger(index.db).record([LedgerEntry(str(old), str(old), "XMP-dc:Subject", "dog", False)])
    assert index.find_moved("h1") is None  # still on disk: not moved
    old.rename(new)
    moved = index.find_moved("h1")
    assert moved is not None and moved.path == str(old)
    index.move(str(old), str(new), 1, 7)
    assert index.lookup(str(old)) is None
    assert (index.lookup(str(new)).mtime_ns, index.photo_tags(str(new))[0].name) == (7, "dog")
    assert [(e.path, e.target) for e in Ledger(index.db).entries(str(new))] == [(str(new), str(new))]
    with pytest.raises(RamcliError, match="not in the index"):
        index.move(str(old), str(new), 1, 7)


def test_update_stat_iter_photos_and_prune(index, tmp_path):
    (tmp_path / "in").mkdir()
    kept, gone, other = tmp_path / "in" / "a.jpg", tmp_path / "in" / "b.jpg", tmp_path / "inner.jpg"
    kept.write_bytes(b"x")
    other.write_bytes(b"x")
    index.record_batch([result(p, [("dog", "狗", 0.9)]) for p in (kept, gone, other)])
    index.update_stat(str(kept), 9, 99)
    assert (index.lookup(str(kept)).size, index.lookup(str(kept)).mtime_ns) == (9, 99)
    assert [r.path for r in index.iter_photos(tmp_path / "in")] == [str(kept), str(gone)]  # not inner.jpg
    assert index.prune() == [str(gone)]
    assert index.lookup(str(gone)) is None
    assert index.db.execute("SELECT photo_count FROM tags WHERE name = 'dog'").fetchone()[0] == 2
    assert check(index) == []


def test_upsert_tags_and_synonyms(index):
    index.upsert_tags(["dog", "glasses"], ["狗", "眼镜"], "builtin")
    index.upsert_tags(["corgi"], [""], "custom")
    rows = index.db.execute("SELECT name, name_zh, lemma, source FROM tags ORDER BY name").fetchall()
    assert rows == [("corgi", None, "corgi", "custom"), ("dog", "狗", "dog", "builtin"), ("glasses", "眼镜", "glass", "builtin")]
    index.add_synonym("puppy", "dog")
    assert index.db.execute("SELECT aliases FROM tags WHERE name = 'dog'").fetchone()[0] == "puppy"
    assert index.db.execute("SELECT t.name FROM tags_fts JOIN tags t ON t.rowid = tags_fts.rowid WHERE tags_fts MATCH 'puppy'").fetchall() == [("dog",)]
    with pytest.raises(RamcliError, match="unknown tag 'wolf'"):
        index.add_synonym("wolfie", "wolf")


def test_check_finds_broken_counts(index, tmp_path):
    index.record_batch([result(tmp_path / "a.jpg", [("dog", "狗", 0.9)])])
    index.db.execute("UPDATE tags SET photo_count = 5")
    assert any("counts 5 photos but has 1" in p for p in check(index))


def test_readonly_open_refuses_writes(tmp_path):
    Index.open(tmp_path / "i.db").close()
    with Index.open(tmp_path / "i.db", readonly=True) as ix:
        with pytest.raises(RamcliError, match="read-only"):
            ix.record_batch([result(tmp_path / "a.jpg", [])])
    with pytest.raises(RamcliError, match="no index"):
        Index.open(tmp_path / "none.db", readonly=True)


def test_second_writer_waits_with_message_then_gives_up(tmp_path):
    db = tmp_path / "i.db"
    Index.open(db).close()
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another process mid-batch
    messages = []
    with Index.open(db, busy_timeout=0.5) as ix:
        ix.on_wait = messages.append
        with pytest.raises(RamcliError, match="stayed locked"):
            ix.record_batch([result(tmp_path / "a.jpg", [("dog", "狗", 0.9)])])
        assert messages and "busy" in messages[0]
        holder.execute("COMMIT")
        ix.record_batch([result(tmp_path / "a.jpg", [("dog", "狗", 0.9)])])  # proceeds once free
        assert ix.lookup(str(tmp_path / "a.jpg")) is not None


WRITER = textwrap.dedent("""
    import sys
    from ramcli.library.index import Index
    from ramcli.tagging.records import PhotoResult, TagScore
    db, name, batches = sys.argv[1], sys.argv[2], int(sys.argv[3])
    with Index.open(db) as ix:
        for b in range(batches):
            ix.record_batch([
                PhotoResult(f"/lib/{name}/{b:05d}/{i:03d}.jpg", "tagged", size=i, mtime_ns=b,
                            tags=[TagScore(f"t{(b + i + k) % 40}", "", 0.5 + k / 100) for k in range(12)])
                for i in range(50)
            ])
            print(b, flush=True)
""")


def _writer(tmp_path, name, batches) -> subprocess.Popen:
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    return subprocess.Popen([sys.executable, str(script), str(tmp_path / "i.db"), name, str(batches)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)


def _batch_sizes(db: Path) -> dict[str, int]:
    with Index.open(db) as ix:
        rows = ix.db.execute("SELECT substr(path, 1, length(path) - 8), count(*) FROM photos GROUP BY 1").fetchall()
        assert check(ix) == []
    return dict(rows)


@pytest.mark.slow
def test_two_concurrent_writer_processes_never_corrupt(tmp_path):
    Index.open(tmp_path / "i.db").close()
    procs = [_writer(tmp_path, name, 30) for name in ("a", "b")]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    sizes = _batch_sizes(tmp_path / "i.db")
    assert len(sizes) == 60 and set(sizes.values()) == {50}
    with Index.open(tmp_path / "i.db") as ix:
        assert ix.db.execute("SELECT count(*) FROM photo_tags").fetchone()[0] == 60 * 50 * 12


@pytest.mark.slow
def test_kill_9_mid_batch_leaves_whole_batches_only(tmp_path):
    Index.open(tmp_path / "i.db").close()
    proc = _writer(tmp_path, "k", 10_000)
    for _ in range(5):  # let a few batches commit, then kill at an arbitrary point
        proc.stdout.readline()
    time.sleep(0.037)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    sizes = _batch_sizes(tmp_path / "i.db")
    assert len(sizes) >= 5 and set(sizes.values()) == {50}  # no half-written batch
    result = subprocess.run([sys.executable, "-m", "ramcli", "index", "check", "--index", str(tmp_path / "i.db")],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr


def test_a_version_1_index_migrates_forward_keeping_its_photos(tmp_path):
    """Schema 2 added captions; an index written by schema 1 upgrades in place on open."""
    import sqlite_utils

    from ramcli.library.schema import MIGRATIONS

    path = tmp_path / "v1.db"
    db = sqlite_utils.Database(path)
    MIGRATIONS[0](db)
    db.execute("PRAGMA user_version = 1")
    db.execute("INSERT INTO photos (path, status) VALUES ('/x.jpg', 'tagged')")
    db.conn.commit()
    db.close()
    with Index.open(path) as ix:
        assert ix.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 3
        assert ix.lookup("/x.jpg").caption is None and "caption" in ix.db["photos"].columns_dict


def test_a_version_2_index_migrates_to_lossless_paths_and_links(tmp_path):
    """Schema 3 stores paths with `pathnames.to_text`: the rare stored path holding one of its
    reserved characters is re-encoded (photos and ledger alike), every other one is kept as is."""
    import sqlite_utils

    from ramcli.library.schema import MIGRATIONS

    odd = "/p/" + chr(0x10FFAA) + ".jpg"  # a valid name that schema 2 stored verbatim
    path = tmp_path / "v2.db"
    db = sqlite_utils.Database(path)
    MIGRATIONS[0](db)
    MIGRATIONS[1](db)
    db.execute("PRAGMA user_version = 2")
    db.execute("INSERT INTO photos (path, status) VALUES ('/p/plain.jpg', 'tagged'), (?, 'tagged')", [odd])
    Ledger(db).record([LedgerEntry("/p/plain.jpg", "/p/plain.xmp", "XMP-dc:Subject", "cat", False)])
    db.execute("INSERT INTO metadata_ledger (path, target, field, value, preexisting)"
               " VALUES (?, ?, 'XMP-dc:Subject', 'dog', 0)", [odd, odd])  # as schema 2 stored it
    db.conn.commit()
    db.close()
    with Index.open(path) as ix:
        assert ix.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert "link" in ix.db["photos"].columns_dict
        assert [r.path for r in ix.iter_photos()] == ["/p/plain.jpg", odd]
        assert ix.lookup(odd) is not None and ix.lookup(odd).link is None
        assert [(e.target, e.value) for e in Ledger(ix.db).entries(odd)] == [(odd, "dog")]
        assert [e.target for e in Ledger(ix.db).entries("/p/plain.jpg")] == ["/p/plain.xmp"]
        stored = {p for (p,) in ix.db.execute("SELECT path FROM photos")}
        assert "/p/plain.jpg" in stored and odd not in stored  # re-encoded, not left ambiguous


def test_names_that_are_not_utf8_are_stored_losslessly(index, tmp_path):
    import os

    folder = tmp_path / os.fsdecode(b"caf\xe9")  # Latin-1 folder name
    folder.mkdir()
    photo = folder / os.fsdecode(b"\xff\xfe photo.jpg")
    photo.write_bytes(b"x")
    index.record_batch([result(photo, [("dog", "狗", 0.9)])])
    Ledger(index.db).record([LedgerEntry(str(photo), str(photo), "XMP-dc:Subject", "dog", False)])
    record = index.lookup(str(photo))
    assert os.fsencode(record.path) == os.fsencode(str(photo))  # the very bytes
    assert [r.path for r in index.iter_photos(under=folder)] == [str(photo)]
    assert index.photo_tags(str(photo)) == [TagScore("dog", "狗", 0.9)]
    assert [e.target for e in Ledger(index.db).entries_under(str(folder))] == [str(photo)]
    assert index.find_moved("nope") is None and index.prune() == []
    photo.unlink()
    assert index.prune() == [str(photo)]


# --- merging indexes from several nodes -----------------------------------------------------------


def _node(path, results, tagged_at=None) -> Path:
    """An index as one node writes it; `tagged_at` backdates every record (as if tagged then)."""
    with Index.open(path) as ix:
        ix.record_batch(results)
        if tagged_at is not None:
            ix.db.execute("UPDATE photos SET tagged_at = ?", [tagged_at])
    return path


def _state(ix) -> tuple:
    photos = ix.db.execute(
        "SELECT path, size, mtime_ns, content_hash, taken_at, tagged_at, model_id, vocab_version, status, error, caption"
        " FROM photos ORDER BY path").fetchall()
    tags = ix.db.execute("SELECT p.path, t.name, pt.score FROM photo_tags pt JOIN photos p ON p.id = pt.photo_id"
                         " JOIN tags t ON t.id = pt.tag_id ORDER BY 1, 2").fetchall()
    return photos, tags, ix.db.execute("SELECT name, photo_count FROM tags ORDER BY name").fetchall()


def _caption_hits(ix, word) -> list[str]:
    return [p for (p,) in ix.db.execute(
        "SELECT p.path FROM photos_fts JOIN photos p ON p.id = photos_fts.rowid WHERE photos_fts MATCH ? ORDER BY p.path",
        [word])]


def test_merge_keeps_the_newer_record_per_path_and_never_duplicates(index, tmp_path):
    index.record_batch([
        result("/n/a.jpg", [("dog", "狗", 0.9)], caption="a dog on a beach", content_hash="ha"),
        result("/n/b.jpg", [("cat", "猫", 0.8)], caption="a cat on a sofa", model_id="old"),
        result("/n/c.jpg", [("tree", "树", 0.7)], caption="a tree"),
    ])
    index.db.execute("UPDATE photos SET tagged_at = '2024-05-01T10:00:00+00:00' WHERE path != '/n/c.jpg'")
    index.db.execute("UPDATE photos SET tagged_at = '2024-07-01T10:00:00+00:00' WHERE path = '/n/c.jpg'")
    source = _node(tmp_path / "node1.db", [
        result("/n/b.jpg", [("sofa", "沙发", 0.6), ("Cat", "", 0.95)], caption="a black cat asleep", model_id="new",
               mtime_ns=9),
        result("/n/c.jpg", [("bush", "", 0.5)], caption="a bush"),  # older than this index's c.jpg
        result("/n/d.jpg", [("dog", "", 0.4)], caption="a puppy", content_hash="hd", taken_at=datetime(2020, 1, 2)),
    ], tagged_at="2024-06-01T10:00:00+00:00")
    before = source.read_bytes()

    assert merge(index, source) == MergeCounts(added=1, updated=1, unchanged=1)
    photos, tags, counts = _state(index)
    assert [(p[0], p[6], p[10]) for p in photos] == [
        ("/n/a.jpg", "m1", "a dog on a beach"),  # only here
        ("/n/b.jpg", "new", "a black cat asleep"),  # the source's is newer
        ("/n/c.jpg", "m1", "a tree"),  # this index's is newer
        ("/n/d.jpg", "m1", "a puppy"),  # only there
    ]
    assert photos[1][2] == 9 and photos[1][5] == "2024-06-01T10:00:00+00:00"
    assert photos[3][3:5] == ("hd", "2020-01-02T00:00:00")
    assert tags == [("/n/a.jpg", "dog", 0.9), ("/n/b.jpg", "cat", 0.95), ("/n/b.jpg", "sofa", 0.6),
                    ("/n/c.jpg", "tree", 0.7), ("/n/d.jpg", "dog", 0.4)]
    assert dict(counts) == {"bush": 0, "cat": 1, "dog": 2, "sofa": 1, "tree": 1}
    assert index.db.execute("SELECT name_zh FROM tags WHERE name = 'sofa'").fetchone() == ("沙发",)
    # the caption search index follows: the replaced caption is gone, the new ones are found
    assert _caption_hits(index, "sofa") == [] and _caption_hits(index, "asleep") == ["/n/b.jpg"]
    assert _caption_hits(index, "puppy") == ["/n/d.jpg"] and _caption_hits(index, "bush") == []
    assert check(index) == []
    index.db.execute("INSERT INTO photos_fts(photos_fts, rank) VALUES ('integrity-check', 1)")
    # merging again (or the same data twice) changes nothing and adds no row
    state = _state(index)
    assert merge(index, source) == MergeCounts(unchanged=3)
    assert _state(index) == state
    assert source.read_bytes() == before  # the source was only read


def test_merge_of_a_newer_failure_keeps_the_photos_tags(index, tmp_path):
    index.record_batch([result("/n/a.jpg", [("dog", "狗", 0.9)], caption="a dog")])
    index.db.execute("UPDATE photos SET tagged_at = '2024-01-01T00:00:00+00:00'")
    source = _node(tmp_path / "node.db", [PhotoResult("/n/a.jpg", "failed", size=1, mtime_ns=2, error="truncated")],
                   tagged_at="2024-02-01T00:00:00+00:00")
    assert merge(index, source) == MergeCounts(updated=1)
    rec = index.lookup("/n/a.jpg")
    assert (rec.status, rec.error, rec.caption) == ("failed", "truncated", "a dog")
    assert index.photo_tags("/n/a.jpg") == [TagScore("dog", "狗", 0.9)]  # like a failed re-tag
    assert check(index) == []


def test_merge_brings_synonyms_groups_and_the_write_ledger(index, tmp_path):
    from ramcli.library.search import search

    path = tmp_path / "node.db"
    with Index.open(path) as node:
        node.record_batch([result("/n/a.jpg", [("dog", "狗", 0.9)]), result("/n/b.jpg", [("puppy", "小狗", 0.8)])])
        node.add_synonym("doggo", "dog")
        node.add_synonym("puppy", "dog")  # two tags: their groups merge
        Ledger(node.db).record([LedgerEntry("/n/a.jpg", "/n/a.xmp", "XMP-dc:Subject", "dog", False)])
    merge(index, path)
    assert [h.path for h in search(index, "doggo")] == ["/n/a.jpg", "/n/b.jpg"]
    assert [h.path for h in search(index, "dog")] == ["/n/a.jpg", "/n/b.jpg"]
    assert index.db.execute("SELECT aliases FROM tags WHERE name = 'dog'").fetchone() == ("doggo",)
    assert [(e.target, e.value) for e in Ledger(index.db).entries("/n/a.jpg")] == [("/n/a.xmp", "dog")]
    merge(index, path)
    assert len(Ledger(index.db).entries("/n/a.jpg")) == 1


def test_merge_drops_ledger_rows_ramcli_cannot_have_written(index, tmp_path):
    """A crafted node index must not make `untag` here delete or rewrite other files."""
    path = tmp_path / "node.db"
    good = [
        LedgerEntry("/n/a.jpg", "/n/a.jpg", "XMP-dc:Subject", "dog", False),
        LedgerEntry("/n/a.jpg", "/n/a.jpg.xmp", "XMP-lr:HierarchicalSubject", "auto|dog", False),
        LedgerEntry("/n/b.NEF", "/n/b.xmp", "ramcli:CreatedSidecar", "1", False),
    ]
    bad = [
        LedgerEntry("/n/a.jpg", "/home/u/victim.txt", "ramcli:CreatedSidecar", "1", False),  # not a sidecar
        LedgerEntry("/n/a.jpg", "/n/other.xmp", "XMP-dc:Subject", "x", False),  # another photo's sidecar
        LedgerEntry("/n/a.jpg", "/n/a.jpg", "ramcli:CreatedSidecar", "1", False),  # the photo is no sidecar
        LedgerEntry("/n/a.jpg", "/n/a.jpg", "EXIF:Artist", "x", False),  # a field ramcli never writes
        LedgerEntry("/n/a.jpg", "/n/a.jpg", "XMP-dc:Subject", "", False),
        LedgerEntry("/n/a.jpg", "/n/a.jpg", "XMP-dc:Subject", "y" * 20_000, False),
        LedgerEntry("n/rel.jpg", "n/rel.jpg", "XMP-dc:Subject", "x", False),  # relative
        LedgerEntry("/n/../etc/a.jpg", "/n/../etc/a.jpg", "XMP-dc:Subject", "x", False),
    ]
    with Index.open(path) as node:
        Ledger(node.db).record(good + bad)
        node.db.execute("UPDATE metadata_ledger SET preexisting = 7 WHERE value = 'dog'")  # not 0/1 either
    counts = merge(index, path)
    assert counts.ledger_dropped == len(bad) + 1
    kept = index.db.execute("SELECT path, target, field FROM metadata_ledger ORDER BY target").fetchall()
    assert kept == [("/n/a.jpg", "/n/a.jpg.xmp", "XMP-lr:HierarchicalSubject"),
                    ("/n/b.NEF", "/n/b.xmp", "ramcli:CreatedSidecar")]


def test_merge_failing_midway_leaves_the_destination_as_it_was(index, tmp_path):
    index.record_batch([result("/n/a.jpg", [("dog", "狗", 0.9)], caption="old")])
    index.db.execute("UPDATE photos SET tagged_at = '2024-01-01T00:00:00+00:00'")
    source = _node(tmp_path / "node.db", [result("/n/a.jpg", [("cat", "猫", 0.9)], caption="new"),
                                          result("/n/b.jpg", [("dog", "狗", 0.5)], caption="more")])
    before = _state(index)
    # A failure after the photos were written (as a full disk would): the last step's insert aborts.
    index.db.execute("CREATE TEMP TRIGGER boom BEFORE INSERT ON main.photo_tags WHEN new.score < 0.6"
                     " BEGIN SELECT RAISE(ABORT, 'disk full'); END")
    with pytest.raises(RamcliError, match="disk full"):
        merge(index, source)
    index.db.execute("DROP TRIGGER boom")
    assert _state(index) == before and check(index) == []
    assert _caption_hits(index, "old") == ["/n/a.jpg"] and _caption_hits(index, "more") == []
    assert merge(index, source) == MergeCounts(added=1, updated=1)  # the connection is usable again


def test_merge_refuses_bad_sources_with_one_line(index, tmp_path):
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not sqlite at all" * 100)
    other = tmp_path / "other.db"
    sqlite3.connect(other).execute("CREATE TABLE photos (x)").connection.commit()
    newer = _node(tmp_path / "newer.db", [])
    conn = sqlite3.connect(newer)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    for source, message in [
        (tmp_path / "missing.db", "no such file"),
        (garbage, "not a ramcli index or is damaged"),
        (other, "not a ramcli index"),
        (newer, "newer than this ramcli"),
        (index.path, "into itself"),
        (tmp_path, "no such file"),
    ]:
        with pytest.raises(RamcliError, match=message) as exc:
            merge(index, source)
        assert "\n" not in str(exc.value)
    assert garbage.read_bytes() == b"not sqlite at all" * 100
    assert index.db.execute("SELECT count(*) FROM photos").fetchone() == (0,)


def test_merge_migrates_an_older_source_in_a_temporary_copy(index, tmp_path):
    import sqlite_utils

    from ramcli.library.schema import MIGRATIONS

    path = tmp_path / "v1.db"
    db = sqlite_utils.Database(path)
    MIGRATIONS[0](db)
    db.execute("PRAGMA user_version = 1")
    db.execute("INSERT INTO photos (path, status, tagged_at) VALUES ('/n/x.jpg', 'tagged', '2023-01-01T00:00:00+00:00')")
    db.execute("INSERT INTO tags (name, lemma, photo_count) VALUES ('dog', 'dog', 1)")
    db.execute("INSERT INTO photo_tags VALUES (1, 1, 0.75)")
    db.conn.commit()
    db.close()
    before = path.read_bytes()
    assert merge(index, path) == MergeCounts(added=1)
    assert index.photo_tags("/n/x.jpg") == [TagScore("dog", "", 0.75)] and index.lookup("/n/x.jpg").caption is None
    assert path.read_bytes() == before  # still version 1: the migration ran on a copy
    assert [p.name for p in index.path.parent.iterdir() if p.name.startswith(".ramcli-merge")] == []
    assert check(index) == []


def test_moves_are_decided_while_decoding_and_recorded_by_the_sink(index, tmp_path):
    """The decode loop only reads the index; the batch's first sink re-points. A moved photo and
    a copy of it in one run: the very file takes the record and its ledger, the copy is new."""
    old, new, copy = tmp_path / "old.jpg", tmp_path / "new.jpg", tmp_path / "copy.jpg"
    old.write_bytes(b"x")
    index.record_batch([result(old, [("dog", "狗", 0.9)], content_hash="h1")])
    old.rename(new)
    copy.write_bytes(b"xx")
    summary = Summary()
    moves = Moves(index, summary)
    before = index.db.execute("SELECT total_changes()").fetchone()
    assert moves.skip(SimpleNamespace(path=new, content_hash="h1", size=100, mtime_ns=5))  # the very file
    assert not moves.skip(SimpleNamespace(path=copy, content_hash="h1", size=2, mtime_ns=5))  # claimed: a new photo
    assert index.db.execute("SELECT total_changes()").fetchone() == before and index.lookup(str(old)) is not None
    moves([])
    assert index.lookup(str(old)) is None and index.photo_tags(str(new))[0].name == "dog"
    assert index.lookup(str(copy)) is None and summary.moved == 1
