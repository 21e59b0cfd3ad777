"""The data engine of the RAM paper (§3.2), whose code was never released: generate missing
tags with a baseline model, then clean wrong ones.

`generate`: every image of the input shards is scored by the baseline model through
`ramcli.tagging.pipeline.score_files` (the pipeline `ramcli tag` uses). Tags above their threshold that
the sample does not already have (given in its JSON or parsed from its captions) are added; an
optional `Captioner` adds a generated caption, and the tags parsed from it. Output shards keep
every member of a sample; only KEY.json changes:

    tags               given ∪ generated ∪ parsed-from-generated-caption tag names
    generated_tags     what the model added
    caption            the captions, plus the generated one (when captioning)

`clean`: for each tag (category) the detector boxes its region in every image that carries it;
the crops are embedded and clustered with K-Means++; the `outlier_fraction` of crops farthest
from their cluster centre lose the tag, and so does every crop on which the baseline model does
not predict the tag (scored through the same pipeline). Tags the detector cannot find are kept
and counted. Removed tags are listed in KEY.json `removed_tags` (captions still mention them:
see docs/engine.md).

Both write `report.json` with per-tag counts before and after.
"""

from __future__ import annotations

import io
import json
import math
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ramcli.tagging.decision import ClassPolicy, class_policy, emitted
from ramcli.errors import RamcliError, UsageError
from ramcli.fileio import atomic_output
from ramcli.models import RecognitionModel
from ramcli_train.data import resolve_shards
from ramcli_train.samples import IMAGE_EXTENSIONS, decode_image
from ramcli_train.detector import CropEmbedder, Detector, crop

REPORT = "report.json"
#: a caption model: (images, their tag names) -> one caption per image
Captioner = Callable[[Sequence[Image.Image], Sequence[Sequence[str]]], list[str]]


# ----------------------------------------------------------------------------- shards


def read_samples(shard: str) -> Iterator[dict]:
    """The samples of one shard as webdataset groups them ({"__key__", ext: bytes, ...})."""
    import webdataset as wds

    def fail(exc: Exception) -> bool:
        raise RamcliError(f"cannot read shard {shard}: {exc}")

    for raw in wds.tarfile_samples(iter([{"url": shard}]), handler=fail):
        yield {k: v for k, v in raw.items() if k != "__url__" and k != "__local_path__"}


def _meta(sample: dict) -> dict:
    try:
        meta = json.loads(sample["json"]) if "json" in sample else {}
    except (ValueError, UnicodeDecodeError):
        meta = {}
    return meta if isinstance(meta, dict) else {}


def _captions(sample: dict, meta: dict) -> list[str]:
    caps = meta.get("caption")
    caps = [caps] if isinstance(caps, str) else [c for c in caps or [] if isinstance(c, str)]
    if "txt" in sample:
        caps.append(sample["txt"].decode("utf-8", "replace"))
    return list(dict.fromkeys(c.strip() for c in caps if c.strip()))


def _image_bytes(sample: dict) -> bytes | None:
    return next((sample[e] for e in IMAGE_EXTENSIONS if e in sample), None)


def _write(out: Path, samples: list[dict]) -> None:
    import webdataset as wds

    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(out) as tmp, wds.TarWriter(tmp, mtime=0) as sink:
        for s in samples:
            sink.write(s)


def _output_path(shard: str, out_dir: Path, index: int, used: set[str]) -> Path:
    name = Path(shard).name
    if name in used:  # shards of different folders with the same name
        name = f"{index:05d}_{name}"
    used.add(name)
    return out_dir / name


class TagNames:
    """Tag names of the model's label system, and the caption parser for it."""

    def __init__(self, model: RecognitionModel):
        from ramcli_train.parse import TagParser

        self.names = model.labels.names
        self.parser = TagParser(model.labels)

    def of(self, captions: Sequence[str], given: Sequence[str]) -> set[str]:
        ids = set(self.parser.ids_for_names([str(g) for g in given])[0])
        for c in captions:
            ids.update(self.parser.tag_ids(c))
        return {self.names[i] for i in ids}


