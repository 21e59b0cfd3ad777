"""Loading the published checkpoints safely (the converted format: ramcli.models.converted).

Published files are `{'model': state_dict, 'optimizer': ..., ...}` pickles with Microsoft-Swin
key names and training-only parts. We read them with `torch.load(weights_only=True, mmap=True)`:
no code can run, and memory-mapping means the optimizer state and the caption branch are never
read from disk. A file whose pickle needs more than tensors and plain containers is refused.
Files re-saved by other tools load too: the state dict may sit under `model`, `state_dict`,
`model_state_dict` or `module` (nested), and its keys may carry `module.` (DDP), `_orig_mod.`
(torch.compile) or `model.` prefixes. Tensors tagging does not use are listed in
`RecognitionModel.ignored_keys` (`ramcli models info` shows them), never an error.

Key mapping (official -> ours):
- `visual_encoder.*` -> `backbone.*` through timm's own Swin `checkpoint_filter_fn` (downsample
  moved to the start of the next stage, buffers dropped),
- `tagging_head.encoder.layer.N.<part>` (older files: `vision_multi.`; RAM also ties these to
  `tag_encoder.encoder.layer.N`) -> `decoder.layers.N.<ours>`,
- Tag2Text's group-wise classifier `fc.W`/`fc.b` -> `fc_weight`/`fc_bias`, its learned queries
  `label_embed.weight` -> `label_embed`; the rest keeps its name,
- the caption branch (`tag_encoder.*`, `text_decoder.*`; read only for captions and training)
  -> `CaptionGenerator`, both ways (`official_to_ours`, `ours_to_official`).
Both heads' layers are `BertLayer`s, so one table (`BERT_LAYER_KEYS`) names their parts.

"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import replace
from pathlib import Path

import torch
from timm.models.swin_transformer import checkpoint_filter_fn

from ramcli.errors import CheckpointError
from ramcli.models.caption import (
    PROMPT,
    CaptionConfig,
    CaptionGenerator,
    CaptionTokenizer,
)
from ramcli.models.configs import ArchConfig, head_prefix, infer_arch, infer_family
from ramcli.models.labels import LabelSet
from ramcli.models.ram import RecognitionModel
from ramcli.models.safeload import load_weights


#: RAM++'s initial `reweight_scale` (`torch.ones([]) * np.log(1 / 0.07)`); the official loader
#: (`strict=False`) keeps it for a file that does not carry the tensor
OFFICIAL_REWEIGHT_SCALE = math.log(1 / 0.07)
#: Where training scripts put the state dict, and prefixes their wrappers add to its keys
_STATE_DICT_KEYS = ("model", "state_dict", "model_state_dict", "module")
_KEY_PREFIXES = ("module.", "_orig_mod.", "model.")
#: The caption branch: read by `tag --caption` and finetuning, not by tagging
TRAINING_PARTS = ("tag_encoder.", "text_decoder.")
#: official BertLayer sub-module -> ours (`ramcli.models.bert.BertLayer`); the recognition decoder's
#: layers have no self-attention
BERT_LAYER_KEYS = {
    "attention.self.query": "self_attn.q", "attention.self.key": "self_attn.k",
    "attention.self.value": "self_attn.v", "attention.output.dense": "self_attn.out",
    "attention.output.LayerNorm": "self_attn.norm",
    "crossattention.self.query": "cross_attn.q", "crossattention.self.key": "cross_attn.k",
    "crossattention.self.value": "cross_attn.v", "crossattention.output.dense": "cross_attn.out",
    "crossattention.output.LayerNorm": "cross_attn.norm",
    "intermediate.dense": "ffn_in", "output.dense": "ffn_out", "output.LayerNorm": "ffn_norm",
}


def file_fingerprint(path: Path) -> str:
    """A cheap identity for a weights file: size + SHA-256 of its first and last MiB."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        if size > 2 << 20:
            f.seek(-(1 << 20), 2)
            h.update(f.read())
    return h.hexdigest()[:16]


def official_model_id(path: Path) -> str:
    """The id of a .pth in the index: its name and fingerprint, so re-downloaded or retrained
    weights under the same name are told apart."""
    return f"{Path(path).stem}@{file_fingerprint(path)}"


