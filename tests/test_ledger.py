"""The write ledger: what ramcli wrote where, kept exactly (no ExifTool needed)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import sqlite_utils

from ramcli.library.ledger import STAGED_TABLE, TABLE, Intent, Ledger, LedgerEntry


def entry(path="/p/IMG.jpg", target=None, field="XMP-dc:Subject", value="dog", pre=False, model="m1"):
    return LedgerEntry(path, target or path, field, value, pre, model)


def test_record_and_read_back_per_photo(tmp_path):
    ledger = Ledger(sqlite_utils.Database(tmp_path / "i.db"))
    assert ledger.entries("/p/IMG.jpg") == []  # no table yet: nothing, and no error
    ledger.record([entry(value="dog"), entry(value="Oma", pre=True), entry(path="/p/other.jpg")])
    got = ledger.entries("/p/IMG.jpg")
    assert [(e.value, e.preexisting, e.model_id) for e in got] == [("dog", False, "m1"), ("Oma", True, "m1")]
    assert all(e.written_at for e in got)
    assert ledger.paths() == ["/p/IMG.jpg", "/p/other.jpg"]


def test_recording_a_known_value_keeps_its_first_row(tmp_path):
    """A re-run must not turn ramcli's own keyword into a 'preexisting' (user) one."""
    ledger = Ledger(sqlite_utils.Database(tmp_path / "i.db"))
    ledger.record([entry(value="dog", pre=False, model="m1")])
    ledger.record([entry(value="dog", pre=True, model="m2")])
    [only] = ledger.entries("/p/IMG.jpg")
    assert (only.preexisting, only.model_id) == (False, "m1")


def test_forget_removes_only_the_named_rows(tmp_path):
    ledger = Ledger(sqlite_utils.Database(tmp_path / "i.db"))
    ledger.record([entry(value="dog"), entry(value="cat"), entry(field="IPTC:Keywords", value="dog")])
    ledger.forget([entry(value="dog")])
    assert {(e.field, e.value) for e in ledger.entries("/p/IMG.jpg")} == {
        ("XMP-dc:Subject", "cat"),
        ("IPTC:Keywords", "dog"),
    }


def test_move_repoints_photo_and_its_sidecars(tmp_path):
    ledger = Ledger(sqlite_utils.Database(tmp_path / "i.db"))
    ledger.record([
        entry(path="/a/IMG.jpg"),
        entry(path="/a/IMG.CR2", target="/a/IMG.xmp"),
        entry(path="/a/IMG.CR2", target="/a/IMG.CR2.xmp", value="cat"),
        entry(path="/a/keep.jpg"),
    ])
    assert ledger.move("/a/IMG.jpg", "/b/NEW.jpg") == 1
    assert ledger.move("/a/IMG.CR2", "/b/NEW.CR2") == 2
    assert [(e.path, e.target) for e in ledger.entries("/b/NEW.jpg")] == [("/b/NEW.jpg", "/b/NEW.jpg")]
    assert sorted(e.target for e in ledger.entries("/b/NEW.CR2")) == ["/b/NEW.CR2.xmp", "/b/NEW.xmp"]
    assert ledger.entries("/a/IMG.CR2") == []
    assert len(ledger.entries("/a/keep.jpg")) == 1
    assert ledger.move("/nowhere.jpg", "/x.jpg") == 0


def test_entries_under_a_folder_only(tmp_path):
    ledger = Ledger(sqlite_utils.Database(tmp_path / "i.db"))
    ledger.record([entry(path="/a/b/1.jpg"), entry(path="/a/bc/2.jpg"), entry(path="/a/b/c/3.jpg")])
    assert sorted(e.path for e in ledger.entries_under("/a/b")) == ["/a/b/1.jpg", "/a/b/c/3.jpg"]


def test_writes_nest_inside_an_open_transaction(tmp_path):
    """The index may call the ledger inside its own BEGIN IMMEDIATE; a rollback must undo both."""
    import sqlite3

    conn = sqlite3.connect(tmp_path / "i.db", isolation_level=None)
    db = sqlite_utils.Database(conn)
    ledger = Ledger(db)
    ledger.record([entry(value="first")])
    conn.execute("BEGIN IMMEDIATE")
    ledger.record([entry(value="inside")])
    ledger.move("/p/IMG.jpg", "/q/IMG.jpg")
    assert conn.in_transaction  # the ledger did not commit the caller's transaction
    conn.execute("ROLLBACK")
    assert [e.value for e in ledger.entries("/p/IMG.jpg")] == ["first"]
    assert db[TABLE].exists()


