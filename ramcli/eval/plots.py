"""The charts of `ramcli eval --plots`: PR curves and per-class AP, as PNG files.

Kept apart from the metrics so that evaluation never imports matplotlib unless a chart is asked for.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ramcli.eval import metrics
from ramcli.errors import RamcliError


def _pyplot():
    """matplotlib with the file-only Agg backend (no display on servers and in CI)."""
    try:
        import matplotlib
    except ImportError:
        raise RamcliError("--plots needs matplotlib: pip install 'ramcli[eval]'") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_pr_curves(scores: np.ndarray, targets: np.ndarray, names: np.ndarray, mean_ap: metrics.MeanAP,
                   path: Path, per_side: int = 5) -> Path:
    """PR curves of the `per_side` best and worst classes by AP (classes with positives only)."""
    plt = _pyplot()
    ranked = [int(k) for k in np.argsort(-mean_ap.per_class, kind="stable") if mean_ap.positives[k] > 0]
    chosen = ranked if len(ranked) <= 2 * per_side else ranked[:per_side] + ranked[-per_side:]
    fig, ax = plt.subplots(figsize=(7, 6))
    for k in chosen:
        curve = metrics.pr_curve(scores[:, k], targets[:, k])
        style = "-" if k in ranked[:per_side] else "--"
        ax.step(curve.recall, curve.precision, style, where="post",
                label=f"{names[k]} (AP {100 * mean_ap.per_class[k]:.1f})")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1.02), ylim=(0, 1.02),
           title=(f"PR curves of all {len(chosen)} classes" if chosen == ranked else
                  f"PR curves: {per_side} best (solid) and worst (dashed) classes") + f", mAP {100 * mean_ap.mean:.2f}")
    if chosen:
        ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_ap_bars(names: np.ndarray, mean_ap: metrics.MeanAP, path: Path, per_side: int = 30) -> Path:
    """Per-class AP, sorted; with many classes only the `per_side` best and worst are drawn."""
    plt = _pyplot()
    order = [int(k) for k in np.argsort(-mean_ap.per_class, kind="stable")]
    if len(order) > 2 * per_side:
        order = order[:per_side] + order[-per_side:]
        title = f"AP of the {per_side} best and {per_side} worst of {len(names)} classes"
    else:
        title = f"AP per class ({len(names)} classes)"
    fig, ax = plt.subplots(figsize=(8, max(3.0, 0.22 * len(order) + 1)))
    ax.barh(range(len(order)), [100 * mean_ap.per_class[k] for k in order], color="tab:blue")
    ax.set_yticks(range(len(order)), [str(names[k]) for k in order], fontsize=7)
    ax.invert_yaxis()
    ax.axvline(100 * mean_ap.mean, color="tab:red", linestyle="--", label=f"mAP {100 * mean_ap.mean:.2f}")
    ax.set(xlabel="AP (%)", xlim=(0, 100), title=title)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
