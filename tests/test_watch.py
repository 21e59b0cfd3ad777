"""`ramcli watch`: settling, temporary names, and the watcher end to end (real ExifTool, tiny
random-weight checkpoints), started as a process and stopped by signals as a service would be."""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from conftest import run_cli
from ckpt_factory import make_labels_dir, make_official_checkpoint
from images import photo_like
from media import read_tags
from ramcli.cli.app import app
from ramcli.media.discover import walk_reaches
from ramcli.pathnames import to_text
from ramcli.tagging.deletions import is_deleted
from ramcli.tagging.options import TagOptions
from ramcli.tagging.settler import Settler
from ramcli.tagging.watch import FALLBACK_POLL_S, Watcher
from ramcli.tagging.watch_names import is_temporary, undecodable_path

N = 30


# ------------------------------------------------------------------ the parts


@pytest.mark.parametrize("name", ["IMG_1.jpg.part", "IMG_1.JPG.crdownload", "x.jpg.tmp", "~$draft.jpg",
                                  ".syncthing.IMG_1.jpg.tmp", "IMG_1.jpg.!sync", ".IMG_1.jpg.Xa81c",
                                  "IMG_1.jpg_exiftool_tmp", "IMG_1.jpg.partial", "IMG_1.jpg.download"])
def test_temporary_names_are_recognised(name):
    assert is_temporary(name)


@pytest.mark.parametrize("name", ["IMG_1.jpg", "party.jpg", "tmp.jpg", "2023~summer.png", "temple.heic"])
def test_photo_names_are_not_temporary(name):
    assert not is_temporary(name)


class Settling:
    """A Settler on a clock the test sets: `ready(at=101.0)` moves the time, then asks."""

    def __init__(self, quiet: float):
        self.now = 100.0
        self.settler = Settler(quiet, lambda: self.now)

    def ready(self, at: float) -> tuple[list[str], list[str]]:
        self.now = at
        return self.settler.ready()


def test_settler_waits_until_size_and_mtime_stay_the_same(tmp_path):
    s = Settling(1.0)
    photo = tmp_path / "a.jpg"
    photo.write_bytes(b"half")
    s.settler.touch(str(photo))
    assert s.settler.next_due() == pytest.approx(101.0)
    assert s.ready(at=100.9) == ([], [])
    with open(photo, "ab") as fh:  # the copy goes on: no event seen yet, but the size changed
        fh.write(b" and the rest")
    assert s.ready(at=101.0) == ([], [])  # restarted, not ready
    assert s.ready(at=101.9) == ([], [])
    assert s.ready(at=102.0) == ([str(photo)], [])
    assert s.settler.next_due() is None
    # an mtime change alone (same size) also restarts the wait
    s.settler.touch(str(photo))
    st = photo.stat()
    os.utime(photo, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert s.ready(at=103.5) == ([], [])
    assert s.ready(at=104.5) == ([str(photo)], [])


def test_settler_deletions_wait_and_a_file_that_vanishes_is_dropped(tmp_path):
    s = Settling(0.5)
    photo = tmp_path / "b.jpg"
    photo.write_bytes(b"x")
    s.settler.touch(str(photo))
    photo.unlink()
    s.settler.delete(str(photo))
    assert s.settler.files == {}
    assert s.ready(at=100.4) == ([], [])
    assert s.ready(at=100.5) == ([], [str(photo)])
    # deleted, then there again (restored, or written anew): an addition, not a deletion
    s.settler.delete(str(photo))
    photo.write_bytes(b"y")
    s.settler.touch(str(photo))
    assert s.ready(at=101.0) == ([str(photo)], [])


def test_settler_a_deletion_waits_for_the_files_noted_with_it(tmp_path):
    """A folder renamed: the old name is noted as deleted a moment before the files under the new
    one; both must come out together, or the move would look like a deletion and an addition."""
    s = Settling(1.0)
    s.settler.delete(str(tmp_path / "old"))
    s.now = 100.01
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "a.jpg").write_bytes(b"x")
    s.settler.touch(str(tmp_path / "new" / "a.jpg"))
    assert s.ready(at=101.0) == ([], [])
    assert s.ready(at=101.01) == ([str(tmp_path / "new" / "a.jpg")], [str(tmp_path / "old")])
    # a file that keeps changing does not hold a deletion up for ever
    s.settler.delete(str(tmp_path / "gone.jpg"))
    busy = tmp_path / "busy.log"
    out = []
    for step in range(1, 5):
        busy.write_bytes(b"x" * step)
        s.now = 101.01 + 0.6 * step
        s.settler.touch(str(busy))
        files, deleted = s.settler.ready()
        assert files == []
        out += [(s.now, d) for d in deleted]
    assert out == [(pytest.approx(102.21), str(tmp_path / "gone.jpg"))]


