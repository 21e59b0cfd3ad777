"""Private working folders of the converters: removed when done, and removed by the next run when a
killed one left them behind, but only ramcli's own, abandoned ones."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ramcli.models.scratch import GRACE_SECONDS, private_folder, remove_abandoned, scratch_root

KILLED_MID_WAY = """
import os, sys
from ramcli.models.scratch import private_folder
with private_folder("onnx-int8") as work:
    (work / "model.onnx").write_bytes(b"x" * 1000)
    print(work, flush=True)
    os.kill(os.getpid(), 9)
"""


def _age(path, seconds=GRACE_SECONDS + 5):
    past = time.time() - seconds
    os.utime(path, (past, past), follow_symlinks=False)


def _killed_run(home) -> Path:
    env = {**os.environ, "RAMCLI_HOME": str(home)}
    run = subprocess.run([sys.executable, "-c", KILLED_MID_WAY], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == -9, run.stderr
    folder = Path(run.stdout.strip())
    assert folder.is_dir() and folder.parent == home / "tmp"
    return folder


def test_a_folder_is_removed_when_its_block_ends(tmp_path, monkeypatch):
    monkeypatch.setenv("RAMCLI_HOME", str(tmp_path))
    with private_folder("openvino-ir") as work:
        assert work.parent == scratch_root() and oct(work.stat().st_mode & 0o777) == "0o700"
        (work / "model.xml").write_text("x")
    assert not work.exists()
    with pytest.raises(ValueError):
        with private_folder("../escape"):
            pass


def test_a_killed_runs_folder_is_removed_by_the_next_run(tmp_path, monkeypatch):
    monkeypatch.setenv("RAMCLI_HOME", str(tmp_path))
    left = _killed_run(tmp_path)
    with private_folder("onnx-export"):
        assert left.exists()  # within the grace period: its owner might still be starting
    _age(left)
    with private_folder("onnx-export") as work:
        assert not left.exists() and work.exists()


def test_a_live_runs_folder_is_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("RAMCLI_HOME", str(tmp_path))
    with private_folder("onnx-int8") as busy:
        _age(busy)
        assert remove_abandoned() == [] and busy.exists()


def test_only_ramcli_folders_are_removed_never_followed_links(tmp_path, monkeypatch):
    monkeypatch.setenv("RAMCLI_HOME", str(tmp_path / "home"))
    root = scratch_root()
    root.mkdir(parents=True)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "photo.jpg").write_bytes(b"keep")
    abandoned = _killed_run(tmp_path / "home")
    (abandoned / "link-inside").symlink_to(precious, target_is_directory=True)
    planted = root / "onnx-int8-4242-abcdefgh"  # ramcli's pattern, but a link to someone's folder
    planted.symlink_to(precious, target_is_directory=True)
    others = [root / "onnx-int8-notapid-abcdefgh", root / "mine", root / "onnx-int8-4242-abcdefghi"]
    for folder in others:
        folder.mkdir()
    named_like_ramcli_file = root / "openvino-ir-4243-abcdefgh"
    named_like_ramcli_file.write_text("a file, not a folder")
    for path in [abandoned, planted, named_like_ramcli_file, *others]:
        _age(path)
    assert remove_abandoned() == [abandoned]
    assert not abandoned.exists() and (precious / "photo.jpg").read_bytes() == b"keep"
    assert planted.is_symlink() and named_like_ramcli_file.is_file() and all(f.is_dir() for f in others)



def test_a_tag_run_that_converts_nothing_removes_a_killed_conversions_folder(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from ckpt_factory import make_labels_dir, make_official_checkpoint
    from images import photo_like
    from ramcli.cli.app import app

    monkeypatch.setenv("RAMCLI_HOME", str(tmp_path / "home"))
    left = _killed_run(tmp_path / "home")
    _age(left)
    weights = make_official_checkpoint(tmp_path / "ram_tiny.pth", "ram_tiny", num_classes=20)
    photos = tmp_path / "photos"
    photos.mkdir()
    photo_like(96, 64).save(photos / "a.jpg")
    res = CliRunner().invoke(app, ["tag", str(photos), "--weights", str(weights), "--labels",
                                   str(make_labels_dir(tmp_path, 20)), "--precision", "fp32", "--no-write",
                                   "--no-index", "-f", "jsonl"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert not left.exists() and list(scratch_root().iterdir()) == []
