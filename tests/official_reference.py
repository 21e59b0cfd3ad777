"""An independent, functional re-statement of the official RAM / RAM++ / Tag2Text tagging forward.

Written from the semantics of xinyu1205/recognize-anything (`ram/models/swin_transformer.py`,
`bert.py`, `ram.py`, `ram_plus.py`, `tag2text.py`, `ram/transform.py`), not from `ramcli`: it
reads an official-layout state dict and computes the logits the official `generate_tag` /
`generate` code computes, step by step, in fp32 plain torch. `ramcli.models` is tested against it.

Like the official loader (`load_checkpoint_swinbase/large`), it ignores the checkpoint's
`relative_position_index` and `attn_mask` buffers and derives them from the geometry, and it
ignores the training-only `tag_encoder.*` / `text_decoder.*` keys.

`cfg` is a mapping with the keys of `tests.ckpt_factory.arch_config`: family, image_size,
patch_size, embed_dim, depths, num_heads, window_size, mlp_ratio, num_classes,
num_attention_heads, num_hidden_layers, layer_norm_eps.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor

IMAGENET_MEAN, IMAGENET_STD = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD  # `ram/transform.py`'s values
SWIN_LN_EPS = 1e-5  # nn.LayerNorm's default, used throughout the official Swin


def official_transform(pil_image: Any, image_size: int) -> Tensor:
    """`ram.transform.get_transform`: RGB, Resize((S, S)) (bilinear on PIL), ToTensor, Normalize."""
    from torchvision import transforms

    pipeline = transforms.Compose([
        transforms.Resize((image_size, image_size)),
        transforms.ToTensor(),
        transforms.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
    ])
    return pipeline(pil_image.convert("RGB"))


# ----------------------------------------------------------------------------- small pieces


def _linear(x: Tensor, sd: Mapping[str, Tensor], key: str) -> Tensor:
    return F.linear(x, sd[f"{key}.weight"], sd.get(f"{key}.bias"))


def _layer_norm(x: Tensor, sd: Mapping[str, Tensor], key: str, eps: float) -> Tensor:
    return F.layer_norm(x, (x.shape[-1],), sd[f"{key}.weight"], sd[f"{key}.bias"], eps)


# ----------------------------------------------------------------------------- Swin (Microsoft layout)


def block_geometry(resolution: int, window: int, block_index: int) -> tuple[int, int]:
    """(window, shift) of a block: odd blocks shift by window // 2, unless the map is no larger
    than the window, where the official block uses one window of the map's size and no shift."""
    shift = 0 if block_index % 2 == 0 else window // 2
    if resolution <= window:
        return resolution, 0
    return window, shift


def relative_position_index(window: int) -> Tensor:
    """The official index into the (2w-1)^2 bias table for every (query, key) pair of a window."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij"))
    flat = coords.flatten(1)  # 2, w*w
    rel = (flat[:, :, None] - flat[:, None, :]).permute(1, 2, 0) + (window - 1)  # w*w, w*w, 2
    return rel[:, :, 0] * (2 * window - 1) + rel[:, :, 1]


def _partition(x: Tensor, window: int) -> Tensor:
    """(B, H, W, C) -> (B * nW, window*window, C), windows in row-major order."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window * window, c)


