"""`ramcli finetune`: start points, tag-list extension with CLIP-initialised queries, the
official defaults, and learning new tags on synthetic shards."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest
import torch
from ckpt_factory import make_labels_dir, make_official_checkpoint
from clip_fixtures import TINY_CLIP, save_random_clip

from ramcli.models.clip_text import ensemble, load_text_encoder
from ramcli.models.labels import LabelSet
from ramcli_train.finetune import finetune, plan_tags, read_start_point, remap_tagger
from ramcli_train.synth import write_shards

BACKGROUNDS = ["sky", "grass", "sand", "snow", "sea", "wood"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    write_shards(root / "s", 160, shards=2, seed=1, size=64, val_samples=60)
    ckpt = make_official_checkpoint(root / "ram_plus.pth", "ram_plus_tiny", num_classes=50, des_per_class=3)
    labels = make_labels_dir(root, 50)
    clip = save_random_clip(root / "clip.safetensors", TINY_CLIP, text_only=True)
    return root, ckpt, labels, lambda: load_text_encoder(clip, model_config=TINY_CLIP)


def test_plan_and_remap_keep_known_rows_and_clip_init_new(world):
    root, ckpt, labels, encoder = world
    start = read_start_point(ckpt, labels)
    plan = plan_tags(start.labels, add_tags=["sky", start.labels.names[3].upper(), "wood"])
    assert plan.new_names == ["sky", "wood"] and len(plan.labels) == 52  # a known name (any case) is not new
    enc = encoder()
    queries = {50: enc.template_embeddings("sky")[:3], 51: enc.template_embeddings("wood")[:3]}
    state = remap_tagger(start.tagger, start.arch, plan, queries)
    table = state["label_embed"].view(52, 3, 512)
    assert torch.equal(table[:50], start.tagger["label_embed"].view(50, 3, 512))
    assert torch.equal(table[50], queries[50]) and not torch.allclose(table[50], table[51])


def test_tag2text_new_rows_are_learned_not_zero():
    from ramcli.models.configs import ARCHS

    arch = ARCHS["tag2text_tiny"]
    labels = LabelSet(("a", "b"), ("a", "b"), (0.68, 0.68))
    state = {"label_embed": torch.ones(2, 64), "fc_weight": torch.ones(2, 64), "fc_bias": torch.ones(2)}
    plan = plan_tags(labels, add_tags=["c"])
    out = remap_tagger(state, arch, plan, {})
    assert torch.equal(out["label_embed"][:2], state["label_embed"]) and out["label_embed"][2].abs().sum() > 0
    assert out["fc_weight"].shape == (3, 64) and out["fc_bias"].shape == (3,)


def test_dry_run_uses_official_defaults_and_a_loadable_init(world, tmp_path):
    root, ckpt, labels, encoder = world
    plan = finetune(ckpt, [str(root / "s")], tmp_path / "run", add_tags=["sky"], labels_dir=labels,
                    encoder_loader=encoder, dry_run=True)
    cfg = plan["config"]
    assert (cfg["lr"], cfg["min_lr"], cfg["schedule"], cfg["epochs"], cfg["batch_size"]) == (5e-6, 0.0, "cosine", 2, 26)
    assert plan["classes"] == 51 and plan["new_tags"] == ["sky"]
    init = torch.load(tmp_path / "run" / "init.pt", weights_only=True)
    sky = ensemble(encoder().template_embeddings("sky"))
    rows = init["tagger.label_embed"].view(51, 3, 512)[50]
    assert torch.allclose(rows, encoder().template_embeddings("sky")[:3]) and rows.norm(dim=-1).min() > 0.99
    assert sky.shape == (512,)


def test_missing_clip_weights_is_a_clear_error(world, tmp_path):
    from ramcli.errors import UsageError

    root, ckpt, labels, _ = world
    with pytest.raises(UsageError, match="CLIP text embeddings"):
        finetune(ckpt, [str(root / "s")], tmp_path / "run", add_tags=["sky"], labels_dir=labels, dry_run=True)


def _val(root):
    images, truth = {}, {}
    with tarfile.open(root / "s" / "val" / "00000.tar") as tar:
        for m in tar:
            key, _, ext = m.name.rpartition(".")
            data = tar.extractfile(m).read()
            if ext == "jpg":
                images[key] = data
            elif ext == "json":
                truth[key] = set(json.loads(data)["tags"])
    return images, truth


@pytest.mark.slow
def test_finetune_learns_new_tags(world, tmp_path):
    from ramcli.tagging.pipeline import score_files
    from ramcli_train.export import tagger_from_checkpoint
    from ramcli.eval.metrics import average_precisions

    root, ckpt, labels, encoder = world
    summary = finetune(ckpt, [str(root / "s")], tmp_path / "run", add_tags=BACKGROUNDS, labels_dir=labels,
                       encoder_loader=encoder,
                       overrides=dict(lr=3e-3, epochs=3, batch_size=16, augment=False, alignment=False, distill="off",
                                      num_workers=0, progress=False))
    assert summary["new_tags"] == BACKGROUNDS and summary["step"] == 30
    images, truth = _val(root)
    folder = tmp_path / "val"
    folder.mkdir()
    for key, data in images.items():
        (folder / f"{key}.jpg").write_bytes(data)
    model = tagger_from_checkpoint(tmp_path / "run" / "checkpoint_last.pt")
    result = score_files(model, sorted(folder.glob("*.jpg")), device="cpu", workers=0)
    cols = [model.labels.names.index(t) for t in BACKGROUNDS]
    targets = np.array([[t in truth[p.stem] for t in BACKGROUNDS] for p in result.paths], dtype=float)
    ap = average_precisions(result.scores[:, cols], targets).mean()
    chance = targets.mean(axis=0).mean()  # the expected AP of a random ranking
    assert ap > chance + 0.08, (ap, chance)


def test_finetune_keeps_a_timm_backbone_or_moves_the_decoder_to_a_new_one(world, tmp_path):
    from ramcli_train.config import resolve
    from ramcli_train.loop import train

    root, _, _, _ = world
    cfg = resolve("tiny", overrides=dict(data=[str(root / "s")], out=str(tmp_path / "src"), backbone="test_resnet",
                                         family="ram_plus", alignment=False, batch_size=8, max_steps=1,
                                         tokenizer_vocab=300, progress=False))
    train(cfg)
    start = tmp_path / "src" / "checkpoint_last.pt"
    plan = finetune(start, [str(root / "s")], tmp_path / "same", dry_run=True)
    assert plan["config"]["backbone"] == "test_resnet" and plan["config"]["image_size"] == 64
    src = torch.load(start, weights_only=True)["model"]
    moved = finetune(start, [str(root / "s")], tmp_path / "moved", overrides={"backbone": "test_convnext"}, dry_run=True)
    assert moved["config"]["backbone"] == "test_convnext"
    init = torch.load(tmp_path / "moved" / "init.pt", weights_only=True)
    assert torch.equal(init["tagger.decoder.layers.0.ffn_in.weight"], src["tagger.decoder.layers.0.ffn_in.weight"])
    assert init["tagger.image_proj.weight"].shape[1] != src["tagger.image_proj.weight"].shape[1]  # the new width
    assert "random initialisation" in json.loads((tmp_path / "moved" / "finetune.json").read_text())["backbone"]
