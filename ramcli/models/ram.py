"""RAM, RAM++ and Tag2Text tagging, on timm's SwinTransformer (or any timm backbone) and our
recognition decoder.

One module serves the three families; they differ only in where the label queries come from:

- RAM: `label_embed` (C, 512) frozen CLIP text embeddings -> relu(wordvec_proj) -> queries.
- RAM++: `label_embed` holds D CLIP description embeddings per tag. Each image weights a tag's
  descriptions by softmax(exp(reweight_scale) * <pooled image embedding, description>) and the
  weighted sum is that tag's 512-d query. Vectorised over the batch (one batched matmul), where
  the official code loops over images in Python.
- Tag2Text: learned queries `label_embed` (C, hidden), no image projection (the decoder attends to
  the raw Swin tokens), and one classifier row per class (closed set).

The image encoder is the official Swin, or any timm model named by `arch.backbone` whose
`forward_features` gives a feature map (NCHW or NHWC) or tokens (ViT): its output becomes the
decoder's image tokens, projected from the backbone's own width (`num_features`).

Open vocabulary: `add_label_queries` appends CLIP-space queries for custom tags. For RAM++ each
custom tag may have any number of descriptions; their softmax is computed per tag with a segment
reduction, while the built-in tags keep the uniform fast path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformer
from torch import nn

from ramcli.errors import CheckpointError
from ramcli.models.labels import LabelSet
from ramcli.models.configs import CLIP_DIM, ArchConfig
from ramcli.models.bert import RecognitionDecoder


def build_backbone(arch: ArchConfig, drop_path_rate: float = 0.0) -> nn.Module:
    """The image encoder of `arch` with random weights: timm's Swin of `arch.swin`, or the timm
    model `arch.backbone` (with `arch.depths` blocks per stage, when set) without its classifier.
    Stochastic depth (`drop_path_rate`, official training: 0.1) only acts in training mode, so
    inference is the same whatever the rate."""
    if arch.backbone:
        return timm_backbone(arch.backbone, arch.image_size, drop_path_rate, depths=arch.depths)
    s = arch.swin
    return SwinTransformer(
        img_size=arch.image_size,
        patch_size=s.patch_size,
        embed_dim=s.embed_dim,
        depths=s.depths,
        num_heads=s.num_heads,
        window_size=s.window_size,
        num_classes=0,
        global_pool="",
        drop_path_rate=drop_path_rate,
    )


def timm_backbone(name: str, image_size: int | None, drop_path_rate: float = 0.0, depths: tuple[int, ...] = (),
                  **kwargs) -> nn.Module:
    """timm's `name` as a feature extractor (no classifier, no pooling), for `image_size` inputs
    (None: the model's own), with `depths` blocks per stage (empty: the model's own); `kwargs` go
    to `timm.create_model` (training passes its pretrained-weights file this way).

    timm's constructors name their blocks per stage `depths` (ConvNeXt, Swin, ...) or `layers`
    (ResNet) and fix their input size (`img_size`) only when they are transformers, so each
    is passed where the model takes it."""
    import timm

    if not timm.is_model(name):
        raise CheckpointError(f"unknown timm backbone {name!r} (`timm.list_models()` lists them)")
    kwargs.update(num_classes=0, global_pool="")
    if drop_path_rate:
        kwargs["drop_path_rate"] = drop_path_rate
    shapes = [{"depths": tuple(depths)}, {"layers": tuple(depths)}] if depths else [{}]
    sizes = [{"img_size": image_size}, {}] if image_size is not None else [{}]
    for shape in shapes:
        for size in sizes:
            try:
                model = timm.create_model(name, **kwargs, **shape, **size)
            except TypeError as exc:
                if not any(f"'{key}'" in str(exc) for key in (*shape, *size)):
                    raise
            except (ValueError, IndexError, AssertionError) as exc:
                if not depths:
                    raise
                raise CheckpointError(f"timm backbone {name!r} cannot have {list(depths)} blocks per stage "
                                      f"({str(exc)[:120]})") from None
            else:
                # fewer stages than the model's own: some (ResNet, ConvNeXt) build them but still
                # declare the width of their full last stage, which the projection is sized by
                info = getattr(model, "feature_info", None) if depths else None
                if info and info[-1]["num_chs"] != model.num_features:
                    raise CheckpointError(f"timm backbone {name!r} cannot have {len(depths)} stages "
                                          f"({list(depths)}): give one number per stage")
                return model
    raise CheckpointError(f"timm backbone {name!r} has no blocks per stage to choose (`depths`)")


def backbone_data_config(name: str) -> dict:
    """The preprocessing timm publishes for backbone `name` (its pretrained config's mean, std and
    interpolation), as `ArchConfig` fields: training feeds the backbone what its weights expect,
    and the exported file carries the same values to `ramcli tag`. ImageNet's, bilinear, when
    timm has no config for it; an interpolation ramcli's resize lacks becomes bicubic."""
    import timm

    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        return {}
    interpolation = cfg.interpolation if cfg.interpolation in ("bilinear", "bicubic") else "bicubic"
    return {"mean": tuple(cfg.mean), "std": tuple(cfg.std), "interpolation": interpolation}


