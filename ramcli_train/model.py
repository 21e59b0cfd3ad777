"""The trainable RAM: the tagger everyone else uses, plus what only training needs.

`TrainableRAM` wraps `ramcli.models.RecognitionModel` (the very module `ramcli tag` runs, so an
export is a plain state-dict copy) and adds the caption generator (RAM, Tag2Text) whose lowest
tag-encoder layers are tied to the recognition decoder, as in the official code. The frozen CLIP
image encoder used as the distillation teacher lives outside the module (`ClipTeacher`): it is
never trained, checkpointed or wrapped in DDP.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from torch import nn

from ramcli.models.caption import CaptionConfig, CaptionGenerator, CaptionTokenizer
from ramcli.errors import RamcliError
from ramcli.models.labels import LabelSet
from ramcli.models.configs import CLIP_DIM, ArchConfig
from ramcli.models.ram import RecognitionModel
from ramcli_train import losses

# the two normalisations, as timm defines them (its OpenAI CLIP values are open_clip's
# OPENAI_DATASET_MEAN/STD; importing open_clip for two tuples would cost seconds)
IMAGENET_MEAN, IMAGENET_STD = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
CLIP_MEAN, CLIP_STD = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

def tag_texts(labels: LabelSet, multi_hot: torch.Tensor) -> list[str]:
    """The caption generator's tag input: tag names in label order, joined by ' | ' (official)."""
    rows = multi_hot.detach().cpu() > 0.5
    return [" | ".join(labels.names[i] for i in row.nonzero().flatten().tolist()) for row in rows]