def _unpartition(windows: Tensor, window: int, h: int, w: int) -> Tensor:
    c = windows.shape[-1]
    x = windows.view(-1, h // window, w // window, window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, w, c)


def shifted_window_mask(resolution: int, window: int, shift: int) -> Tensor:
    """(nW, w*w, w*w) additive mask: -100 between tokens that the cyclic roll brought together
    from different regions of the map, 0 elsewhere (official SwinTransformerBlock)."""
    region_map = torch.zeros(1, resolution, resolution, 1)
    bands = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    for i, rows in enumerate(bands):
        for j, cols in enumerate(bands):
            region_map[:, rows, cols, :] = 3 * i + j
    regions = _partition(region_map, window).squeeze(-1)  # nW, w*w
    differ = regions[:, None, :] - regions[:, :, None]
    return torch.where(differ != 0, -100.0, 0.0)


def _window_attention(x: Tensor, sd: Mapping[str, Tensor], key: str, heads: int, window: int,
                      mask: Tensor | None) -> Tensor:
    n_windows_b, n, c = x.shape
    qkv = _linear(x, sd, f"{key}.qkv").reshape(n_windows_b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = (q * (c // heads) ** -0.5) @ k.transpose(-2, -1)
    table = sd[f"{key}.relative_position_bias_table"]
    bias = table[relative_position_index(window).view(-1)].view(n, n, heads).permute(2, 0, 1)
    attn = attn + bias.unsqueeze(0)
    if mask is not None:
        n_windows = mask.shape[0]
        attn = attn.view(-1, n_windows, heads, n, n) + mask[None, :, None]
        attn = attn.view(-1, heads, n, n)
    attn = attn.softmax(dim=-1)
    out = (attn @ v).transpose(1, 2).reshape(n_windows_b, n, c)
    return _linear(out, sd, f"{key}.proj")


def _swin_block(x: Tensor, sd: Mapping[str, Tensor], key: str, resolution: int, heads: int,
                window: int, shift: int) -> Tensor:
    b, length, c = x.shape
    shortcut = x
    h = _layer_norm(x, sd, f"{key}.norm1", SWIN_LN_EPS).view(b, resolution, resolution, c)
    if shift:
        h = torch.roll(h, shifts=(-shift, -shift), dims=(1, 2))
    mask = shifted_window_mask(resolution, window, shift) if shift else None
    windows = _window_attention(_partition(h, window), sd, f"{key}.attn", heads, window, mask)
    h = _unpartition(windows, window, resolution, resolution)
    if shift:
        h = torch.roll(h, shifts=(shift, shift), dims=(1, 2))
    x = shortcut + h.reshape(b, length, c)
    y = _layer_norm(x, sd, f"{key}.norm2", SWIN_LN_EPS)
    y = _linear(F.gelu(_linear(y, sd, f"{key}.mlp.fc1")), sd, f"{key}.mlp.fc2")
    return x + y


def _patch_merging(x: Tensor, sd: Mapping[str, Tensor], key: str, resolution: int) -> Tensor:
    b, _, c = x.shape
    x = x.view(b, resolution, resolution, c)
    quads = [x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]]
    x = torch.cat(quads, dim=-1).view(b, -1, 4 * c)
    return _linear(_layer_norm(x, sd, f"{key}.norm", SWIN_LN_EPS), sd, f"{key}.reduction")


def swin_forward(sd: Mapping[str, Tensor], prefix: str, cfg: Mapping[str, Any], x: Tensor) -> Tensor:
    """Official `SwinTransformer.forward`: (B, 3, S, S) -> (B, 1 + L, C), average-pooled token first."""
    x = F.conv2d(x, sd[f"{prefix}patch_embed.proj.weight"], sd[f"{prefix}patch_embed.proj.bias"],
                 stride=cfg["patch_size"])
    x = x.flatten(2).transpose(1, 2)
    x = _layer_norm(x, sd, f"{prefix}patch_embed.norm", SWIN_LN_EPS)
    resolution = cfg["image_size"] // cfg["patch_size"]
    n_stages = len(cfg["depths"])
    for i, (depth, heads) in enumerate(zip(cfg["depths"], cfg["num_heads"])):
        for j in range(depth):
            window, shift = block_geometry(resolution, cfg["window_size"], j)
            x = _swin_block(x, sd, f"{prefix}layers.{i}.blocks.{j}", resolution, heads, window, shift)
        if i < n_stages - 1:
            x = _patch_merging(x, sd, f"{prefix}layers.{i}.downsample", resolution)
            resolution //= 2
    x = _layer_norm(x, sd, f"{prefix}norm", SWIN_LN_EPS)
    return torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)


# ----------------------------------------------------------------------------- recognition decoder


def _cross_attention(h: Tensor, memory: Tensor, sd: Mapping[str, Tensor], key: str, heads: int) -> Tensor:
    """BertSelfAttention with encoder_hidden_states; the all-ones image mask adds exactly 0."""
    b, n, hidden = h.shape
    d = hidden // heads

    def split(t: Tensor) -> Tensor:
        return t.view(b, -1, heads, d).permute(0, 2, 1, 3)

    q = split(_linear(h, sd, f"{key}.query"))
    k = split(_linear(memory, sd, f"{key}.key"))
    v = split(_linear(memory, sd, f"{key}.value"))
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(d)
    context = scores.softmax(dim=-1) @ v
    return context.permute(0, 2, 1, 3).reshape(b, n, hidden)


def tagging_head_forward(sd: Mapping[str, Tensor], cfg: Mapping[str, Any], queries: Tensor,
                         memory: Tensor) -> Tensor:
    """`BertModel(..., mode='tagging')` with self-attention deleted: per layer cross-attention
    (+ residual LayerNorm), then the GELU feed-forward (+ residual LayerNorm)."""
    eps = cfg["layer_norm_eps"]
    h = queries
    for i in range(cfg["num_hidden_layers"]):
        p = f"tagging_head.encoder.layer.{i}."
        context = _cross_attention(h, memory, sd, p + "crossattention.self", cfg["num_attention_heads"])
        attended = _layer_norm(_linear(context, sd, p + "crossattention.output.dense") + h, sd,
                               p + "crossattention.output.LayerNorm", eps)
        inner = F.gelu(_linear(attended, sd, p + "intermediate.dense"))
        h = _layer_norm(_linear(inner, sd, p + "output.dense") + attended, sd, p + "output.LayerNorm", eps)
    return h


def _ram_plus_label_queries(sd: Mapping[str, Tensor], num_classes: int, image_embeds: Tensor) -> Tensor:
    """RAM++'s image-conditioned label embeddings, written the way `generate_tag` writes them."""
    label_embed = sd["label_embed"]
    bs = image_embeds.shape[0]
    des_per_class = int(label_embed.shape[0] / num_classes)
    cls = image_embeds[:, 0, :]
    cls = cls / cls.norm(dim=-1, keepdim=True)
    # `RAM_plus.__init__` sets reweight_scale to ln(1/0.07) and the loader uses strict=False, so a
    # file without the tensor runs with that initial value
    reweight_scale = sd.get("reweight_scale", torch.ones([]) * math.log(1 / 0.07))
    logits_per_image = (reweight_scale.exp() * cls @ label_embed.t()).view(bs, -1, des_per_class)
    weights = F.softmax(logits_per_image, dim=2)
    reweighted = torch.empty(bs, num_classes, label_embed.shape[1], dtype=image_embeds.dtype)
    for i in range(bs):
        per_class = label_embed.view(-1, des_per_class, label_embed.shape[1])
        reweighted[i] = (weights[i].unsqueeze(-1) * per_class).sum(dim=1)
    return reweighted


@torch.no_grad()
def official_logits(sd: Mapping[str, Tensor], cfg: Mapping[str, Any], images: Tensor) -> Tensor:
    """Logits (B, C) of the official tagging forward for cfg['family'] in ram / ram_plus / tag2text."""
    family = cfg["family"]
    tokens = swin_forward(sd, "visual_encoder.", cfg, images)
    bs = images.shape[0]
    if family == "tag2text":
        queries = sd["label_embed.weight"].unsqueeze(0).repeat(bs, 1, 1)
        h = tagging_head_forward(sd, cfg, queries, tokens)
        return (sd["fc.W"] * h).sum(-1) + sd["fc.b"]
    image_embeds = _linear(tokens, sd, "image_proj")
    if family == "ram":
        queries = F.relu(_linear(sd["label_embed"], sd, "wordvec_proj")).unsqueeze(0).repeat(bs, 1, 1)
    elif family == "ram_plus":
        queries = F.relu(_linear(_ram_plus_label_queries(sd, cfg["num_classes"], image_embeds), sd, "wordvec_proj"))
    else:
        raise ValueError(f"unknown family {family!r}")
    h = tagging_head_forward(sd, cfg, queries, image_embeds)
    return _linear(h, sd, "fc").squeeze(-1)


def official_tags(logits: Tensor, class_threshold: Sequence[float] | Tensor, delete_index: Iterable[int] = ()) -> Tensor:
    """The official decision: 1.0 where sigmoid(logit) > threshold (strictly, compared in fp32 as
    the official `torch.ones(C) * threshold` tensor is), then deleted classes zeroed."""
    threshold = torch.as_tensor(class_threshold, dtype=torch.float32)
    probs = torch.sigmoid(logits.float())
    targets = torch.where(probs > threshold, torch.tensor(1.0), torch.zeros(logits.shape[-1]))
    deleted = list(delete_index)
    if deleted:
        targets[:, deleted] = 0
    return targets