def feature_tokens(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """A backbone's last features as tokens (B, L, C): NCHW and NHWC maps flattened, ViT tokens as they are."""
    x = backbone.forward_features(images)
    if x.ndim == 4:
        x = x.flatten(1, 2) if getattr(backbone, "output_fmt", "NCHW") == "NHWC" else x.flatten(2).transpose(1, 2)
    return x


def backbone_width(arch: ArchConfig) -> int:
    """Channels of the backbone's tokens, read off a weightless (meta-device) copy."""
    if not arch.backbone:
        return arch.swin.width
    with torch.device("meta"):
        return build_backbone(arch).num_features


class RecognitionModel(nn.Module):
    """Image -> per-class logits for one RAM-family architecture.

    Attributes other modules rely on: `arch`, `labels` (LabelSet, output order), `model_id`,
    `pretrained_cfg` (the data config, as on timm models: `timm.data.resolve_data_config(model=m)`
    reads it). A model loaded from a file also says what the file held that tagging does not use
    (`ignored_keys`) and which tensors it lacked and got their official initial value
    (`defaulted_keys`).
    """

    ignored_keys: tuple[str, ...] = ()
    defaulted_keys: tuple[str, ...] = ()

    def __init__(self, arch: ArchConfig, labels: LabelSet | None = None, model_id: str = "untrained",
                 drop_path_rate: float = 0.0):
        super().__init__()
        self.arch = arch
        self.model_id = model_id
        self.labels = labels
        self.backbone = build_backbone(arch, drop_path_rate)
        width = self.backbone.num_features
        c = arch.num_classes
        if arch.family == "tag2text":
            self.image_proj = nn.Identity()
            context_dim = width
            self.register_buffer("label_embed", torch.zeros(c, arch.hidden))
            self.fc_weight = nn.Parameter(torch.zeros(c, arch.hidden))
            self.fc_bias = nn.Parameter(torch.zeros(c))
        else:
            self.image_proj = nn.Linear(width, CLIP_DIM)
            context_dim = CLIP_DIM
            self.register_buffer("label_embed", torch.zeros(c * arch.descriptions_per_class, CLIP_DIM))
            self.wordvec_proj = nn.Linear(CLIP_DIM, arch.hidden)
            self.fc = nn.Linear(arch.hidden, 1)
            if arch.family == "ram_plus":
                self.reweight_scale = nn.Parameter(torch.tensor(0.0))
        self.decoder = RecognitionDecoder(
            arch.hidden, context_dim, arch.heads, arch.intermediate, arch.layers, arch.layer_norm_eps
        )
        # Custom (open-vocabulary) RAM++ tags: description rows and the custom class each belongs to.
        self.register_buffer("extra_embed", torch.zeros(0, CLIP_DIM), persistent=False)
        self.register_buffer("extra_class", torch.zeros(0, dtype=torch.long), persistent=False)

    @property
    def pretrained_cfg(self) -> dict:
        return self.arch.data_config

    # ------------------------------------------------------------------ image side
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B,3,S,S) normalised -> image embeddings (B, 1+L, D): the mean-pooled token first."""
        x = feature_tokens(self.backbone, images)
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)
        return self.image_proj(x)

    # ------------------------------------------------------------------ label side
    @property
    def num_classes(self) -> int:
        base = self.arch.num_classes
        return base + (int(self.extra_class.max()) + 1 if self.extra_class.numel() else 0)

    def _builtin_ram_plus_queries(self, pooled: torch.Tensor, classes: torch.Tensor | None) -> torch.Tensor:
        d = self.arch.descriptions_per_class
        table = self.label_embed.view(self.arch.num_classes, d, CLIP_DIM)
        if classes is not None:
            table = table[classes]
        logits = torch.einsum("be,cde->bcd", pooled, table) * self.reweight_scale.exp()
        weights = logits.softmax(dim=-1)
        return torch.einsum("bcd,cde->bce", weights, table)

    def _extra_ram_plus_queries(self, pooled: torch.Tensor) -> torch.Tensor:
        """Per-tag softmax over a variable number of descriptions (segment reduction)."""
        groups = int(self.extra_class.max()) + 1
        logits = pooled @ self.extra_embed.t() * self.reweight_scale.exp()  # (B, N)
        index = self.extra_class.unsqueeze(0).expand_as(logits)
        peak = logits.new_full((logits.shape[0], groups), float("-inf")).scatter_reduce(1, index, logits, "amax")
        e = (logits - peak.gather(1, index)).exp()
        total = e.new_zeros(peak.shape).scatter_add(1, index, e)
        weights = e / total.gather(1, index)
        out = weights.new_zeros(logits.shape[0], groups, CLIP_DIM)
        return out.index_add(1, self.extra_class, weights.unsqueeze(-1) * self.extra_embed)

    def label_queries(self, image_embeds: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
        """Decoder queries (1 or B, C', hidden) for `classes` (all classes when None)."""
        family = self.arch.family
        if family == "tag2text":
            table = self.label_embed if classes is None else self.label_embed[classes]
            return table.unsqueeze(0)
        base = self.arch.num_classes
        if family == "ram":
            table = torch.cat([self.label_embed, self.extra_embed]) if self.extra_class.numel() else self.label_embed
            table = table if classes is None else table[classes]
            return F.relu(self.wordvec_proj(table)).unsqueeze(0)
        pooled = F.normalize(image_embeds[:, 0, :], dim=-1)
        if classes is None:
            parts = [self._builtin_ram_plus_queries(pooled, None)]
            if self.extra_class.numel():
                parts.append(self._extra_ram_plus_queries(pooled))
            queries = torch.cat(parts, dim=1)
        else:
            builtin = classes[classes < base]
            parts = [self._builtin_ram_plus_queries(pooled, builtin)]
            if self.extra_class.numel():
                parts.append(self._extra_ram_plus_queries(pooled)[:, classes[classes >= base] - base])
            queries = torch.cat(parts, dim=1)
            order = torch.argsort(torch.cat([(classes < base).nonzero(), (classes >= base).nonzero()]).squeeze(1))
            queries = queries[:, order]
        return F.relu(self.wordvec_proj(queries))

    # ------------------------------------------------------------------ decoding
    def decode(
        self,
        image_embeds: torch.Tensor,
        classes: torch.Tensor | None = None,
        label_embed: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run only the recognition decoder: image embeddings -> logits (B, C').

        `classes` restricts the output to those class indices (disabled tags cost nothing);
        `label_embed` (C', 512) replaces the label side with arbitrary CLIP-space queries (RAM).
        """
        if label_embed is not None:
            if self.arch.family == "tag2text":
                raise ValueError("Tag2Text is closed-set: it takes no CLIP label queries")
            queries = F.relu(self.wordvec_proj(label_embed.to(image_embeds.dtype))).unsqueeze(0)
        else:
            queries = self.label_queries(image_embeds, classes)
        hidden = self.decoder(queries.to(image_embeds.dtype), image_embeds)
        if self.arch.family == "tag2text":
            w, b = (self.fc_weight, self.fc_bias) if classes is None else (self.fc_weight[classes], self.fc_bias[classes])
            # einsum, not (hidden * w).sum(-1): OpenVINO computes the latter wrongly for batches > 1
            return torch.einsum("bch,ch->bc", hidden, w) + b
        return self.fc(hidden).squeeze(-1)

    def forward(self, images: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
        return self.decode(self.encode_image(images), classes)

    # ------------------------------------------------------------------ open vocabulary
    def add_label_queries(
        self,
        embeds: torch.Tensor,
        names: list[str],
        names_zh: list[str],
        thresholds: list[float],
        descriptions_per_tag: list[int] | None = None,
    ) -> None:
        """Append custom tags given as CLIP-space embeddings (open vocabulary).

        RAM: `embeds` is (K, 512), one query per tag. RAM++: (sum(descriptions_per_tag), 512),
        each tag's descriptions consecutive; counts may differ between tags.
        """
        if self.arch.family == "tag2text":
            raise ValueError("Tag2Text is closed-set: custom tags need RAM or RAM++")
        k = len(names)
        counts = descriptions_per_tag or [1] * k
        if self.arch.family == "ram" and any(c != 1 for c in counts):
            raise ValueError("RAM takes one query per custom tag (average the descriptions first)")
        if len(counts) != k or sum(counts) != embeds.shape[0] or embeds.shape[-1] != CLIP_DIM:
            raise ValueError(
                f"expected ({sum(counts)}, {CLIP_DIM}) embeddings for {k} tags, got {tuple(embeds.shape)}"
            )
        start = self.num_classes - self.arch.num_classes
        owner = torch.repeat_interleave(torch.arange(start, start + k), torch.tensor(counts))
        self.extra_embed = torch.cat([self.extra_embed, embeds.to(self.extra_embed.device, self.extra_embed.dtype)])
        self.extra_class = torch.cat([self.extra_class, owner.to(self.extra_class.device)])
        if self.labels is not None:
            self.labels = self.labels.extend(list(names), list(names_zh), list(thresholds))
