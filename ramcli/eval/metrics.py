"""Multi-label metrics of the official RAM evaluation, plus threshold calibration.

Everything works on plain matrices: `scores` (N images, C classes, float) and `targets`
(N, C, bool), so a threshold sweep over cached scores needs no model.

Matching the official `ram/utils/metrics.py` (checked against its source):

* **AP** is non-interpolated: rank the images by score (highest first) and average the precision
  at the rank of every positive, divided by `positives + 1e-8` (the official epsilon, kept so that
  numbers agree to the last digit).
* **A class with no positives gets AP = 0 and still counts in the mean**, as in the official code
  (it divides 0 by 1e-8). `MeanAP.mean_with_positives` also reports the mean over classes that
  have positives, because a benchmark subset can leave some classes empty.
* **Ties**: the official code ranks with `argsort()[::-1]`, so among equal scores the later image
  ranks first whenever numpy's sort is stable (always for fewer than 17 images; above that numpy's
  default sort is unstable and the official order among ties is arbitrary). We use a stable sort,
  reversed: the same rule, made deterministic.
* **CP / CR**: per-class precision `TP / (TP + FP + 1e-9)` and recall `TP / (TP + FN + 1e-9)` of
  the predictions `score > threshold` (`ramcli.tagging.decision.emitted`, the rule `tag` applies), macro-averaged over all classes (a class with no
  predictions has precision 0, one with no positives recall 0, as in the official code).
  The official code has no F1; we report the usual CF1 = 2·CP·CR / (CP + CR), and also the
  micro-averaged OP / OR / OF1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ramcli.tagging.decision import emitted, threshold_below, threshold_between
from ramcli.errors import RamcliError

AP_EPSILON = 1e-8
PR_EPSILON = 1e-9


def _as_matrices(scores: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores)
    if scores.dtype not in (np.float32, np.float64):  # float32 ranks exactly like its float64 copy
        scores = scores.astype(np.float64)
    targets = np.asarray(targets).astype(bool)
    if scores.ndim == 1:
        scores, targets = scores[:, None], targets[:, None]
    if scores.shape != targets.shape:
        raise ValueError(f"scores {scores.shape} and targets {targets.shape} differ in shape")
    return scores, targets


def average_precisions(scores: np.ndarray, targets: np.ndarray, chunk: int = 64) -> np.ndarray:
    """Official non-interpolated AP of every column; shape (C,).

    Classes are processed in chunks, each transposed to contiguous rows, so that a 50,000 x 1,000
    benchmark needs neither a full int64 ranking in memory nor strided sorts.
    """
    scores, targets = _as_matrices(scores, targets)
    c = scores.shape[1]
    aps = np.zeros(c, dtype=np.float64)
    for start in range(0, c, chunk):
        block = slice(start, min(start + chunk, c))
        block_scores = np.ascontiguousarray(scores[:, block].T)
        order = np.argsort(block_scores, axis=1, kind="stable")[:, ::-1]
        hits = np.take_along_axis(np.ascontiguousarray(targets[:, block].T), order, axis=1)
        classes, ranks = np.nonzero(hits)
        precision_at_hits = np.cumsum(hits, axis=1, dtype=np.int64)[classes, ranks] / (ranks + 1.0)
        sums = np.bincount(classes, weights=precision_at_hits, minlength=hits.shape[0])
        aps[block] = sums / (hits.sum(axis=1) + AP_EPSILON)
    return aps


@dataclass(frozen=True)
class MeanAP:
    """mAP as the official code reports it, and the mean over classes that have positives."""

    mean: float
    per_class: np.ndarray
    positives: np.ndarray

    @property
    def mean_with_positives(self) -> float:
        present = self.positives > 0
        return float(self.per_class[present].mean()) if present.any() else 0.0


def mean_average_precision(scores: np.ndarray, targets: np.ndarray) -> MeanAP:
    scores, targets = _as_matrices(scores, targets)
    aps = average_precisions(scores, targets)
    return MeanAP(float(aps.mean()) if aps.size else 0.0, aps, targets.sum(axis=0))


@dataclass(frozen=True)
class PRSummary:
    """Thresholded precision/recall: macro (CP, CR, CF1), micro (OP, OR, OF1) and per class."""

    cp: float
    cr: float
    cf1: float
    op: float
    or_: float
    of1: float
    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray


def _f1(p: np.ndarray | float, r: np.ndarray | float) -> np.ndarray | float:
    p, r = np.asarray(p, dtype=np.float64), np.asarray(r, dtype=np.float64)
    denom = p + r
    return np.where(denom > 0, 2 * p * r / np.where(denom > 0, denom, 1.0), 0.0)


def predict(scores: np.ndarray, thresholds: np.ndarray | float) -> np.ndarray:
    """The decision rule of `ramcli tag`: a class is predicted when its score is > its threshold."""
    return emitted(scores, thresholds)


def precision_recall(predictions: np.ndarray, targets: np.ndarray) -> PRSummary:
    predictions = np.asarray(predictions).astype(bool)
    targets = np.asarray(targets).astype(bool)
    if predictions.shape != targets.shape:
        raise ValueError(f"predictions {predictions.shape} and targets {targets.shape} differ in shape")
    tp = (predictions & targets).sum(axis=0).astype(np.float64)
    fp = (predictions & ~targets).sum(axis=0).astype(np.float64)
    fn = (~predictions & targets).sum(axis=0).astype(np.float64)
    precision = tp / (tp + fp + PR_EPSILON)
    recall = tp / (tp + fn + PR_EPSILON)
    cp, cr = float(precision.mean()), float(recall.mean())
    op = float(tp.sum() / (tp.sum() + fp.sum() + PR_EPSILON))
    or_ = float(tp.sum() / (tp.sum() + fn.sum() + PR_EPSILON))
    return PRSummary(
        cp=cp, cr=cr, cf1=float(_f1(cp, cr)),
        op=op, or_=or_, of1=float(_f1(op, or_)),
        precision=precision, recall=recall, f1=np.asarray(_f1(precision, recall)),
    )


def split_indices(n: int, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A reproducible random split of `n` rows: (calibration rows, evaluation rows), both sorted.

    Random rather than head/tail because benchmark files are often sorted by id or class.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"calibration fraction must be between 0 and 1, got {fraction}")
    order = np.random.default_rng(seed).permutation(n)
    cut = int(round(n * fraction))
    return np.sort(order[:cut]), np.sort(order[cut:])


def _precision_recall_curve(targets: np.ndarray, scores: np.ndarray, **kwargs):
    """scikit-learn's curve; imported here so that mAP and CP/CR need no scikit-learn."""
    try:
        from sklearn.metrics import precision_recall_curve
    except ImportError:
        raise RamcliError("threshold calibration and PR curves need scikit-learn: pip install 'ramcli[eval]'") from None
    return precision_recall_curve(targets, scores, **kwargs)


