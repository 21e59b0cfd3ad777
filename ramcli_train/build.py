"""The model and caption vocabulary a training run trains, and what they will need in memory."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from ramcli.models.caption import CaptionTokenizer
from ramcli.errors import RamcliError
from ramcli.models.labels import LabelSet
from ramcli.models.safeload import load_weights
from ramcli_train.config import TrainConfig
from ramcli_train.model import TrainableRAM, label_embeddings
from ramcli_train.pretrained import load_pretrained_backbone
from ramcli_train.trainer import load_into
from ramcli_train.sources import iter_captions
from ramcli_train.tokenizer import train_tokenizer


def build_tokenizer(cfg: TrainConfig, paths: list[str], out: Path) -> CaptionTokenizer | None:
    """The caption vocabulary; a trained one is saved in the run folder and reused on resume."""
    if cfg.family == "ram_plus":
        return None
    saved = out / "tokenizer.json"
    if cfg.tokenizer == "train":
        if saved.is_file():
            return CaptionTokenizer.from_vocab(saved)
        texts = [cfg.prompt + c for c in iter_captions(paths)]
        if not texts:
            raise RamcliError("tokenizer=train needs captions in the data; none found")
        return train_tokenizer(texts, cfg.tokenizer_vocab)
    return CaptionTokenizer.from_vocab(None if cfg.tokenizer == "bert-base-uncased" else cfg.tokenizer)


def build_model(cfg: TrainConfig, labels: LabelSet, tokenizer: CaptionTokenizer | None) -> TrainableRAM:
    """The model of `cfg`; `model.backbone_init` says where the backbone's weights came from."""
    arch = cfg.arch(len(labels))
    embed = label_embeddings(labels, arch, cfg.label_embed, cfg.clip_weights, cfg.seed)
    vocab = max(len(tokenizer), 30524 if cfg.tokenizer == "bert-base-uncased" else 0) if tokenizer else 0
    model = TrainableRAM(arch, labels, embed, cfg.caption_config(arch, vocab) if tokenizer else None, tokenizer,
                         cfg.prompt, drop_path_rate=cfg.drop_path, caption_samples=cfg.caption_samples,
                         pooled_tag_weight=cfg.pooled_tag_weight)
    model.backbone_init = f"backbone {arch.backbone or 'Swin'}: random initialisation"
    if cfg.pretrained_backbone and cfg.init_from is None:
        model.backbone_init = load_pretrained_backbone(model.tagger).message
    if cfg.init_from:
        state = load_weights(cfg.init_from)
        load_into(model, state.get("model", state), cfg.init_from)
        model.backbone_init = f"backbone {arch.backbone or 'Swin'}: from {Path(cfg.init_from).name}"
    if cfg.grad_ckpt:
        model.set_grad_checkpointing(True)
    return model


def memory_estimate(model: TrainableRAM, cfg: TrainConfig) -> dict[str, float]:
    """GiB of parameters + gradients + AdamW moments (fp32), and a rough activation figure."""
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    static = (params + 3 * trainable) * 4 / 2**30
    element = 2 if cfg.amp != "off" else 4
    swin = model.arch.swin
    if swin is not None:
        tokens = (cfg.image_size // 4) ** 2
        act = cfg.batch_size * tokens * swin.embed_dim * 34 * sum(swin.depths) / 4 * element / 2**30
    else:
        act = cfg.batch_size * _backbone_activations(model.arch) * element / 2**30
    if cfg.grad_ckpt:
        act /= 4
    return {"parameters_millions": params / 1e6, "static_gib": round(static, 2), "activations_gib": round(act, 2)}


def _backbone_activations(arch) -> int:
    """Elements a timm backbone keeps for backward per image: its modules' outputs, counted on a
    weightless (meta-device) forward pass."""
    from ramcli.models.ram import build_backbone

    total = 0

    def count(_module, _inputs, output) -> None:
        nonlocal total
        if isinstance(output, torch.Tensor):
            total += output.numel()

    with torch.device("meta"):
        backbone = build_backbone(arch)
        hooks = [m.register_forward_hook(count) for m in backbone.modules() if not list(m.children())]
        backbone.forward_features(torch.empty(1, 3, arch.image_size, arch.image_size))
    for h in hooks:
        h.remove()
    return total


def no_downloads(cfg: TrainConfig) -> TrainConfig:
    """`cfg` building only the model's shape: a resumed run, or a plan, loads its weights itself."""
    return replace(cfg, pretrained_backbone=False, init_from=None)

