"""Metrics match the official definitions on hand-computed matrices; calibration improves F1."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from ramcli.eval.metrics import (
    average_precisions,
    best_f1_threshold,
    calibrate_thresholds,
    mean_average_precision,
    pr_curve,
    precision_recall,
    predict,
    split_indices,
)

# 4 images x 3 classes.
#            c0   c1   c2           targets  c0 c1 c2
SCORES = np.array([
    [0.9, 0.2, 0.5],  # img0            1  0  0
    [0.8, 0.7, 0.5],  # img1            0  0  0
    [0.3, 0.6, 0.1],  # img2            1  1  0
    [0.1, 0.4, 0.4],  # img3            0  1  0
])
TARGETS = np.array([[1, 0, 0], [0, 0, 0], [1, 1, 0], [0, 1, 0]], dtype=bool)
# c0: ranking img0+ img1- img2+ img3-  -> precision at positives 1/1, 2/3 -> AP = 5/6
# c1: ranking img1- img2+ img3+ img0-  -> precision at positives 1/2, 2/3 -> AP = 7/12
# c2: no positives -> AP = 0, counted in the mean like the official code
# mAP = (5/6 + 7/12 + 0) / 3 = 17/36; over classes with positives: (5/6 + 7/12) / 2 = 17/24


def test_map_on_hand_computed_matrix():
    result = mean_average_precision(SCORES, TARGETS)
    assert result.per_class == pytest.approx([5 / 6, 7 / 12, 0.0], rel=1e-7)
    assert result.mean == pytest.approx(17 / 36, rel=1e-7)
    assert result.mean_with_positives == pytest.approx(17 / 24, rel=1e-7)
    assert result.positives.tolist() == [2, 2, 0]


def test_ap_keeps_the_official_epsilon():
    # A perfect class scores 1 / (1 + 1e-8), not exactly 1, exactly as the official code does.
    ap = average_precisions(np.array([0.9, 0.1]), np.array([1, 0]))
    assert ap[0] == 1.0 / (1.0 + 1e-8)


def test_ties_rank_the_later_image_first():
    scores = np.array([0.5, 0.5])
    # argsort()[::-1] over equal scores puts image 1 before image 0.
    assert average_precisions(scores, np.array([1, 0]))[0] == pytest.approx(0.5, rel=1e-7)
    assert average_precisions(scores, np.array([0, 1]))[0] == pytest.approx(1.0, rel=1e-7)


def test_ap_agrees_with_sklearn_when_scores_are_distinct():
    rng = np.random.default_rng(1)
    scores = rng.random((300, 7))
    targets = rng.random((300, 7)) < 0.2
    ours = average_precisions(scores, targets, chunk=3)  # several chunks
    reference = [average_precision_score(targets[:, k], scores[:, k]) for k in range(7)]
    assert ours == pytest.approx(reference, rel=1e-6)


def test_precision_recall_on_hand_computed_matrix():
    result = precision_recall(predict(SCORES, [0.5, 0.5, 0.5]), TARGETS)
    # c0 predicted on img0, img1 -> TP 1, FP 1, FN 1 ; c1 on img1, img2 -> TP 1, FP 1, FN 1
    # c2 nowhere (0.5 > 0.5 is false: the strict rule of `tag`) -> TP 0, FP 0: precision 0, recall 0
    assert result.precision == pytest.approx([0.5, 0.5, 0.0], abs=1e-8)
    assert result.recall == pytest.approx([0.5, 0.5, 0.0], abs=1e-8)
    assert result.cp == pytest.approx(1 / 3, abs=1e-8)
    assert result.cr == pytest.approx(1 / 3, abs=1e-8)
    assert result.cf1 == pytest.approx(1 / 3, abs=1e-8)
    # micro: TP 2, FP 2, FN 2 -> OP 1/2, OR 1/2, OF1 0.5
    assert result.op == pytest.approx(0.5, abs=1e-8)
    assert result.or_ == pytest.approx(0.5, abs=1e-8)
    assert result.of1 == pytest.approx(0.5, abs=1e-8)


def test_predict_uses_per_class_thresholds():
    assert predict(SCORES, [0.85, 0.1, 0.6]).sum(axis=0).tolist() == [1, 4, 0]


def test_best_threshold_reaches_the_best_f1_of_any_threshold():
    rng = np.random.default_rng(2)
    scores = rng.random(200)
    targets = rng.random(200) < scores * 0.6
    chosen = best_f1_threshold(scores, targets)

    def f1_at(t):
        return precision_recall(predict(scores[:, None], t), targets[:, None]).f1[0]

    best_possible = max(f1_at(t) for t in np.unique(scores))
    assert f1_at(chosen) == pytest.approx(best_possible, abs=1e-9)


def test_best_threshold_sits_between_scores():
    # Positives 0.9, 0.8; negatives 0.3, 0.1: any t in (0.3, 0.8] is perfect; the midpoint is chosen.
    assert best_f1_threshold(np.array([0.9, 0.8, 0.3, 0.1]), np.array([1, 1, 0, 0])) == pytest.approx(0.55)
    assert best_f1_threshold(np.array([0.9, 0.1]), np.array([0, 0])) is None


def test_split_is_reproducible_and_disjoint():
    cal, ev = split_indices(101, 0.5)
    again, _ = split_indices(101, 0.5)
    assert np.array_equal(cal, again)
    assert len(cal) + len(ev) == 101 and not set(cal) & set(ev)
    with pytest.raises(ValueError):
        split_indices(10, 1.0)


def _synthetic(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """Three classes whose best thresholds differ: near 0.3, 0.6 and 0.85 (plus a class without positives)."""
    rng = np.random.default_rng(seed)
    centres = [(0.2, 0.4), (0.5, 0.7), (0.75, 0.95)]
    targets = rng.random((n, 4)) < 0.25
    targets[:, 3] = False
    scores = np.empty((n, 4))
    for k, (neg, pos) in enumerate(centres + [(0.5, 0.5)]):
        centre = np.where(targets[:, k], pos, neg)
        scores[:, k] = np.clip(centre + rng.normal(0, 0.06, n), 0, 1)
    return scores, targets, [0.3, 0.6, 0.85]


def test_calibration_improves_f1_on_held_out_data():
    scores, targets, optimal = _synthetic(4000, seed=3)
    cal, ev = split_indices(len(scores), 0.5)
    defaults = np.full(4, 0.5)
    fitted = calibrate_thresholds(scores[cal], targets[cal], defaults)

    assert fitted[:3] == pytest.approx(optimal, abs=0.05)
    assert fitted[3] == 0.5  # no positives: the default stays

    before = precision_recall(predict(scores[ev], defaults), targets[ev])
    after = precision_recall(predict(scores[ev], fitted), targets[ev])
    assert after.f1[:3].mean() > before.f1[:3].mean() + 0.1
    assert after.cf1 > before.cf1


def test_pr_curve_ends_at_full_recall_and_skips_empty_classes():
    curve = pr_curve(SCORES[:, 0], TARGETS[:, 0])
    assert curve.recall.max() == 1.0 and curve.precision.max() == 1.0
    assert pr_curve(SCORES[:, 2], TARGETS[:, 2]) is None


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError):
        average_precisions(SCORES, TARGETS[:, :2])
