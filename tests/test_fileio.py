"""Atomic writes (ramcli/fileio.py) and the in-place redo journal (ramcli/journal.py, ramcli/inplace.py):
a kill -9 at any moment and a full disk leave a photo whole. The kill -9 tests of the metadata writer (tests/test_metadata.py)
exercise the journal end to end."""

from __future__ import annotations

import base64
import errno
import io
import json
import os
import random
import signal
import stat
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from ramcli import inplace
from ramcli.fileio import atomic_output, atomic_write
from ramcli.journal import Change, Journal
from small_disk import fill, free_bytes, small_disk


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


# --- a full disk ------------------------------------------------------------------------------


def jpeg(seed: int, size: int = 256) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=95)
    return out.getvalue()


def grown(data: bytes, extra: int) -> bytes:
    """The same JPEG, `extra` bytes longer (comment segments after its start marker), as a photo's
    new version with more metadata grows."""
    segments = b""
    while extra > 0:
        n = min(extra, 65533)
        segments += b"\xff\xfe" + (n + 2).to_bytes(2, "big") + b"c" * n
        extra -= n
    return data[:2] + segments + data[2:]


def pixels(data: bytes) -> bytes:
    """The decoded image (raises if it does not decode: a torn JPEG)."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB")).tobytes()


def record_of(photo, data_name: str) -> list[dict]:
    st = photo.stat()
    return [{"target": base64.b64encode(os.fsencode(photo)).decode(), "data": data_name,
             "create": False, "mtime_ns": None, "inode": [st.st_dev, st.st_ino]}]


def test_a_full_disk_leaves_the_photo_and_its_snapshot_untouched(tmp_path):
    """A new version that does not fit is not written at all (the photo and a hard-linked
    snapshot of it keep every byte, and decode), the batch's other photos are written, nothing
    waits in the journal, and once there is room the same change goes in, in place."""
    with small_disk(tmp_path / "disk", 2 << 20) as disk:
        old, shrunk = jpeg(1), jpeg(2)
        new = grown(old, 200_000)
        photo, other = disk / "photo.jpg", disk / "other.jpg"
        photo.write_bytes(old)
        other.write_bytes(grown(shrunk, 10_000))
        (disk / "snapshot").mkdir()
        snapshot = disk / "snapshot" / "photo.jpg"
        os.link(photo, snapshot)
        inode, mtime = photo.stat().st_ino, photo.stat().st_mtime_ns
        filler = fill(disk)

        journal = Journal(tmp_path / "journal")
        batch = journal.new_batch()
        (batch / "f1").write_bytes(new)
        (batch / "f2").write_bytes(shrunk)  # smaller than what is there: fits
        results = journal.commit(batch, [Change(str(photo), str(batch / "f1")),
                                         Change(str(other), str(batch / "f2"))])
        assert results == {str(photo): "not written: no space left on device (the file is unchanged)",
                           str(other): None}
        assert photo.read_bytes() == old == snapshot.read_bytes() and photo.stat().st_mtime_ns == mtime
        assert other.read_bytes() == shrunk
        assert pixels(photo.read_bytes()) == pixels(old) and journal.waiting == []
        journal.close()
        assert [p.name for p in (tmp_path / "journal").iterdir()] == ["lock"]

        filler.unlink()
        journal = Journal(tmp_path / "journal")
        assert journal.replayed == 0
        batch = journal.new_batch()
        (batch / "f1").write_bytes(new)
        assert journal.commit(batch, [Change(str(photo), str(batch / "f1"))]) == {str(photo): None}
        journal.close()
        assert photo.read_bytes() == new == snapshot.read_bytes() and photo.stat().st_ino == inode
        assert pixels(new) == pixels(old)


def test_where_space_cannot_be_allocated_the_free_space_is_checked(tmp_path, monkeypatch):
    """Without fallocate (macOS, some network file systems) `reserve` compares the growth with the
    free space: it refuses on a full disk, and never changes the file."""
    monkeypatch.setattr(inplace, "_FALLOCATE", None)
    with small_disk(tmp_path / "disk", 1 << 20) as disk:
        photo = disk / "photo.jpg"
        photo.write_bytes(jpeg(4))
        size = photo.stat().st_size
        filler = fill(disk)
        fd = os.open(photo, os.O_WRONLY)
        try:
            with pytest.raises(OSError) as refused:
                inplace.reserve(fd, size + 200_000)
            assert refused.value.errno == errno.ENOSPC
            inplace.reserve(fd, size)  # no growth: nothing to reserve
            filler.unlink()
            inplace.reserve(fd, size + 200_000)
        finally:
            os.close(fd)
        assert photo.read_bytes() == jpeg(4)


def test_a_replay_that_finds_the_disk_full_keeps_its_record_until_it_can(tmp_path):
    """A run killed in the middle of a copy, then a full disk: the next journal cannot complete
    the photo, so it keeps the record (and makes nothing worse), refuses any other write into that
    photo meanwhile, and the first journal that finds room completes it."""
    with small_disk(tmp_path / "disk", 2 << 20) as disk:
        old = jpeg(1)
        new = grown(old, 300_000)
        torn = new[: len(old) // 2] + old[len(old) // 2 :]  # as a kill in the middle of the copy leaves it
        photo = disk / "photo.jpg"
        photo.write_bytes(torn)
        snapshot = disk / "snapshot.jpg"
        os.link(photo, snapshot)
        root = tmp_path / "journal"
        dead = Journal(root)
        batch = dead.new_batch()
        (batch / "f1").write_bytes(new)
        batch.with_suffix(".json").write_text(json.dumps(record_of(photo, "f1")))
        (dead.folder / "workspaces").mkdir()  # what else a dead run leaves: its workspace links
        (dead.folder / "workspaces" / "f000001.jpg").symlink_to(photo)
        dead._lock.close()  # the process dies
        filler = fill(disk)

        after = Journal(root)
        assert after.replayed == 0 and photo.read_bytes() == torn
        assert batch.with_suffix(".json").exists() and (batch / "f1").read_bytes() == new
        assert not (dead.folder / "workspaces").exists()
        assert [(w.target, w.reason) for w in after.waiting] == [(str(photo), "no space left on device")]
        retry = after.new_batch()
        (retry / "f1").write_bytes(old)
        results = after.commit(retry, [Change(str(snapshot), str(retry / "f1"))])  # the same file, by its other name
        assert "an earlier ramcli write into it waits to be completed (no space left on device)" in results[str(snapshot)]
        assert photo.read_bytes() == torn
        after.close()

        filler.unlink()
        again = Journal(root)
        assert again.replayed == 1 and again.waiting == []
        assert photo.read_bytes() == new == snapshot.read_bytes()
        assert not dead.folder.exists()
        again.close()


KILLED_COMMITS = """
import itertools, os, shutil, signal, sys
import ramcli.inplace as inplace
import ramcli.journal as journal_module

