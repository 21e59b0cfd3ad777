"""`ramcli engine generate --ray` and `ramcli engine clean --ray`: the data engine over a Ray cluster.

Each shard is one unit of work for a pool of model actors (one per GPU, or CPU actors; the same
plan as `ramcli tag --ray`), running the local engine's own per-shard step on it. The model
travels once through Ray's object store, as the driver loaded it. The input shards and the
output folder must be visible at the same path on every node.

- generate: an actor runs `engine_generate.generate_shard`, writing the new shard (atomically)
  into the output folder; the driver adds up the actors' counts into `report.json`.
- clean: an actor runs `engine_clean.shard_regions` (detector, crop embeddings, the model's
  check of each crop) and hands the regions back; the driver compares each category across all
  shards (`engine_clean.clean_report`, as locally), and Ray tasks write the cleaned shards
  (`engine_clean.write_cleaned`). The detector is built on each actor from a factory, so its
  weights must be reachable from every node.

A killed actor is restarted and its shard processed again from the start; results are keyed by
shard and outputs written atomically, so nothing is lost, doubled or half-written.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ramcli.errors import RamcliError
from ramcli.models import RecognitionModel
from ramcli.tagging.ray_cluster import connect, one_line, plan
from ramcli_train.detector import CropEmbedder, Detector, ModelCropEmbedder
from ramcli_train.engine_clean import (
    check_clean_options,
    clean_report,
    shard_regions,
    write_cleaned,
)
from ramcli_train.engine_generate import generate_report, generate_shard
from ramcli_train.engine_shards import TagNames, output_paths


class ShardGenerator:
    """A model actor: rows of (shard, output path) in, each shard's report counts out."""

    def __init__(self, model: list, threshold: float | None, device: str, batch_size: int, threads: int):
        import ray
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.model = ray.get(model[0])  # a nested reference: the driver keeps it alive for restarts
        self.names = TagNames(self.model)
        self.threshold, self.device, self.batch_size = threshold, device, batch_size

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        counts = []
        for shard, out in zip(rows["shard"], rows["out"]):
            report = generate_report(self.model, self.threshold, False)
            generate_shard(self.model, self.names, str(shard), Path(out), report, self.threshold, None, self.device,
                           self.batch_size, 0)
            counts.append(json.dumps(report.counts()))
        return {"shard": rows["shard"], "counts": np.array(counts, dtype=object)}


def _start(address: str | None, device: str, actors: int | None, actor_cpus: float | None, data: Sequence[str],
           out_dir: Path, verb: str) -> tuple:
    """The cluster, its plan, and each input shard with its output path (the folder made)."""
    ray = connect(address)
    cluster = plan(ray, device, actors, actor_cpus)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards = output_paths(data, out_dir)
    if not shards:
        raise RamcliError(f"no shards to {verb}")
    return ray, cluster, shards


def generate(model: RecognitionModel, data: Sequence[str], out_dir: Path, threshold: float | None = None,
             device: str = "auto", batch_size: int = 8, address: str | None = None, actors: int | None = None,
             actor_cpus: float | None = None) -> dict:
    """`ramcli_train.engine_generate.generate` (without captions) with the shards spread over Ray actors."""
    out_dir = Path(out_dir)
    ray, cluster, shards = _start(address, device, actors, actor_cpus, data, out_dir, "generate")
    model_ref = ray.put(model)
    ds = ray.data.from_items([{"shard": shard, "out": str(out)} for shard, out in shards],
                             override_num_blocks=len(shards))
    ds = ds.map_batches(ShardGenerator, batch_size=1, batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(size=min(cluster.actors, len(shards))),
                        fn_constructor_kwargs=dict(model=[model_ref], threshold=threshold, device=cluster.device,
                                                   batch_size=batch_size,
                                                   threads=0 if cluster.gpus else int(cluster.cpus)),
                        num_cpus=cluster.cpus, num_gpus=cluster.gpus)
    report = generate_report(model, threshold, False)
    try:
        for row in ds.iter_rows():
            report.merge(json.loads(row["counts"]))
    except ray.exceptions.RayError as exc:
        raise RamcliError(f"the Ray job failed: {one_line(exc)}") from None
    report.save(out_dir)
    return report.as_dict()


