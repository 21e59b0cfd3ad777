"""`ramcli tag`: the main job. Discover photos, tag what is new or changed, write the results.

Its options are defined once, by the signature of `_options`; `tag_options` gives them to `tag`
and to `ramcli watch`, which takes the same model, output, metadata and filter options.
"""

from __future__ import annotations

import functools
import os
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import typer

from ramcli.cli.common import console, err_console
from ramcli.cli.write import FollowLinksOption
from ramcli.cli.write import writer_options as with_writer_options
from ramcli.metadata.options import WriterOptions
from ramcli.output import default_format
from ramcli.tagging import runtimes

Precision = Literal[runtimes.names()]
_OPENVINO_ONLY = ", ".join(name for name in runtimes.names() if runtimes.runtimes_of(name) == ["openvino"])
Decode = Literal["auto", "workers", "draft", "device"]
Format = Literal["table", "json", "jsonl", "csv", "tsv", "paths"]
Runtime = Literal["auto", "openvino"]


def _options(
    weights: str = typer.Option(None, "--weights", "-w", metavar="FILE|NAME", help="A weights file (.pth, .safetensors, .onnx) or a model name (default: ram_plus_swin_large_14m)."),
    arch: str = typer.Option(None, help="ram, ram_plus, tag2text or a full arch name (default: from the weights)."),
    labels: Path = typer.Option(None, "--labels", help="Folder of official label files (default: the model's own)."),
    device: str = typer.Option("auto", metavar="[auto|cpu|cuda[:N]|mps]", help="auto: CUDA, then MPS, then the CPU."),
    precision: Precision = typer.Option("auto", help="auto: bf16 on CUDA, fp16 on MPS, on the CPU the fastest that agrees with fp32 (exact). " f"{_OPENVINO_ONLY}: --runtime openvino only."),
    runtime: Runtime = typer.Option("auto", help="auto: PyTorch (ONNX Runtime for .onnx, OpenVINO for .xml); openvino: the whole model on Intel's OpenVINO, converted once (pip install 'ramcli\\[openvino]'); --device then names its device: cpu, gpu, npu."),
    precision_check: int = typer.Option(8, "--precision-check", min=0, help="Photos --precision auto compares on (0: fp32)."),
    decode: Decode = typer.Option("auto", help="JPEG decoding. auto: nvJPEG on CUDA, else workers; draft: faster, scores move slightly."),
    batch_size: int = typer.Option(None, "--batch-size", "-b", min=1, help="Images per model call (default: 64 on CUDA, 4 on CPU)."),
    workers: int = typer.Option(None, min=0, help="Decode processes (default: up to 2 on CPU, 8 with a GPU)."),
    compile_model: bool = typer.Option(None, "--compile/--no-compile", help="torch.compile: a slow start, then up to 2x faster (default: on for 100+ photos on a CPU)."),
    threshold: float = typer.Option(None, min=0.0, max=1.0, help="One threshold for every tag (default: per-class)."),
    threshold_file: Path = typer.Option(None, help="Per-class thresholds, a line each (`ramcli eval --calibrate`)."),
    top_k: int = typer.Option(None, min=1, help="Keep at most K tags per photo."),
    exclude_tags: str = typer.Option("", help="Comma-separated tags never to emit."),
    include: list[str] = typer.Option([], "--include", help="Only paths matching this glob (repeatable)."),
    exclude: list[str] = typer.Option([], "--exclude", help="Skip paths matching this glob (repeatable)."),
    fmt: Format = typer.Option(None, "--format", "-f", help="(default: table on a terminal, else jsonl)"),
    output: Path = typer.Option(None, "--output", "-o", help="Write results to this file instead of stdout."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List what would be tagged and exit."),
    force: bool = typer.Option(False, "--force", help="Re-tag every photo, even unchanged ones."),
    retry_broken: bool = typer.Option(False, "--retry-broken", help="Try broken photos again (they are skipped until their files change)."),
    no_index: bool = typer.Option(False, "--no-index", help="Do not use the index (every photo is tagged)."),
    index_path: Path = typer.Option(None, "--index", help="Index file (default: $RAMCLI_HOME/index.db)."),
    write: bool = typer.Option(True, "--write/--no-write", help="Write tags into the photos' XMP/IPTC (or sidecars)."),
    cache_embeddings: bool = typer.Option(False, "--cache-embeddings", help="Keep embeddings (~145 KB/photo): new tags then re-score fast."),
    caption: bool = typer.Option(False, "--caption", help="Tag2Text only: also write a caption per photo."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar and no summary."),
    follow_links: FollowLinksOption = False,
) -> None:
    """Not a command: its signature defines the options of `ramcli tag` (see `tag_options`)."""


#: The help panels of the shared options; an option not named here is listed under "Options".
_PANELS = {
    "Model": ("weights", "arch", "labels", "device", "precision", "runtime", "precision_check", "decode", "batch_size",
              "workers", "compile_model", "cache_embeddings", "caption"),
    "Which tags": ("threshold", "threshold_file", "top_k", "exclude_tags"),
    "Which photos": ("include", "exclude", "follow_links", "force", "retry_broken", "dry_run"),
    "Output and index": ("fmt", "output", "quiet", "no_index", "index_path", "write"),
}


def _panel(name: str) -> str | None:
    return next((panel for panel, names in _PANELS.items() if name in names), None)


def tag_options(omit: tuple[str, ...] = ()) -> Callable[[Callable], Callable]:
    """Give a command the options of `ramcli tag` and the writer flags, except those in `omit`
    (their defaults apply). The command keeps its own parameters (its `paths` among them) and
    receives the rest as one `options: TagOptions`."""
    options = inspect.signature(_options, eval_str=True).parameters
    for name, p in options.items():
        if getattr(p.default, "rich_help_panel", "") is None:
            p.default.rich_help_panel = _panel(name)
    shared = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in options.values() if p.name not in omit]
    defaults = {name: getattr(p.default, "default", p.default) for name, p in options.items() if name in omit}

    def decorate(func: Callable) -> Callable:
        signature = inspect.signature(func, eval_str=True)
        own = [p for p in signature.parameters.values() if p.name != "options"]

        @functools.wraps(func)
        def wrapper(*args, writer_options: WriterOptions, **kwargs):
            values = {**defaults, **{p.name: kwargs.pop(p.name) for p in shared}}
            return func(*args, options=_tag_options(kwargs["paths"], writer_options, **values), **kwargs)

        # the command's arguments, then the shared panels, then its own options (--ray, ...)
        arguments = [p for p in own if isinstance(p.default, typer.models.ArgumentInfo)]
        rest = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own if p not in arguments]
        wrapper.__signature__ = signature.replace(parameters=arguments + shared + rest + [
            inspect.Parameter("writer_options", inspect.Parameter.KEYWORD_ONLY, annotation=WriterOptions)])
        wrapper.__annotations__ = {p.name: p.annotation for p in wrapper.__signature__.parameters.values()}
        return with_writer_options(wrapper)

    return decorate


