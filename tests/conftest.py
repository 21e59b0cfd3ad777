"""Shared fixtures. `../shared` (read-only in CI) holds the official label files and sample photos."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("RAMCLI_SHARED", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    assert SHARED.is_dir(), f"../shared not found at {SHARED} (set RAMCLI_SHARED)"
    return SHARED


@pytest.fixture(scope="session")
def labels_dir(shared_dir: Path) -> Path:
    """The official label files (ram_tag_list*.txt, tag_list.txt)."""
    return shared_dir / "ram"


@pytest.fixture(scope="session")
def sample_photos(shared_dir: Path) -> list[Path]:
    return sorted((shared_dir / "ram" / "images").glob("*.jpg"))


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """Every test gets its own RAMCLI_HOME so nothing touches the user's real state."""
    monkeypatch.setenv("RAMCLI_HOME", str(tmp_path_factory.mktemp("ramcli_home")))
    monkeypatch.delenv("RAMCLI_LABELS", raising=False)