def read_official(path: Path) -> dict[str, torch.Tensor]:
    """The state dict of a published .pth (or one re-saved by other tools), loaded without
    unpickling code (`ramcli.models.safeload`, memory-mapped). Raises `CheckpointError` with a one-line
    reason for anything else."""
    path = Path(path)
    return state_dict_of(load_weights(path, mmap=True), path.name)


def state_dict_of(obj: object, name: str) -> dict[str, torch.Tensor]:
    """The tensors of the state dict inside a loaded checkpoint, wrapper keys and prefixes removed."""
    for _ in range(len(_STATE_DICT_KEYS)):
        if not isinstance(obj, dict) or any(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        inner = next((obj[k] for k in _STATE_DICT_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)} if isinstance(obj, dict) else {}
    if not tensors:
        raise CheckpointError(f"{name} holds no state dict of tensors (looked under {', '.join(map(repr, _STATE_DICT_KEYS))})")
    stripped = True
    while stripped:
        stripped = False
        for prefix in _KEY_PREFIXES:
            if all(k.startswith(prefix) for k in tensors):
                tensors = {k[len(prefix):]: v for k, v in tensors.items()}
                stripped = True
    return tensors


def map_official(sd: dict[str, torch.Tensor], model: RecognitionModel) -> dict[str, torch.Tensor]:
    """Official key layout -> ours, for exactly the tensors tagging needs."""
    return _map(sd, model)[0]


def _map(sd: dict[str, torch.Tensor], model: RecognitionModel) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(our tensors, the file's keys that tagging does not use). The caption branch and Swin's
    derived buffers (`relative_position_index`, `attn_mask`) are expected there and not listed."""
    arch = model.arch
    expected = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    visual = {k[len("visual_encoder."):]: v for k, v in sd.items() if k.startswith("visual_encoder.")}
    unknown_visual = []
    for k, v in checkpoint_filter_fn(visual, model.backbone).items():
        if f"backbone.{k}" in expected:
            out[f"backbone.{k}"] = v
        else:
            unknown_visual.append(f"visual_encoder.{k}")

    prefix = head_prefix(sd)
    for i in range(arch.layers):
        for official, ours in BERT_LAYER_KEYS.items():
            for param in ("weight", "bias"):
                key, target = f"{prefix}{i}.{official}.{param}", f"decoder.layers.{i}.{ours}.{param}"
                if key in sd and target in expected:
                    out[target] = sd[key]
                    used.add(key)

    if arch.family == "tag2text":
        # GroupWiseLinear stores (1, C, hidden) weights and (1, C) biases.
        for src, dst in (("label_embed.weight", "label_embed"), ("fc.W", "fc_weight"), ("fc.b", "fc_bias")):
            if src in sd:
                out[dst] = sd[src].squeeze(0) if src != "label_embed.weight" else sd[src]
                used.add(src)
    else:
        for name in ("label_embed", "image_proj.weight", "image_proj.bias", "wordvec_proj.weight",
                     "wordvec_proj.bias", "fc.weight", "fc.bias", "reweight_scale"):
            if name in sd:
                out[name] = sd[name]
                used.add(name)
        if arch.family == "ram_plus" and "reweight_scale" not in sd:
            out["reweight_scale"] = torch.tensor(OFFICIAL_REWEIGHT_SCALE, dtype=torch.float32)
    ignored = unknown_visual + [k for k in sd if k not in used and not k.startswith(("visual_encoder.", *TRAINING_PARTS))]
    return out, ignored


def _check_complete(mapped: dict[str, torch.Tensor], model: RecognitionModel, source: str) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in mapped]
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise CheckpointError(f"{source} is missing tensors: {shown}")
    for k, v in expected.items():
        if tuple(mapped[k].shape) != tuple(v.shape):
            raise CheckpointError(
                f"{source}: tensor {k} has shape {tuple(mapped[k].shape)}, the architecture needs {tuple(v.shape)}"
            )


def materialise(arch: ArchConfig, tensors: dict[str, torch.Tensor], labels: LabelSet | None,
                 model_id: str, source: str, dtype: torch.dtype | None) -> RecognitionModel:
    """Build the model without initialising weights, then adopt the loaded tensors."""
    with torch.device("meta"):
        model = RecognitionModel(arch, labels, model_id)
    _check_complete(tensors, model, source)
    # fp32 unless asked otherwise: a bf16/fp16 file then runs at any precision, on any device
    # (autocast keeps fp32 weights and casts per operation)
    target = dtype or torch.float32
    tensors = {k: v.to(target) if v.is_floating_point() else v for k, v in tensors.items()}
    model.load_state_dict(tensors, strict=True, assign=True)
    # Buffers that are not in the file (timm's relative-position indices and shift masks, our
    # empty custom-tag tables) get real storage, then timm fills its own.
    for module in model.modules():
        for name, buf in module._buffers.items():
            if buf is not None and buf.is_meta:
                module._buffers[name] = torch.empty_like(buf, device="cpu")
    for module in model.modules():
        if hasattr(module, "init_non_persistent_buffers"):
            module.init_non_persistent_buffers()
    if dtype is not None:
        model.to(dtype)  # params already are; float buffers computed above follow
    return model.eval()


def load_official(path: Path, arch: ArchConfig | None = None, labels: LabelSet | None = None,
                  dtype: torch.dtype | None = None, sd: dict[str, torch.Tensor] | None = None,
                  known_family: str | None = None) -> RecognitionModel:
    """A tag-only model from a published .pth (text encoder/decoder never materialised).

    `sd` is the file's state dict when the caller has already read it (memory-mapped, cheap);
    `known_family` the family of a verified published file (see `infer_family`).
    """
    sd = read_official(path) if sd is None else sd
    classes = len(labels) if labels is not None else None
    family = infer_family(sd, num_classes=classes, known=arch.family if arch is not None else known_family)
    if arch is not None and family != arch.family:
        raise CheckpointError(f"{Path(path).name} is a {family} checkpoint, not {arch.family}")
    inferred = infer_arch(sd, num_classes=classes, family=family)
    arch = inferred if arch is None else _with_classes(arch, inferred)
    if labels is not None and len(labels) != arch.num_classes:
        raise CheckpointError(
            f"{Path(path).name} has {arch.num_classes} classes but the label files list {len(labels)}"
        )
    with torch.device("meta"):
        skeleton = RecognitionModel(arch, labels)
    mapped, ignored = _map(sd, skeleton)
    model_id = official_model_id(path)
    model = materialise(arch, mapped, labels, model_id, Path(path).name, dtype)
    model.ignored_keys = tuple(ignored)
    model.defaulted_keys = ("reweight_scale",) if arch.family == "ram_plus" and "reweight_scale" not in sd else ()
    return model


def _with_classes(arch: ArchConfig, inferred: ArchConfig) -> ArchConfig:
    """A requested arch, with the class count the weights actually have."""
    return replace(arch, num_classes=inferred.num_classes, descriptions_per_class=inferred.descriptions_per_class)


# ----------------------------------------------------------------------------- caption branch

_EMBED_KEYS = {"word_embeddings": "word_embed", "position_embeddings": "pos_embed", "LayerNorm": "embed_norm"}
_HEAD_KEYS = {
    "cls.predictions.transform.dense": "text_decoder.head_dense",
    "cls.predictions.transform.LayerNorm": "text_decoder.head_norm",
}


def official_to_ours(key: str) -> str | None:
    """Our name of an official `tag_encoder.*` / `text_decoder.*` tensor (None: not needed)."""
    for official, ours in (("tag_encoder.", "tag_encoder."), ("text_decoder.bert.", "text_decoder.body.")):
        if not key.startswith(official):
            continue
        rest = key[len(official):]
        m = re.match(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias)$", rest)
        if m and m.group(2) in BERT_LAYER_KEYS:
            return f"{ours}layers.{m.group(1)}.{BERT_LAYER_KEYS[m.group(2)]}.{m.group(3)}"
        m = re.match(r"embeddings\.(word_embeddings|position_embeddings|LayerNorm)\.(weight|bias)$", rest)
        if m:
            return f"{ours}{_EMBED_KEYS[m.group(1)]}.{m.group(2)}"
        return None
    if key.startswith("text_decoder.cls.predictions."):
        rest = key[len("text_decoder."):]
        if rest == "cls.predictions.bias":
            return "text_decoder.head_bias"
        for official, ours in _HEAD_KEYS.items():
            if rest.startswith(official + "."):
                return ours + rest[len(official):]
    return None


def infer_caption_config(sd: dict[str, torch.Tensor], heads: int = 12) -> CaptionConfig:
    """Sizes from an official state dict's `tag_encoder.*` / `text_decoder.*` shapes."""
    try:
        vocab, hidden = sd["text_decoder.bert.embeddings.word_embeddings.weight"].shape
        positions = sd["text_decoder.bert.embeddings.position_embeddings.weight"].shape[0]
        inter = sd["text_decoder.bert.encoder.layer.0.intermediate.dense.weight"].shape[0]
        width = sd["tag_encoder.encoder.layer.0.crossattention.self.key.weight"].shape[1]
    except KeyError:
        raise CheckpointError("no caption generator in this checkpoint (tag_encoder.* / text_decoder.* missing)") from None
    layers = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"text_decoder\.bert\.encoder\.layer\.(\d+)\.", k)))
    return CaptionConfig(hidden, heads, inter, layers, vocab, positions, width, dropout=0.1)