def test_walk_reaches_follows_the_walks_rules(tmp_path):
    root = tmp_path / "lib"
    assert walk_reaches(root, root / "2023" / "a.jpg")
    assert not walk_reaches(root, tmp_path / "other" / "a.jpg")
    assert not walk_reaches(root, root / ".hidden" / "a.jpg")
    assert not walk_reaches(root, root / "@eaDir" / "a.jpg")
    assert not walk_reaches(root, root / "a.jpg.xmp")
    assert not walk_reaches(root, root / "drafts" / "a.jpg", exclude=["drafts"])
    assert not walk_reaches(root, root / "2023" / "drafts" / "a.jpg", exclude=["2023/drafts"])
    assert walk_reaches(root, root / "2023" / "a.jpg", include=["*.jpg"])
    assert not walk_reaches(root, root / "2023" / "a.png", include=["*.jpg"])


def test_undecodable_path_from_watchfiles_error():
    assert undecodable_path('Unable to decode path "/lib/2023/bad\\xFF.jpg" to string') == os.fsdecode(b"/lib/2023/bad\xff.jpg")
    assert undecodable_path('Unable to decode path "/lib/q\\"\\\\\\n\\u{7f}\\xC3" to string') == os.fsdecode(b'/lib/q"\\\n\x7f\xc3')
    assert undecodable_path("error in underlying watcher: No space left on device") is None


@pytest.mark.skipif(sys.platform != "linux", reason="non-UTF-8 file names are a Linux file system's")
@settings(max_examples=25, deadline=None)
@given(name=st.binary(min_size=1, max_size=12).filter(lambda b: b"/" not in b and b"\0" not in b and not b.startswith(b"."))
       .map(lambda b: b + b"\xff"))
def test_undecodable_path_gives_back_the_name_watchfiles_failed_on(name):
    """Any name that is not UTF-8, as the real watchfiles reports it, comes back byte for byte."""
    from watchfiles._rust_notify import RustNotify, WatchfilesRustInternalError

    folder = tempfile.mkdtemp()
    try:
        notify = RustNotify([folder], False, False, 0, True, True)
        path = os.fsencode(folder) + b"/" + name
        with open(path, "wb") as fh:
            fh.write(b"x")
        with pytest.raises(WatchfilesRustInternalError) as failed:
            notify.watch(50, 10, 20_000, threading.Event())
        notify.close()
        assert undecodable_path(str(failed.value)) == os.fsdecode(path)
    finally:
        shutil.rmtree(folder)


class _NoPhotos:
    """The index a watcher under test looks at: it holds no photos."""

    @staticmethod
    def iter_photos(under=None):
        return iter(())


