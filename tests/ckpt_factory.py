"""Random-weight checkpoints in the exact layout of the official RAM / RAM++ / Tag2Text releases.

The published `.pth` files cannot be downloaded in tests, so this module writes files that look
like them to a loader: `{'model': state_dict, ...}` saved with `torch.save`, with the official key
names, shapes, dtypes, buffers (`relative_position_index` everywhere, `attn_mask` only on shifted
Swin blocks) and tied tensors (the first two `tag_encoder` layers *are* the tagging head's, the
text decoder's output projection *is* its word embedding), as the official modules' `state_dict()`
produces them. Key order follows the official modules (own parameters before child modules).

Weights are random but scaled so that every part matters: attention is not uniform, label
queries differ per class, and logits spread over a few units. Tiny models are centred on the
typical threshold (about half their tags fire), which makes the factory depend on
`official_reference`; full-size ones keep the published init scales.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from official_reference import official_logits
from ramcli.models.labels import official_dir

CLIP_DIM = 512  # RAM/RAM++ label embeddings live in CLIP's text space

_SWIN_TINY = dict(image_size=64, patch_size=4, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8),
                  window_size=4, mlp_ratio=4.0)
_SWIN_L_384 = dict(image_size=384, patch_size=4, embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48),
                   window_size=12, mlp_ratio=4.0)
_SWIN_B_384 = dict(image_size=384, patch_size=4, embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32),
                   window_size=12, mlp_ratio=4.0)
# recognition decoder (the official q2l_config.json, shrunk for tests)
_HEAD_TINY = dict(hidden_size=64, num_attention_heads=4, intermediate_size=128, num_hidden_layers=2,
                  layer_norm_eps=1e-12)
_HEAD_FULL = dict(hidden_size=768, num_attention_heads=4, intermediate_size=3072, num_hidden_layers=2,
                  layer_norm_eps=1e-12)
# training-only BERT parts (the official med_config.json, shrunk for tests)
_TEXT_TINY = dict(text_layers=3, text_heads=4, vocab_size=100, max_position_embeddings=32)
_TEXT_FULL = dict(text_layers=12, text_heads=12, vocab_size=30524, max_position_embeddings=512)


def _arch(family: str, swin: dict, head: dict, text: dict, num_classes: int, init: str) -> dict[str, Any]:
    cfg: dict[str, Any] = dict(family=family, **swin, **head, **text, num_classes=num_classes, init=init)
    cfg["vision_width"] = swin["embed_dim"] * 2 ** (len(swin["depths"]) - 1)
    if family == "ram_plus":
        cfg["des_per_class"] = 51
    return cfg


#: Tiny configs for tests: stages of 16x16, 8x8, 4x4, 2x2 tokens; shifted windows in stages 1-2.
TINY: dict[str, dict[str, Any]] = {
    "ram_tiny": _arch("ram", _SWIN_TINY, _HEAD_TINY, _TEXT_TINY, 4585, "lecun"),
    "ram_plus_tiny": _arch("ram_plus", _SWIN_TINY, _HEAD_TINY, {}, 4585, "lecun"),
    "tag2text_tiny": _arch("tag2text", _SWIN_TINY, _HEAD_TINY, _TEXT_TINY, 3429, "lecun"),
    # captions with the real tokenizer and the official 12 text heads: bert's vocabulary, 40-token tags
    "tag2text_tiny_bert_vocab": _arch("tag2text", _SWIN_TINY, dict(_HEAD_TINY, hidden_size=48, intermediate_size=96),
                                      dict(_TEXT_TINY, text_heads=12, vocab_size=30524, max_position_embeddings=64),
                                      3429, "lecun"),
}
#: The published sizes (for benchmarks and file-size realism).
FULL: dict[str, dict[str, Any]] = {
    "ram_swin_large_384": _arch("ram", _SWIN_L_384, _HEAD_FULL, _TEXT_FULL, 4585, "bert"),
    "ram_plus_swin_large_384": _arch("ram_plus", _SWIN_L_384, _HEAD_FULL, {}, 4585, "bert"),
    "tag2text_swin_base_384": _arch("tag2text", _SWIN_B_384, _HEAD_FULL, _TEXT_FULL, 3429, "bert"),
}
CONFIGS: dict[str, dict[str, Any]] = {**TINY, **FULL}


def arch_config(arch: str, num_classes: int | None = None, des_per_class: int = 51) -> dict[str, Any]:
    """A copy of the named config with the class count (and RAM++ descriptions) filled in."""
    if arch not in CONFIGS:
        raise KeyError(f"unknown arch {arch!r}; choose from {sorted(CONFIGS)}")
    cfg = dict(CONFIGS[arch])
    if num_classes is not None:
        cfg["num_classes"] = int(num_classes)
    if cfg["family"] == "ram_plus":
        cfg["des_per_class"] = int(des_per_class)
    return cfg


# ----------------------------------------------------------------------------- Swin geometry


def stage_geometry(cfg: dict[str, Any]) -> list[tuple[int, int, int]]:
    """(resolution, window, shift) per stage, by the official rule: a stage no larger than the
    window gets one window of its own size and no shift."""
    out = []
    res = cfg["image_size"] // cfg["patch_size"]
    for i in range(len(cfg["depths"])):
        r = res // 2**i
        w = cfg["window_size"]
        if r <= w:
            out.append((r, r, 0))
        else:
            out.append((r, w, w // 2))
    return out


def _relative_position_index(w: int) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(w), torch.arange(w), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    dy = ys[:, None] - ys[None, :] + (w - 1)
    dx = xs[:, None] - xs[None, :] + (w - 1)
    return dy * (2 * w - 1) + dx  # int64, (w*w, w*w)


def _shift_mask(res: int, w: int, s: int) -> torch.Tensor:
    """(nW, w*w, w*w): -100 between tokens that came from different regions of the rolled map."""
    region = torch.zeros(res, dtype=torch.long)
    region[res - w: res - s] = 1
    region[res - s:] = 2
    label = region[:, None] * 3 + region[None, :]
    windows = label.view(res // w, w, res // w, w).permute(0, 2, 1, 3).reshape(-1, w * w)
    differ = windows[:, None, :] != windows[:, :, None]
    return torch.where(differ, torch.tensor(-100.0), torch.tensor(0.0))


# ----------------------------------------------------------------------------- random weights


class _Init:
    """Seeded random tensors. 'lecun' (tiny configs) scales linears by 1/sqrt(fan_in) so signals
    stay O(1) through tiny widths; 'bert' uses the published models' 0.02."""

    def __init__(self, seed: int, init: str, meta: bool = False):
        self.gen = torch.Generator().manual_seed(seed)
        self.init = init
        self.meta = meta  # shapes only (meta tensors): for counting full-size parameters cheaply

    def normal(self, *shape: int, std: float) -> torch.Tensor:
        if self.meta:
            return torch.empty(shape, device="meta")
        return torch.randn(shape, generator=self.gen) * std

    def uniform(self, *shape: int, bound: float) -> torch.Tensor:
        if self.meta:
            return torch.empty(shape, device="meta")
        return (torch.rand(shape, generator=self.gen) * 2 - 1) * bound

    def linear(self, sd: dict, key: str, out_f: int, in_f: int, bias: bool = True, std: float | None = None) -> None:
        if std is None:
            std = in_f**-0.5 if self.init == "lecun" else 0.02
        if self.meta:
            sd[f"{key}.weight"] = torch.empty(out_f, in_f, device="meta")
        else:
            # a normal clipped at 2 std: trunc_normal_'s scale at a tenth of its cost on full sizes
            sd[f"{key}.weight"] = self.normal(out_f, in_f, std=std).clamp_(-2 * std, 2 * std)
        if bias:
            sd[f"{key}.bias"] = self.normal(out_f, std=0.1 if self.init == "lecun" else 0.02)

    def layernorm(self, sd: dict, key: str, dim: int) -> None:
        sd[f"{key}.weight"] = 1.0 + self.normal(dim, std=0.1)
        sd[f"{key}.bias"] = self.normal(dim, std=0.1)


