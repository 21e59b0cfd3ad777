"""Benchmark evaluation: read the official benchmark files, score images once, report metrics.

The flow of `ramcli eval`:

1. `load_benchmark` reads a taglist and an annotation file in any of the official formats.
2. `select_classes` maps benchmark classes to the model's label indices (closed set).
3. Images are scored by the same pipeline as `ramcli tag` and the scores of the benchmark classes
   are cached in `OUT/scores.npz`, keyed by the benchmark and a fingerprint of the model, so a
   re-run with other thresholds (or `--calibrate`) never touches the model again.
4. `evaluate_scores` computes mAP, CP/CR/F1 (see `ramcli.eval.metrics`), optionally calibrates
   per-class thresholds, and `write_outputs` writes the summary, tables, predictions and plots.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from ramcli.eval import metrics
from ramcli.tagging.decision import format_thresholds, read_threshold_file
from ramcli.errors import RamcliError, UsageError
from ramcli.models.labels import LabelSet

CACHE_NAME = "scores.npz"
CACHE_VERSION = 1
#: Tried in order when an annotation names an image without its extension (OpenImages ids).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".JPG", ".JPEG", ".png", ".PNG", ".webp", ".heic", ".HEIC")

# Label formats of the annotation files (see docs/eval.md):
NAMES = "names"      # `image,tag,tag` with tag names from the taglist (RAM OpenImages files)
TAG_IDS = "tag_ids"  # `image,id,id` where the taglist itself is model label ids (Tag2Text files)
INDICES = "indices"  # `image,i j k`: 0-based positions in the taglist (ImageNet-multi, HICO)


@dataclass(frozen=True)
class Benchmark:
    """A benchmark: class keys in taglist order, image ids in file order, (N, K) bool targets."""

    taglist: tuple[str, ...]
    image_ids: tuple[str, ...]
    targets: np.ndarray
    label_format: str

    def key(self) -> str:
        """Digest of the taglist and image list: a score cache is valid only for the same pair."""
        payload = json.dumps([self.taglist, self.image_ids, self.label_format])
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def _read_text_lines(path: Path, what: str) -> list[str]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RamcliError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise RamcliError(f"{what} is a folder, expected a file: {path}") from None
    except UnicodeDecodeError:
        raise RamcliError(f"{what} is not UTF-8 text: {path}") from None
    return text.splitlines()


def read_taglist(path: Path) -> list[str]:
    """One class per line; trailing blank lines are ignored, blank lines inside are an error."""
    lines = [line.strip() for line in _read_text_lines(path, "taglist")]
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise RamcliError(f"taglist is empty: {path}")
    if "" in lines:
        raise RamcliError(f"taglist has a blank line at line {lines.index('') + 1}: {path}")
    return lines


def _is_index_field(text: str) -> bool:
    return all(token.isdigit() for token in text.split())


def _detect_format(taglist: list[str], rows: list[list[str]]) -> str:
    if all(tag.isdigit() for tag in taglist):
        return TAG_IDS
    known = set(taglist)
    fields = [f for row in rows for f in row[1:] if f]
    if fields and all(len(row) <= 2 for row in rows) and all(
        _is_index_field(f) and f not in known for f in fields
    ):
        return INDICES
    return NAMES


def load_benchmark(annotations: Path, taglist_path: Path) -> Benchmark:
    """Read a benchmark in any official format; every label must name a taglist class.

    Duplicate names in a taglist are kept as separate classes and a label with that name marks
    all of them, as the official metric does. Lines with only an image id have no positives.
    """
    taglist = read_taglist(taglist_path)
    rows: list[list[str]] = []
    for line in _read_text_lines(annotations, "annotation file"):
        if line.strip():
            rows.append([part.strip() for part in line.split(",")])
    if not rows:
        raise RamcliError(f"annotation file has no images: {annotations}")
    label_format = _detect_format(taglist, rows)

    positions: dict[str, list[int]] = {}
    for index, tag in enumerate(taglist):
        key = str(int(tag)) if label_format == TAG_IDS else tag
        positions.setdefault(key, []).append(index)

    targets = np.zeros((len(rows), len(taglist)), dtype=bool)
    for i, row in enumerate(rows):
        if not row[0]:
            raise RamcliError(f"{annotations}: image {i + 1} has an empty image id")
        labels = row[1].split() if label_format == INDICES and len(row) > 1 else row[1:]
        for label in labels:
            if not label:
                continue
            if label_format == INDICES:
                column = int(label)
                if column >= len(taglist):
                    raise RamcliError(
                        f"{annotations}: image {row[0]} has class index {column}, "
                        f"but the taglist has {len(taglist)} classes"
                    )
                targets[i, column] = True
                continue
            key = str(int(label)) if label_format == TAG_IDS and label.isdigit() else label
            if key not in positions:
                raise RamcliError(
                    f"{annotations}: image {row[0]} has the label {label!r}, which is not in the "
                    f"taglist {taglist_path}"
                )
            targets[i, positions[key]] = True
    return Benchmark(tuple(taglist), tuple(row[0] for row in rows), targets, label_format)


@dataclass(frozen=True)
class ClassSelection:
    """Benchmark classes the model can score: their taglist columns and model label indices."""

    columns: np.ndarray
    model_indices: np.ndarray
    names: tuple[str, ...]
    missing: tuple[str, ...]


def select_classes(benchmark: Benchmark, labels: LabelSet) -> ClassSelection:
    """Map benchmark classes to model label indices (exact names, first match, like the official code).

    Classes the model does not know are left out and listed in `missing`; if none is known the
    benchmark is open-set for this model and needs its classes added to the vocabulary first.
    """
    index_of: dict[str, int] = {}
    for index, name in enumerate(labels.names):
        index_of.setdefault(name, index)
    columns, model_indices, names, missing = [], [], [], []
    for column, tag in enumerate(benchmark.taglist):
        if benchmark.label_format == TAG_IDS:
            model_index = int(tag) if int(tag) < len(labels) else None
            name = f"{labels.names[int(tag)]} ({tag})" if model_index is not None else tag
        else:
            model_index, name = index_of.get(tag), tag
        if model_index is None:
            missing.append(tag)
            continue
        columns.append(column)
        model_indices.append(model_index)
        names.append(name)
    if not columns:
        examples = ", ".join(repr(t) for t in benchmark.taglist[:3])
        raise RamcliError(
            f"none of the {len(benchmark.taglist)} benchmark classes (e.g. {examples}) is in the "
            f"model's vocabulary of {len(labels)} tags: this is an open-set benchmark for this model; "
            f"add its classes with `ramcli vocab add` and evaluate again"
        )
    return ClassSelection(np.array(columns), np.array(model_indices), tuple(names), tuple(missing))


def resolve_image(images_dir: Path, image_id: str) -> Path | None:
    """The file of an annotation's image id under `images_dir` (None if absent).

    Ids are relative paths (`test/0000c64e1253d68f`, `ILSVRC2012_val_00000001.JPEG`); an id without
    an extension gets the usual image suffixes tried. Ids that would leave `images_dir` are refused.
    """
    relative = PurePosixPath(image_id.replace("\\", "/"))
    if relative.is_absolute() or ".." in relative.parts or ":" in image_id:
        raise RamcliError(f"image id {image_id!r} points outside the images folder")
    base = Path(images_dir) / Path(*relative.parts)
    if base.is_file():
        return base
    for suffix in IMAGE_SUFFIXES:
        candidate = base.with_name(base.name + suffix)
        if candidate.is_file():
            return candidate
    return None


@dataclass
class ScoreCache:
    """Scores of the benchmark classes for the images that were scored, and what they depend on.

    Saved with `numpy.savez` (strings as unicode arrays, no pickle) and read with
    `allow_pickle=False`.
    """

    benchmark_key: str
    model_fingerprint: str
    model_id: str
    image_ids: np.ndarray        # (M,) str, rows of `scores`
    paths: np.ndarray            # (M,) str
    scores: np.ndarray           # (M, K') float32, K' = selected classes
    columns: np.ndarray          # (K',) taglist columns of the selected classes
    model_indices: np.ndarray    # (K',) model label indices
    class_names: np.ndarray      # (K',) str
    missing_classes: np.ndarray  # str
    model_thresholds: np.ndarray  # (C,) the model's default thresholds, all classes
    failed_ids: np.ndarray = field(default_factory=lambda: np.array([], dtype=str))
    failed_reasons: np.ndarray = field(default_factory=lambda: np.array([], dtype=str))

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(
            tmp,
            version=np.array(CACHE_VERSION),
            benchmark_key=np.array(self.benchmark_key),
            model_fingerprint=np.array(self.model_fingerprint),
            model_id=np.array(self.model_id),
            image_ids=self.image_ids.astype(str),
            paths=self.paths.astype(str),
            scores=self.scores.astype(np.float32),
            columns=self.columns.astype(np.int64),
            model_indices=self.model_indices.astype(np.int64),
            class_names=self.class_names.astype(str),
            missing_classes=self.missing_classes.astype(str),
            model_thresholds=self.model_thresholds.astype(np.float64),
            failed_ids=self.failed_ids.astype(str),
            failed_reasons=self.failed_reasons.astype(str),
        )
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> ScoreCache | None:
        """The cache at `path`, or None if there is none or it is from another ramcli version."""
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                if int(data["version"]) != CACHE_VERSION:
                    return None
                fields = {name: data[name] for name in data.files if name != "version"}
        except (OSError, ValueError, KeyError):
            raise RamcliError(f"score cache is unreadable: {path}; delete it to score again") from None
        for name in ("benchmark_key", "model_fingerprint", "model_id"):
            fields[name] = str(fields[name])
        return cls(**fields)


def model_fingerprint(weights: Path | str, arch: str | None, labels_dir: Path | None) -> str:
    """What the scores depend on, cheap to compute without loading (or hashing) a 2 GB checkpoint:
    a file's path, size and mtime, or a published model's name."""
    path = Path(weights).expanduser()
    if path.is_file():
        stat = path.resolve().stat()
        source: list = [str(path.resolve()), stat.st_size, stat.st_mtime_ns]
    else:
        source = [str(weights)]
    payload = [*source, arch, str(Path(labels_dir).resolve()) if labels_dir else None]
    return hashlib.sha256(json.dumps(payload).encode("utf-8")).hexdigest()[:16]


def score_benchmark(
    benchmark: Benchmark,
    images_dir: Path,
    weights: Path,
    arch: str | None,
    labels_dir: Path | None,
    device: str,
    batch_size: int,
    workers: int | None = None,
    scorer: Callable | None = None,
) -> ScoreCache:
    """Load the model, score every benchmark image with the `ramcli tag` pipeline, keep the scores
    of the benchmark classes. Images that are missing or cannot be decoded are recorded as failures
    (the official script silently scored a black image instead)."""
    from ramcli.models import load_model
    from ramcli.tagging.pipeline import resolve_device, score_files

    if not Path(images_dir).is_dir():
        raise RamcliError(f"images folder not found: {images_dir}")
    device = str(resolve_device(device))
    model = load_model(weights, arch=arch, labels_dir=labels_dir, device=device)
    selection = select_classes(benchmark, model.labels)

    found: dict[str, Path] = {}
    failed: dict[str, str] = {}
    for image_id in benchmark.image_ids:
        path = resolve_image(images_dir, image_id)
        if path is None:
            failed[image_id] = "not found"
        else:
            found[image_id] = path
    if not found:
        raise RamcliError(
            f"none of the {len(benchmark.image_ids)} benchmark images is in {images_dir} "
            f"(first id: {benchmark.image_ids[0]!r}); point --images at the folder they are relative to"
        )
    id_of = {path: image_id for image_id, path in found.items()}
    id_of.update({path.resolve(): image_id for image_id, path in found.items()})

    def image_id_of(path: Path | str) -> str:
        path = Path(path)
        return id_of[path] if path in id_of else id_of[path.resolve()]

    result = (scorer or score_files)(model, list(found.values()), batch_size=batch_size, device=device, workers=workers)
    for path, reason in result.failures.items():
        failed[image_id_of(path)] = reason
    scores = np.asarray(result.scores, dtype=np.float32)[:, selection.model_indices]
    return ScoreCache(
        benchmark_key=benchmark.key(),
        model_fingerprint=model_fingerprint(weights, arch, labels_dir),
        model_id=str(model.model_id),
        image_ids=np.array([image_id_of(p) for p in result.paths], dtype=str),
        paths=np.array([str(p) for p in result.paths], dtype=str),
        scores=scores,
        columns=selection.columns,
        model_indices=selection.model_indices,
        class_names=np.array(selection.names, dtype=str),
        missing_classes=np.array(selection.missing, dtype=str),
        model_thresholds=np.array(model.labels.thresholds, dtype=np.float64),
        failed_ids=np.array(list(failed), dtype=str),
        failed_reasons=np.array(list(failed.values()), dtype=str),
    )


def targets_for(benchmark: Benchmark, cache: ScoreCache) -> np.ndarray:
    """The (M, K') targets aligned with the cached score rows and columns."""
    row_of = {image_id: i for i, image_id in enumerate(benchmark.image_ids)}
    rows = np.array([row_of[str(image_id)] for image_id in cache.image_ids], dtype=np.int64)
    return benchmark.targets[rows][:, cache.columns]


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