@contextmanager
def watch_loop(lib: Path, settle: float):
    """A watcher's event thread and main loop on `lib`, its passes only classifying the files (a
    pass reads each one, as tagging does). Yields (watcher, files passed, how often the OS
    watch was opened, how often a look again found its folder unchanged)."""
    watcher = Watcher(TagOptions(paths=[lib], write=False, quiet=True), settle=settle)
    watcher.session = SimpleNamespace(index=_NoPhotos())
    passed, opened, unchanged = [], [0], [0]
    open_watch, rescan = watcher._open_watch, watcher._rescan

    def counted_rescan(item):
        before = watcher._listings.get(os.path.dirname(item.path))
        rescan(item)
        unchanged[0] += before is not None and before == watcher._listings.get(os.path.dirname(item.path))

    def counted_open():
        opened[0] += 1
        return open_watch()

    watcher._open_watch, watcher._rescan = counted_open, counted_rescan
    watcher._pass = lambda files, deleted: passed.extend(str(f.path) for p in files for f in watcher._classified(p))
    events = threading.Thread(target=watcher._watch, args=(watcher._open_watch(),), daemon=True)
    loop = threading.Thread(target=watcher._loop, daemon=True)
    events.start()
    loop.start()
    try:
        yield watcher, passed, opened, unchanged
    finally:
        watcher.stop()
        events.join(timeout=10)
        loop.join(timeout=10)
    assert not events.is_alive() and not loop.is_alive() and watcher._error is None


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="non-UTF-8 file names are a Linux file system's")
def test_a_name_that_is_not_utf8_is_looked_at_once_and_later_photos_beside_it_settle(tmp_path):
    """watchfiles fails on any event for such a name, a read included, and the watcher's look at
    the folder reads the file: that must not go round (each look also restarted the wait of
    every file in the folder, so nothing there ever settled)."""
    lib = tmp_path / "lib"
    (lib / "sub").mkdir(parents=True)
    bad = os.fsdecode(os.fsencode(lib / "sub") + b"/bad\xff.jpg")
    with watch_loop(lib, settle=1.0) as (watcher, passed, opened, unchanged):
        with open(bad, "wb") as fh:
            fh.write(b"not yet a photo")
        # the look at the folder reads it, and so does its pass: two looks that find no change
        wait_for(lambda: bad in passed and unchanged[0] >= 2, 60, "the file with the undecodable name to settle")
        (lib / "sub" / "good.jpg").write_bytes(b"a photo")
        wait_for(lambda: str(lib / "sub" / "good.jpg") in passed, 60, "the photo beside it to settle")
        reopened = opened[0]
        (lib / "sub" / "later.jpg").write_bytes(b"another photo")
        wait_for(lambda: str(lib / "sub" / "later.jpg") in passed, 60, "a later photo to settle")
        assert opened[0] == reopened, "the watch is still being opened again and again"
        assert passed.count(bad) == 1 and watcher.poll is None


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="non-UTF-8 file names are a Linux file system's")
def test_a_folder_name_that_is_not_utf8_makes_the_watch_poll(tmp_path):
    """Every new OS watch fails at once on such a folder (setting it up opens the folder): the
    watch polls instead, and photos in and beside that folder are still noted."""
    lib = tmp_path / "lib"
    lib.mkdir()
    odd = os.fsdecode(os.fsencode(lib) + b"/b\xffd")
    with watch_loop(lib, settle=0.2) as (watcher, passed, opened, _):
        os.mkdir(odd)
        with open(os.path.join(odd, "in.jpg"), "wb") as fh:
            fh.write(b"a photo")
        wait_for(lambda: os.path.join(odd, "in.jpg") in passed, 60, "the photo in that folder")
        wait_for(lambda: watcher.poll == FALLBACK_POLL_S, 60, "the watch to poll")
        reopened = opened[0]
        (lib / "beside.jpg").write_bytes(b"another photo")
        wait_for(lambda: str(lib / "beside.jpg") in passed, 60, "a later photo beside that folder")
        assert opened[0] == reopened, "the watch is still being opened again and again"
        with open(os.path.join(odd, "later.jpg"), "wb") as fh:
            fh.write(b"a later photo")
        wait_for(lambda: os.path.join(odd, "later.jpg") in passed, 60, "a later photo in that folder")


def test_a_photo_is_deleted_only_where_its_folder_is_there_to_say_so(tmp_path):
    lib = tmp_path / "lib"
    (lib / "2023").mkdir(parents=True)
    (lib / "2023" / "other.jpg").write_bytes(b"x")
    assert not is_deleted(str(lib / "2023" / "other.jpg"))  # there
    assert is_deleted(str(lib / "2023" / "gone.jpg"))  # its folder is there and holds other files
    assert is_deleted(str(lib / "2022" / "trip" / "gone.jpg"))  # a folder deleted as a whole
    (lib / "usb").mkdir()
    assert not is_deleted(str(lib / "usb" / "DCIM" / "a.jpg"))  # the empty folder of a drive that is away
    assert not is_deleted(str(lib / "usb" / "a.jpg"))
    assert is_deleted(str(lib / "usb" / "a.jpg"), reported=True)  # the OS reported this very file gone
    assert not is_deleted(str(lib / "card" / "a.jpg"), mount_points=[str(lib / "card")])  # a drive's folder, gone with it
    assert not is_deleted(str(lib / "card" / "a.jpg"), mount_points=[str(lib / "card")], reported=True)
    (lib / "loop").symlink_to(lib / "loop")
    assert not is_deleted(str(lib / "loop" / "a.jpg"))  # cannot be looked at (ELOOP): not known to be gone
    (lib / "2021").write_bytes(b"a file where a folder was")
    assert is_deleted(str(lib / "2021" / "a.jpg"))


def test_usage_errors(tmp_path, capsys):
    (tmp_path / "a.jpg").write_bytes(b"x")
    assert run_cli(["watch", str(tmp_path / "a.jpg"), "--no-write"]) == 2
    assert "watch needs folders" in capsys.readouterr().err
    assert run_cli(["watch", str(tmp_path), "-f", "csv", "-o", str(tmp_path / "out.csv")]) == 2
    assert "--format jsonl" in capsys.readouterr().err
    assert run_cli(["watch", str(tmp_path), "--force"]) == 2  # re-tagging its own writes would never end
    assert "No such option" in capsys.readouterr().err


