"""Atomic writes and the in-place redo journal (ramcli/fileio.py); the kill -9 tests of the
metadata writer (tests/test_metadata.py) exercise the journal end to end."""

from __future__ import annotations

import base64
import json
import os
import stat

import pytest

from ramcli.fileio import Change, Journal, atomic_output, atomic_write


def test_atomic_write_replaces_or_refuses_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "a.xmp"
    atomic_write(target, b"one")
    assert target.read_bytes() == b"one"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask
    atomic_write(target, b"two")
    assert target.read_bytes() == b"two"
    with pytest.raises(FileExistsError):
        atomic_write(target, b"three", exclusive=True)
    assert target.read_bytes() == b"two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.xmp"]


def test_atomic_output_keeps_the_old_file_when_the_writer_fails(tmp_path):
    """A library that writes by name (torch.save, safetensors) and fails half-way leaves the
    previous file and no temporary; a writer that finishes replaces it."""
    import torch

    target = tmp_path / "model.pt"
    torch.save({"step": 1}, target)
    with pytest.raises(RuntimeError), atomic_output(target) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(b"half a checkpoint")
        raise RuntimeError("killed while saving")
    assert torch.load(target, weights_only=True) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]
    with atomic_output(target) as tmp:
        torch.save({"step": 2}, tmp)
    assert torch.load(target, weights_only=True) == {"step": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_journal_writes_in_place_and_creates_new_files(tmp_path):
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(b"old content that is longer")
    link = tmp_path / "link.jpg"
    os.link(photo, link)
    inode = photo.stat().st_ino
    journal = Journal(tmp_path / "journal")
    batch = journal.new_batch()
    (batch / "f1").write_bytes(b"new")
    (batch / "f2").write_bytes(b"sidecar")
    results = journal.commit(batch, [Change(str(photo), str(batch / "f1"), mtime_ns=123_000_000_007),
                                     Change(str(tmp_path / "photo.xmp"), str(batch / "f2"), create=True)])
    journal.close()
    assert results == {str(photo): None, str(tmp_path / "photo.xmp"): None}
    assert photo.read_bytes() == b"new" == link.read_bytes() and photo.stat().st_ino == inode
    assert photo.stat().st_mtime_ns == 123_000_000_007
    assert (tmp_path / "photo.xmp").read_bytes() == b"sidecar"
    assert [p.name for p in (tmp_path / "journal").iterdir()] == ["lock"]


def test_a_dead_sessions_batch_is_replayed_a_live_one_is_not(tmp_path):
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(b"half new, half old")  # as a kill in the middle of the copy leaves it
    root = tmp_path / "journal"
    dead = Journal(root)
    batch = dead.new_batch()
    (batch / "f1").write_bytes(b"the new content")
    st = photo.stat()
    record = [{"target": base64.b64encode(os.fsencode(photo)).decode(), "data": "f1",
               "create": False, "mtime_ns": None, "inode": [st.st_dev, st.st_ino]}]
    batch.with_suffix(".json").write_text(json.dumps(record))

    alive = Journal(root)  # the first session's process still runs: its batch is not touched
    assert alive.replayed == 0 and photo.read_bytes() == b"half new, half old"
    alive.close()

    dead._lock.close()  # the process dies: its lock goes, its files stay
    after = Journal(root)
    assert after.replayed == 1
    assert photo.read_bytes() == b"the new content" and photo.stat().st_ino == st.st_ino
    assert not dead.folder.exists()
    after.close()
