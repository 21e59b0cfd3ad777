"""`ramcli engine`: the data engine, generate and clean. Thin wrappers over
`ramcli_train.engine_generate` and `ramcli_train.engine_clean`."""

from __future__ import annotations

from pathlib import Path

import typer

from ramcli.cli.common import console

engine_app = typer.Typer(help="The data engine: generate missing tags, clean wrong ones.", no_args_is_help=True)

WEIGHTS = typer.Option(..., "--weights", help="Baseline model: a published name, .pth or tagger .safetensors.")
LABELS = typer.Option(None, "--labels", help="Label folder of the baseline model (official layout).")
DATA = typer.Option(..., "--data", help="Input shards: folder, .tar or brace pattern; repeatable.")
OUT = typer.Option(..., "--out", help="Folder for the new shards and report.json.")
DEVICE = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N.")
RAY = typer.Option(False, "--ray", help="Spread the shards over Ray model actors (pip install 'ramcli\\[ray]'; --data and --out on storage every node sees). See docs/scale-out.md.")
RAY_ADDRESS = typer.Option(None, "--ray-address", help="Ray cluster to join (implies --ray; default: $RAY_ADDRESS, else a local Ray).")
RAY_ACTORS = typer.Option(None, "--ray-actors", min=1, help="Model actors (default: one per GPU; without GPUs one per node).")


def _model(weights: str, labels: Path | None):
    from ramcli.models import load_model

    return load_model(weights, labels_dir=labels)


def _ray_engine():
    """`ramcli_train.ray_engine`, once Ray is there: without it `--ray` is a one-line usage error
    naming the extra, before any model is loaded."""
    from ramcli.tagging.ray_cluster import import_ray

    import_ray()
    from ramcli_train import ray_engine

    return ray_engine


def _print(report: dict, what: str) -> None:
    console.print(f"{report['samples']} samples; tags {report['tag_count_before']} -> {report['tag_count_after']} "
                  f"({what}); report.json written", highlight=False)


@engine_app.command()
def generate(
    weights: str = WEIGHTS,
    data: list[str] = DATA,
    out: Path = OUT,
    labels: Path | None = LABELS,
    threshold: float | None = typer.Option(None, "--threshold", help="One threshold for all tags (default: per-class)."),
    captioner: Path | None = typer.Option(None, "--captioner", help="A RAM/Tag2Text `ramcli train`/`finetune` checkpoint: add generated captions and their tags."),
    batch_size: int = typer.Option(8, "--batch-size", help="Images per model call."),
    device: str = DEVICE,
    ray: bool = RAY,
    ray_address: str = RAY_ADDRESS,
    ray_actors: int = RAY_ACTORS,
) -> None:
    """Run a baseline model over shards and add the tags (and captions) it generates."""
    from ramcli_train.engine_generate import checkpoint_captioner
    from ramcli_train.engine_generate import generate as run

    if ray or ray_address:
        ray_engine = _ray_engine()
        if captioner:
            from ramcli.errors import UsageError

            raise UsageError("--ray does not generate captions yet: run --captioner locally")
        report = ray_engine.generate(_model(weights, labels), data, out, threshold=threshold, device=device,
                                     batch_size=batch_size, address=ray_address, actors=ray_actors)
    else:
        model = _model(weights, labels)
        cap = checkpoint_captioner(captioner, "cpu" if device == "auto" else device) if captioner else None
        report = run(model, data, out, threshold=threshold, captioner=cap, device=device, batch_size=batch_size)
    _print(report, f"{report['generated']} generated")


@engine_app.command()
def clean(
    weights: str = WEIGHTS,
    data: list[str] = DATA,
    out: Path = OUT,
    labels: Path | None = LABELS,
    detector_model: str = typer.Option("IDEA-Research/grounding-dino-tiny", "--detector-model", help="Grounding DINO model id or local folder (transformers)."),
    outlier_fraction: float = typer.Option(0.1, "--outlier-fraction", help="Share of each category's regions dropped as outliers."),
    clusters: int = typer.Option(4, "--clusters", help="K-Means++ clusters per category."),
    category: list[str] = typer.Option(None, "--category", help="Clean only these tags (repeatable; default all)."),
    threshold: float | None = typer.Option(None, "--threshold", help="Region check threshold (default: per-class)."),
    device: str = DEVICE,
    ray: bool = RAY,
    ray_address: str = RAY_ADDRESS,
    ray_actors: int = RAY_ACTORS,
) -> None:
    """Drop tags whose detected region is an outlier of its category or not recognised by the model."""
    from ramcli_train.detector import GroundingDino, ModelCropEmbedder

    if ray or ray_address:
        from functools import partial

        report = _ray_engine().clean(_model(weights, labels), data, out, partial(GroundingDino, detector_model),
                                     ModelCropEmbedder, outlier_fraction=outlier_fraction, clusters=clusters,
                                     threshold=threshold, categories=category or None, device=device,
                                     address=ray_address, actors=ray_actors)
    else:
        from ramcli.tagging.pipeline import resolve_device
        from ramcli_train.engine_clean import clean as run

        model = _model(weights, labels)
        dev = str(resolve_device(device))
        detector = GroundingDino(detector_model, device=dev)
        report = run(model, data, out, detector, ModelCropEmbedder(model, dev), outlier_fraction=outlier_fraction,
                     clusters=clusters, threshold=threshold, categories=category or None, device=device)
    _print(report, f"{report['removed']} removed")


def register(app: typer.Typer) -> None:
    app.add_typer(engine_app, name="engine")