# ------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("model")
    return (make_official_checkpoint(root / "ram_tiny.pth", "ram_tiny", num_classes=N),
            make_labels_dir(root, N))


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Photos to copy in (made once: the tests copy them, as a user would)."""
    folder = tmp_path_factory.mktemp("sources")
    for i in range(40):
        photo_like(320, 240, seed=i).save(folder / f"p{i:03d}.jpg", quality=85)
    return folder


class WatchProcess:
    """`ramcli watch` as a service runs it: a process, its stdout (JSONL) and stderr (the log)."""

    started: list[WatchProcess] = []  # killed at the end of the test if still running (a failure)

    def __init__(self, lib: Path, home: Path, model_files, *extra: str, settle: float = 1.0):
        weights, labels = model_files
        args = [sys.executable, "-m", "ramcli", "watch", str(lib), "--weights", str(weights), "--labels",
                str(labels), "--workers", "0", "-f", "jsonl", "--settle", str(settle), *extra]
        self.proc = subprocess.Popen(args, env={**os.environ, "RAMCLI_HOME": str(home)}, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        WatchProcess.started.append(self)
        self.out: list[dict] = []
        self.err: list[str] = []
        self._lines: queue.Queue = queue.Queue()
        self._readers = [threading.Thread(target=self._read, args=(self.proc.stdout, True), daemon=True),
                         threading.Thread(target=self._read, args=(self.proc.stderr, False), daemon=True)]
        for t in self._readers:
            t.start()

    def _read(self, stream, is_out: bool) -> None:
        for line in stream:
            if is_out and line.startswith("{"):
                self.out.append(json.loads(line))
            elif not is_out:
                self.err.append(line.rstrip("\n"))

    def wait_watching(self, timeout: float = 300) -> None:
        wait_for(lambda: any(line.startswith("watching ") for line in self.err) or self.proc.poll() is not None,
                 timeout, "the watcher to start")
        assert self.proc.poll() is None, "\n".join(self.err)

    def tagged(self, path: Path) -> list[dict]:
        return [r for r in self.out if r["path"] == str(path)]

    def stop(self, sig=signal.SIGTERM, timeout: float = 120) -> int:
        self.proc.send_signal(sig)
        rc = self.proc.wait(timeout=timeout)
        for t in self._readers:
            t.join(timeout=10)
        return rc


@pytest.fixture(autouse=True)
def _no_watcher_left():
    yield
    while WatchProcess.started:
        proc = WatchProcess.started.pop().proc
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def rows(home: Path) -> dict[str, tuple]:
    """path -> (status, size, mtime_ns) of every photo in the index."""
    db = home / "index.db"
    if not db.exists():
        return {}
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as con:
        return {p: (s, size, m) for p, s, size, m in con.execute("select path, status, size, mtime_ns from photos")}


def ledger_paths(home: Path) -> set[str]:
    with sqlite3.connect(f"file:{home / 'index.db'}?mode=ro", uri=True, timeout=30) as con:
        return {p for (p,) in con.execute("select distinct path from metadata_ledger")}


def index_tags(home: Path, path: Path) -> set[str]:
    with sqlite3.connect(f"file:{home / 'index.db'}?mode=ro", uri=True, timeout=30) as con:
        return {n for (n,) in con.execute(
            "select t.name from photo_tags pt join tags t on t.id = pt.tag_id join photos p on p.id = pt.photo_id"
            " where p.path = ?", [str(path)])}


def search(home: Path, term: str) -> set[str]:
    res = CliRunner().invoke(app, ["search", term, "--format", "paths"], env={"RAMCLI_HOME": str(home)})
    assert res.exit_code == 0, res.output
    return {line for line in res.stdout.splitlines() if line.strip()}


def assert_tagged_everywhere(home: Path, path: Path) -> None:
    """In the index with its tags, in the file's XMP with the same ones, and found by search."""
    tags = index_tags(home, path)
    assert tags, f"{path} has no tags in the index"
    assert set(read_tags(path, "XMP-dc:Subject").get("XMP-dc:Subject", [])) == tags
    assert str(path) in search(home, sorted(tags)[0])