def caption_state_from_official(sd: dict[str, torch.Tensor], generator: CaptionGenerator) -> dict[str, torch.Tensor]:
    """Map every official caption tensor onto `generator`; refuse missing or misshapen ones."""
    mapped = {ours: v for k, v in sd.items() if (ours := official_to_ours(k)) is not None}
    expected = generator.state_dict()
    missing = [k for k in expected if k not in mapped]
    if missing:
        raise CheckpointError(f"caption weights incomplete: {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
    for k, v in expected.items():
        if mapped[k].shape != v.shape:
            raise CheckpointError(f"caption tensor {k}: shape {tuple(mapped[k].shape)}, expected {tuple(v.shape)}")
    return {k: mapped[k] for k in expected}


def ours_to_official(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our caption state (keys under tag_encoder./text_decoder.) -> the official names."""
    inverse: dict[str, str] = {}
    for prefix, official in (("tag_encoder.", "tag_encoder."), ("text_decoder.body.", "text_decoder.bert.")):
        for o, w in _EMBED_KEYS.items():
            for p in ("weight", "bias"):
                inverse[f"{prefix}{w}.{p}"] = f"{official}embeddings.{o}.{p}"
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        m = re.match(r"(tag_encoder\.|text_decoder\.body\.)layers\.(\d+)\.(.+)\.(weight|bias)$", k)
        if m:
            official_sub = next(o for o, w in BERT_LAYER_KEYS.items() if w == m.group(3))
            base = "tag_encoder." if m.group(1) == "tag_encoder." else "text_decoder.bert."
            out[f"{base}encoder.layer.{m.group(2)}.{official_sub}.{m.group(4)}"] = v
        elif k in inverse:
            out[inverse[k]] = v
        elif k == "text_decoder.head_bias":
            out["text_decoder.cls.predictions.bias"] = v
            out["text_decoder.cls.predictions.decoder.bias"] = v
        else:
            for official, ours in _HEAD_KEYS.items():
                if k.startswith(ours + "."):
                    out["text_decoder." + official + k[len(ours):]] = v
    word = state["text_decoder.body.word_embed.weight"]
    out["text_decoder.cls.predictions.decoder.weight"] = word
    for stack in ("tag_encoder.", "text_decoder.bert."):
        n = out[f"{stack}embeddings.position_embeddings.weight"].shape[0]
        out[f"{stack}embeddings.position_ids"] = torch.arange(n).expand(1, -1).clone()
    return out


def load_official_generator(sd: dict[str, torch.Tensor], tokenizer: CaptionTokenizer | None = None,
                            heads: int = 12, prompt: str = PROMPT) -> CaptionGenerator:
    """A caption generator (eval mode) from a published RAM/Tag2Text state dict."""
    cfg = infer_caption_config(sd, heads)
    gen = CaptionGenerator(cfg, tokenizer or CaptionTokenizer.from_vocab(), prompt)
    gen.load_state_dict(caption_state_from_official(sd, gen), strict=True)
    return gen.eval()
