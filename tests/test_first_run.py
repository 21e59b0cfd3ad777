"""The first run on a machine without the model and without the hub: one line of advice that
names a weights file, at once, and nothing left behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def _ramcli(*args: str, home: Path, **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, "RAMCLI_HOME": str(home), "HF_HOME": str(home.parent / "hf"), **env,
               "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    environ.pop("HF_HUB_OFFLINE", None) if "HF_HUB_OFFLINE" not in env else None
    return subprocess.run([sys.executable, "-m", "ramcli", *args], capture_output=True, text=True, env=environ,
                          timeout=300)


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:9"}],
                         ids=["HF_HUB_OFFLINE", "unreachable"])
def test_tag_without_model_or_hub_gives_one_line_and_creates_nothing(tmp_path, env):
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (64, 48), "orange").save(photos / "a.jpg")
    home = tmp_path / "home"
    done = _ramcli("tag", str(photos), home=home, **env)
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot download ram_plus_swin_large_14m"), lines
    assert "--weights ram_plus_swin_large_14m.pth" in lines[0]
    assert "downloading" not in done.stderr and "Retrying" not in done.stderr
    assert not (home / "index.db").exists() and done.stdout == ""


def test_clip_advice_does_not_send_the_user_to_models_import(tmp_path):
    done = _ramcli("models", "pull", "clip-vit-b-16", home=tmp_path / "home", HF_HUB_OFFLINE="1")
    assert done.returncode == 1
    assert "--clip-weights FILE" in done.stderr and "models import" not in done.stderr


def test_missing_exiftool_is_said_before_anything_else(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (64, 48), "orange").save(photos / "a.jpg")
    home = tmp_path / "home"
    done = _ramcli("tag", str(photos), home=home, PATH=str(tmp_path / "no-tools-here"), HF_HUB_OFFLINE="1")
    assert done.returncode == 1
    assert done.stderr.startswith("error: ExifTool not found") and "--no-write" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not (home / "index.db").exists()