def copy_slowly(src: Path, dst: Path, chunks: int, pause: float) -> None:
    data = src.read_bytes()
    step = len(data) // chunks + 1
    with open(dst, "wb") as fh:
        for i in range(0, len(data), step):
            fh.write(data[i:i + step])
            fh.flush()
            time.sleep(pause)


@pytest.mark.slow
def test_watch_tags_arrivals_follows_moves_and_deletions_and_restarts(model_files, sources, tmp_path):
    lib, home = tmp_path / "lib", tmp_path / "home"
    lib.mkdir()
    shutil.copy2(sources / "p000.jpg", lib / "before.jpg")  # there before the watcher starts
    w = WatchProcess(lib, home, model_files)
    w.wait_watching()
    assert rows(home)[str(lib / "before.jpg")][0] == "tagged"  # the catch-up pass
    assert_tagged_everywhere(home, lib / "before.jpg")

    # photos arriving one at a time
    for name, src in (("one.jpg", "p001.jpg"), ("two.jpg", "p002.jpg")):
        shutil.copy(sources / src, lib / name)
        wait_for(lambda: str(lib / name) in rows(home), 120, name)
        assert_tagged_everywhere(home, lib / name)

    # a burst: tagged in batches (more than one photo per pass), each photo once
    shutil.copytree(sources, lib / "burst", ignore=shutil.ignore_patterns("p00[0-2].jpg", "p03*"))
    burst = sorted((lib / "burst").iterdir())
    wait_for(lambda: all(str(p) in rows(home) for p in burst), 300, "the burst")
    assert all(len(w.tagged(p)) == 1 for p in burst)
    passes = [int(m.group(1)) for line in w.err if (m := re.match(r"tagged (\d+)", line))]
    assert max(passes) > 1, w.err
    assert_tagged_everywhere(home, burst[0])

    # a slow copy (pauses shorter than the settle time) and a sync client's temporary name
    copy_slowly(sources / "p030.jpg", lib / "slow.jpg", chunks=8, pause=0.15)
    copy_slowly(sources / "p031.jpg", lib / "synced.jpg.part", chunks=3, pause=1.5)
    assert str(lib / "synced.jpg.part") not in rows(home)
    os.rename(lib / "synced.jpg.part", lib / "synced.jpg")
    wait_for(lambda: str(lib / "slow.jpg") in rows(home) and str(lib / "synced.jpg") in rows(home), 120,
             "the slow and the synced photo")
    for name in ("slow.jpg", "synced.jpg"):
        assert [r.get("status", "tagged") for r in w.tagged(lib / name)] == ["tagged"], "tagged half written"
        assert_tagged_everywhere(home, lib / name)
    assert not any(".part" in p for p in rows(home))

    # a move into a new folder: the index follows, nothing is re-tagged, the ledger moves along
    lines = len(w.out)
    tags_before = index_tags(home, lib / "one.jpg")
    (lib / "2024").mkdir()
    os.rename(lib / "one.jpg", lib / "2024" / "moved.jpg")
    wait_for(lambda: str(lib / "2024" / "moved.jpg") in rows(home) and str(lib / "one.jpg") not in rows(home),
             120, "the move")
    assert index_tags(home, lib / "2024" / "moved.jpg") == tags_before
    assert str(lib / "2024" / "moved.jpg") in ledger_paths(home) and str(lib / "one.jpg") not in ledger_paths(home)
    assert_tagged_everywhere(home, lib / "2024" / "moved.jpg")

    # a folder renamed: every photo in it is re-pointed, none re-tagged
    os.rename(lib / "burst", lib / "summer")
    renamed = [lib / "summer" / p.name for p in burst]
    wait_for(lambda: all(str(p) in rows(home) for p in renamed) and not any(str(p) in rows(home) for p in burst),
             120, "the folder rename")
    assert len(w.out) == lines, "a move re-tagged photos:\n" + "\n".join(w.err + [r["path"] for r in w.out[lines:]])
    assert_tagged_everywhere(home, renamed[0])

    # a deletion: gone from the index, from search and (the file being gone) from the ledger
    os.remove(lib / "two.jpg")
    # (the index and the ledger commit one after the other: wait for both, and for the summary)
    wait_for(lambda: str(lib / "two.jpg") not in rows(home) and str(lib / "two.jpg") not in ledger_paths(home),
             120, "the deletion")
    assert str(lib / "two.jpg") not in search(home, sorted(index_tags(home, lib / "before.jpg"))[0])
    wait_for(lambda: any(line.startswith("tagged 0") and "removed 1" in line for line in w.err), 30,
             "the summary line of the deletion")

    assert w.stop(signal.SIGTERM) == 0
    assert not any("Traceback" in line or "error" in line for line in w.err), w.err

    # while it is stopped: a new photo, a renamed one, a deleted one, and the ledger rows that a
    # watcher killed between the index's commit and the ledger's leaves of a deleted photo
    shutil.copy(sources / "p032.jpg", lib / "while-away.jpg")
    os.rename(renamed[0], lib / "summer" / "renamed-away.jpg")
    os.remove(renamed[1])
    orphan = str(lib / "summer" / "killed-mid-delete.jpg")
    with sqlite3.connect(home / "index.db") as con:
        con.execute("insert into metadata_ledger (path, target, field, value, preexisting, model_id, written_at)"
                    " values (?, ?, 'XMP-dc:Subject', 'dog', 0, 'm', 0)", [orphan, orphan])
    assert orphan in ledger_paths(home) and str(lib / "2024" / "moved.jpg") in ledger_paths(home)
    again = WatchProcess(lib, home, model_files)
    again.wait_watching()
    assert orphan not in ledger_paths(home) and str(lib / "2024" / "moved.jpg") in ledger_paths(home)
    assert [r["path"] for r in again.out] == [str(lib / "while-away.jpg")]  # the rest is not re-tagged
    index = rows(home)
    assert str(lib / "summer" / "renamed-away.jpg") in index and str(renamed[0]) not in index
    assert str(renamed[1]) not in index
    assert_tagged_everywhere(home, lib / "while-away.jpg")
    assert again.stop(signal.SIGTERM) == 0