def _swin(sd: dict, rnd: _Init, cfg: dict[str, Any], p: str) -> None:
    e, ps = cfg["embed_dim"], cfg["patch_size"]
    sd[f"{p}patch_embed.proj.weight"] = rnd.normal(e, 3, ps, ps, std=(3 * ps * ps) ** -0.5)
    sd[f"{p}patch_embed.proj.bias"] = rnd.normal(e, std=0.1)
    rnd.layernorm(sd, f"{p}patch_embed.norm", e)
    table_std = 0.5 if rnd.init == "lecun" else 0.02
    hidden_ratio = cfg["mlp_ratio"]
    for i, ((res, w, shift), depth, heads) in enumerate(zip(stage_geometry(cfg), cfg["depths"], cfg["num_heads"])):
        dim = e * 2**i
        for j in range(depth):
            b = f"{p}layers.{i}.blocks.{j}."
            block_shift = shift if j % 2 == 1 else 0
            if block_shift:
                sd[b + "attn_mask"] = _shift_mask(res, w, block_shift)
            rnd.layernorm(sd, b + "norm1", dim)
            sd[b + "attn.relative_position_bias_table"] = rnd.normal((2 * w - 1) ** 2, heads, std=table_std)
            sd[b + "attn.relative_position_index"] = _relative_position_index(w)
            rnd.linear(sd, b + "attn.qkv", 3 * dim, dim)
            rnd.linear(sd, b + "attn.proj", dim, dim)
            rnd.layernorm(sd, b + "norm2", dim)
            rnd.linear(sd, b + "mlp.fc1", int(dim * hidden_ratio), dim)
            rnd.linear(sd, b + "mlp.fc2", dim, int(dim * hidden_ratio))
        if i < len(cfg["depths"]) - 1:
            rnd.linear(sd, f"{p}layers.{i}.downsample.reduction", 2 * dim, 4 * dim, bias=False)
            rnd.layernorm(sd, f"{p}layers.{i}.downsample.norm", 4 * dim)
    rnd.layernorm(sd, f"{p}norm", cfg["vision_width"])


