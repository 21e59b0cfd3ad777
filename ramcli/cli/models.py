"""`ramcli models`: list, info, pull, import, convert."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from ramcli.cli.common import LAYOUT_FORMAT_OPTION, console, err_console
from ramcli.output import Layout, check_format, default_format, write_records

models_app = typer.Typer(help="The published models: list, info, pull, import, convert.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(models_app, name="models")


MODELS = Layout(
    columns=("name", "arch", "download", "installed", "description"),
    row=lambda m: [m["name"] + (" (default)" if m["default"] else ""), m["arch"] or "-",
                   f"{m['bytes'] / 1e9:.2f} GB", "yes" if m["installed"] else "-", m["description"]],
    json=lambda m: m,
)


@models_app.command("list")
def list_models(
    fmt: str = LAYOUT_FORMAT_OPTION,
) -> None:
    """The published models, their size, and whether they are installed."""
    from ramcli.config import home
    from ramcli.models import DEFAULT_MODEL, PUBLISHED
    from ramcli.models.registry import converted_path

    fmt = check_format(fmt or default_format(), MODELS)
    models = [{"name": p.name, "default": p.name == DEFAULT_MODEL, "arch": p.arch, "bytes": p.size,
               "installed": converted_path(home().models, p.name).is_file(), "description": p.description}
              for p in PUBLISHED.values()]
    write_records(models, fmt, MODELS)


@models_app.command()
def info(name: str = typer.Argument(..., help="A published name or a weights file.")) -> None:
    """Architecture, classes, data config, label checksum, provenance, and what a file holds that
    tagging does not use (reads headers only for converted files)."""
    from ramcli.models import PUBLISHED, load_any
    from ramcli.models.converted import converted_arch, is_converted, read_converted_metadata

    if name in PUBLISHED:
        p = PUBLISHED[name]
        console.print_json(json.dumps({"name": p.name, "repo": p.repo_id, "file": p.filename,
                                       "bytes": p.size, "arch": p.arch, "description": p.description}))
        return
    path = Path(name)
    if path.is_file() and is_converted(path):
        meta = read_converted_metadata(path)
        arch = converted_arch(meta, path.name)
        console.print_json(json.dumps({
            "file": str(path), "model_id": meta.get("model_id"), "arch": arch.name, "family": arch.family,
            "image_size": arch.image_size, "classes": arch.num_classes, "dtype": meta.get("dtype"),
            "data_config": arch.data_config, "labels_checksum": meta.get("labels_checksum"),
            "source": meta.get("source"), "source_ignored_keys": json.loads(meta.get("source_ignored_keys", "[]")),
        }))
        return
    model = load_any(path)
    console.print_json(json.dumps({"file": str(path), "model_id": model.model_id, "arch": model.arch.name,
                                   "family": model.arch.family, "image_size": model.arch.image_size,
                                   "classes": model.arch.num_classes, "data_config": model.arch.data_config,
                                   "ignored_keys": list(model.ignored_keys),
                                   "defaulted_keys": list(model.defaulted_keys)}))


@models_app.command()
def pull(
    name: str = typer.Argument("ram_plus_swin_large_14m", help="A name from `ramcli models list`."),
    dtype: str = typer.Option("fp32", help="Precision of the converted file: fp32, bf16 or fp16."),
    no_convert: bool = typer.Option(False, "--no-convert", help="Keep only the original download."),
    labels: Path = typer.Option(None, help="Folder with the official label files (else RAMCLI_LABELS, else the shipped official files)."),
) -> None:
    """Download a published model from the Hugging Face hub (verified) and convert it to a tag-only file."""
    from ramcli.models import get_published, pull as do_pull

    p = get_published(name)
    err_console.print(f"{p.name}: {p.size / 1e9:.2f} GB from huggingface.co/{p.repo_id}")
    path = do_pull(name, dtype=dtype, convert_to_tagger=not no_convert, labels_dir=labels)
    console.print(str(path))


@models_app.command("import")
def import_(
    src: Path = typer.Argument(..., help="A .pth you downloaded yourself (or a converted file)."),
    name: str = typer.Option(None, help="Register under this name (default: the file's stem; a published name makes it that model)."),
    dtype: str = typer.Option("fp32", help="fp32, bf16 or fp16."),
    labels: Path = typer.Option(None, help="Folder with the official label files."),
    arch: str = typer.Option(None, help="Architecture when it cannot be inferred."),
) -> None:
    """Convert a local checkpoint into the models folder, so `--weights NAME` finds it."""
    from ramcli.config import home
    from ramcli.models import convert
    from ramcli.models.registry import converted_path

    target = converted_path(home().models, name or src.stem)
    convert(src, target, dtype=dtype, arch=arch, labels_dir=labels)
    console.print(str(target))


@models_app.command("convert")
def convert_cmd(
    src: Path = typer.Argument(..., help="An official .pth checkpoint (or a converted file)."),
    dst: Path = typer.Argument(..., help="The file to write: .safetensors (tag-only weights), .onnx (the tagging graph, for ONNX Runtime) or .xml (the tagging graph as OpenVINO's IR, with its .bin beside it)."),
    dtype: str = typer.Option("fp32", help="fp32, bf16 or fp16 (.safetensors); fp32 or int8 (.onnx: int8 is ONNX Runtime's dynamic quantisation); fp32 (.xml: `tag --precision` picks OpenVINO's arithmetic)."),
    labels: Path = typer.Option(None, help="Folder with the official label files (else RAMCLI_LABELS, else the shipped official files)."),
    arch: str = typer.Option(None, help="Architecture when it cannot be inferred."),
) -> None:
    """Write a self-contained tag-only file (weights + arch + labels), the format chosen by DST's extension.

    .onnx and .xml: pixels -> per-class logits, with labels, thresholds and the data config in
    its metadata; the vocabulary's custom tags are baked in (`ramcli tag --weights DST.onnx`,
    `--weights DST.xml` on OpenVINO).
    """
    from ramcli.models import convert
    from ramcli.models.onnx import is_onnx
    from ramcli.models.openvino_runtime import is_ir

    vocab = None
    if is_onnx(dst) or is_ir(dst):
        from ramcli.tagging.vocab import Vocabulary

        vocab = Vocabulary.open()
        if vocab.custom:
            err_console.print(f"baking {len(vocab.custom)} custom tag(s) of the vocabulary into {dst.name}")
    out = convert(src, dst, dtype=dtype, arch=arch, labels_dir=labels, vocab=vocab)
    console.print(f"{out} ({out.stat().st_size / 1e6:.1f} MB)")
