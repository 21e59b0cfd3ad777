"""Loading the published checkpoints safely, and the converted tag-only format.

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
  `label_embed.weight` -> `label_embed`; the rest keeps its name.

The converted format is a safetensors file in our layout with the architecture, label system and
provenance in its metadata: self-contained, memory-mapped on load, no pickle at all.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from timm.models.swin_transformer import checkpoint_filter_fn

from ramcli.errors import CheckpointError
from ramcli.fileio import atomic_output
from ramcli.models.labels import LabelSet
from ramcli.models.configs import ArchConfig, head_prefix, infer_arch, infer_family
from ramcli.models.decoder import OFFICIAL_LAYER_KEYS
from ramcli.models.ram import RecognitionModel
from ramcli.models.safeload import load_weights

FORMAT_VERSION = "1"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

#: RAM++'s initial `reweight_scale` (`torch.ones([]) * np.log(1 / 0.07)`); the official loader
#: (`strict=False`) keeps it for a file that does not carry the tensor
OFFICIAL_REWEIGHT_SCALE = math.log(1 / 0.07)
#: Where training scripts put the state dict, and prefixes their wrappers add to its keys
_STATE_DICT_KEYS = ("model", "state_dict", "model_state_dict", "module")
_KEY_PREFIXES = ("module.", "_orig_mod.", "model.")
#: The caption branch: read by `tag --caption` and finetuning, not by tagging
TRAINING_PARTS = ("tag_encoder.", "text_decoder.")


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
        for official, ours in OFFICIAL_LAYER_KEYS.items():
            for param in ("weight", "bias"):
                key = f"{prefix}{i}.{official}.{param}"
                if key in sd:
                    out[f"decoder.layers.{i}.{ours}.{param}"] = sd[key]
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


def _materialise(arch: ArchConfig, tensors: dict[str, torch.Tensor], labels: LabelSet | None,
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
    model = _materialise(arch, mapped, labels, model_id, Path(path).name, dtype)
    model.ignored_keys = tuple(ignored)
    model.defaulted_keys = ("reweight_scale",) if arch.family == "ram_plus" and "reweight_scale" not in sd else ()
    return model


def _with_classes(arch: ArchConfig, inferred: ArchConfig) -> ArchConfig:
    """A requested arch, with the class count the weights actually have."""
    return replace(arch, num_classes=inferred.num_classes, descriptions_per_class=inferred.descriptions_per_class)


def save_converted(model: RecognitionModel, dst: Path, dtype: str = "fp32", source: str = "") -> Path:
    """Write a self-contained tag-only safetensors file (weights + arch + labels + provenance)."""
    if dtype not in DTYPES:
        raise CheckpointError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    if model.labels is None:
        raise CheckpointError("cannot convert without the label system (pass --labels DIR)")
    if model.num_classes != model.arch.num_classes:
        raise CheckpointError("custom vocabulary tags live in the vocabulary, not in converted models")
    tensors = {
        k: (v.to(DTYPES[dtype]) if v.is_floating_point() else v).contiguous()
        for k, v in model.state_dict().items()
    }
    meta = {
        "format": "ramcli-tagger",
        "format_version": FORMAT_VERSION,
        "arch": model.arch.to_json(),
        "model_id": model.model_id,
        "source": source,
        "dtype": dtype,
        "labels_checksum": model.labels.checksum(),
        "source_ignored_keys": json.dumps(list(model.ignored_keys)),
        **model.labels.to_metadata(),
    }
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(dst) as tmp:
        save_file(tensors, tmp, metadata=meta)
    return dst


def read_converted_metadata(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for bad headers
        reason = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise CheckpointError(f"cannot read {Path(path).name}: not a valid safetensors file ({reason})") from None
    if meta.get("format") != "ramcli-tagger":
        raise CheckpointError(f"{Path(path).name} is a safetensors file but not a ramcli tagger (convert it first)")
    return meta


def converted_arch(meta: dict[str, str], name: str) -> ArchConfig:
    """The architecture a converted file's header records."""
    try:
        return ArchConfig.from_json(meta["arch"])
    except KeyError:
        raise CheckpointError(f"{name}: damaged ramcli header (no arch)") from None
    except (TypeError, ValueError) as exc:
        reason = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise CheckpointError(f"{name}: damaged ramcli header (arch: {reason})") from None


def load_converted(path: Path, labels: LabelSet | None = None, dtype: torch.dtype | None = None) -> RecognitionModel:
    """Load a converted file memory-mapped; labels default to the ones embedded in it."""
    path = Path(path)
    meta = read_converted_metadata(path)
    arch = converted_arch(meta, path.name)
    try:
        embedded = LabelSet.from_metadata(meta)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path.name}: damaged ramcli header (labels: {exc})") from None
    labels = labels or embedded
    if labels is not None and len(labels) != arch.num_classes:
        raise CheckpointError(f"{path.name} has {arch.num_classes} classes but the labels list {len(labels)}")
    tensors: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
    except Exception as exc:  # noqa: BLE001 - truncated or corrupt tensor data
        reason = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise CheckpointError(f"cannot read {path.name}: damaged tensor data ({reason})") from None
    return _materialise(arch, tensors, labels, meta.get("model_id", path.stem), path.name, dtype)


def is_converted(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    # safetensors: 8-byte little-endian header length, then a JSON object
    return len(head) == 9 and head[8:9] == b"{"