root, photo, first, second, kill_at = sys.argv[1:]
inplace._COPY_CHUNK = 16 << 10  # many writes per copy, so that a kill lands between two of them
real_write, writes = os.write, itertools.count(1)

def write(fd, data):  # the kill_at-th write into the photo kills the process (0: the test does)
    if next(writes) == int(kill_at):
        os.kill(os.getpid(), signal.SIGKILL)
    return real_write(fd, data)

os.write = write
journal = journal_module.Journal(root)
print("ready", flush=True)
for new in itertools.cycle([second, first]):
    batch = journal.new_batch()
    shutil.copyfile(new, batch / "new")
    assert journal.commit(batch, [journal_module.Change(photo, str(batch / "new"))]) == {photo: None}
"""


@pytest.mark.slow
def test_kill_9_at_any_moment_then_a_full_disk_leaves_the_old_or_the_new_photo(tmp_path):
    """A process rewrites a photo over and over (it grows and shrinks) and is killed with
    SIGKILL in the middle of a copy, or at a random moment; then the disk fills up. The next
    journal completes the photo all the same (the space was reserved before the copy began):
    it is its old or its new self, byte for byte, in every hard link, and decodes."""
    with small_disk(tmp_path / "disk", 4 << 20) as disk:
        first = jpeg(3)
        second = grown(first, 250_000)
        sources = tmp_path / "first.jpg", tmp_path / "second.jpg"
        sources[0].write_bytes(first)
        sources[1].write_bytes(second)
        photo, snapshot = disk / "photo.jpg", disk / "snapshot.jpg"
        photo.write_bytes(first)
        os.link(photo, snapshot)
        inode = photo.stat().st_ino
        root = tmp_path / "journal"
        script = tmp_path / "killed.py"
        script.write_text(KILLED_COMMITS)
        timer = random.Random(0)
        copies = len(second) // (16 << 10) + 1
        for kill_at in [2, copies // 2, copies + 2, copies + 4, 3 * copies // 2 + 1, 0, 0, 0, 0]:
            proc = subprocess.Popen([sys.executable, script, root, photo, *sources, str(kill_at)],
                                    stdout=subprocess.PIPE, text=True)
            if kill_at == 0:
                assert proc.stdout.readline() == "ready\n"
                try:
                    proc.wait(timer.uniform(0, 0.3))
                except subprocess.TimeoutExpired:
                    proc.send_signal(signal.SIGKILL)
            assert proc.wait(60) == -signal.SIGKILL
            proc.stdout.close()
            filler = fill(disk)
            journal = Journal(root)
            data = photo.read_bytes()
            assert data in (first, second), kill_at
            assert journal.waiting == []
            assert snapshot.read_bytes() == data and photo.stat().st_ino == inode
            assert pixels(data) == pixels(first)
            journal.close()
            filler.unlink()
        assert free_bytes(disk) > 3 << 20  # no space was lost to the reservations
