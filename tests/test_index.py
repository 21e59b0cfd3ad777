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

import pytest

from ramcli.errors import RamcliError
from ramcli.index import SCHEMA_VERSION, Index
from ramcli.ledger import Ledger, LedgerEntry
from ramcli.records import PhotoResult, TagScore

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
        assert ix.check() == []


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
    assert (rec.content_hash, rec.width, rec.taken_at, rec.status) == ("h1", 4, "2021-05-01T12:00:00", "tagged")
    assert [t.name for t in index.photo_tags(str(a))] == ["dog", "beach"]
    # re-tag a: its tags are replaced, not added; doing it twice changes nothing
    for _ in range(2):
        index.record_batch([result(a, [("cat", "猫", 0.8)], content_hash="h1")])
    assert index.photo_tags(str(a)) == [TagScore("cat", "猫", 0.8)]
    counts = dict(index.db.execute("SELECT name, photo_count FROM tags").fetchall())
    assert counts == {"dog": 1, "beach": 0, "cat": 1}
    assert index.check() == []


def test_failed_result_records_error_and_keeps_earlier_tags(index, tmp_path):
    a = tmp_path / "a.jpg"
    index.record_batch([result(a, [("dog", "狗", 0.9)])])
    index.record_batch([PhotoResult(str(a), "failed", size=1, mtime_ns=2, error="cannot decode")])
    rec = index.lookup(str(a))
    assert (rec.status, rec.error) == ("failed", "cannot decode")
    assert [t.name for t in index.photo_tags(str(a))] == ["dog"]
    assert index.needs_tagging(str(a), 1, 2, "m1", "v1")


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
    assert index.check() == []


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
    assert any("counts 5 photos but has 1" in p for p in index.check())


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
    from ramcli.index import Index
    from ramcli.records import PhotoResult, TagScore
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
        assert ix.check() == []
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

    from ramcli.index import MIGRATIONS

    path = tmp_path / "v1.db"
    db = sqlite_utils.Database(path)
    MIGRATIONS[0](db)
    db.execute("PRAGMA user_version = 1")
    db.execute("INSERT INTO photos (path, status) VALUES ('/x.jpg', 'tagged')")
    db.conn.commit()
    db.close()
    with Index.open(path) as ix:
        assert ix.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
        assert ix.lookup("/x.jpg").caption is None and "caption" in ix.db["photos"].columns_dict