def _bert_attention(sd: dict, rnd: _Init, p: str, hidden: int, kv_width: int) -> None:
    rnd.linear(sd, p + "self.query", hidden, hidden)
    rnd.linear(sd, p + "self.key", hidden, kv_width)
    rnd.linear(sd, p + "self.value", hidden, kv_width)
    rnd.linear(sd, p + "output.dense", hidden, hidden)
    rnd.layernorm(sd, p + "output.LayerNorm", hidden)


def _bert_layer(sd: dict, rnd: _Init, p: str, cfg: dict, kv_width: int, self_attention: bool) -> None:
    """One official BertLayer: attention (unless deleted, as in the tagging head), crossattention,
    intermediate, output."""
    h = cfg["hidden_size"]
    if self_attention:
        _bert_attention(sd, rnd, p + "attention.", h, h)
    _bert_attention(sd, rnd, p + "crossattention.", h, kv_width)
    rnd.linear(sd, p + "intermediate.dense", cfg["intermediate_size"], h)
    rnd.linear(sd, p + "output.dense", h, cfg["intermediate_size"])
    rnd.layernorm(sd, p + "output.LayerNorm", h)


def _bert_embeddings(sd: dict, rnd: _Init, p: str, cfg: dict) -> None:
    n_pos, h = cfg["max_position_embeddings"], cfg["hidden_size"]
    sd[p + "position_ids"] = torch.arange(n_pos).expand(1, -1).clone()
    sd[p + "word_embeddings.weight"] = rnd.normal(cfg["vocab_size"], h, std=0.02)
    sd[p + "position_embeddings.weight"] = rnd.normal(n_pos, h, std=0.02)
    rnd.layernorm(sd, p + "LayerNorm", h)


def _tagging_head(rnd: _Init, cfg: dict, kv_width: int) -> dict[str, torch.Tensor]:
    head: dict[str, torch.Tensor] = {}
    for i in range(cfg["num_hidden_layers"]):
        _bert_layer(head, rnd, f"tagging_head.encoder.layer.{i}.", cfg, kv_width, self_attention=False)
    return head


def _tag_encoder(sd: dict, rnd: _Init, cfg: dict, kv_width: int, head: dict[str, torch.Tensor]) -> None:
    """The image-tag interaction encoder; its lowest layers are the tagging head's tensors (tied)."""
    _bert_embeddings(sd, rnd, "tag_encoder.embeddings.", cfg)
    for i in range(cfg["text_layers"]):
        layer: dict[str, torch.Tensor] = {}
        _bert_layer(layer, rnd, f"tag_encoder.encoder.layer.{i}.", cfg, kv_width, self_attention=True)
        if i < cfg["num_hidden_layers"]:
            for key in layer:
                tied = key.replace("tag_encoder.", "tagging_head.", 1)
                if tied in head:
                    layer[key] = head[tied]
        sd.update(layer)


