"""The converted tag-only format: a safetensors file in our layout with the architecture, label
system and provenance in its metadata: self-contained, memory-mapped on load, no pickle at all.
Format 1 named the decoder's cross-attention flat (`decoder.layers.N.q`, `attn_out`,
`attn_norm`); such files still load.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ramcli.errors import CheckpointError
from ramcli.fileio import atomic_output
from ramcli.models.checkpoint import materialise
from ramcli.models.configs import ArchConfig
from ramcli.models.labels import LabelSet
from ramcli.models.ram import RecognitionModel

FORMAT_VERSION = "2"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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
    if meta.get("format_version") == "1":
        tensors = {_format_1_key(k): v for k, v in tensors.items()}
    return materialise(arch, tensors, labels, meta.get("model_id", path.stem), path.name, dtype)


def _format_1_key(key: str) -> str:
    m = re.match(r"(decoder\.layers\.\d+\.)(q|k|v|attn_out|attn_norm)\.(weight|bias)$", key)
    if m is None:
        return key
    return f"{m[1]}cross_attn.{m[2].removeprefix('attn_')}.{m[3]}"


def is_converted(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    # safetensors: 8-byte little-endian header length, then a JSON object
    return len(head) == 9 and head[8:9] == b"{"