@dataclass
class EngineReport:
    samples: int = 0
    images_scored: int = 0
    undecodable: int = 0
    before: Counter = field(default_factory=Counter)
    after: Counter = field(default_factory=Counter)
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        tags = sorted(set(self.before) | set(self.after), key=lambda t: (-self.after[t], t))
        return {"samples": self.samples, "images_scored": self.images_scored, "undecodable": self.undecodable,
                "tag_count_before": sum(self.before.values()), "tag_count_after": sum(self.after.values()),
                "per_tag": {t: {"before": self.before[t], "after": self.after[t]} for t in tags}, **self.extra}

    def counts(self) -> dict:
        """What `merge` adds up: the counts of the shards this report saw."""
        return {"samples": self.samples, "images_scored": self.images_scored, "undecodable": self.undecodable,
                "before": dict(self.before), "after": dict(self.after), "generated": self.extra.get("generated", 0)}

    def merge(self, counts: dict) -> None:
        """Add another report's `counts` (from the shards a Ray actor generated)."""
        self.samples += counts["samples"]
        self.images_scored += counts["images_scored"]
        self.undecodable += counts["undecodable"]
        self.before.update(counts["before"])
        self.after.update(counts["after"])
        self.extra["generated"] = self.extra.get("generated", 0) + counts["generated"]

    def save(self, out_dir: Path) -> Path:
        path = Path(out_dir) / REPORT
        path.write_text(json.dumps(self.as_dict(), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        return path


def _score(model: RecognitionModel, images: list[tuple[int, bytes]], device: str, batch_size: int,
           workers: int) -> dict[int, np.ndarray]:
    """Scores (all classes) of encoded images through the tagging pipeline, by position."""
    from ramcli.tagging.pipeline import score_files

    with tempfile.TemporaryDirectory(prefix="ramcli-engine-") as tmp:
        paths = []
        for i, data in images:
            p = Path(tmp) / f"{i:08d}.img"
            p.write_bytes(data)
            paths.append(p)
        result = score_files(model, paths, batch_size=batch_size, device=device, workers=workers)
        return {int(p.stem): row for p, row in zip(result.paths, result.scores)}


def _decide(model: RecognitionModel, policy: ClassPolicy, scores: np.ndarray) -> list[str]:
    """The tags `ramcli tag` emits for one row of every class's scores, in label order."""
    keep = emitted(scores[policy.active], policy.thresholds)
    return [model.labels.names[policy.active[j]] for j in np.flatnonzero(keep)]


# ----------------------------------------------------------------------------- generate


def generate(model: RecognitionModel, data: Sequence[str], out_dir: Path, threshold: float | None = None,
             captioner: Captioner | None = None, device: str = "auto", batch_size: int = 8,
             workers: int | None = 0) -> dict:
    """Add the baseline model's tags (and generated captions' tags) to every sample; write new
    shards and `report.json` (per-tag counts before and after)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = TagNames(model)
    report = generate_report(model, threshold, captioner is not None)
    for shard, out in output_paths(data, out_dir):
        generate_shard(model, names, shard, out, report, threshold, captioner, device, batch_size, workers)
    report.save(out_dir)
    return report.as_dict()


def generate_report(model: RecognitionModel, threshold: float | None, captioned: bool) -> EngineReport:
    return EngineReport(extra={"model": model.model_id, "threshold": threshold if threshold is not None else "per-class",
                               "captioned": captioned, "generated": 0})


def output_paths(data: Sequence[str], out_dir: Path) -> list[tuple[str, Path]]:
    """(input shard, its output shard) for every shard of `data`, in order."""
    used: set[str] = set()
    return [(shard, _output_path(shard, Path(out_dir), index, used))
            for index, shard in enumerate(resolve_shards(list(data)))]


def generate_shard(model: RecognitionModel, names: TagNames, shard: str, out: Path, report: EngineReport,
                   threshold: float | None = None, captioner: Captioner | None = None, device: str = "auto",
                   batch_size: int = 8, workers: int | None = 0) -> None:
    """`generate` for one shard: its new shard written at `out` (atomically), counts into `report`."""
    samples = list(read_samples(shard))
    images = [(i, b) for i, s in enumerate(samples) if (b := _image_bytes(s)) is not None]
    scores = _score(model, images, device, batch_size, workers) if images else {}
    report.images_scored += len(scores)
    report.undecodable += len(images) - len(scores)
    policy = class_policy(model.labels, threshold)
    predicted = {i: _decide(model, policy, row) for i, row in scores.items()}
    captions_new: dict[int, str] = {}
    if captioner is not None and predicted:
        order = sorted(predicted)
        pil = [decode_image(samples[i][next(e for e in IMAGE_EXTENSIONS if e in samples[i])]) for i in order]
        for i, text in zip(order, captioner(pil, [predicted[i] for i in order])):
            captions_new[i] = text
    written = []
    for i, sample in enumerate(samples):
        report.samples += 1
        meta = _meta(sample)
        captions = _captions(sample, meta)
        given = [str(t) for t in meta.get("tags") or []]
        before = names.of(captions, given)
        report.before.update(before)
        if i not in predicted:
            report.after.update(before)
            written.append(sample)
            continue
        added = sorted(set(predicted[i]) - before)
        caption_tags: set[str] = set()
        if i in captions_new:
            caption_tags = names.of([captions_new[i]], []) - before - set(added)
            meta["caption"] = [*captions_new_list(meta), captions_new[i]]
            meta["generated_caption"] = captions_new[i]
            meta["generated_caption_tags"] = sorted(caption_tags)
        after = before | set(added) | caption_tags
        report.after.update(after)
        report.extra["generated"] += len(added) + len(caption_tags)
        meta["tags"] = sorted(set(given) | set(added) | caption_tags)
        meta["generated_tags"] = added
        written.append({**sample, "json": json.dumps(meta, ensure_ascii=False).encode("utf-8")})
    _write(out, written)


def captions_new_list(meta: dict) -> list[str]:
    caps = meta.get("caption")
    return [caps] if isinstance(caps, str) else [c for c in caps or [] if isinstance(c, str)]


def checkpoint_captioner(checkpoint: Path, device: str = "cpu", num_beams: int = 3) -> Captioner:
    """Captions from the caption branch of a `ramcli train` / `ramcli finetune` checkpoint (RAM,
    Tag2Text), guided by the tags the engine found, as RAM's captioner is."""
    import torch

    from ramcli.models.caption import CaptionTokenizer
    from ramcli.media.decode import model_input, normalize
    from ramcli_train.config import TrainConfig
    from ramcli_train.build import build_model
    from ramcli_train.trainer import load_checkpoint
    from ramcli.models.labels import LabelSet

    ckpt = load_checkpoint(Path(checkpoint))
    if not isinstance(ckpt, dict) or not any(k.startswith("caption.") for k in ckpt.get("model", {})):
        raise UsageError(f"{Path(checkpoint).name} has no caption branch (train RAM or Tag2Text, not RAM++)")
    tok = Path(checkpoint).parent / "tokenizer.json"
    cfg = TrainConfig(**{k: v for k, v in ckpt["config"].items() if k in TrainConfig.__dataclass_fields__})
    cfg.tokenizer, cfg.label_embed, cfg.pretrained_backbone, cfg.init_from = str(tok), "random", False, None
    labels = LabelSet.from_metadata(ckpt["labels"])
    model = build_model(cfg, labels, CaptionTokenizer.from_vocab(tok))
    model.load_state_dict(ckpt["model"])
    model.to(device).eval()
    data_config = model.tagger.pretrained_cfg

    @torch.inference_mode()
    def caption(images: Sequence[Image.Image], tags: Sequence[Sequence[str]]) -> list[str]:
        pixels = torch.stack([model_input(im, data_config) for im in images]).to(device)
        embeds = model.tagger.encode_image(normalize(pixels, data_config))
        return model.caption.generate(embeds, [" | ".join(t) for t in tags], num_beams=num_beams)

    return caption


# ----------------------------------------------------------------------------- clean


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
        meta = _meta(sample)
        tags = names.of(_captions(sample, meta), [str(t) for t in meta.get("tags") or []])
        found.tags.append(tags)
        todo = sorted(t for t in tags if wanted is None or t in wanted)
        data_bytes = _image_bytes(sample)
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
    scored = _score(model, encoded, device, batch_size, 0) if encoded else {}
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
        meta = _meta(sample)
        meta["tags"] = sorted(set(tags[i]) - set(drop))
        meta["removed_tags"] = sorted(set(meta.get("removed_tags") or []) | set(drop))
        written.append({**sample, "json": json.dumps(meta, ensure_ascii=False).encode("utf-8")})
    _write(out, written)


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
