"""`ramcli eval`, one request from the benchmark files to the output folder.

1. `benchmark.load_benchmark` reads a taglist and an annotation file in any of the official formats.
2. `benchmark.select_classes` maps benchmark classes to the model's label indices (closed set).
3. `scores.score_benchmark` scores the images with the pipeline of `ramcli tag`, once: the scores
   of the benchmark classes are cached in `OUT/scores.npz`, keyed by the benchmark and a
   fingerprint of the model, so a re-run with other thresholds (or `--calibrate`) never touches
   the model again.
4. `results.evaluate_scores` computes mAP, CP/CR/F1, optionally calibrates per-class thresholds,
   and `results.write_outputs` writes the summary, tables, predictions and plots.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ramcli.errors import UsageError
from ramcli.eval.benchmark import load_benchmark
from ramcli.eval.results import EvalResult, evaluate_scores, write_outputs
from ramcli.eval.scores import CACHE_NAME, ScoreCache, model_fingerprint, score_benchmark

@dataclass(frozen=True)
class EvalRequest:
    """What `ramcli eval` was asked to do (the CLI fills it from its options)."""

    annotations: Path
    taglist: Path
    out_dir: Path
    images: Path | None = None
    weights: Path | None = None
    arch: str | None = None
    labels_dir: Path | None = None
    device: str = "auto"
    batch_size: int = 16
    workers: int | None = None  # None: the `ramcli tag` default
    threshold: float | None = None
    threshold_file: Path | None = None
    calibration_fraction: float | None = None
    plots: bool = False
    #: Scores the images, with `ramcli.tagging.pipeline.score_files`'s signature; None is the local
    #: pipeline (`ramcli eval --ray` passes `ramcli.tagging.on_ray.score_files`).
    scorer: Callable | None = None


def run(request: EvalRequest) -> tuple[EvalResult, dict[str, Path], bool]:
    """Evaluate, reusing `OUT/scores.npz` when it matches; returns (result, files, cache_was_used).

    Without `--weights` a matching cache is required: that is the instant threshold sweep.
    """
    benchmark = load_benchmark(request.annotations, request.taglist)
    cache_path = request.out_dir / CACHE_NAME
    cache = ScoreCache.load(cache_path)
    reusable = cache is not None and cache.benchmark_key == benchmark.key() and (
        request.weights is None
        or cache.model_fingerprint == model_fingerprint(request.weights, request.arch, request.labels_dir)
    )
    if not reusable:
        if request.weights is None:
            reason = "has none" if cache is None else "holds scores of another benchmark"
            raise UsageError(f"--weights is needed: {request.out_dir} {reason} (no reusable {CACHE_NAME})")
        if request.images is None:
            raise UsageError("--images is needed to score the benchmark (the folder the image ids are relative to)")
        cache = score_benchmark(benchmark, request.images, request.weights, request.arch, request.labels_dir,
                                request.device, request.batch_size, request.workers, request.scorer)
        cache.save(cache_path)
    result = evaluate_scores(benchmark, cache, request.threshold, request.threshold_file,
                             request.calibration_fraction)
    return result, write_outputs(result, benchmark, request.out_dir, request.plots), reusable