class TrainableRAM(nn.Module):
    """Tagger + caption generator; `forward` returns the loss parts of one batch."""

    def __init__(self, arch: ArchConfig, labels: LabelSet, label_embed: torch.Tensor | None = None,
                 caption_cfg: CaptionConfig | None = None, tokenizer: CaptionTokenizer | None = None,
                 prompt: str = "a picture of ", drop_path_rate: float = 0.0, caption_samples: int = 0,
                 pooled_tag_weight: float = 0.0):
        super().__init__()
        self.arch = arch
        self.labels = labels
        self.caption_samples = caption_samples  # captions a batch's caption loss reads (0: all)
        self.pooled_tag_weight = pooled_tag_weight
        self.tagger = RecognitionModel(arch, labels, model_id="training", drop_path_rate=drop_path_rate)
        self.arch = self.tagger.arch  # with the backbone's data config
        _init_tagger(self.tagger, label_embed)
        self.caption: CaptionGenerator | None = None
        if arch.family in ("ram", "tag2text") and caption_cfg is not None:
            if tokenizer is None:
                raise RamcliError("a caption generator needs a tokenizer")
            self.caption = CaptionGenerator(caption_cfg, tokenizer, prompt, tied_layers=self.tagger.decoder.layers)
            self.caption.apply(_bert_init)

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        self.tagger.backbone.set_grad_checkpointing(enabled)
        if self.caption is not None:
            self.caption.set_grad_checkpointing(enabled)

    def forward(self, images: torch.Tensor, tags: torch.Tensor, parse_tags: torch.Tensor | None = None,
                captions: Sequence[str] | None = None, clip_features: torch.Tensor | None = None,
                text_embeds: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Loss parts: tag (always), lm (caption branch), dis (with clip_features), align (RAM++
        with caption text_embeds), pooled_tag (RAM, RAM++ with `pooled_tag_weight`). Tag2Text
        trains on the parsed tags, as the official code."""
        embeds = self.tagger.encode_image(images)
        logits = self.tagger.decode(embeds)
        family = self.arch.family
        targets = parse_tags if family == "tag2text" and parse_tags is not None else tags
        parts = {"tag": losses.asymmetric_loss(logits, targets)}
        if self.caption is not None and captions is not None:
            guide = parse_tags if parse_tags is not None else tags
            n = self.caption_samples or len(captions)
            lm_logits, lm_targets = self.caption.logits(embeds[:n], tag_texts(self.labels, guide[:n]), captions[:n])
            parts["lm"] = losses.lm_loss(lm_logits, lm_targets)
        if self.pooled_tag_weight and family != "tag2text":
            class_embeds = self.tagger.label_embed.view(self.arch.num_classes, -1, CLIP_DIM).mean(dim=1)
            parts["pooled_tag"] = self.pooled_tag_weight * losses.pooled_tag_loss(embeds[:, 0, :], class_embeds, targets)
        if clip_features is not None and family != "tag2text":
            parts["dis"] = losses.distillation_loss(embeds[:, 0, :], clip_features)
        if text_embeds is not None and family == "ram_plus":
            parts["align"] = losses.alignment_loss(self.tagger.decode(embeds, label_embed=text_embeds))
        return parts


def _bert_init(module: nn.Module) -> None:
    """BERT's initialisation (normal 0.02, zero bias, unit LayerNorm), as the official text parts."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def _init_tagger(tagger: RecognitionModel, label_embed: torch.Tensor | None) -> None:
    """Frozen CLIP label queries (RAM/RAM++) or learned ones (Tag2Text); classifier init as official.

    Tag2Text's queries are an nn.Embedding in the official model (trained), so the buffer of the
    inference module becomes a parameter under the same name (state-dict keys are unchanged).
    """
    arch = tagger.arch
    tagger.decoder.apply(_bert_init)
    if arch.family == "tag2text":
        del tagger._buffers["label_embed"]
        tagger.label_embed = nn.Parameter(torch.randn(arch.num_classes, arch.hidden))
        bound = 1 / math.sqrt(arch.hidden)
        nn.init.uniform_(tagger.fc_weight, -bound, bound)
        nn.init.uniform_(tagger.fc_bias, -bound, bound)
        return
    rows = arch.num_classes * arch.descriptions_per_class
    if label_embed is None or tuple(label_embed.shape) != (rows, CLIP_DIM):
        got = "none" if label_embed is None else tuple(label_embed.shape)
        raise RamcliError(f"label embeddings must be ({rows}, {CLIP_DIM}) CLIP text vectors, got {got}")
    tagger.label_embed.copy_(label_embed)
    # Label queries are unit-norm CLIP vectors; nn.Linear's default init maps them to ~0.03 per
    # coordinate, so every class starts with nearly the same query and the decoder needs many
    # steps before classes differ. Std 1 gives O(1) queries that differ from the first step.
    nn.init.normal_(tagger.wordvec_proj.weight, std=1.0)
    nn.init.zeros_(tagger.wordvec_proj.bias)
    if arch.family == "ram_plus":
        with torch.no_grad():
            tagger.reweight_scale.fill_(math.log(1 / 0.07))


# ----------------------------------------------------------------------------- CLIP teacher

#: clip_model "tiny": a 512-d CLIP small enough for CPU tests (same shape as the tests' fixture)
TINY_CLIP = {
    "embed_dim": CLIP_DIM, "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


class ClipTeacher:
    """Frozen CLIP image encoder: the distillation target (fp16 on CUDA, like the official)."""

    def __init__(self, model: nn.Module, image_size: int, device: torch.device):
        self.model = model.eval().requires_grad_(False).to(device)
        if device.type == "cuda":
            self.model.half()
        self.image_size = image_size
        self.device = device

    @classmethod
    def load(cls, weights: str | None, model_name: str, device: torch.device,
             require_weights: bool = False) -> ClipTeacher:
        """open_clip `model_name` with CLIP weights found like `ramcli vocab` finds them; without
        weights a seeded random encoder and a warning (tests, smoke runs), or the lookup's error
        when `require_weights` (targets written to disk must never come from a random encoder)."""
        import open_clip

        from ramcli.models.clip_text import _read_state_dict, find_clip_weights

        if model_name == "tiny":
            config = TINY_CLIP
        else:
            config = open_clip.get_model_config(model_name)
            if config is None:
                raise RamcliError(f"unknown open_clip model {model_name!r}")
        torch.manual_seed(0)
        model = open_clip.CLIP(**config)
        try:
            path = find_clip_weights(weights)
        except RamcliError as exc:
            if require_weights:
                raise
            warnings.warn(f"distilling towards a RANDOM CLIP image encoder: {exc}", stacklevel=2)
        else:
            state = {k: v for k, v in _read_state_dict(path).items() if k.startswith("visual.")}
            model.visual.load_state_dict({k[len("visual."):]: v for k, v in state.items()}, strict=True)
        return cls(model.visual, config["vision_cfg"]["image_size"], device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, clip_images: torch.Tensor | None = None) -> torch.Tensor:
        """CLIP features (B, 512) of CLIP-normalised views; without views, the training crop
        re-normalised and resized (the official pretraining uses the same crop)."""
        if clip_images is None:
            clip_images = imagenet_to_clip(images, self.image_size)
        x = clip_images.to(self.device, next(self.model.parameters()).dtype)
        return self.model(x).float()


def imagenet_to_clip(images: torch.Tensor, size: int) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    raw = images.float() * std + mean
    if raw.shape[-1] != size:
        raw = F.interpolate(raw, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
    cmean = torch.tensor(CLIP_MEAN, device=images.device).view(1, 3, 1, 1)
    cstd = torch.tensor(CLIP_STD, device=images.device).view(1, 3, 1, 1)
    return (raw - cmean) / cstd


def label_embeddings(labels: LabelSet, arch: ArchConfig, source: str, clip_weights: str | None = None,
                     seed: int = 0) -> torch.Tensor | None:
    """Frozen label queries for RAM/RAM++: 'clip' (CLIP text of the official prompt templates),
    'random' (unit vectors; synthetic data and tests), or a .safetensors/.pt file with one tensor."""
    if arch.family == "tag2text":
        return None
    rows = arch.num_classes * arch.descriptions_per_class
    if source == "random":
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(rows, CLIP_DIM, generator=g)
        return x / x.norm(dim=-1, keepdim=True)
    if source == "clip":
        from ramcli.models.clip_text import ensemble, load_text_encoder

        encoder = load_text_encoder(clip_weights)
        out = []
        for name in labels.names:
            t = encoder.template_embeddings(name)
            out.append(ensemble(t)[None] if arch.family == "ram" else t[: arch.descriptions_per_class])
        return torch.cat(out)
    from pathlib import Path

    path = Path(source)
    if not path.is_file():
        raise RamcliError(f"label embedding file not found: {path} (or use label_embed=clip|random)")
    from ramcli.models.safeload import load_weights

    obj = load_weights(path)
    tensors = [obj] if isinstance(obj, torch.Tensor) else [v for v in obj.values() if isinstance(v, torch.Tensor)]
    if len(tensors) != 1:
        raise RamcliError(f"{path.name} must hold exactly one tensor of label embeddings")
    return tensors[0].float()
