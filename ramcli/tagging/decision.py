"""The decision rule, written once: a tag is emitted when its score is strictly above its threshold.

This is the official rule (`generate_tag`: `torch.where(torch.sigmoid(logits) > class_threshold,
...)`, an fp32 score against an fp32 threshold), so both sides are compared in float32. `tag`,
the data engine, the evaluation metrics and threshold calibration all call `emitted`, and
calibration picks thresholds with `threshold_between` / `threshold_below`, so a threshold file
that `ramcli eval --calibrate` writes makes `ramcli tag --threshold-file` take exactly the
decisions that were calibrated. Threshold files hold the shortest decimal that reads back as the
same float32.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ramcli.errors import UsageError


def emitted(scores, thresholds):
    """score > threshold, in float32: a bool tensor for tensor scores, else a bool array.

    `thresholds` is one value or one per class (the last axis of `scores`).
    """
    if isinstance(scores, torch.Tensor):
        return scores.float() > torch.as_tensor(thresholds, dtype=torch.float32, device=scores.device)
    return np.asarray(scores, dtype=np.float32) > np.asarray(thresholds, dtype=np.float32)


@dataclass(frozen=True)
class ClassPolicy:
    """Which classes a model computes and the threshold each is decided at."""

    active: list[int]  # label indices, in output order
    thresholds: torch.Tensor  # float32, one per active class


def class_policy(labels, threshold: float | None = None, thresholds: Sequence[float] | None = None,
                 exclude: Iterable[str] = ()) -> ClassPolicy:
    """The active classes of `labels` (every class but Tag2Text's deleted tags, the vocabulary's
    disabled ones and the names in `exclude`) and their thresholds: `threshold` for all, else
    `thresholds` (one per label), else the label set's own."""
    names = labels.names
    excluded = {n.strip().lower() for n in exclude if n.strip()}
    unknown = excluded - {n.lower() for n in names}
    if unknown:
        raise UsageError(f"--exclude-tags: unknown tag(s): {', '.join(sorted(unknown)[:5])}")
    dropped = set(labels.deleted) | {i for i, n in enumerate(names) if n.lower() in excluded}
    active = [i for i in range(len(names)) if i not in dropped]
    if not active:
        raise UsageError("every tag is disabled or excluded: nothing to tag")
    if threshold is not None:
        check_threshold(threshold, "--threshold")
    base = list(thresholds) if thresholds is not None else list(labels.thresholds)
    chosen = [threshold if threshold is not None else base[i] for i in active]
    return ClassPolicy(active, torch.tensor(chosen, dtype=torch.float32))


def threshold_below(score: float) -> float:
    """The largest float32 threshold that still emits `score`."""
    return float(np.nextafter(np.float32(score), np.float32(-np.inf)))


def threshold_between(below: float, at: float) -> float:
    """A threshold that emits `at` (and every higher score) but not `below` (< `at`): the float32
    midpoint, the widest margin on both sides, kept strictly under `at`."""
    lo, hi = np.float32(below), np.float32(at)
    if not lo < hi:
        raise ValueError(f"need below < at, got {below} and {at}")
    mid = np.float32((float(lo) + float(hi)) / 2)
    return float(mid if mid < hi else np.nextafter(hi, np.float32(-np.inf)))


def is_threshold(value) -> bool:
    """The rule for every threshold, wherever it comes from (the command line, a threshold file,
    a label folder, a model file's metadata, the vocabulary): a real number from 0 to 1. Not nan
    or inf, not a string or a bool that happens to convert; a negative one would emit every tag,
    one above 1 none, silently."""
    return (isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
            and math.isfinite(value) and 0.0 <= value <= 1.0)


def check_threshold(value: float, where: str) -> float:
    """`value` as a float if `is_threshold`, else a usage error."""
    if not is_threshold(value):
        raise UsageError(f"{where}: {repr(value)[:40]} is not a threshold (a number from 0 to 1)")
    return float(value)


def format_thresholds(thresholds: Sequence[float]) -> str:
    """The official threshold-file layout, one value per line, each the shortest decimal that
    reads back as the same float32 (so `emitted` decides the same after a round trip)."""
    return "".join(np.format_float_positional(np.float32(t), unique=True, trim="0") + "\n" for t in thresholds)


def read_threshold_file(path: Path, count: int | None = None) -> list[float]:
    """A threshold file in the official format: one number in [0, 1] per line, in label order.
    `count`, when given, is the number of lines the model needs."""
    try:
        lines = [s.strip() for s in Path(path).read_text(encoding="utf-8").splitlines() if s.strip()]
        values = [float(s) for s in lines]
    except FileNotFoundError:
        raise UsageError(f"threshold file not found: {path}") from None
    except IsADirectoryError:
        raise UsageError(f"threshold file is a directory: {path}") from None
    except (UnicodeDecodeError, ValueError):
        raise UsageError(f"threshold file {path} must hold one number per line") from None
    for line, value in enumerate(values, 1):
        check_threshold(value, f"threshold file {path}, line {line}")
    if count is not None and len(values) != count:
        raise UsageError(f"threshold file {path} has {len(values)} values; the model has {count} classes")
    return values
