"""Loading any model file or published name into a tagger: the functions behind `ramcli.models`.

`load_model` is the one entry point the rest of ramcli uses:

    model = load_model("photo-weights.pth")            # an official checkpoint, arch inferred
    model = load_model("ram_plus_swin_large_14m")      # a published model, pulled on first use
    logits = model(normalised_images)                   # (B, C), classes in model.labels order
"""

from __future__ import annotations

from pathlib import Path

import torch

from ramcli.config import home
from ramcli.errors import CheckpointError, UsageError
from ramcli.models.labels import LabelError, LabelSet, check_name, resolve_labels
from ramcli.models.checkpoint import load_official, official_model_id, read_official
from ramcli.models.converted import converted_arch, is_converted, load_converted, read_converted_metadata, save_converted
from ramcli.models.configs import ARCHS, FAMILIES, ArchConfig, get_arch
from ramcli.models.onnx import export_onnx, is_onnx, load_onnx, read_onnx_metadata
from ramcli.models.openvino_runtime import export_ir, is_ir, load_ir
from ramcli.models.ram import RecognitionModel
from ramcli.models.registry import (
    DEFAULT_MODEL,
    PUBLISHED,
    converted_path,
    download,
    ensure_downloadable,
    get_published,
    verified_as,
)

__all__ = [
    "ARCHS", "ArchConfig", "DEFAULT_MODEL", "PUBLISHED", "RecognitionModel", "convert", "get_arch",
    "load_model", "model_id_of", "pull", "resolve_weights",
]


def load_any(path: Path, arch: str | None = None, labels_dir: Path | None = None,
             dtype: torch.dtype | None = None) -> RecognitionModel:
    """Load an official .pth or a converted .safetensors file from disk.

    Labels: `labels_dir`, else the file's own (converted files), else `RAMCLI_LABELS`, else the
    shipped official files (`ramcli.models.labels.resolve_labels`). RAM and RAM++ share their label
    files, so only Tag2Text (told by its classifier) needs its own before the family is known.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    if is_onnx(path):
        return load_onnx(path, labels_dir)
    if is_ir(path):
        return load_ir(path, labels_dir)
    if is_converted(path):
        meta = read_converted_metadata(path)
        family = converted_arch(meta, path.name).family
        embedded = LabelSet.from_metadata(meta, path.name)
        try:
            check_name(meta.get("model_id", path.stem), "model_id")
        except LabelError as exc:
            raise CheckpointError(f"{path.name}: damaged ramcli header ({exc})") from None
        labels = resolve_labels(family, labels_dir=labels_dir, embedded=embedded)
        return load_converted(path, labels=labels, dtype=dtype)
    sd = read_official(path)
    requested = get_arch(arch) if arch and arch not in FAMILIES else None
    published = verified_as(path)
    known = arch if arch in FAMILIES else get_arch(PUBLISHED[published].arch).family if published else None
    family = requested.family if requested is not None else known
    tag2text = family == "tag2text" if family else "fc.W" in sd
    labels = resolve_labels("tag2text" if tag2text else "ram", labels_dir=labels_dir)
    return load_official(path, arch=requested, labels=labels, dtype=dtype, sd=sd, known_family=known)


def pull(name: str, dtype: str = "fp32", convert_to_tagger: bool = True,
         labels_dir: Path | None = None) -> Path:
    """Download a published model (hub cache, verified) and convert it to a tag-only file."""
    p = get_published(name)
    target = converted_path(home().models, name)
    if p.arch is None or not convert_to_tagger:
        return download(p)
    if target.is_file():
        return target
    source = download(p)
    model = load_any(source, arch=p.arch, labels_dir=labels_dir)
    model.model_id = name
    return save_converted(model, target, dtype=dtype, source=f"{p.repo_id}/{p.filename}")


def resolve_weights(weights: str | None) -> tuple[Path, str | None]:
    """(path, published name or None) for a --weights value.

    A file path wins; then a name in the models folder (`ramcli models import --name`, or a pulled
    model); then a published name (pulled on first use); no value means the default model.
    """
    name = weights or DEFAULT_MODEL
    if weights and Path(weights).expanduser().is_file():
        return Path(weights).expanduser(), None
    installed = converted_path(home().models, name)
    if name in PUBLISHED:
        return installed, name
    if installed.is_file():
        return installed, None
    raise UsageError(f"weights not found: {weights}{_did_you_mean(name)}")


def _did_you_mean(name: str) -> str:
    import difflib

    folder = home().models
    installed = [p.stem for p in folder.glob("*.safetensors")] if folder.is_dir() else []
    close = difflib.get_close_matches(name, [*PUBLISHED, *installed], n=1)
    if close:
        return f"; did you mean '{close[0]}'?"
    return " (a file path, or a name from `ramcli models list`)"


def model_id_of(weights: str | Path | None) -> str:
    """The id `load_model` will give these weights, without loading them (for incremental runs)."""
    path, name = resolve_weights(str(weights) if weights is not None else None)
    if name is not None:
        return name
    if is_onnx(path):
        return read_onnx_metadata(path).get("model_id", path.stem)
    if is_converted(path):
        return read_converted_metadata(path).get("model_id", path.stem)
    if is_ir(path):
        return load_ir(path).model_id
    return official_model_id(path)


def load_model(weights: str | Path | None = None, arch: str | None = None, labels_dir: Path | None = None,
               device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               on_pull=None) -> RecognitionModel:
    """Load a tagger from a file or a published name; published models are pulled on first use.

    `on_pull(published)` is called before a download starts, so the CLI can say how big it is.
    """
    path, name = resolve_weights(str(weights) if weights is not None else None)
    if name is not None and not path.is_file():
        ensure_downloadable(get_published(name))  # offline: the advice now, not "downloading ..."
        if on_pull is not None:
            on_pull(get_published(name))
        path = pull(name, labels_dir=labels_dir)
    model = load_any(path, arch=arch, labels_dir=labels_dir, dtype=dtype)
    if name is not None:
        model.model_id = name
    return model.to(device)


def convert(src: Path, dst: Path, dtype: str = "fp32", arch: str | None = None,
            labels_dir: Path | None = None, vocab=None) -> Path:
    """`ramcli models convert`: an official .pth (or a converted file) -> a self-contained
    tag-only file, the format chosen by `dst`'s extension: safetensors, ONNX (`.onnx`) or
    OpenVINO's IR (`.xml` + `.bin`), the last two with the custom tags of `vocab` (a
    `ramcli.tagging.vocab.Vocabulary`) baked in."""
    from ramcli.tagging.vocab_apply import apply_to_model

    model = load_any(src, arch=arch, labels_dir=labels_dir)
    if is_ir(dst):
        if dtype != "fp32":
            raise CheckpointError("an OpenVINO model is converted in fp32; its arithmetic is chosen when it runs "
                                  "(`ramcli tag --precision`)")
        version = apply_to_model(vocab, model).version if vocab is not None else "builtin"
        return export_ir(model, dst, source=Path(src).name, vocab_version=version)
    if is_onnx(dst):
        version = apply_to_model(vocab, model).version if vocab is not None else "builtin"
        return export_onnx(model, dst, dtype=dtype, source=Path(src).name, vocab_version=version)
    return save_converted(model, dst, dtype=dtype, source=Path(src).name)
