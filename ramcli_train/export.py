"""Training checkpoint -> the files other code loads.

- `export_tagger`: the self-contained tag-only safetensors file (`ramcli tag --weights FILE`),
  written by `ramcli.models.converted.save_converted` from the very `RecognitionModel` trained.
- `export_official`: `{'model': state_dict, 'epoch', 'config'}` in the official key layout
  (Microsoft Swin names, `tagging_head.*`, `tag_encoder.*`, `text_decoder.*`, tied tensors
  duplicated under both names), so the official code (and `ramcli models convert`) load it.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ramcli.errors import RamcliError
from ramcli.fileio import atomic_output
from ramcli.models.labels import LabelSet
from ramcli.models.checkpoint import BERT_LAYER_KEYS, ours_to_official
from ramcli.models.converted import save_converted
from ramcli.models.configs import ArchConfig
from ramcli.models.ram import RecognitionModel
from ramcli_train.trainer import load_checkpoint


def _read(path: Path) -> tuple[dict, ArchConfig, LabelSet]:
    ckpt = load_checkpoint(Path(path))
    if not isinstance(ckpt, dict) or "model" not in ckpt or "arch" not in ckpt:
        raise RamcliError(f"{Path(path).name} is not a ramcli training checkpoint")
    labels = LabelSet.from_metadata(ckpt["labels"])
    return ckpt, ArchConfig.from_json(ckpt["arch"]), labels


def tagger_from_checkpoint(path: Path) -> RecognitionModel:
    """The trained tagger as the inference module (eval mode)."""
    ckpt, arch, labels = _read(path)
    model = RecognitionModel(arch, labels, model_id=f"{Path(path).parent.name}@step{ckpt['step']}")
    state = {k[len("tagger."):]: v for k, v in ckpt["model"].items() if k.startswith("tagger.")}
    model.load_state_dict(state, strict=True)
    return model.eval()


def export_tagger(path: Path, dst: Path, dtype: str = "fp32") -> Path:
    model = tagger_from_checkpoint(path)
    return save_converted(model, Path(dst), dtype=dtype, source=f"ramcli train {Path(path).name}")


def _official_backbone(tagger: RecognitionModel) -> dict[str, torch.Tensor]:
    """timm Swin -> Microsoft Swin: downsampling back at the end of the previous stage, and the
    relative-position-index / shift-mask buffers the official modules save."""
    out: dict[str, torch.Tensor] = {}
    for k, v in tagger.backbone.state_dict().items():
        k = re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k)
        out[f"visual_encoder.{k}"] = v
    for k, v in tagger.backbone.named_buffers():
        if k.endswith(("relative_position_index", "attn_mask")) and v is not None:
            out[f"visual_encoder.{k}"] = v
    return out


def official_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    ckpt, arch, _ = _read(path)
    tagger = tagger_from_checkpoint(path)
    sd = _official_backbone(tagger)
    inverse = {ours: official for official, ours in BERT_LAYER_KEYS.items()}
    for k, v in tagger.state_dict().items():
        m = re.match(r"decoder\.layers\.(\d+)\.(.+)\.(weight|bias)$", k)
        if m:
            sd[f"tagging_head.encoder.layer.{m.group(1)}.{inverse[m.group(2)]}.{m.group(3)}"] = v
    if arch.family == "tag2text":
        sd["label_embed.weight"] = tagger.label_embed
        sd["fc.W"] = tagger.fc_weight.unsqueeze(0)
        sd["fc.b"] = tagger.fc_bias.unsqueeze(0)
    else:
        for name in ("label_embed", "image_proj.weight", "image_proj.bias", "wordvec_proj.weight",
                     "wordvec_proj.bias", "fc.weight", "fc.bias", "reweight_scale"):
            if name in tagger.state_dict():
                sd[name] = tagger.state_dict()[name]
    caption = {k[len("caption."):]: v for k, v in ckpt["model"].items() if k.startswith("caption.")}
    if caption:
        sd.update(ours_to_official(caption))
    return sd, ckpt


def export_official(path: Path, dst: Path) -> Path:
    sd, ckpt = official_state_dict(path)
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(dst) as tmp:
        torch.save({"model": sd, "epoch": ckpt["epoch"], "config": ckpt["config"]}, tmp)
    return dst