def _text_decoder(sd: dict, rnd: _Init, cfg: dict) -> None:
    h = cfg["hidden_size"]
    _bert_embeddings(sd, rnd, "text_decoder.bert.embeddings.", cfg)
    for i in range(cfg["text_layers"]):
        _bert_layer(sd, rnd, f"text_decoder.bert.encoder.layer.{i}.", cfg, h, self_attention=True)
    p = "text_decoder.cls.predictions."
    sd[p + "bias"] = rnd.normal(cfg["vocab_size"], std=0.02)
    rnd.linear(sd, p + "transform.dense", h, h)
    rnd.layernorm(sd, p + "transform.LayerNorm", h)
    sd[p + "decoder.weight"] = sd["text_decoder.bert.embeddings.word_embeddings.weight"]  # tied
    sd[p + "decoder.bias"] = sd[p + "bias"]  # tied


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def official_state_dict(
    arch: str,
    num_classes: int | None = None,
    des_per_class: int = 51,
    seed: int = 0,
    training_parts: bool = True,
    meta: bool = False,
) -> dict[str, torch.Tensor]:
    """A random state dict with the official keys, shapes and ties for `arch` (see TINY/FULL).

    `meta=True` gives weights as meta tensors (shapes, no data); buffers stay real."""
    cfg = arch_config(arch, num_classes, des_per_class)
    rnd = _Init(seed, cfg["init"], meta)
    family, c, h, vw = cfg["family"], cfg["num_classes"], cfg["hidden_size"], cfg["vision_width"]
    # nn.Linear's default init, as the official fc keeps it; tiny models widen it so that their
    # logits spread over a few units, like trained ones
    fc_bound = h**-0.5 * (6.0 if cfg["init"] == "lecun" else 1.0)
    sd: dict[str, torch.Tensor] = {}
    if family in ("ram", "ram_plus"):
        rows = c * cfg["des_per_class"] if family == "ram_plus" else c
        sd["label_embed"] = _unit_rows(rnd.normal(rows, CLIP_DIM, std=1.0))
        if family == "ram_plus":
            sd["reweight_scale"] = math.log(1 / 0.07) + rnd.normal(std=0.1)
    kv_width = CLIP_DIM if family in ("ram", "ram_plus") else vw
    _swin(sd, rnd, cfg, "visual_encoder.")
    head = _tagging_head(rnd, cfg, kv_width)
    if training_parts and family in ("ram", "tag2text"):
        # own random stream: the tagging weights do not depend on training_parts
        extra = _Init(seed + 1, cfg["init"], meta)
        _tag_encoder(sd, extra, cfg, kv_width, head)
        _text_decoder(sd, extra, cfg)
    sd.update(head)
    if family in ("ram", "ram_plus"):
        # wordvec_proj sees unit-norm CLIP vectors: std 1 keeps its outputs O(1) per coordinate
        rnd.linear(sd, "wordvec_proj", h, CLIP_DIM, std=1.0 if cfg["init"] == "lecun" else 0.02)
        sd["fc.weight"] = rnd.uniform(1, h, bound=fc_bound)
        sd["fc.bias"] = rnd.uniform(1, bound=fc_bound)
        rnd.linear(sd, "image_proj", CLIP_DIM, vw)
    else:
        sd["label_embed.weight"] = rnd.normal(c, h, std=1.0)
        sd["fc.W"] = rnd.uniform(1, c, h, bound=fc_bound)
        sd["fc.b"] = rnd.uniform(1, c, bound=fc_bound)
    if cfg["init"] == "lecun" and not meta:
        _center_logits(sd, cfg, seed)
    return sd


#: sigmoid(this) = 0.65, the most common official per-class threshold
_TYPICAL_THRESHOLD_LOGIT = math.log(0.65 / 0.35)


def _center_logits(sd: dict[str, torch.Tensor], cfg: dict[str, Any], seed: int) -> None:
    """Shift the fc bias so that on a fixed batch of noise images the median logit sits at the
    typical threshold: about half of a tiny model's tags fire, so tests see both outcomes."""
    images = torch.randn(4, 3, cfg["image_size"], cfg["image_size"], generator=torch.Generator().manual_seed(seed))
    shift = _TYPICAL_THRESHOLD_LOGIT - official_logits(sd, cfg, images).median()
    bias_key = "fc.b" if cfg["family"] == "tag2text" else "fc.bias"
    sd[bias_key] = sd[bias_key] + shift


