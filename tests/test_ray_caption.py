"""`ramcli tag --ray --caption`: Tag2Text's captions written by the model actors, recorded by the
driver as a local run records them."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ckpt_factory import make_labels_dir, make_official_checkpoint
from images import photo_like
from ramcli.cli.app import app


@pytest.fixture(scope="module")
def cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def _tag(weights: Path, labels: Path, home: Path, library: Path, *args: str):
    return CliRunner().invoke(app, ["tag", str(library), "--weights", str(weights), "--labels", str(labels),
                                    "--caption", "--threshold", "0.3", "--top-k", "4", "--precision", "fp32",
                                    "--batch-size", "2", "--workers", "0", "--no-write", "-f", "jsonl", *args],
                              env={"RAMCLI_HOME": str(home)}, catch_exceptions=False)


def _captions(home: Path, library: Path) -> dict[str, str]:
    with sqlite3.connect(home / "index.db") as con:
        return {Path(p).relative_to(library).as_posix(): c for p, c in con.execute("SELECT path, caption FROM photos")}


@pytest.mark.slow
def test_captions_on_ray_are_those_of_a_local_run(cluster, tmp_path):
    weights = make_official_checkpoint(tmp_path / "tag2text_tiny.pth", "tag2text_tiny_bert_vocab", num_classes=20)
    labels = make_labels_dir(tmp_path, 20, "tag2text")
    library = tmp_path / "lib"
    (library / "sub").mkdir(parents=True)
    for i in range(5):
        photo_like(96, 64, seed=i).save(library / ("sub" if i % 2 else "") / f"p{i}.jpg", quality=85)

    local = _tag(weights, labels, tmp_path / "local", library)
    remote = _tag(weights, labels, tmp_path / "ray", library, "--ray")
    assert local.exit_code == 0 and remote.exit_code == 0, remote.output
    rows = {r["path"]: r for r in map(json.loads, local.stdout.splitlines())}
    ray_rows = {r["path"]: r for r in map(json.loads, remote.stdout.splitlines())}
    assert rows.keys() == ray_rows.keys() and len(rows) == 5
    for path, row in rows.items():
        assert ray_rows[path]["caption"] == row["caption"], path
        assert [t["name"] for t in ray_rows[path]["tags"]] == [t["name"] for t in row["tags"]], path
    captions = _captions(tmp_path / "ray", library)
    assert captions == _captions(tmp_path / "local", library)
    assert all(isinstance(c, str) for c in captions.values()) and any(captions.values())
