"""`ramcli eval`: mAP / CP / CR / F1 on the official benchmark formats.

A thin wrapper over `ramcli.eval.run`; see docs/eval.md.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from ramcli.cli.common import console, err_console
from ramcli.errors import UsageError


def register(app: typer.Typer) -> None:
    @app.command(name="eval")
    def evaluate(
        annotations: Path = typer.Option(..., "--annotations", help="Benchmark annotations: lines `image_id,tag,tag...` (or `image_id,i j k` class indices)."),
        taglist: Path = typer.Option(..., "--taglist", help="Benchmark classes, one per line (names, or Tag2Text tag ids)."),
        images: Path | None = typer.Option(None, "--images", help="Folder the image ids are relative to (`.jpg` etc. is added to ids without an extension)."),
        weights: Path | None = typer.Option(None, "--weights", help="Model checkpoint (.pth or .safetensors) or a published model name. Without it, the scores cached in --out are reused."),
        arch: str | None = typer.Option(None, "--arch", help="Architecture name, if the checkpoint does not say."),
        labels: Path | None = typer.Option(None, "--labels", help="Folder with the official label files."),
        device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N (as for `ramcli tag`)."),
        batch_size: int = typer.Option(16, "--batch-size", min=1, help="Images per forward pass."),
        threshold: float | None = typer.Option(None, "--threshold", min=0.0, max=1.0, help="One threshold for every class (default: the model's per-class thresholds)."),
        threshold_file: Path | None = typer.Option(None, "--threshold-file", help="One float per line: per model class, or per benchmark class."),
        calibrate: bool = typer.Option(False, "--calibrate", help="Fit per-class F1-optimal thresholds on a held-out split; write OUT/thresholds.txt."),
        calibration_split: float = typer.Option(0.5, "--calibration-split", help="Fraction of the images used to fit thresholds (the rest measures them)."),
        out: Path = typer.Option(Path("ramcli-eval"), "--out", help="Output folder (also holds the score cache)."),
        plots: bool = typer.Option(False, "--plots", help="Also write PR curves and a per-class AP chart as PNG."),
        ray: bool = typer.Option(False, "--ray", help="Score the images as a Ray Data job (pip install 'ramcli\\[ray]'). See docs/scale-out.md."),
        ray_address: str | None = typer.Option(None, "--ray-address", help="Ray cluster to join (implies --ray; default: $RAY_ADDRESS, else a local Ray)."),
        ray_actors: int | None = typer.Option(None, "--ray-actors", min=1, help="Model actors (default: one per GPU; without GPUs one per node)."),
    ) -> None:
        """Evaluate a model on a benchmark (mAP, CP/CR/F1, per-class AP, calibration)."""
        if threshold is not None and threshold_file is not None:
            raise UsageError("give --threshold or --threshold-file, not both")
        if calibrate and not 0.0 < calibration_split < 1.0:
            raise UsageError(f"--calibration-split must be between 0 and 1, got {calibration_split}")
        from ramcli.eval.results import summary_text
        from ramcli.eval.run import EvalRequest, run
        from ramcli.eval.scores import CACHE_NAME

        scorer = None
        if ray or ray_address:
            import functools

            from ramcli.tagging.on_ray import score_files
            from ramcli.tagging.ray_cluster import import_ray

            import_ray()
            scorer = functools.partial(score_files, actor_device=device, address=ray_address, actors=ray_actors)
            device = "cpu"  # the driver only loads the model and gathers the scores
        request = EvalRequest(
            annotations=annotations, taglist=taglist, out_dir=out, images=images, weights=weights, arch=arch,
            labels_dir=labels, device=device, batch_size=batch_size, threshold=threshold,
            threshold_file=threshold_file, calibration_fraction=calibration_split if calibrate else None,
            plots=plots, scorer=scorer,
        )
        result, written, reused = run(request)
        if reused:
            err_console.print(f"reused the cached scores in {out / CACHE_NAME}", highlight=False, markup=False, soft_wrap=True)
        if len(result.cache.missing_classes):
            err_console.print(
                f"[yellow]warning:[/] {len(result.cache.missing_classes)} benchmark classes are not in the model's "
                f"vocabulary and were left out (listed in {escape(str(written['missing_classes']))}); "
                "add them with `ramcli vocab add` to evaluate them", highlight=False, soft_wrap=True,
            )
        if len(result.cache.failed_ids):
            err_console.print(
                f"[yellow]warning:[/] {len(result.cache.failed_ids)} images are missing or unreadable and were "
                f"left out (listed in {escape(str(written['failures']))})", highlight=False, soft_wrap=True,
            )
        console.print(summary_text(result), highlight=False, markup=False, soft_wrap=True)
        console.print(f"results in {out}/ ({', '.join(sorted(p.name for p in written.values()))})",
                      highlight=False, markup=False, soft_wrap=True)
