"""The official-forward reference and the checkpoint factory, checked against library code.

`official_reference` is what `ramcli.models` is compared with, so it is itself proven here
independently: its Swin against timm's SwinTransformer loaded from the same Microsoft-layout
weights, and its whole tagging forward against a second implementation assembled from library
modules (timm Swin, torch's nn.MultiheadAttention / LayerNorm / GELU, a vectorised RAM++
re-weighting).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from timm.models.swin_transformer import SwinTransformer, checkpoint_filter_fn
from torch import nn

from ckpt_factory import (
    FULL,
    TINY,
    arch_config,
    make_labels_dir,
    make_official_checkpoint,
    official_state_dict,
)
from official_reference import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    official_logits,
    official_tags,
    official_transform,
    relative_position_index,
    shifted_window_mask,
    swin_forward,
)

NUM_CLASSES = 12
DES = 3
VISUAL = "visual_encoder."


def _timm_swin(cfg: dict, sd: dict) -> SwinTransformer:
    """timm's Swin with the same geometry, loaded strictly from the official `visual_encoder.*`."""
    model = SwinTransformer(
        img_size=cfg["image_size"], patch_size=cfg["patch_size"], in_chans=3, num_classes=0, global_pool="",
        embed_dim=cfg["embed_dim"], depths=cfg["depths"], num_heads=cfg["num_heads"],
        window_size=cfg["window_size"], mlp_ratio=cfg["mlp_ratio"],
    ).eval()
    visual = {k[len(VISUAL):]: v for k, v in sd.items() if k.startswith(VISUAL)}
    result = model.load_state_dict(checkpoint_filter_fn(visual, model), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, tuple[dict, dict]]:
    """arch -> (config, state dict as read back from an official-format file)."""
    folder = tmp_path_factory.mktemp("ckpt")
    out = {}
    for arch in TINY:
        path = make_official_checkpoint(folder / f"{arch}.pth", arch, num_classes=NUM_CLASSES, des_per_class=DES)
        out[arch] = (arch_config(arch, NUM_CLASSES, DES), torch.load(path, weights_only=True)["model"])
    return out


