"""Shared fixtures. Everything the tests need ships with the repository or is generated: the
official label files are package data (`ramcli/data/official`), sample photos are written by
`images.photo_like`, benchmark lists in the official formats by the tests that read them."""

from __future__ import annotations

from pathlib import Path

import pytest



@pytest.fixture(scope="session")
def labels_dir() -> Path:
    """The official label files (ram_tag_list*.txt, tag_list.txt), as shipped in the package."""
    from ramcli.models.labels import official_dir

    return official_dir()


@pytest.fixture(scope="session")
def sample_photos(tmp_path_factory) -> list[Path]:
    """Three photo-like JPEGs shaped like the official demo photos: a 3000x2000 landscape, a
    3216x4288 portrait with EXIF orientation 1, and a small 428x640 one."""
    from images import exif_with, photo_like

    folder = tmp_path_factory.mktemp("sample_photos")
    out = []
    for i, (width, height, orientation) in enumerate([(3000, 2000, None), (3216, 4288, 1), (428, 640, None)]):
        path = folder / f"demo{i + 2}.jpg"
        extra = {"exif": exif_with(orientation=orientation)} if orientation else {}
        photo_like(width, height, seed=i).save(path, quality=90, **extra)
        out.append(path)
    return out


@pytest.fixture(scope="session")
def labels(labels_dir: Path):
    """The official RAM label system (LabelSet)."""
    from ramcli.models.labels import read_label_dir

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