def _adamw_state(sd: dict[str, torch.Tensor], rnd: _Init) -> dict[str, Any]:
    """AdamW.state_dict() over the model's unique trainable tensors (tied ones once, no buffers),
    as the official finetune.py saves it: RAM/RAM++'s CLIP `label_embed` is frozen there, which
    is why the published RAM++ file (3.0 GB) is far smaller than 3x its weights."""
    seen: set[int] = set()
    params = []
    for key, value in sd.items():
        frozen = key == "label_embed"
        if frozen or not value.is_floating_point() or key.endswith("attn_mask") or id(value) in seen:
            continue
        seen.add(id(value))
        params.append(value)
    state = {
        i: {
            "step": torch.tensor(1000.0),
            "exp_avg": rnd.normal(*p.shape, std=1e-4),
            "exp_avg_sq": rnd.normal(*p.shape, std=1e-6).abs(),
        }
        for i, p in enumerate(params)
    }
    group = dict(lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05, amsgrad=False, foreach=None,
                 maximize=False, capturable=False, differentiable=False, fused=None,
                 params=list(range(len(params))))
    return {"state": state, "param_groups": [group]}


def make_official_checkpoint(
    path: str | Path,
    arch: str,
    num_classes: int | None = None,
    des_per_class: int = 51,
    seed: int = 0,
    optimizer_state: bool = False,
    training_parts: bool = True,
) -> Path:
    """Write `{'model': state_dict, 'epoch', 'config'[, 'optimizer']}` like the published `.pth` files
    (the official finetune.py's save_obj). Tiny RAM++ files: pass a small `des_per_class`; with
    the default 51 x 4585 classes the label table alone is 480 MB."""
    path = Path(path)
    sd = official_state_dict(arch, num_classes, des_per_class, seed, training_parts)
    cfg = arch_config(arch, num_classes, des_per_class)
    plain_cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}
    checkpoint: dict[str, Any] = {"model": sd, "epoch": 4, "config": plain_cfg}
    if optimizer_state:
        checkpoint["optimizer"] = _adamw_state(sd, _Init(seed + 2, cfg["init"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path)
    return path


#: How other tools save a state dict: the layouts `save_variant` writes
LAYOUTS = ("model", "state_dict", "nested", "bare")


def save_variant(path: str | Path, sd: dict[str, torch.Tensor], layout: str = "model", key_prefix: str = "",
                 drop: tuple[str, ...] = (), extra: dict[str, torch.Tensor] | None = None,
                 optimizer_state: bool = False) -> Path:
    """A state dict saved the way files found in the wild are: without some tensors (`drop`),
    with unused extra ones (`extra`, e.g. a CLIP `logit_scale`), every key prefixed (`module.`
    from DDP), with AdamW state, and in one of `LAYOUTS`: `{'model': sd}` (official),
    `{'state_dict': sd}` (Lightning and others), `{'model': {'state_dict': sd}}` (an extra
    nesting) or the bare state dict."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose from {LAYOUTS}")
    sd = {k: v for k, v in sd.items() if k not in drop}
    sd.update(extra or {})
    sd = {key_prefix + k: v for k, v in sd.items()}
    body: Any = {"model": {"model": sd}, "state_dict": {"state_dict": sd},
                 "nested": {"model": {"state_dict": sd}}, "bare": sd}[layout]
    if optimizer_state and layout != "bare":
        body = {**body, "optimizer": _adamw_state(sd, _Init(2, "lecun")), "epoch": 1}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(body, path)
    return path


# ----------------------------------------------------------------------------- label files

_LABEL_FILES = {
    "ram": ("ram_tag_list.txt", "ram_tag_list_chinese.txt", "ram_tag_list_threshold.txt"),
    "tag2text": ("tag_list.txt",),
}


def make_labels_dir(tmp_path: str | Path, num_classes: int, family: str = "ram") -> Path:
    """A folder with the official label file names holding the first `num_classes` lines of the
    official files (shipped in ramcli/data/official), each file ending the way its original ends."""
    shared = official_dir()
    names = _LABEL_FILES["tag2text" if family == "tag2text" else "ram"]
    out = Path(tmp_path) / f"labels_{family}_{num_classes}"
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        raw = (shared / name).read_bytes().decode("utf-8")
        lines = raw.split("\n")
        ends_with_newline = raw.endswith("\n")
        if ends_with_newline:
            lines = lines[:-1]
        if num_classes > len(lines):
            raise ValueError(f"{name} has only {len(lines)} lines, asked for {num_classes}")
        text = "\n".join(lines[:num_classes]) + ("\n" if ends_with_newline else "")
        (out / name).write_bytes(text.encode("utf-8"))
    return out