def best_f1_threshold(scores: np.ndarray, targets: np.ndarray) -> float | None:
    """A threshold that maximises F1 of `score > t` on one class; None without positives.

    The best cut emits the scores from some candidate up; any t between that score and the next
    lower one does, and `threshold_between` takes the float32 midpoint (the widest margin on both
    sides) so that held-out images just below the chosen score are not decided by a hair.
    Among equal F1 the highest cut wins.
    """
    targets = np.asarray(targets).astype(bool)
    if not targets.any():
        return None
    precision, recall, candidates = _precision_recall_curve(targets, scores, drop_intermediate=False)
    precision, recall = precision[:-1], recall[:-1]  # the last point is (1, 0) with no threshold
    f1 = np.asarray(_f1(precision, recall))
    best = len(f1) - 1 - int(np.argmax(f1[::-1]))  # candidates ascend: last maximum = highest t
    if best == 0:
        return threshold_below(candidates[0])
    return threshold_between(candidates[best - 1], candidates[best])


def calibrate_thresholds(scores: np.ndarray, targets: np.ndarray, defaults: np.ndarray) -> np.ndarray:
    """Per-class F1-optimal thresholds; classes without positives keep their default."""
    scores, targets = _as_matrices(scores, targets)
    fitted = np.array(defaults, dtype=np.float64, copy=True)
    if fitted.shape != (scores.shape[1],):
        raise ValueError(f"{fitted.shape[0]} default thresholds for {scores.shape[1]} classes")
    for k in range(scores.shape[1]):
        best = best_f1_threshold(scores[:, k], targets[:, k])
        if best is not None:
            fitted[k] = best
    return fitted


@dataclass(frozen=True)
class PRCurve:
    precision: np.ndarray
    recall: np.ndarray


def pr_curve(scores: np.ndarray, targets: np.ndarray) -> PRCurve | None:
    """Precision-recall points of one class (None when it has no positives)."""
    targets = np.asarray(targets).astype(bool)
    if not targets.any():
        return None
    precision, recall, _ = _precision_recall_curve(targets, scores)
    return PRCurve(precision, recall)
