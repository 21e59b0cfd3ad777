"""`ramcli vocab build`: tag counts from captions, dataset lists, synonyms, CLIP embeddings."""

from __future__ import annotations

import json
import tarfile
from collections import Counter

import pytest
import torch
from clip_fixtures import TINY_CLIP, save_random_clip
from typer.testing import CliRunner

from ramcli.models.clip_text import ensemble, load_text_encoder
from ramcli.models.labels import read_label_dir
from ramcli_train.label_system import LabelSystem, build_label_system
from ramcli_train.synth import write_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("ls")
    write_shards(root, 30, shards=2, seed=3, size=32)
    truth: Counter = Counter()
    for shard in sorted((root / "train").glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar:
                if m.name.endswith(".json"):
                    truth.update(set(json.loads(tar.extractfile(m).read())["tags"]))
    return root / "train", truth


def test_counts_top_dataset_lists_and_synonyms(shards, labels_dir, tmp_path):
    data, truth = shards
    coco = tmp_path / "coco.txt"
    coco.write_text("1,zebra\n2,circle\n# comment\n\n", encoding="utf-8")
    syn = tmp_path / "syn.txt"
    syn.write_text("circle, ring\n", encoding="utf-8")
    base = read_label_dir(labels_dir, "ram")
    system = build_label_system([str(data)], base, [coco], [syn], top=5)
    ranked = sorted(truth, key=lambda t: (-truth[t], t))[:5]
    assert system.names[:5] == ranked
    assert {n: system.counts[n] for n in ranked} == {n: truth[n] for n in ranked}
    assert "zebra" in system.names and system.counts["zebra"] == 0  # dataset lists are always kept
    assert "ring" not in system.names and system.synonyms.get("ring") == "circle"
    zebra = base.names.index("zebra")
    assert system.thresholds[system.names.index("zebra")] == base.thresholds[zebra]


def test_embeddings_and_folder_roundtrip(shards, labels_dir, tmp_path):
    data, _ = shards
    clip = save_random_clip(tmp_path / "clip.safetensors", TINY_CLIP, text_only=True)
    encoder = load_text_encoder(clip, model_config=TINY_CLIP)
    system = build_label_system([str(data)], None, top=4, encoder_loader=lambda: encoder)
    assert system.embeddings.shape == (4, 512)
    assert torch.allclose(system.embeddings[1], ensemble(encoder.template_embeddings(system.names[1])), atol=1e-6)
    system.save(tmp_path / "sys")
    assert read_label_dir(tmp_path / "sys", "ram").names == tuple(system.names)
    again = LabelSystem.load(tmp_path / "sys")
    assert again.names == system.names and torch.equal(again.embeddings, system.embeddings)


def test_cli_vocab_build(shards, tmp_path, capsys):
    from ramcli.cli import labelsys
    from ramcli.cli.app import app

    labelsys.register(app)
    data, truth = shards
    runner = CliRunner()
    out = tmp_path / "sys"
    result = runner.invoke(app, ["vocab", "build", "--data", str(data), "--out", str(out), "--top", "3",
                                 "--base", "none", "--embed", "none"])
    assert result.exit_code == 0, result.output
    assert len(read_label_dir(out, "ram")) == 3
    from ramcli.cli.app import main

    with pytest.raises(SystemExit) as exc:
        main(["vocab", "build", "--data", str(data), "--out", str(out), "--top", "0", "--embed", "none", "--base", "none"])
    assert exc.value.code == 2
    assert "--top must be at least 1" in capsys.readouterr().err
