"""From cached scores to metrics, and the files `ramcli eval` writes.

`evaluate_scores` computes mAP, CP/CR/F1 (see `ramcli.eval.metrics`) with the model's, one, or
a file's thresholds, optionally calibrates per-class thresholds on a held-out split, and
`write_outputs` writes the summary, tables, predictions, thresholds and plots.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ramcli.errors import RamcliError, UsageError
from ramcli.eval import metrics
from ramcli.eval.benchmark import INDICES, Benchmark
from ramcli.eval.scores import ScoreCache, targets_for
from ramcli.tagging.decision import format_thresholds, read_threshold_file

def benchmark_thresholds(path: Path, num_model_classes: int, cache: ScoreCache) -> np.ndarray:
    """Per-class thresholds for the evaluated classes from a threshold file (read as `ramcli tag
    --threshold-file` reads it: `decision.read_threshold_file`).

    A file with one line per model class (the official `ram_tag_list_threshold.txt` layout, what
    `--calibrate` writes and `ramcli tag --threshold-file` reads) is indexed by model label; a file
    with one line per benchmark class (the official `batch_inference.py` layout) by taglist order.
    """
    values = np.array(read_threshold_file(path), dtype=np.float64)
    if len(values) == num_model_classes:
        return values[cache.model_indices]
    benchmark_classes = len(cache.columns) + len(cache.missing_classes)
    if len(values) == benchmark_classes:
        return values[cache.columns]
    raise RamcliError(
        f"threshold file {path} has {len(values)} values; expected {num_model_classes} "
        f"(one per model class) or {benchmark_classes} (one per benchmark class)"
    )


def write_threshold_file(path: Path, thresholds: np.ndarray) -> None:
    """The official `ram_tag_list_threshold.txt` layout: one float per line, model label order."""
    path.write_text(format_thresholds(thresholds), encoding="utf-8")


@dataclass(frozen=True)
class Calibration:
    """Thresholds fitted on one split, and the thresholded metrics before/after on the other."""

    thresholds: np.ndarray        # (K',) for the evaluated classes
    model_thresholds: np.ndarray  # (C,) all model classes, the file `--calibrate` writes
    calibration_images: int
    evaluation_images: int
    before: metrics.PRSummary
    after: metrics.PRSummary


def calibrate(
    scores: np.ndarray,
    targets: np.ndarray,
    thresholds: np.ndarray,
    model_indices: np.ndarray,
    model_thresholds: np.ndarray,
    fraction: float,
    seed: int = 0,
) -> Calibration:
    """Fit per-class thresholds on a random `fraction` of the images; compare F1 on the rest.

    Thresholds are fitted per *model* class: benchmark classes that map to the same model tag
    (duplicate names) share one threshold, fitted on the union of their positives.
    """
    try:
        cal, ev = metrics.split_indices(len(scores), fraction, seed)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if len(cal) == 0 or len(ev) == 0:
        raise RamcliError(f"{len(scores)} images are too few to split for calibration")
    unique, first = np.unique(model_indices, return_index=True)
    merged_targets = np.stack([targets[:, model_indices == m].any(axis=1) for m in unique], axis=1)
    fitted_unique = metrics.calibrate_thresholds(scores[cal][:, first], merged_targets[cal], thresholds[first])
    fitted = fitted_unique[np.searchsorted(unique, model_indices)]
    full = np.array(model_thresholds, dtype=np.float64, copy=True)
    full[unique] = fitted_unique
    return Calibration(
        thresholds=fitted,
        model_thresholds=full,
        calibration_images=len(cal),
        evaluation_images=len(ev),
        before=metrics.precision_recall(metrics.predict(scores[ev], thresholds), targets[ev]),
        after=metrics.precision_recall(metrics.predict(scores[ev], fitted), targets[ev]),
    )


@dataclass(frozen=True)
class EvalResult:
    cache: ScoreCache
    targets: np.ndarray
    thresholds: np.ndarray
    threshold_source: str
    mean_ap: metrics.MeanAP
    pr: metrics.PRSummary
    calibration: Calibration | None

    def summary(self) -> dict:
        out = {
            "model_id": self.cache.model_id,
            "images": int(len(self.cache.image_ids)),
            "failed_images": int(len(self.cache.failed_ids)),
            "classes": int(len(self.cache.columns)),
            "missing_classes": int(len(self.cache.missing_classes)),
            "classes_without_positives": int((self.mean_ap.positives == 0).sum()),
            "mAP": self.mean_ap.mean,
            "mAP_classes_with_positives": self.mean_ap.mean_with_positives,
            "thresholds": self.threshold_source,
            **_pr_dict(self.pr),
        }
        if self.calibration is not None:
            c = self.calibration
            out["calibration"] = {
                "calibration_images": c.calibration_images,
                "evaluation_images": c.evaluation_images,
                "before": _pr_dict(c.before),
                "after": _pr_dict(c.after),
            }
        return out


def _pr_dict(pr: metrics.PRSummary) -> dict[str, float]:
    return {"CP": pr.cp, "CR": pr.cr, "CF1": pr.cf1, "OP": pr.op, "OR": pr.or_, "OF1": pr.of1,
            "mean_class_F1": float(pr.f1.mean()) if pr.f1.size else 0.0}


def evaluate_scores(
    benchmark: Benchmark,
    cache: ScoreCache,
    threshold: float | None = None,
    threshold_file: Path | None = None,
    calibration_fraction: float | None = None,
) -> EvalResult:
    """All metrics from cached scores: no model needed, so threshold sweeps are instant."""
    if len(cache.image_ids) == 0:
        raise RamcliError("no benchmark image could be scored; see the failures in the output folder")
    if threshold is not None and threshold_file is not None:
        raise UsageError("give --threshold or --threshold-file, not both")
    if threshold is not None:
        thresholds, source = np.full(len(cache.columns), float(threshold)), f"{threshold:g} for every class"
    elif threshold_file is not None:
        thresholds = benchmark_thresholds(threshold_file, len(cache.model_thresholds), cache)
        source = str(threshold_file)
    else:
        thresholds, source = cache.model_thresholds[cache.model_indices], "the model's per-class defaults"
    targets = targets_for(benchmark, cache)
    scores = cache.scores
    calibration = None
    if calibration_fraction is not None:
        calibration = calibrate(scores, targets, thresholds, cache.model_indices,
                                cache.model_thresholds, calibration_fraction)
    return EvalResult(
        cache=cache,
        targets=targets,
        thresholds=thresholds,
        threshold_source=source,
        mean_ap=metrics.mean_average_precision(scores, targets),
        pr=metrics.precision_recall(metrics.predict(scores, thresholds), targets),
        calibration=calibration,
    )


def summary_text(result: EvalResult) -> str:
    """The human summary (percentages, like the official summary.txt)."""
    s = result.summary()
    lines = [
        f"model: {s['model_id']}",
        f"images: {s['images']} scored, {s['failed_images']} failed or missing",
        f"classes: {s['classes']} evaluated, {s['missing_classes']} not in the model's vocabulary, "
        f"{s['classes_without_positives']} without positives (AP 0, counted as in the official metric)",
        f"mAP: {100 * s['mAP']:.2f}  (classes with positives only: {100 * s['mAP_classes_with_positives']:.2f})",
        f"thresholds: {s['thresholds']}",
        f"CP: {100 * s['CP']:.2f}  CR: {100 * s['CR']:.2f}  CF1: {100 * s['CF1']:.2f}  "
        f"OP: {100 * s['OP']:.2f}  OR: {100 * s['OR']:.2f}  OF1: {100 * s['OF1']:.2f}",
    ]
    if "calibration" in s:
        c = s["calibration"]
        lines.append(
            f"calibration: thresholds fitted on {c['calibration_images']} images, "
            f"compared on the other {c['evaluation_images']}"
        )
        for when in ("before", "after"):
            m = c[when]
            lines.append(
                f"  {when:6s} CP: {100 * m['CP']:.2f}  CR: {100 * m['CR']:.2f}  CF1: {100 * m['CF1']:.2f}  "
                f"mean class F1: {100 * m['mean_class_F1']:.2f}"
            )
    return "\n".join(lines)


def write_outputs(result: EvalResult, benchmark: Benchmark, out_dir: Path, plots: bool) -> dict[str, Path]:
    """Summary (txt + json), per-class table (CSV), predictions, failures, thresholds, plots."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cache, written = result.cache, {}

    written["summary"] = out_dir / "summary.txt"
    written["summary"].write_text(summary_text(result) + "\n", encoding="utf-8")
    written["summary_json"] = out_dir / "summary.json"
    written["summary_json"].write_text(json.dumps(result.summary(), indent=2) + "\n", encoding="utf-8")

    written["per_class"] = out_dir / "per_class.csv"
    with written["per_class"].open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["tag", "model_tag", "model_index", "positives", "AP", "precision", "recall", "F1", "threshold"])
        for k, column in enumerate(cache.columns):
            writer.writerow([
                benchmark.taglist[column], cache.class_names[k], int(cache.model_indices[k]),
                int(result.mean_ap.positives[k]), f"{result.mean_ap.per_class[k]:.6f}",
                f"{result.pr.precision[k]:.6f}", f"{result.pr.recall[k]:.6f}", f"{result.pr.f1[k]:.6f}",
                f"{result.thresholds[k]:.4f}",
            ])

    written["predictions"] = out_dir / "pred.txt"
    predicted = metrics.predict(cache.scores, result.thresholds)
    separator = " " if benchmark.label_format == INDICES else ","
    with written["predictions"].open("w", encoding="utf-8") as f:
        for image_id, row in zip(cache.image_ids, predicted):
            tags = [str(c) if benchmark.label_format == INDICES else benchmark.taglist[c] for c in cache.columns[row]]
            f.write(str(image_id) + ("," + separator.join(tags) if tags else "") + "\n")

    if len(cache.missing_classes):
        written["missing_classes"] = out_dir / "missing_classes.txt"
        written["missing_classes"].write_text("".join(f"{t}\n" for t in cache.missing_classes), encoding="utf-8")
    if len(cache.failed_ids):
        written["failures"] = out_dir / "failures.txt"
        written["failures"].write_text(
            "".join(f"{i}\t{r}\n" for i, r in zip(cache.failed_ids, cache.failed_reasons)), encoding="utf-8"
        )
    if result.calibration is not None:
        written["thresholds"] = out_dir / "thresholds.txt"
        write_threshold_file(written["thresholds"], result.calibration.model_thresholds)
    if plots:
        from ramcli.eval.plots import plot_ap_bars, plot_pr_curves

        written["pr_curves"] = plot_pr_curves(cache.scores, result.targets, cache.class_names,
                                              result.mean_ap, out_dir / "pr_curves.png")
        written["ap_per_class"] = plot_ap_bars(cache.class_names, result.mean_ap, out_dir / "ap_per_class.png")
    return written
