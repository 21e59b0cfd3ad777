"""Scoring a benchmark's images once, and the cache of those scores.

Images are scored by the same pipeline as `ramcli tag`; the scores of the benchmark classes are
cached in `OUT/scores.npz`, keyed by the benchmark and a fingerprint of the model, so a re-run
with other thresholds (or `--calibrate`) never touches the model again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ramcli.errors import RamcliError
from ramcli.eval.benchmark import Benchmark, resolve_image, select_classes

CACHE_NAME = "scores.npz"
CACHE_VERSION = 1


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
