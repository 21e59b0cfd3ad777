"""Inference never imports the training package: `ramcli_train` loads only for training commands.

Each command runs in a fresh interpreter, because this test process has long imported everything.
"""

from __future__ import annotations

import json

import pytest
from ckpt_factory import make_labels_dir, make_official_checkpoint
from fresh_cli import run_ramcli
from images import photo_like


@pytest.mark.slow
def test_inference_commands_never_import_ramcli_train(tmp_path):
    home = tmp_path / "home"
    for args in (["tag", "--help"], ["eval", "--help"], ["search", "--help"], ["vocab", "list", "--help"]):
        result = run_ramcli(*args, home=home)
        assert result.code == 0 and result.modules_of(["ramcli_train"]) == [], (args, result)

    weights = make_official_checkpoint(tmp_path / "tag2text_tiny.pth", "tag2text_tiny_bert_vocab", num_classes=20)
    labels = make_labels_dir(tmp_path, 20, "tag2text")
    library = tmp_path / "lib"
    library.mkdir()
    for i in range(2):
        photo_like(96, 64, seed=i).save(library / f"p{i}.jpg", quality=85)
    tagged = run_ramcli("tag", str(library), "--weights", str(weights), "--labels", str(labels), "--caption",
                        "--threshold", "0", "--no-write", "--workers", "0", "-q", "-f", "jsonl", home=home)
    assert tagged.code == 0 and tagged.modules_of(["ramcli_train"]) == [], tagged
    rows = [json.loads(line) for line in tagged.stdout.splitlines()]
    assert len(rows) == 2 and all(isinstance(r["caption"], str) and r["tags"] for r in rows)

    found = run_ramcli("search", rows[0]["tags"][0]["name"], "--format", "paths", home=home)
    assert found.code == 0 and found.modules_of(["ramcli_train"]) == [], found
    assert str(library / "p0.jpg") in found.stdout.splitlines() or str(library / "p1.jpg") in found.stdout

    # the check itself can fail: a training-data command does load the package
    parsed = run_ramcli("parse", "a dog", "--labels", str(make_labels_dir(tmp_path, 20)), "--json", home=home)
    assert parsed.code == 0 and "ramcli_train.parse" in parsed.modules_of(["ramcli_train"]), parsed
