"""`ramcli engine generate --ray`: the data engine's generate step over a Ray cluster.

Each shard is one unit of work: a pool of model actors (one per GPU, or CPU actors; the same
plan as `ramcli tag --ray`) each runs `engine.generate_shard` on the shards it is handed,
writing the new shard (atomically) into the output folder, which every node must see. The
driver adds up the actors' counts into `report.json`. A killed actor is restarted and its
shard generated again from the start; the atomic write means a half-written shard never
appears. The model travels once through Ray's object store, as the driver loaded it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ramcli.errors import RamcliError
from ramcli.models import RecognitionModel
from ramcli.tagging.on_ray import connect, one_line, plan
from ramcli_train.engine import TagNames, generate_report, generate_shard, output_paths


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


def generate(model: RecognitionModel, data: Sequence[str], out_dir: Path, threshold: float | None = None,
             device: str = "auto", batch_size: int = 8, address: str | None = None, actors: int | None = None,
             actor_cpus: float | None = None) -> dict:
    """`ramcli_train.engine.generate` (without captions) with the shards spread over Ray actors."""
    ray = connect(address)
    cluster = plan(ray, device, actors, actor_cpus)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards = output_paths(data, out_dir)
    if not shards:
        raise RamcliError("no shards to generate")
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
