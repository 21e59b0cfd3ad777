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


@pytest.fixture(scope="session")
def labels(labels_dir: Path):
    """The official RAM label system (LabelSet)."""
    from ramcli.labels import read_label_dir

    return read_label_dir(labels_dir, "ram")


@pytest.fixture(scope="session")
def parser(labels):
    """A caption parser over the official label system (building one takes ~0.6 s)."""
    from ramcli_train.parse import TagParser

    return TagParser(labels)


def run_cli(args: list[str]) -> int:
    """Run the real `ramcli` entry point in-process; its exit code (standalone mode exits)."""
    from ramcli.cli.app import main

    try:
        main(args)
    except SystemExit as exc:
        return exc.code or 0
    return 0


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """Every test gets its own RAMCLI_HOME so nothing touches the user's real state."""
    monkeypatch.setenv("RAMCLI_HOME", str(tmp_path_factory.mktemp("ramcli_home")))
    monkeypatch.delenv("RAMCLI_LABELS", raising=False)