@pytest.mark.slow
def test_ctrl_c_finishes_the_batch_kill_9_loses_at_most_it_and_once_catches_up(model_files, sources, tmp_path):
    lib, home = tmp_path / "lib", tmp_path / "home"
    lib.mkdir()
    w = WatchProcess(lib, home, model_files, "--batch-size", "1", settle=0.5)
    w.wait_watching()
    photos = sorted(sources.iterdir())
    for p in photos:
        shutil.copy(p, lib / p.name)
    wait_for(lambda: sum(s == "tagged" for s, *_ in rows(home).values()) >= 3, 300, "the first photos")
    assert w.stop(signal.SIGINT) == 0
    done = rows(home)
    assert 0 < len(done) < len(photos), "the watcher was not stopped in the middle of the burst"
    assert sorted(r["path"] for r in w.out) == sorted(done)  # every batch printed was recorded, and back
    assert any(line.startswith("stopping after the batch in flight") for line in w.err)

    # kill -9 during the catch-up of the rest: at most the batch in flight is lost (done again)
    killed = WatchProcess(lib, home, model_files, "--batch-size", "1")
    wait_for(lambda: len(rows(home)) >= len(done) + 2 or killed.proc.poll() is not None, 300, "the catch-up")
    killed.stop(signal.SIGKILL)
    after_kill = rows(home)
    assert len(done) < len(after_kill) < len(photos), "the kill did not land in the middle of the catch-up"
    printed = {r["path"] for r in killed.out}
    assert set(after_kill) - set(done) <= printed  # nothing recorded that was not written first

    weights, labels = model_files
    res = subprocess.run([sys.executable, "-m", "ramcli", "watch", str(lib), "--once", "--weights", str(weights),
                          "--labels", str(labels), "--workers", "0", "-f", "jsonl"],
                         env={**os.environ, "RAMCLI_HOME": str(home)}, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    rest = [json.loads(line)["path"] for line in res.stdout.splitlines() if line.startswith("{")]
    assert sorted(rest) == sorted(str(lib / p.name) for p in photos if str(lib / p.name) not in after_kill)
    assert len(printed & set(rest)) <= 1  # the batch in flight when killed, tagged again
    assert len(rows(home)) == len(photos) and all(s == "tagged" for s, *_ in rows(home).values())
    assert "watching" not in res.stderr


def same_size_other_photo(like: Path, dst: Path, seed: int) -> None:
    """A different photo with `like`'s size and mtime (padded after its end), moved into `dst`
    in one rename: what a card's burst looks like to a watcher."""
    staging = dst.parent.parent / f".staging-{seed}.jpg"
    photo_like(96, 72, seed=seed).save(staging, quality=70)
    pad = like.stat().st_size - staging.stat().st_size
    assert pad >= 0
    with open(staging, "ab") as fh:
        fh.write(b"\0" * pad)
    st = like.stat()
    os.utime(staging, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.rename(staging, dst)


@pytest.mark.slow
def test_a_new_photo_with_a_deleted_ones_size_and_time_is_tagged_not_taken_for_it(model_files, sources, tmp_path):
    lib, home = tmp_path / "lib", tmp_path / "home"
    (lib / "card").mkdir(parents=True)
    shutil.copy2(sources / "p000.jpg", lib / "card" / "IMG_0001.jpg")
    w = WatchProcess(lib, home, model_files)
    w.wait_watching()
    old = lib / "card" / "IMG_0001.jpg"
    assert_tagged_everywhere(home, old)

    new = lib / "card" / "IMG_0002.jpg"
    same_size_other_photo(old, new, seed=99)
    os.remove(old)
    wait_for(lambda: str(old) not in rows(home) and str(new) in rows(home) and w.tagged(new), 120,
             "the new photo to be tagged and the deleted one to be forgotten")
    assert_tagged_everywhere(home, new)
    assert str(old) not in ledger_paths(home)

    # a true rename of a photo of the same size and time still moves without tagging
    lines = len(w.out)
    renamed = lib / "card" / "IMG_0002-renamed.jpg"
    os.rename(new, renamed)
    wait_for(lambda: str(renamed) in rows(home) and str(new) not in rows(home), 120, "the rename")
    assert len(w.out) == lines
    assert_tagged_everywhere(home, renamed)
    assert w.stop(signal.SIGTERM) == 0


def watch_once(lib: Path, home: Path, model_files) -> subprocess.CompletedProcess:
    weights, labels = model_files
    res = subprocess.run([sys.executable, "-m", "ramcli", "watch", str(lib), "--once", "--weights", str(weights),
                          "--labels", str(labels), "--workers", "0", "-f", "jsonl"],
                         env={**os.environ, "RAMCLI_HOME": str(home)}, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    return res


def untag(path: Path, home: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "ramcli", "untag", str(path)], env={**os.environ, "RAMCLI_HOME": str(home)},
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr


@pytest.mark.slow
def test_photos_of_a_drive_that_is_away_are_kept_and_untag_works_when_it_is_back(model_files, sources, tmp_path):
    """A drive's folder inside the watched folder is empty while the drive is away: its photos
    are not deleted, so their index rows and write ledger stay, and `untag` still knows what
    ramcli wrote once the drive is back. Files deleted beside it are forgotten as before."""
    lib, home, away = tmp_path / "lib", tmp_path / "home", tmp_path / "away"
    (lib / "usb" / "DCIM").mkdir(parents=True)
    away.mkdir()
    shutil.copy2(sources / "p000.jpg", lib / "kept.jpg")
    shutil.copy2(sources / "p001.jpg", lib / "deleted.jpg")
    on_drive = [lib / "usb" / "DCIM" / f"IMG_{i}.jpg" for i in range(2)]
    for i, photo in enumerate(on_drive):
        shutil.copy2(sources / f"p01{i}.jpg", photo)
    watch_once(lib, home, model_files)
    assert all(str(p) in ledger_paths(home) for p in on_drive)
    before = rows(home)

    os.rename(lib / "usb" / "DCIM", away / "DCIM")  # unplugged: the mount point is an empty folder
    os.remove(lib / "deleted.jpg")
    res = watch_once(lib, home, model_files)
    assert "removed 1 photo" in res.stderr
    assert all(rows(home)[str(p)] == before[str(p)] for p in on_drive)
    assert all(str(p) in ledger_paths(home) for p in on_drive)
    assert str(lib / "deleted.jpg") not in rows(home) and str(lib / "deleted.jpg") not in ledger_paths(home)

    os.rename(away / "DCIM", lib / "usb" / "DCIM")  # back
    assert watch_once(lib, home, model_files).stdout.strip() == ""  # nothing re-tagged
    assert_tagged_everywhere(home, on_drive[0])
    untag(on_drive[0], home)
    assert read_tags(on_drive[0], "XMP-dc:Subject").get("XMP-dc:Subject", []) == []


def _can_mount() -> bool:
    try:
        return subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True,
                              timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux" or not _can_mount(), reason="needs Linux mount namespaces (unshare)")
def test_a_drive_whose_folder_vanishes_with_it_keeps_its_photos(model_files, sources, tmp_path):
    """An automounter removes the drive's folder when the drive goes: the folder vanishes as a
    whole, which must not read as a deletion once the watcher has seen a drive mounted there."""
    lib, home, drive = tmp_path / "lib", tmp_path / "home", tmp_path / "drive"
    lib.mkdir()
    drive.mkdir()
    shutil.copy2(sources / "p000.jpg", lib / "kept.jpg")
    weights, labels = model_files
    script = tmp_path / "plug.sh"
    script.write_text(f"""set -e
once() {{ "$PY" -m ramcli watch "$LIB" --once --weights "{weights}" --labels "{labels}" --workers 0 -f jsonl >> "$OUT/$1.jsonl"; }}
mount -t tmpfs tmpfs "$DRIVE"
cp "{sources / 'p010.jpg'}" "{sources / 'p011.jpg'}" "$DRIVE/"
mkdir "$LIB/usb" && mount --bind "$DRIVE" "$LIB/usb"
once plugged
umount "$LIB/usb" && rmdir "$LIB/usb"
once away
"$PY" -c 'import json, sqlite3, sys; c = sqlite3.connect(sys.argv[1]); print(json.dumps([[p for (p,) in c.execute(q)]
for q in ("select path from photos", "select distinct path from metadata_ledger")]))' "$RAMCLI_HOME/index.db" > "$OUT/away.json"
mkdir "$LIB/usb" && mount --bind "$DRIVE" "$LIB/usb"
once back
"$PY" -m ramcli untag "$LIB/usb/p010.jpg"
exiftool -j -XMP-dc:Subject "$LIB/usb/p010.jpg" > "$OUT/untagged.json"
""")
    env = {**os.environ, "RAMCLI_HOME": str(home), "PY": sys.executable, "LIB": str(lib), "DRIVE": str(drive),
           "OUT": str(tmp_path)}
    res = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "bash", str(script)], env=env,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr
    on_drive = [str(lib / "usb" / "p010.jpg"), str(lib / "usb" / "p011.jpg")]
    assert sorted(json.loads(line)["path"] for line in (tmp_path / "plugged.jsonl").read_text().splitlines()) == \
        sorted([str(lib / "kept.jpg"), *on_drive])
    photos, ledger = json.loads((tmp_path / "away.json").read_text())
    assert set(on_drive) <= set(photos) and set(on_drive) <= set(ledger)
    assert (tmp_path / "back.jsonl").read_text() == ""  # back: nothing re-tagged
    assert "Subject" not in json.loads((tmp_path / "untagged.json").read_text())[0]


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="non-UTF-8 file names are a Linux file system's")
def test_photos_beside_one_whose_name_is_not_utf8_are_tagged(model_files, sources, tmp_path):
    lib, home = tmp_path / "lib", tmp_path / "home"
    (lib / "import").mkdir(parents=True)
    w = WatchProcess(lib, home, model_files)
    w.wait_watching()
    odd = os.fsencode(lib / "import") + b"/DSC\xe9t\xe9.jpg"  # Latin-1, from an old camera's card
    shutil.copy(sources / "p000.jpg", odd)
    wait_for(lambda: to_text(os.fsdecode(odd)) in rows(home), 120, "the photo with the undecodable name")
    for name, src in (("next.jpg", "p001.jpg"), ("later.jpg", "p002.jpg")):
        shutil.copy(sources / src, lib / "import" / name)
        wait_for(lambda: str(lib / "import" / name) in rows(home), 120, name)
        assert_tagged_everywhere(home, lib / "import" / name)
    assert len(w.out) == 3, w.out
    assert w.stop(signal.SIGTERM) == 0
    assert not any("Traceback" in line or "error" in line for line in w.err), w.err


@pytest.mark.slow
def test_broken_arrivals_get_a_line_and_a_record_and_are_not_retried(model_files, sources, tmp_path):
    """A file with a photo's name and no photo inside, arriving while the watcher runs, is listed
    in the output and recorded in the index as broken, like `ramcli tag` does; later passes in
    its folder leave it alone until it changes."""
    lib, home = tmp_path / "lib", tmp_path / "home"
    lib.mkdir()
    w = WatchProcess(lib, home, model_files)
    w.wait_watching()
    (lib / "note.jpg").write_text("not a photo\n")
    wait_for(lambda: str(lib / "note.jpg") in rows(home) and w.tagged(lib / "note.jpg"), 120, "the broken file")
    assert rows(home)[str(lib / "note.jpg")][0] == "broken"
    assert w.tagged(lib / "note.jpg")[0]["error"]

    shutil.copy(sources / "p001.jpg", lib / "one.jpg")  # another pass in the same folder
    wait_for(lambda: str(lib / "one.jpg") in rows(home), 120, "the photo")
    os.utime(lib / "one.jpg")
    time.sleep(3)
    assert len(w.tagged(lib / "note.jpg")) == 1
    assert w.stop(signal.SIGTERM) == 0