def test_staged_intents_settle_in_one_step(tmp_path):
    ledger = Ledger(sqlite_utils.Database(tmp_path / "i.db"))
    ledger.record([entry(value="cat")])
    add, drop = Intent(entry(value="dog")), Intent(entry(value="cat"), remove=True)
    ledger.stage([add, drop])
    assert ledger.staged() == []  # this process is running: its intents are a write in flight
    assert [e.value for e in ledger.entries("/p/IMG.jpg")] == ["cat"]  # nothing applied yet
    ledger.settle([add, drop], [add, drop])
    assert [e.value for e in ledger.entries("/p/IMG.jpg")] == ["dog"]
    assert ledger.db[STAGED_TABLE].count == 0


def test_intents_of_a_dead_process_are_handed_back_and_move_with_the_photo(tmp_path):
    db = tmp_path / "i.db"
    stage = (
        "import sqlite_utils, sys\n"
        "from ramcli.library.ledger import Intent, Ledger, LedgerEntry\n"
        "Ledger(sqlite_utils.Database(sys.argv[1])).stage("
        "[Intent(LedgerEntry('/a/IMG.CR2', '/a/IMG.xmp', 'XMP-dc:Subject', 'dog', False, 'm1'))])\n"
    )
    subprocess.run([sys.executable, "-c", stage, db], check=True)  # it exits without settling
    ledger = Ledger(sqlite_utils.Database(db))
    [left] = ledger.staged()
    assert (left.entry.target, left.entry.value, left.remove, left.entry.model_id) == ("/a/IMG.xmp", "dog", False, "m1")
    ledger.move("/a/IMG.CR2", "/b/NEW.CR2")
    [moved] = ledger.staged()
    assert (moved.entry.path, moved.entry.target) == ("/b/NEW.CR2", "/b/NEW.xmp")
    ledger.settle([], [moved])  # resolved as "not written": dropped, nothing recorded
    assert ledger.staged() == [] and ledger.entries("/b/NEW.CR2") == []


def test_entries_of_many_photos(tmp_path):
    ledger = Ledger(sqlite_utils.Database(tmp_path / "i.db"))
    ledger.record([entry(path=f"/p/{i}.jpg", value=str(i)) for i in range(1200)])
    got = ledger.entries_of([f"/p/{i}.jpg" for i in range(0, 1200, 2)] + ["/p/none.jpg"])
    assert len(got) == 601 and got["/p/none.jpg"] == []
    assert all([e.value for e in got[f"/p/{i}.jpg"]] == [str(i)] for i in range(0, 1200, 2))


def test_settling_while_another_process_writes_waits_for_it(tmp_path):
    """A settle that had read the database while another process held the write lock used to fail
    with "database is locked" the moment that process committed; now it waits and records."""
    from ramcli.library.index import Index

    db = tmp_path / "index.db"
    with Index.open(db) as index:
        Ledger(index.db).record([entry(path="/p/first.jpg")])  # the table exists: settle only reads it first
    hold = (
        "import sqlite3, sys, time\n"
        "con = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
        "con.execute('BEGIN IMMEDIATE')\n"
        "con.execute(\"insert into metadata_ledger (path, target, field, value, preexisting)"
        " values ('/p/other.jpg', '/p/other.jpg', 'XMP-dc:Subject', 'cat', 0)\")\n"
        "print('holding', flush=True)\n"
        "time.sleep(1.5)\n"
        "con.execute('COMMIT')\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", hold, db], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        with Index.open(db) as index:
            add = Intent(entry(value="dog"))
            Ledger(index.db).settle([add], [])
            assert [e.value for e in Ledger(index.db).entries("/p/IMG.jpg")] == ["dog"]
            assert [e.value for e in Ledger(index.db).entries("/p/other.jpg")] == ["cat"]
    finally:
        assert holder.wait(timeout=30) == 0


def test_a_ledger_write_held_off_too_long_says_so_in_one_line(tmp_path):
    from ramcli.errors import RamcliError
    from ramcli.library.index import Index

    db = tmp_path / "index.db"
    Index.open(db).close()
    holder = sqlite_utils.Database(db).conn
    holder.isolation_level = None
    holder.execute("BEGIN IMMEDIATE")  # another run mid-batch
    with Index.open(db, busy_timeout=0.5) as index:
        with pytest.raises(RamcliError, match="stayed locked by another process") as raised:
            Ledger(index.db).stage([Intent(entry())])
        assert "\n" not in str(raised.value)
    holder.execute("COMMIT")