def _tag_options(paths: list[str], writer_options: WriterOptions, *, exclude_tags: str, fmt: str | None,
                 no_index: bool, **options):
    _preflight(paths, **options)
    from ramcli.tagging.options import TagOptions

    return TagOptions(
        paths=[Path(p) for p in paths], lang=writer_options.lang, exclude_tags=[t for t in exclude_tags.split(",") if t.strip()],
        fmt=fmt or default_format(options["output"]),
        use_index=not no_index, writer_options=writer_options, **options,
    )


WEIGHT_SUFFIXES = (".pth", ".pt", ".safetensors", ".onnx")


def _preflight(paths: list[str], *, weights: str | None, device: str, runtime: str,
               threshold_file: Path | None, **_) -> None:
    """The usage errors that would otherwise show only after the model loaded: the photos, a
    weights path, the device."""
    from ramcli.errors import UsageError

    from ramcli.pathnames import is_uri

    for p in map(Path, filter(lambda p: not is_uri(str(p)), paths)):  # object storage is Ray's to read
        if not p.exists() and not p.is_symlink():
            raise UsageError(f"no such file or folder: {p}")
    if threshold_file is not None and not threshold_file.is_file():
        raise UsageError(f"threshold file not found: {threshold_file}")
    if weights and ("/" in weights or os.sep in weights or Path(weights).suffix in WEIGHT_SUFFIXES):
        if not Path(weights).expanduser().is_file():  # a path, not a model name: say so before torch loads
            raise UsageError(f"weights file not found: {weights}")
    if runtime == "openvino" or (weights or "").endswith(".xml"):
        return  # --device names an OpenVINO device (cpu, gpu, npu): OpenVINO checks it
    from ramcli.tagging.pipeline import resolve_device

    resolve_device(device)


def check_ready(options) -> None:
    """What the run needs from the machine, checked before the model loads: ExifTool (when
    writing), the weights, and the hub when they must be downloaded."""
    if options.write and not options.dry_run:
        from ramcli.metadata.exiftool import find_exiftool

        find_exiftool(options.writer_options.exiftool if options.writer_options else "exiftool")
    from ramcli.models import get_published, resolve_weights
    from ramcli.models.registry import ensure_downloadable

    path, name = resolve_weights(options.weights)
    if name is not None and not path.is_file():
        ensure_downloadable(get_published(name))


def register(app: typer.Typer) -> None:
    @app.command()
    @tag_options()
    def tag(
        paths: list[str] = typer.Argument(..., help="Photos and folders (walked recursively); with --ray also s3://, gs:// or file:// addresses."),
        ray: bool = typer.Option(False, "--ray", rich_help_panel="Scale-out (Ray)", help="Run decoding and the model as a Ray Data job (pip install 'ramcli\\[ray]'); the index and metadata are written here. See docs/scale-out.md."),
        ray_address: str = typer.Option(None, "--ray-address", rich_help_panel="Scale-out (Ray)", help="Ray cluster to join: auto, host:port or ray://host:10001 (implies --ray; default: $RAY_ADDRESS, else a local Ray)."),
        ray_actors: int = typer.Option(None, "--ray-actors", min=1, rich_help_panel="Scale-out (Ray)", help="Model actors (default: one per GPU; without GPUs one per node)."),
        ray_actor_cpus: float = typer.Option(None, "--ray-actor-cpus", min=0.5, rich_help_panel="Scale-out (Ray)", help="CPUs per model actor (default: 1 with a GPU; else all of a node's CPUs but one)."),
        *, options,
    ) -> None:
        """Tag photos and folders: new and changed photos only, results to stdout, the index and the files' metadata.

        Exit code 0 when nothing new failed; 1 when a photo failed, is broken (a photo's name, no
        photo inside) or could not be written, and the index did not already hold that failure
        (every failure is listed, old ones too); 2 on usage errors.
        """
        from ramcli.cli.progress import ConsoleListener

        check_ready(options)
        listener = ConsoleListener(console, err_console, quiet=options.quiet)
        if ray or ray_address:
            from ramcli.tagging import on_ray as ray_tag

            failed = ray_tag.execute(options, paths, listener, address=ray_address,
                                     actors=ray_actors, actor_cpus=ray_actor_cpus)
        else:
            from ramcli.tagging.session import TagSession

            with TagSession(options, listener) as session:
                failed = session.execute()
        if failed:
            raise typer.Exit(1)