def _images(n: int = 3, size: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- Swin vs timm


def test_swin_reference_matches_timm(checkpoints):
    cfg, sd = checkpoints["ram_tiny"]
    x = _images()
    tokens = swin_forward(sd, VISUAL, cfg, x)
    with torch.no_grad():
        timm_tokens = _timm_swin(cfg, sd).forward_features(x)  # (B, 2, 2, C), after the final norm
    b, h, w, c = timm_tokens.shape
    assert tokens.shape == (b, 1 + h * w, c) == (3, 5, cfg["vision_width"])
    torch.testing.assert_close(tokens[:, 1:], timm_tokens.reshape(b, h * w, c), atol=1e-5, rtol=0)
    torch.testing.assert_close(tokens[:, 0], tokens[:, 1:].mean(dim=1), atol=1e-6, rtol=0)
    assert (tokens[0, 1:] - tokens[1, 1:]).abs().max() > 0.1  # the image matters


def test_swin_geometry_buffers_match_timm(checkpoints):
    """The factory's buffers and the reference's own index/mask equal timm's, block by block;
    shifted windows occur exactly in the stages larger than the window (stages 0 and 1)."""
    cfg, sd = checkpoints["ram_tiny"]
    model = _timm_swin(cfg, sd)
    shifted_stages = set()
    for i, stage in enumerate(model.layers):
        for j, block in enumerate(stage.blocks):
            key = f"{VISUAL}layers.{i}.blocks.{j}."
            window = block.window_size[0]
            index = block.attn.relative_position_index
            assert torch.equal(sd[key + "attn.relative_position_index"], index)
            assert torch.equal(relative_position_index(window), index)
            assert sd[key + "attn.relative_position_bias_table"].shape == ((2 * window - 1) ** 2, cfg["num_heads"][i])
            if block.attn_mask is None:
                assert key + "attn_mask" not in sd
                continue
            shifted_stages.add(i)
            assert torch.equal(sd[key + "attn_mask"], block.attn_mask)
            resolution = cfg["image_size"] // cfg["patch_size"] // 2**i
            assert torch.equal(shifted_window_mask(resolution, window, block.shift_size[0]), block.attn_mask)
    assert shifted_stages == {0, 1}


# ----------------------------------------------------------------------------- whole forward vs library modules


def _mha_layer(sd: dict, cfg: dict, i: int, kv_width: int) -> tuple[nn.Module, ...]:
    p = f"tagging_head.encoder.layer.{i}."
    h, eps = cfg["hidden_size"], cfg["layer_norm_eps"]
    attn = nn.MultiheadAttention(h, cfg["num_attention_heads"], kdim=kv_width, vdim=kv_width, batch_first=True)
    a = p + "crossattention."
    attn.load_state_dict({
        "q_proj_weight": sd[a + "self.query.weight"], "k_proj_weight": sd[a + "self.key.weight"],
        "v_proj_weight": sd[a + "self.value.weight"],
        "in_proj_bias": torch.cat([sd[a + f"self.{n}.bias"] for n in ("query", "key", "value")]),
        "out_proj.weight": sd[a + "output.dense.weight"], "out_proj.bias": sd[a + "output.dense.bias"],
    })
    norm1 = nn.LayerNorm(h, eps=eps)
    norm1.load_state_dict({"weight": sd[a + "output.LayerNorm.weight"], "bias": sd[a + "output.LayerNorm.bias"]})
    ffn = nn.Sequential(nn.Linear(h, cfg["intermediate_size"]), nn.GELU(), nn.Linear(cfg["intermediate_size"], h))
    ffn.load_state_dict({
        "0.weight": sd[p + "intermediate.dense.weight"], "0.bias": sd[p + "intermediate.dense.bias"],
        "2.weight": sd[p + "output.dense.weight"], "2.bias": sd[p + "output.dense.bias"],
    })
    norm2 = nn.LayerNorm(h, eps=eps)
    norm2.load_state_dict({"weight": sd[p + "output.LayerNorm.weight"], "bias": sd[p + "output.LayerNorm.bias"]})
    return attn.eval(), norm1, ffn, norm2


@torch.no_grad()
def _library_logits(sd: dict, cfg: dict, images: torch.Tensor) -> torch.Tensor:
    feats = _timm_swin(cfg, sd).forward_features(images).flatten(1, 2)
    tokens = torch.cat([feats.mean(dim=1, keepdim=True), feats], dim=1)
    family, bs = cfg["family"], images.shape[0]
    if family == "tag2text":
        memory, queries = tokens, sd["label_embed.weight"].expand(bs, -1, -1)
    else:
        memory = nn.functional.linear(tokens, sd["image_proj.weight"], sd["image_proj.bias"])
        table = sd["label_embed"]
        if family == "ram_plus":
            per_class = table.view(cfg["num_classes"], -1, table.shape[1])  # C, D, 512
            pooled = nn.functional.normalize(memory[:, 0], dim=-1)
            weights = (sd["reweight_scale"].exp() * torch.einsum("bk,cdk->bcd", pooled, per_class)).softmax(-1)
            table = torch.einsum("bcd,cdk->bck", weights, per_class)
        queries = nn.functional.linear(table, sd["wordvec_proj.weight"], sd["wordvec_proj.bias"]).relu()
        queries = queries.expand(bs, -1, -1)
    h = queries
    for i in range(cfg["num_hidden_layers"]):
        attn, norm1, ffn, norm2 = _mha_layer(sd, cfg, i, memory.shape[-1])
        h = norm1(attn(h, memory, memory, need_weights=False)[0] + h)
        h = norm2(ffn(h) + h)
    if family == "tag2text":
        return torch.einsum("bch,ch->bc", h, sd["fc.W"][0]) + sd["fc.b"]
    return nn.functional.linear(h, sd["fc.weight"], sd["fc.bias"]).squeeze(-1)


@pytest.mark.parametrize("arch", sorted(TINY))
def test_official_logits_match_library_implementation(checkpoints, arch):
    cfg, sd = checkpoints[arch]
    images = _images()
    logits = official_logits(sd, cfg, images)
    assert logits.shape == (3, NUM_CLASSES) and logits.dtype == torch.float32
    torch.testing.assert_close(logits, _library_logits(sd, cfg, images), atol=1e-5, rtol=0)
    # not degenerate: classes and images are told apart, and some (not all) tags fire at 0.65
    assert logits.std(dim=1).min() > 0.05
    assert (logits[0] - logits[1]).abs().max() > 0.01
    fired = torch.sigmoid(logits) > 0.65
    assert 0 < fired.sum() < fired.numel()


def test_ram_plus_depends_on_descriptions_per_image(checkpoints):
    """RAM++'s queries are re-weighted per image: swapping two descriptions inside a class
    changes nothing, moving a description to another class changes that class's logits."""
    cfg, sd = checkpoints["ram_plus_tiny"]
    images = _images(2)
    base = official_logits(sd, cfg, images)
    table = sd["label_embed"].view(NUM_CLASSES, DES, -1)
    swapped = dict(sd, label_embed=table[:, [1, 0, 2]].reshape(NUM_CLASSES * DES, -1))
    torch.testing.assert_close(official_logits(swapped, cfg, images), base, atol=1e-5, rtol=0)
    moved = table.clone()
    moved[0, 0], moved[1, 0] = table[1, 0], table[0, 0]
    changed = official_logits(dict(sd, label_embed=moved.reshape(NUM_CLASSES * DES, -1)), cfg, images)
    assert (changed[:, :2] - base[:, :2]).abs().max() > 1e-4


def test_training_parts_do_not_change_tagging_weights():
    full = official_state_dict("ram_tiny", NUM_CLASSES, seed=3)
    lean = official_state_dict("ram_tiny", NUM_CLASSES, seed=3, training_parts=False)
    assert set(lean) < set(full)
    assert not any(k.startswith(("tag_encoder.", "text_decoder.")) for k in lean)
    assert all(torch.equal(lean[k], full[k]) for k in lean)
    cfg = arch_config("ram_tiny", NUM_CLASSES)
    assert torch.equal(official_logits(lean, cfg, _images(1)), official_logits(full, cfg, _images(1)))
    other_seed = official_state_dict("ram_tiny", NUM_CLASSES, seed=4, training_parts=False)
    assert not torch.equal(other_seed["fc.weight"], lean["fc.weight"])


# ----------------------------------------------------------------------------- factory layout


TAGGING_SUFFIXES = (
    "crossattention.self.query.weight", "crossattention.self.key.bias", "crossattention.self.value.weight",
    "crossattention.output.dense.weight", "crossattention.output.LayerNorm.weight",
    "intermediate.dense.weight", "output.dense.bias", "output.LayerNorm.bias",
)


@pytest.mark.parametrize("arch", ["ram_tiny", "tag2text_tiny"])
def test_tag_encoder_lowest_layers_are_the_tagging_head(checkpoints, arch):
    cfg, sd = checkpoints[arch]
    for i in range(cfg["num_hidden_layers"]):
        for suffix in TAGGING_SUFFIXES:
            head, enc = sd[f"tagging_head.encoder.layer.{i}.{suffix}"], sd[f"tag_encoder.encoder.layer.{i}.{suffix}"]
            assert head.data_ptr() == enc.data_ptr()  # one tensor in the file, as the official tie makes it
        assert f"tag_encoder.encoder.layer.{i}.attention.self.query.weight" in sd
        assert not any(k.startswith(f"tagging_head.encoder.layer.{i}.attention.") for k in sd)
    top = cfg["num_hidden_layers"]
    assert sd[f"tag_encoder.encoder.layer.{top}.output.dense.weight"].data_ptr() != \
        sd["tagging_head.encoder.layer.0.output.dense.weight"].data_ptr()
    assert not any(k.startswith("tagging_head.embeddings") for k in sd)
    kv = 512 if cfg["family"] == "ram" else cfg["vision_width"]
    assert sd["tag_encoder.encoder.layer.0.crossattention.self.key.weight"].shape == (cfg["hidden_size"], kv)
    words = sd["text_decoder.bert.embeddings.word_embeddings.weight"]
    assert words.shape == (cfg["vocab_size"], cfg["hidden_size"])
    assert sd["text_decoder.cls.predictions.decoder.weight"].data_ptr() == words.data_ptr()


def test_family_specific_keys(checkpoints):
    cfg, ram = checkpoints["ram_tiny"]
    assert ram["label_embed"].shape == (NUM_CLASSES, 512)
    torch.testing.assert_close(ram["label_embed"].norm(dim=-1), torch.ones(NUM_CLASSES))
    assert ram["image_proj.weight"].shape == (512, cfg["vision_width"])
    assert ram["wordvec_proj.weight"].shape == (cfg["hidden_size"], 512)
    assert ram["fc.weight"].shape == (1, cfg["hidden_size"]) and "reweight_scale" not in ram

    cfg, plus = checkpoints["ram_plus_tiny"]
    assert plus["label_embed"].shape == (NUM_CLASSES * DES, 512)
    assert plus["reweight_scale"].shape == ()
    assert not any(k.startswith(("tag_encoder.", "text_decoder.")) for k in plus)

    cfg, t2t = checkpoints["tag2text_tiny"]
    assert t2t["label_embed.weight"].shape == (NUM_CLASSES, cfg["hidden_size"])
    assert t2t["fc.W"].shape == (1, NUM_CLASSES, cfg["hidden_size"]) and t2t["fc.b"].shape == (1, NUM_CLASSES)
    assert t2t["tagging_head.encoder.layer.0.crossattention.self.key.weight"].shape == \
        (cfg["hidden_size"], cfg["vision_width"])
    assert not any(k.startswith(("image_proj", "wordvec_proj")) for k in t2t)


def test_checkpoint_file_carries_optimizer_epoch_and_config(tmp_path):
    path = make_official_checkpoint(tmp_path / "ram.pth", "ram_plus_tiny", num_classes=5, des_per_class=2,
                                    optimizer_state=True)
    ckpt = torch.load(path, weights_only=True)
    assert set(ckpt) == {"model", "optimizer", "epoch", "config"}
    assert isinstance(ckpt["epoch"], int) and ckpt["config"]["family"] == "ram_plus"
    sd = ckpt["model"]
    trainable = [v for k, v in sd.items()
                 if v.is_floating_point() and k != "label_embed" and not k.endswith("attn_mask")]
    state = ckpt["optimizer"]["state"]
    assert len(state) == len(trainable) == len(ckpt["optimizer"]["param_groups"][0]["params"])
    assert all(state[i]["exp_avg"].shape == p.shape == state[i]["exp_avg_sq"].shape for i, p in enumerate(trainable))


def _swin_params(sd: dict) -> int:
    return sum(v.numel() for k, v in sd.items()
               if k.startswith(VISUAL) and not k.endswith(("relative_position_index", "attn_mask")))


@pytest.mark.parametrize("arch, documented_millions", [("ram_swin_large_384", 197), ("tag2text_swin_base_384", 88)])
def test_full_size_backbones_have_the_documented_size(arch, documented_millions):
    """Swin-L 197M / Swin-B 88M (Swin paper, with a 1000-class head); exact count from timm."""
    cfg = arch_config(arch)
    sd = official_state_dict(arch, meta=True)
    with torch.device("meta"):
        reference = SwinTransformer(
            img_size=cfg["image_size"], patch_size=4, num_classes=0, embed_dim=cfg["embed_dim"],
            depths=cfg["depths"], num_heads=cfg["num_heads"], window_size=cfg["window_size"],
        )
    backbone = _swin_params(sd)
    assert backbone == sum(p.numel() for p in reference.parameters())
    with_head = backbone + cfg["vision_width"] * 1000 + 1000
    assert abs(with_head / 1e6 - documented_millions) / documented_millions < 0.01
    assert sd["label_embed" if cfg["family"] == "ram" else "label_embed.weight"].shape[0] == cfg["num_classes"]
    assert sd["text_decoder.bert.embeddings.word_embeddings.weight"].shape == (30524, 768)
    assert sum(k.startswith("tag_encoder.encoder.layer.") and k.endswith("output.LayerNorm.bias")
               and "attention" not in k for k in sd) == 12


def test_full_size_ram_plus_label_embedding_has_51_descriptions():
    sd = official_state_dict("ram_plus_swin_large_384", meta=True)
    assert sd["label_embed"].shape == (4585 * 51, 512)
    assert FULL["ram_plus_swin_large_384"]["vision_width"] == 1536


# ----------------------------------------------------------------------------- labels, transform, decision


def test_labels_dir_keeps_the_official_files_quirks(tmp_path, labels_dir):
    out = make_labels_dir(tmp_path, 7)
    english = (out / "ram_tag_list.txt").read_text(encoding="utf-8")
    assert english.split("\n") == (labels_dir / "ram_tag_list.txt").read_text(encoding="utf-8").split("\n")[:7]
    assert not english.endswith("\n")
    chinese = (out / "ram_tag_list_chinese.txt").read_text(encoding="utf-8")
    assert chinese.endswith("\n") and len(chinese.splitlines()) == 7
    assert any(line.endswith(" ") for line in chinese.splitlines())
    official = (labels_dir / "ram_tag_list_chinese.txt").read_text(encoding="utf-8").splitlines()[:7]
    assert chinese.splitlines() == official
    thresholds = (out / "ram_tag_list_threshold.txt").read_text(encoding="utf-8").splitlines()
    assert len(thresholds) == 7 and all(0 < float(t) < 1 for t in thresholds)
    tag2text = make_labels_dir(tmp_path, 4, family="tag2text")
    assert [p.name for p in tag2text.iterdir()] == ["tag_list.txt"]
    lines = (tag2text / "tag_list.txt").read_text(encoding="utf-8").split("\n")
    assert lines == (labels_dir / "tag_list.txt").read_text(encoding="utf-8").split("\n")[:4]


def test_official_transform_is_pil_bilinear_resize_then_imagenet_normalise(sample_photos):
    photo = min(sample_photos, key=lambda p: p.stat().st_size)
    with Image.open(photo) as img:
        tensor = official_transform(img, 48)
        expected = np.asarray(img.convert("RGB").resize((48, 48), Image.BILINEAR), dtype=np.float32) / 255.0
    expected = (expected - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    assert tensor.shape == (3, 48, 48) and tensor.dtype == torch.float32
    torch.testing.assert_close(tensor, torch.from_numpy(expected).permute(2, 0, 1), atol=1e-5, rtol=0)
    gray = official_transform(Image.new("LA", (30, 20), (128, 255)), 16)
    assert gray.shape == (3, 16, 16)
    assert torch.allclose(gray[0] * IMAGENET_STD[0] + IMAGENET_MEAN[0], torch.full((16, 16), 128 / 255), atol=1e-6)


def test_official_tags_threshold_is_strict_and_deleted_classes_never_fire():
    threshold = torch.tensor(0.65)
    at = torch.logit(threshold.double()).float()
    assert torch.sigmoid(at) == threshold  # a score exactly equal to the threshold
    above = at + 1e-3
    logits = torch.stack([torch.stack([at, above, above, torch.tensor(5.0)])])
    tags = official_tags(logits, [0.65, 0.65, 0.65, 0.99], delete_index=[2])
    assert tags.tolist() == [[0.0, 1.0, 0.0, 1.0]]
    assert official_tags(torch.zeros(2, 3), [0.5] * 3).sum() == 0  # sigmoid(0) == 0.5 exactly, not > 0.5
    assert official_tags(torch.full((1, 2), 0.01), [0.5, 0.51]).tolist() == [[1.0, 0.0]]
