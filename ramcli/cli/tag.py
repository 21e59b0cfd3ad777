"""`ramcli tag`: the main job. Discover photos, tag what is new or changed, write the results.

Its options are defined once, by the signature of `_options`; `tag_options` gives them to `tag`
and to `ramcli watch`, which takes the same model, output, metadata and filter options.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from pathlib import Path

import typer

from ramcli.cli.common import console, err_console
from ramcli.cli.write import FollowLinksOption
from ramcli.cli.write import writer_options as with_writer_options
from ramcli.metadata import WriterOptions
from ramcli.output import default_format


def _options(
    weights: str = typer.Option(None, "--weights", "-w", help="Model file (.pth or converted .safetensors) or a published name. Default: ram_plus_swin_large_14m."),
    arch: str = typer.Option(None, help="Architecture (ram, ram_plus, tag2text or a full arch name); inferred from the weights when omitted."),
    labels: Path = typer.Option(None, "--labels", help="Folder with the official label files (overrides RAMCLI_LABELS and the model's own)."),
    device: str = typer.Option("auto", help="auto (CUDA, then Apple's MPS, then the CPU), cpu, cuda, cuda:N or mps."),
    precision: str = typer.Option("auto", help="auto, fp32 (exact), bf16, fp16 or int8 (CPU). auto: bf16 on CUDA, fp16 on MPS; on the CPU the fastest path that agrees with fp32 on >= 99% of the tags of the first photos (checked once per model and CPU)."),
    runtime: str = typer.Option("auto", help="auto (PyTorch; ONNX Runtime for .onnx; OpenVINO for .xml) or openvino: the whole tagging graph on Intel's OpenVINO, converted once and cached (pip install 'ramcli[openvino]'); --device then names its device: cpu, gpu, npu."),
    precision_check: int = typer.Option(8, "--precision-check", min=0, help="Photos --precision auto scores in fp32 and in each CPU fast path before it picks one (0: fp32 unless already decided)."),
    decode: str = typer.Option("auto", help="Where JPEGs are decoded: auto (the GPU's nvJPEG on CUDA, the decode workers with the official full decode on CPU), workers, draft (workers, JPEG draft mode: faster, scores move slightly) or device."),
    batch_size: int = typer.Option(None, "--batch-size", "-b", min=1, help="Images per model call (default: 64 on CUDA, 4 on CPU)."),
    workers: int = typer.Option(None, min=0, help="Decode worker processes (default: up to 2 on CPU, up to 8 with a GPU)."),
    compile_model: bool = typer.Option(None, "--compile/--no-compile", help="torch.compile the model: a slow first batch, then up to 2x faster. Default: on for jobs of 100+ photos on the CPU (50,000+ on a GPU).", show_default=False),
    threshold: float = typer.Option(None, min=0.0, max=1.0, help="One threshold for every tag (default: the official per-class thresholds)."),
    threshold_file: Path = typer.Option(None, help="Per-class thresholds, one per line in label order (e.g. from `ramcli eval --calibrate`)."),
    top_k: int = typer.Option(None, min=1, help="Keep at most K tags per photo."),
    exclude_tags: str = typer.Option("", help="Comma-separated tags never to emit (they are not even computed)."),
    include: list[str] = typer.Option([], "--include", help="Only files whose relative path matches this glob (repeatable)."),
    exclude: list[str] = typer.Option([], "--exclude", help="Skip files whose relative path matches this glob (repeatable)."),
    fmt: str = typer.Option(None, "--format", "-f", help="table, json, jsonl, csv, tsv or paths (default: table on a terminal, jsonl otherwise)."),
    output: Path = typer.Option(None, "--output", "-o", help="Write results to this file instead of stdout."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List what would be tagged and exit."),
    force: bool = typer.Option(False, "--force", help="Re-tag every photo, even unchanged ones."),
    no_index: bool = typer.Option(False, "--no-index", help="Do not record results in the index (every photo is tagged)."),
    index_path: Path = typer.Option(None, "--index", help="Index database (default: $RAMCLI_HOME/index.db)."),
    write: bool = typer.Option(True, "--write/--no-write", help="Write tags into the photos' XMP/IPTC metadata (or sidecars)."),
    cache_embeddings: bool = typer.Option(False, "--cache-embeddings", help="Keep image embeddings (fp16, ~145 KB/photo) so tags added later re-run only the decoder."),
    caption: bool = typer.Option(False, "--caption", help="Tag2Text only: also write a caption per photo (beam search 3, 10-30 tokens, as the official)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar and no summary."),
    follow_links: FollowLinksOption = False,
) -> None:
    """Not a command: its signature defines the options of `ramcli tag` (see `tag_options`)."""


def tag_options(omit: tuple[str, ...] = ()) -> Callable[[Callable], Callable]:
    """Give a command the options of `ramcli tag` and the writer flags, except those in `omit`
    (their defaults apply). The command keeps its own parameters (its `paths` among them) and
    receives the rest as one `run: TagRun`."""
    options = inspect.signature(_options, eval_str=True).parameters
    shared = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in options.values() if p.name not in omit]
    defaults = {name: getattr(p.default, "default", p.default) for name, p in options.items() if name in omit}

    def decorate(func: Callable) -> Callable:
        signature = inspect.signature(func, eval_str=True)
        own = [p for p in signature.parameters.values() if p.name != "run"]

        @functools.wraps(func)
        def wrapper(*args, writer_options: WriterOptions, **kwargs):
            values = {**defaults, **{p.name: kwargs.pop(p.name) for p in shared}}
            return func(*args, run=_run(kwargs["paths"], writer_options, **values), **kwargs)

        wrapper.__signature__ = signature.replace(parameters=own + shared + [
            inspect.Parameter("writer_options", inspect.Parameter.KEYWORD_ONLY, annotation=WriterOptions)])
        wrapper.__annotations__ = {p.name: p.annotation for p in wrapper.__signature__.parameters.values()}
        return with_writer_options(wrapper)

    return decorate


def _run(paths: list[Path], writer_options: WriterOptions, *, exclude_tags: str, fmt: str | None, no_index: bool,
         **options):
    from ramcli.tagrun import TagRun

    return TagRun(
        paths=paths, lang=writer_options.lang, exclude_tags=[t for t in exclude_tags.split(",") if t.strip()],
        fmt=fmt or default_format(options["output"], piped="jsonl"),
        use_index=not no_index, writer_options=writer_options, **options,
    )


def register(app: typer.Typer) -> None:
    @app.command()
    @tag_options()
    def tag(paths: list[Path] = typer.Argument(..., help="Photos and folders (walked recursively)."), *, run) -> None:
        """Tag photos and folders: new and changed photos only, results to stdout, the index and the files' metadata.

        Exit code 0 when every photo was tagged, indexed and (unless --no-write) written; 1 when
        some photo failed, is broken (a photo's name, no photo inside) or could not be written
        (each listed); 2 on usage errors.
        """
        failed = run.execute(console=console, err_console=err_console)
        if failed:
            raise typer.Exit(1)
