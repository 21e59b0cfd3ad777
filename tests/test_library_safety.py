"""The library is never harmed by what it contains: symlinks, names that are not UTF-8, broken
photos, restored copies, crafted indexes. Each case runs the real `ramcli` entry point (a
subprocess where real stdout bytes matter) and the real ExifTool."""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ckpt_factory import make_labels_dir, make_official_checkpoint
from images import photo_like
from media import exiftool, read_tags
from ramcli.cli.app import app
from ramcli.errors import RamcliError
from ramcli.library.index import Index
from ramcli.library.ledger import Ledger, LedgerEntry

N = 12


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("model")
    return (make_official_checkpoint(root / "ram_tiny.pth", "ram_tiny", num_classes=N), make_labels_dir(root, N))


def _photo(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    photo_like(96, 64, seed=seed).save(path, quality=85)
    return path


def _cli(*args, home: Path):
    """In-process; a RamcliError is what `ramcli.cli.app.main` turns into exit code 1."""
    res = CliRunner().invoke(app, [str(a) for a in args], env={"RAMCLI_HOME": str(home)})
    assert res.exception is None or isinstance(res.exception, (SystemExit, RamcliError)), res.exception
    return res


def _tag(model_files, *args, home: Path):
    weights, labels = model_files
    return _cli("tag", *args, "--weights", weights, "--labels", labels, "--workers", "0", "--threshold", "0",
                "-f", "jsonl", home=home)


def _ramcli(*args, home: Path) -> subprocess.CompletedProcess:
    """The real entry point in a subprocess: stdout as the bytes a pipe gets."""
    return subprocess.run([sys.executable, "-m", "ramcli", *map(os.fsencode, map(str, args))], capture_output=True,
                          env={**os.environ, "RAMCLI_HOME": str(home)})


def _subjects(path: Path) -> list[str]:
    return read_tags(path, "XMP-dc:Subject").get("XMP-dc:Subject", [])


def _tree(folder: Path) -> dict[str, str]:
    """Every file under `folder` (links not followed) with the hash of its bytes."""
    out = {}
    for dirpath, _, files in os.walk(folder):
        for name in files:
            p = Path(dirpath) / name
            out[str(p.relative_to(folder))] = "link" if p.is_symlink() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def test_symlinks_out_of_the_folder_are_indexed_not_written_and_untag_undoes_the_opt_in(model_files, tmp_path):
    home, lib, outside = tmp_path / "home", tmp_path / "lib", tmp_path / "outside"
    inside = _photo(lib / "in.jpg", 1)
    real = _photo(outside / "real.jpg", 2)
    _photo(outside / "folder" / "far.jpg", 3)
    (lib / "link.jpg").symlink_to(real)
    (lib / "far").symlink_to(outside / "folder")
    (lib / "root").symlink_to("/")  # must never walk the file system
    before = _tree(outside)

    res = _tag(model_files, lib, home=home)
    assert res.exit_code == 0, res.output
    assert _tree(outside) == before  # nothing outside was written
    assert len(_subjects(inside)) == N
    assert f"not written: {lib / 'link.jpg'}: symlink to a file outside the tagged folders" in res.stderr
    assert "--follow-links" in res.stderr
    assert f"not followed: {lib / 'far'}: symlink to the folder" in res.stderr
    assert f"not followed: {lib / 'root'}: symlink to /, which contains the tagged folder" in res.stderr
    with Index.open(home / "index.db") as index:  # still tagged into the index, with its link
        record = index.lookup(str(real))
        assert record.status == "tagged" and record.link == str(lib.resolve() / "link.jpg")
        assert index.lookup(str(outside / "folder" / "far.jpg")) is None
    res = _cli("write", lib, home=home)  # `write` keeps the same policy
    assert res.exit_code == 0 and _tree(outside) == before
    assert f"{lib.resolve() / 'link.jpg'} -> {real.resolve()}: symlink to a file outside" in res.stderr

    res = _tag(model_files, lib, "--follow-links", home=home)  # what was left unwritten is written now
    assert res.exit_code == 0, res.output
    assert len(_subjects(real)) == N and len(_subjects(outside / "folder" / "far.jpg")) == N
    assert "tagged 1, unchanged 2, metadata written 2" in res.stderr
    kept = _cli("untag", lib, home=home)  # without the flag, what lies outside is listed, not touched
    assert kept.exit_code == 0 and len(_subjects(real)) == N and _subjects(inside) == []
    assert "--follow-links" in kept.stderr
    done = _cli("untag", lib, "--follow-links", home=home)
    assert done.exit_code == 0, done.output
    assert _subjects(real) == [] and _subjects(outside / "folder" / "far.jpg") == []
    with Index.open(home / "index.db") as index:
        assert Ledger(index.db).entries(str(real)) == []


def test_a_name_that_is_not_utf8_is_stored_losslessly_and_the_run_completes(model_files, tmp_path):
    home, lib = tmp_path / "home", tmp_path / "lib"
    good = _photo(lib / "good.jpg", 1)
    odd = _photo(lib / os.fsdecode(b"caf\xe9 \xff.jpg"), 2)  # Latin-1 bytes from an old camera or archive
    weights, labels = model_files
    res = _ramcli("tag", lib, "--weights", weights, "--labels", labels, "--workers", "0", "--threshold", "0",
                  "-f", "jsonl", home=home)
    assert res.returncode == 0, res.stderr.decode(errors="replace")
    assert len(_subjects(odd)) == N and len(_subjects(good)) == N  # both written, neither stopped the run
    res.stdout.decode("utf-8")  # the JSONL is valid UTF-8 ...
    assert b'"path": "' + os.fsencode(lib) + b'/caf\\\\xe9 \\\\xff.jpg"' in res.stdout  # ... with the name escaped
    with Index.open(home / "index.db") as index:
        assert os.fsencode(index.lookup(str(odd)).path) == os.fsencode(odd)
    tag = _tag_names(home, good)[0]
    found = _ramcli("search", tag, "--format", "paths", "-0", home=home)
    assert found.returncode == 0
    assert sorted(found.stdout.split(b"\0")[:-1]) == sorted([os.fsencode(good), os.fsencode(odd)])  # real bytes
    table = _ramcli("search", tag, "--format", "table", home=home)
    assert table.returncode == 0 and b"caf\\xe9 \\xff.jpg" in table.stdout
    assert _ramcli("untag", lib, home=home).returncode == 0
    assert _subjects(odd) == [] and _subjects(good) == []


def _tag_names(home: Path, photo: Path) -> list[str]:
    with Index.open(home / "index.db") as index:
        return [t.name for t in index.photo_tags(str(photo))]


def test_files_with_a_photos_name_that_are_no_photos_are_broken_photos(model_files, tmp_path):
    home, lib = tmp_path / "home", tmp_path / "lib"
    good = _photo(lib / "good.jpg", 1)
    (lib / "empty.jpg").write_bytes(b"")
    (lib / "notes.jpg").write_text("remember the milk\n")
    (lib / "readme.txt").write_text("not a photo, and not called one\n")
    res = _tag(model_files, lib, home=home)
    assert res.exit_code == 1
    assert f"failed: {lib / 'empty.jpg'}: empty file (0 bytes)" in res.stderr
    assert f"failed: {lib / 'notes.jpg'}: not an image (text)" in res.stderr
    assert "readme.txt" not in res.stderr and "skipped: 1 unsupported" in res.stderr
    assert len(_subjects(good)) == N  # the valid photo was tagged and written all the same


def test_tag_exits_1_when_a_metadata_write_failed_like_write_does(model_files, tmp_path):
    home, lib = tmp_path / "home", tmp_path / "lib"
    ok = _photo(lib / "ok.jpg", 1)
    locked = _photo(lib / "locked.jpg", 2)
    locked.chmod(0o444)
    res = _tag(model_files, lib, home=home)
    assert res.exit_code == 1, res.output
    assert f"not written: {locked}: locked.jpg: read-only file" in res.stderr
    assert "metadata write failed 1" in res.stderr
    assert len(_subjects(ok)) == N and _subjects(locked) == []
    res = _cli("write", lib, home=home)
    assert res.exit_code == 1 and "read-only file" in res.stderr


def test_a_restored_copy_gets_its_tags_written_and_a_real_move_keeps_its_ledger(model_files, tmp_path):
    home, lib, backup = tmp_path / "home", tmp_path / "lib", tmp_path / "backup"
    photo = _photo(lib / "a.jpg", 1)
    moving = _photo(lib / "b.jpg", 2)
    backup.mkdir()
    shutil.copy2(photo, backup / "a.jpg")  # a backup from before ramcli wrote
    assert _tag(model_files, lib, home=home).exit_code == 0
    assert len(_subjects(photo)) == N
    photo.unlink()  # the original is lost ...
    restored = lib / "restored" / "a.jpg"
    restored.parent.mkdir()
    shutil.copy(backup / "a.jpg", restored)  # ... and restored from the backup elsewhere
    moved = lib / "moved" / "b.jpg"
    moved.parent.mkdir()
    os.rename(moving, moved)  # a real move: the file ramcli wrote
    time.sleep(0.01)
    res = _tag(model_files, lib, home=home)
    assert res.exit_code == 0, res.output
    assert "moved 1" in res.stderr
    with Index.open(home / "index.db") as index:
        indexed = sorted(t.name for t in index.photo_tags(str(restored)))
        assert index.lookup(str(photo)) is None and len(indexed) == N
        assert {e.path for e in Ledger(index.db).entries(str(moved))} == {str(moved)}
    assert sorted(_subjects(restored)) == indexed  # metadata matches the index
    assert _cli("write", lib, home=home).exit_code == 0 and sorted(_subjects(restored)) == indexed
    assert _cli("untag", lib, home=home).exit_code == 0
    assert _subjects(restored) == [] and _subjects(moved) == []


def test_untag_never_deletes_what_a_merged_ledger_names(tmp_path):
    home, lib = tmp_path / "home", tmp_path / "lib"
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    photo = _photo(lib / "a.jpg", 1)
    exiftool("-q", "-overwrite_original", "-XMP-dc:Subject=mine", photo)
    node = tmp_path / "node2.db"
    with Index.open(node) as index:
        Ledger(index.db).record([
            LedgerEntry(str(photo), str(victim), "ramcli:CreatedSidecar", "1", False),
            LedgerEntry(str(photo), str(victim), "XMP-dc:Subject", "x", False),
            LedgerEntry(str(photo), str(photo), "XMP-dc:Subject", "ramcli's", False),  # a plausible row: kept
        ])
    res = _cli("index", "merge", node, home=home)
    assert res.exit_code == 0, res.output
    assert "2 write-ledger rows dropped (not ramcli's)" in res.stdout
    res = _cli("untag", lib, home=home)
    assert res.exit_code == 0, res.output
    assert victim.read_text() == "precious\n"
    assert _subjects(photo) == ["mine"]


def test_doctor_calls_a_damaged_index_broken(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "index.db").write_bytes(os.urandom(8192))
    res = _cli("doctor", home=home)
    assert res.exit_code == 1
    assert "broken" in res.stdout and "damaged" in res.stdout
    with Index.open(tmp_path / "fine.db"):
        pass
    shutil.copy(tmp_path / "fine.db", home / "index.db")
    assert "broken" not in _cli("doctor", home=home).stdout
    assert sqlite3.connect(home / "index.db").execute("PRAGMA user_version").fetchone()[0] >= 3