class ShardCleaner:
    """A model actor for `clean`: rows of shards in, each shard's `ShardRegions` out."""

    def __init__(self, model: list, detector: Callable[..., Detector], embedder: Callable[..., CropEmbedder],
                 categories: list[str] | None, device: str, batch_size: int, threads: int):
        import ray
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.model = ray.get(model[0])  # a nested reference: the driver keeps it alive for restarts
        self.names = TagNames(self.model)
        self.detector = detector(device=device)
        self.embedder = embedder(self.model, device)
        self.categories, self.device, self.batch_size = categories, device, batch_size

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        found = np.empty(len(rows["shard"]), dtype=object)
        for i, shard in enumerate(rows["shard"]):
            found[i] = shard_regions(self.model, self.names, str(shard), self.detector, self.embedder,
                                     self.categories, self.device, self.batch_size)
        return {"index": rows["index"], "found": found}


def _write_cleaned(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A task: the cleaned copies of its shards, from the driver's decisions."""
    for shard, out, decided in zip(rows["shard"], rows["out"], rows["decided"]):
        decided = json.loads(decided)
        write_cleaned(str(shard), Path(out), [set(t) for t in decided["tags"]],
                      {int(i): drop for i, drop in decided["removed"].items()})
    return {"index": rows["index"]}


def clean(model: RecognitionModel, data: Sequence[str], out_dir: Path, detector: Callable[..., Detector],
          embedder: Callable[..., CropEmbedder] = ModelCropEmbedder, outlier_fraction: float = 0.1, clusters: int = 4,
          threshold: float | None = None, categories: Sequence[str] | None = None, device: str = "auto",
          batch_size: int = 8, seed: int = 0, address: str | None = None, actors: int | None = None,
          actor_cpus: float | None = None, on_shard: Callable[[int, int], None] | None = None) -> dict:
    """`ramcli_train.engine_clean.clean` with the shards' regions found by Ray actors. `detector` and
    `embedder` are factories each actor calls, `detector(device=...)` and `embedder(model,
    device)`; `on_shard(done, total)` follows the shards as their regions come back."""
    check_clean_options(model, outlier_fraction, categories)
    out_dir = Path(out_dir)
    ray, cluster, shards = _start(address, device, actors, actor_cpus, data, out_dir, "clean")
    model_ref = ray.put(model)
    ds = ray.data.from_items([{"index": i, "shard": shard} for i, (shard, _) in enumerate(shards)],
                             override_num_blocks=len(shards))
    ds = ds.map_batches(ShardCleaner, batch_size=1, batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(size=min(cluster.actors, len(shards))),
                        fn_constructor_kwargs=dict(model=[model_ref], detector=detector, embedder=embedder,
                                                   categories=list(categories) if categories else None,
                                                   device=cluster.device, batch_size=batch_size,
                                                   threads=0 if cluster.gpus else int(cluster.cpus)),
                        num_cpus=cluster.cpus, num_gpus=cluster.gpus)
    found: dict = {}
    try:
        for row in ds.iter_rows():
            found[int(row["index"])] = row["found"]  # keyed by shard: a retried shard counts once
            if on_shard is not None:
                on_shard(len(found), len(shards))
        regions = [found[i] for i in range(len(shards))]
        report, removed = clean_report(model, regions, outlier_fraction, clusters, threshold, seed)
        decided = [json.dumps({"tags": [sorted(t) for t in regions[i].tags], "removed": removed.get(i, {})})
                   for i in range(len(shards))]
        writes = ray.data.from_items([{"index": i, "shard": shard, "out": str(out), "decided": decided[i]}
                                      for i, (shard, out) in enumerate(shards)], override_num_blocks=len(shards))
        writes.map_batches(_write_cleaned, batch_size=1, batch_format="numpy", num_cpus=1).materialize()
    except ray.exceptions.RayError as exc:
        raise RamcliError(f"the Ray job failed: {one_line(exc)}") from None
    report.save(out_dir)
    return report.as_dict()
