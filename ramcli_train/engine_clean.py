"""The data engine's `clean` (RAM paper §3.2): wrong tags removed.

For each tag (category) the detector boxes its region in every image that carries it;
the crops are embedded and clustered with K-Means++; the `outlier_fraction` of crops farthest
from their cluster centre lose the tag, and so does every crop on which the baseline model does
not predict the tag (scored through the same pipeline as `ramcli tag`). Tags the detector cannot
find are kept and counted. Removed tags are listed in KEY.json `removed_tags` (captions still
mention them: see docs/engine.md).

It writes `report.json` with per-tag counts before and after.
"""

from __future__ import annotations

import io
import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ramcli.errors import UsageError
from ramcli.models import RecognitionModel
from ramcli_train.detector import CropEmbedder, Detector, crop
from ramcli_train.engine_shards import (EngineReport, TagNames, image_bytes, output_paths, read_samples,
                                        sample_captions, sample_meta, score_images, write_shard)
from ramcli_train.samples import decode_image


def outliers(vectors: np.ndarray, fraction: float = 0.1, clusters: int = 4, seed: int = 0) -> np.ndarray:
    """Indices of the `fraction` of vectors farthest from the nearest K-Means++ cluster centre
    (clusters of one vector do not count as clusters)."""
    from sklearn.cluster import KMeans

    n = len(vectors)
    drop = int(math.floor(n * fraction))
    if n < 2 or drop == 0:
        return np.zeros(0, dtype=int)
    km = KMeans(n_clusters=max(1, min(clusters, n // 2)), init="k-means++", n_init=4, random_state=seed).fit(vectors)
    # a lone outlier becomes its own cluster (distance 0): measure against the real clusters only
    sizes = np.bincount(km.labels_, minlength=len(km.cluster_centers_))
    real = km.cluster_centers_[sizes >= max(2, math.ceil(0.05 * n))]
    centres = real if len(real) else km.cluster_centers_
    dist = np.linalg.norm(vectors[:, None, :] - centres[None, :, :], axis=-1).min(axis=1)
    return np.argsort(-dist, kind="stable")[:drop]


@dataclass
class ShardRegions:
    """What cleaning learns from one shard, before the categories are compared across shards:
    each sample's tags, and each detected region's (sample, tag), embedding and the baseline
    model's score of the tag on its crop (None where the crop could not be scored)."""

    tags: list[set[str]] = field(default_factory=list)
    undecodable: int = 0
    regions: list[tuple[int, str]] = field(default_factory=list)
    vectors: np.ndarray | None = None
    scores: list[float | None] = field(default_factory=list)
    undetected: Counter = field(default_factory=Counter)


def shard_regions(model: RecognitionModel, names: TagNames, shard: str, detector: Detector, embedder: CropEmbedder,
                  categories: Sequence[str] | None = None, device: str = "auto", batch_size: int = 8) -> ShardRegions:
    """`clean`'s work on one shard: detect each (wanted) tag's region, embed the crops, and
    score each crop through the tagging pipeline. Shards are independent here, so this is the
    step a cluster spreads (`ramcli_train.ray_engine.clean`)."""
    index = {n: i for i, n in enumerate(model.labels.names)}
    wanted = set(categories) if categories else None
    found = ShardRegions()
    crops: list[Image.Image] = []
    for i, sample in enumerate(read_samples(shard)):
        meta = sample_meta(sample)
        tags = names.of(sample_captions(sample, meta), [str(t) for t in meta.get("tags") or []])
        found.tags.append(tags)
        todo = sorted(t for t in tags if wanted is None or t in wanted)
        data_bytes = image_bytes(sample)
        image = decode_image(data_bytes) if data_bytes is not None else None
        if image is None or not todo:
            found.undecodable += image is None
            continue
        best: dict[str, tuple[float, tuple]] = {}
        for det in detector.detect(image, todo):
            if det.phrase in todo and det.score > best.get(det.phrase, (-1.0, ()))[0]:
                best[det.phrase] = (det.score, det.box)
        for tag in todo:
            region = crop(image, best[tag][1]) if tag in best else None
            if region is None:
                found.undetected[tag] += 1
            else:
                found.regions.append((i, tag))
                crops.append(region)
    found.vectors = embedder.embed(crops) if crops else None
    # region check: the baseline model's score of the tag on its own crop, through the pipeline
    encoded = []
    for r, region in enumerate(crops):
        buf = io.BytesIO()
        region.save(buf, format="PNG")
        encoded.append((r, buf.getvalue()))
    scored = score_images(model, encoded, device, batch_size, 0) if encoded else {}
    found.scores = [float(scored[r][index[tag]]) if r in scored else None for r, (_, tag) in enumerate(found.regions)]
    return found


def clean_report(model: RecognitionModel, found: Sequence[ShardRegions], outlier_fraction: float = 0.1,
                 clusters: int = 4, threshold: float | None = None, seed: int = 0
                 ) -> tuple[EngineReport, dict[int, dict[int, dict[str, str]]]]:
    """The decision over all shards' regions: per category, the outliers of its K-Means++
    clusters and the crops the model does not recognise lose the tag. Returns the report and
    the removals, {shard: {sample: {tag: reason}}}."""
    index = {n: i for i, n in enumerate(model.labels.names)}
    report = EngineReport(extra={"model": model.model_id, "outlier_fraction": outlier_fraction})
    by_tag: dict[str, list[tuple[int, int]]] = {}
    undetected: Counter = Counter()
    for si, shard in enumerate(found):
        report.samples += len(shard.tags)
        report.undecodable += shard.undecodable
        for tags in shard.tags:
            report.before.update(tags)
        undetected.update(shard.undetected)
        for r, (_, tag) in enumerate(shard.regions):
            by_tag.setdefault(tag, []).append((si, r))
    removed: dict[int, dict[int, dict[str, str]]] = {}
    per_tag: dict[str, dict[str, int]] = {}
    for tag, members in sorted(by_tag.items()):
        vectors = np.stack([found[si].vectors[r] for si, r in members])
        far = {members[j] for j in outliers(vectors, outlier_fraction, clusters, seed)}
        thr = threshold if threshold is not None else model.labels.thresholds[index[tag]]
        missed = {(si, r) for si, r in members if (score := found[si].scores[r]) is not None and score <= thr}
        for si, r in members:
            reason = "outlier" if (si, r) in far else "not_recognised" if (si, r) in missed else None
            if reason:
                removed.setdefault(si, {}).setdefault(found[si].regions[r][0], {})[tag] = reason
        per_tag[tag] = {"regions": len(members), "outliers": len(far), "not_recognised": len(missed - far),
                        "undetected": undetected[tag]}
    for tag, n in undetected.items():
        per_tag.setdefault(tag, {"regions": 0, "outliers": 0, "not_recognised": 0, "undetected": n})
    for si, shard in enumerate(found):
        for i, tags in enumerate(shard.tags):
            report.after.update(tags - set(removed.get(si, {}).get(i, {})))
    report.extra["removed"] = sum(len(d) for s in removed.values() for d in s.values())
    report.extra["categories"] = per_tag
    return report, removed


def write_cleaned(shard: str, out: Path, tags: Sequence[set[str]], removed: dict[int, dict[str, str]]) -> None:
    """The cleaned copy of `shard` at `out` (atomically): samples that lost tags get their new
    `tags` and `removed_tags`; the rest are copied as they are."""
    written = []
    for i, sample in enumerate(read_samples(shard)):
        drop = removed.get(i, {})
        if not drop:
            written.append(sample)
            continue
        meta = sample_meta(sample)
        meta["tags"] = sorted(set(tags[i]) - set(drop))
        meta["removed_tags"] = sorted(set(meta.get("removed_tags") or []) | set(drop))
        written.append({**sample, "json": json.dumps(meta, ensure_ascii=False).encode("utf-8")})
    write_shard(out, written)


def check_clean_options(model: RecognitionModel, outlier_fraction: float, categories: Sequence[str] | None) -> None:
    if not 0 <= outlier_fraction < 1:
        raise UsageError("--outlier-fraction must be in [0, 1)")
    if categories and (unknown := set(categories) - set(model.labels.names)):
        raise UsageError(f"--category: not tags of the model: {', '.join(sorted(unknown)[:5])}")


def clean(model: RecognitionModel, data: Sequence[str], out_dir: Path, detector: Detector,
          embedder: CropEmbedder, outlier_fraction: float = 0.1, clusters: int = 4,
          threshold: float | None = None, categories: Sequence[str] | None = None, device: str = "auto",
          batch_size: int = 8, seed: int = 0) -> dict:
    """Drop tags whose region is an outlier of its category or is not recognised by the model."""
    check_clean_options(model, outlier_fraction, categories)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = TagNames(model)
    shards = output_paths(data, out_dir)
    found = [shard_regions(model, names, shard, detector, embedder, categories, device, batch_size)
             for shard, _ in shards]
    report, removed = clean_report(model, found, outlier_fraction, clusters, threshold, seed)
    for si, (shard, out) in enumerate(shards):
        write_cleaned(shard, out, found[si].tags, removed.get(si, {}))
    report.save(out_dir)
    return report.as_dict()
