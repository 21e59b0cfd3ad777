"""`ramcli tag --ray`: the tagging pipeline as a Ray Data job, for libraries past one machine.

    discover (driver) -> decode (Ray tasks on CPU workers) -> model scores (a pool of actors:
    one per GPU, or CPU actors) -> the driver: decisions and the sinks of a local run

Only the model's work moves to the cluster. The driver keeps what must stay in one place: the
incremental rule (`TagSession.due`), the decision rule (its `Tagger.decide`) and the sinks
(output, metadata writer, index) of `ramcli.tagging.session`, through `TagSession.runner`. So a Ray run makes
the same records as a local one, writes the index from one process, and resumes the same way:
each batch is recorded once it came back, a killed run re-tags only what was not recorded.

The model travels once, through Ray's object store, as the driver loaded it (vocabulary applied),
so workers need neither the weights nor the labels nor `$RAMCLI_HOME`. A killed actor is
restarted and its batch retried (`max_restarts`, `max_task_retries`); Ray Data hands every
block to the driver once, and the index keys records by path, so no photo is lost or doubled.

Sources are local (or shared) folders, discovered as `ramcli tag` does, and object storage
addresses (`s3://`, `gs://`, `file://`, see `ramcli.media.object_storage`). The cluster and Ray
itself, imported lazily, come from `ramcli.tagging.ray_cluster`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from ramcli.errors import RamcliError, UsageError
from ramcli.media.discover import Found
from ramcli.media.loader import Batch, Failure, Item, PhotoDataset
from ramcli.media.object_storage import list_objects, read_object
from ramcli.pathnames import is_uri
from ramcli.tagging.listener import Listener
from ramcli.tagging.options import TagOptions
from ramcli.tagging.pipeline import ScoreResult, resolve_device, results_of
from ramcli.tagging.precision import resolve_precision
from ramcli.tagging.ray_cluster import Cluster, connect, one_line, plan
from ramcli.tagging.session import TagSession
from ramcli.tagging.tagger import Tagger
from ramcli.tagging.tagger_setup import should_compile

#: Upper bound on the blocks the photo list is cut into: a block is the unit Ray schedules and retries.
MAX_BLOCKS = 2000
#: Memory a decode task holds besides its batch's pixels: one photo decoded at full size (a
#: 50 MP RGB frame with Pillow's working copy). Declaring it also keeps Ray Data from fusing
#: decoding into the model actors, whose cores it would take.
DECODE_MEMORY = 256 * 2**20


class RaySession(TagSession):
    """A `TagSession` whose sources may also be object-storage addresses (`uris`)."""

    def __init__(self, options: TagOptions, uris: list[str], listener: Listener | None = None, **kwargs):
        super().__init__(options, listener, **kwargs)
        self.uris = uris

    def discover(self) -> tuple[list[Found], Counter]:
        found, counts = super().discover() if self.options.paths else ([], Counter())
        for uri in self.uris:
            photos, seen = list_objects(uri, self.options.include, self.options.exclude)
            found += photos
            counts += seen
        return found, counts


# ----------------------------------------------------------------------------- workers

def _text(value: bytes) -> str:
    return os.fsdecode(value)


def _decode(rows: dict[str, np.ndarray], size: int, draft: bool, interpolation: str) -> dict[str, np.ndarray]:
    """A decode task: each row's photo to uint8 pixels and the facts the index keeps, or its
    one-line failure (never an exception: one bad photo must not fail the block). Paths travel
    as bytes, so names that are not UTF-8 survive Arrow."""
    from ramcli.media.decode import ImageError, load_for_model

    out = {k: [] for k in ("path", "ok", "error", "width", "height", "taken_at", "content_hash", "size", "mtime_ns")}
    pixels = []
    filesystems: dict = {}
    for raw in rows["path"]:
        path = _text(raw)
        record: tuple | Failure
        if is_uri(path):
            try:
                data, stat_size, stat_mtime = read_object(path, filesystems)
                decoded = load_for_model(Path(path.split("://", 1)[1]), size, draft=draft,
                                         interpolation=interpolation, data=data)
                record = (decoded.pixels, Item(path, decoded.width, decoded.height, decoded.taken_at,
                                               decoded.content_hash, stat_size, stat_mtime))
            except ImageError as exc:
                record = Failure(path, str(exc))
            except Exception as exc:  # noqa: BLE001 - a read or decoder error on one object must not end the run
                record = Failure(path, f"cannot read {' '.join(str(exc).split())[:160]}")
        else:
            record = PhotoDataset([path], size, draft=draft, interpolation=interpolation)[0]
        ok = not isinstance(record, Failure)
        out["path"].append(raw)
        out["ok"].append(ok)
        out["error"].append(os.fsencode(record.reason) if not ok else b"")
        item = record[1] if ok else None
        pixels.append(record[0].numpy() if ok else np.zeros((3, size, size), np.uint8))
        out["width"].append(item.width if ok else 0)
        out["height"].append(item.height if ok else 0)
        out["taken_at"].append(item.taken_at.isoformat() if ok and item.taken_at else "")
        out["content_hash"].append(item.content_hash if ok else "")
        out["size"].append(item.size if ok else 0)
        out["mtime_ns"].append(item.mtime_ns if ok else 0)
    columns = {k: np.array(v, dtype=object if k in ("path", "error", "taken_at", "content_hash") else None)
               for k, v in out.items()}
    columns["pixels"] = np.stack(pixels) if pixels else np.zeros((0, 3, size, size), np.uint8)
    return columns


class Scorer:
    """A model actor: the driver's model (shipped once through the object store) on this
    actor's device and precision; decoded rows in, their scores out (the pixels stay here).

    With the driver's caption generator (`tag --caption`) it also writes each photo's caption:
    Tag2Text's generator reads the image embeddings, which never leave the actor, guided by the
    tags the driver's decision rule (`decision`: threshold, per-class thresholds, top-k) emits."""

    def __init__(self, model: list, device: str, precision: str, exclude: Sequence[str], compile: bool, threads: int,
                 captioner: list | None = None, decision: dict | None = None):
        import ray

        model = ray.get(model[0])  # a nested reference: the driver keeps it alive for restarts
        if threads:
            torch.set_num_threads(threads)
        dev = resolve_device(device)
        chosen = resolve_precision(dev, precision)
        self.precision = "fp32" if chosen == "auto" else chosen  # CPU auto: exact, see docs/scale-out.md
        self.tagger = Tagger(model, dev, self.precision, exclude=exclude, compile=compile,
                             captioner=ray.get(captioner[0]) if captioner else None, **(decision or {}))
        self.device = str(dev)

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = rows["ok"].astype(bool)
        classes = len(self.tagger.active)
        scores = np.zeros((len(ok), classes), np.float32)
        captions = np.full(len(ok), "", dtype=object)
        if ok.any():
            found, embeds = self.tagger.forward_batch(torch.from_numpy(np.ascontiguousarray(rows["pixels"][ok])))
            scores[ok] = found.numpy()
            if self.tagger.captioner is not None:
                captions[ok] = self.tagger.captions(embeds, self.tagger.decide(found))
        out = {k: v for k, v in rows.items() if k != "pixels"}
        out["scores"] = scores
        if self.tagger.captioner is not None:
            out["caption"] = captions
        out["arithmetic"] = np.array([f"{self.precision} on {self.device}"] * len(ok), dtype=object)
        return out


# ----------------------------------------------------------------------------- driver


def scored_batches(ray, cluster: Cluster, paths: Sequence, model, batch_size: int, precision: str,
                   exclude: Sequence[str] = (), compile_model: bool = False, draft: bool = False,
                   captioner: torch.nn.Module | None = None, decision: dict | None = None
                   ) -> Iterator[dict[str, np.ndarray]]:
    """The Ray Data pipeline: `paths` decoded by tasks and scored by the model actors, back
    batch by batch in input order (rows as `Scorer` returns them, with captions when a
    `captioner` is given)."""
    if getattr(model, "fixed_precision", None) is not None:
        raise UsageError("--ray ships the model to its actors: use the .pth/.safetensors weights, not ONNX")
    model_ref = ray.put(model)  # held here for the run: a restarted actor fetches it again
    size = model.arch.image_size
    blocks = max(1, min(MAX_BLOCKS, math.ceil(len(paths) / batch_size)))
    ds = ray.data.from_items([{"path": os.fsencode(str(f))} for f in paths], override_num_blocks=blocks)
    ds = ds.map_batches(_decode, batch_size=batch_size, batch_format="numpy", num_cpus=1,
                        memory=DECODE_MEMORY + batch_size * 3 * size ** 2,
                        fn_kwargs=dict(size=size, draft=draft, interpolation=model.pretrained_cfg["interpolation"]))
    ds = ds.map_batches(
        Scorer, batch_size=batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=cluster.actors),
        fn_constructor_kwargs=dict(model=[model_ref], device=cluster.device, precision=precision,
                                   exclude=list(exclude), compile=compile_model,
                                   threads=0 if cluster.gpus else int(cluster.cpus),
                                   captioner=[ray.put(captioner)] if captioner is not None else None,
                                   decision=decision),
        num_cpus=cluster.cpus, num_gpus=cluster.gpus)  # Ray Data's actor pool: max_restarts and max_task_retries -1
    try:
        yield from ds.iter_batches(batch_size=batch_size, batch_format="numpy")
    except ray.exceptions.RayError as exc:
        raise RamcliError(f"the Ray job failed: {one_line(exc)}") from None


class RayRunner:
    """`pipeline.tag_files` over a Ray Data pipeline; its results go to the same sinks, batch by
    batch, in input order. `session` learns the actors' arithmetic for the run's summary."""

    def __init__(self, ray, run: TagOptions, cluster: Cluster, session: TagSession | None = None):
        self.ray, self.run, self.cluster, self.session = ray, run, cluster, session

    def __call__(self, paths: list, tagger: Tagger, sinks: Sequence[Callable], batch_size: int, workers: int,
                 vocab_version: str = "builtin", on_batch: Callable[[int, int], None] | None = None,
                 skip: Callable[[Item], bool] | None = None, decode: str = "workers") -> None:
        if not paths:
            return
        run, cluster = self.run, self.cluster
        draft = run.decode == "draft" or (cluster.gpus > 0 and run.decode == "workers")
        decision = dict(threshold=tagger.threshold, thresholds=tagger.thresholds, top_k=tagger.top_k)
        for rows in scored_batches(self.ray, cluster, paths, tagger.model, batch_size, run.precision, run.exclude_tags,
                                   should_compile(run, torch.device(cluster.device), len(paths)), draft,
                                   tagger.captioner, decision):
            self._record(rows, tagger, sinks, vocab_version, on_batch, skip)

    def _record(self, rows: dict[str, np.ndarray], tagger: Tagger, sinks, vocab_version: str, on_batch, skip) -> None:
        """One batch back from the actors: the decision rule and the sinks of a local run."""
        if self.session is not None and len(rows["arithmetic"]):
            self.session.precision_note = f"{rows['arithmetic'][0]} (Ray actors)"
        items, failures, keep = [], [], []
        for i, raw in enumerate(rows["path"]):
            path = _text(raw)
            if not rows["ok"][i]:
                failures.append(Failure(path, _text(rows["error"][i])))
                continue
            taken = rows["taken_at"][i]
            item = Item(path, int(rows["width"][i]), int(rows["height"][i]),
                        datetime.fromisoformat(taken) if taken else None, rows["content_hash"][i],
                        int(rows["size"][i]), int(rows["mtime_ns"][i]))
            if skip is not None and skip(item):
                continue  # a moved photo the index re-pointed
            items.append(item)
            keep.append(i)
        scores = torch.from_numpy(np.ascontiguousarray(rows["scores"][keep]))
        batch = Batch(torch.empty(0), items, failures)
        captions = [rows["caption"][i] for i in keep] if "caption" in rows and keep else None
        results = results_of(batch, tagger.decide(scores), tagger, vocab_version, captions)
        for sink in sinks:
            sink(results)
        if on_batch is not None:
            on_batch(len(items) + len(failures), len(failures))


def execute(run: TagOptions, sources: Sequence[str], listener: Listener | None = None, address: str | None = None,
            actors: int | None = None, actor_cpus: float | None = None, stop: Callable[[], bool] | None = None) -> int:
    """`run` (every option of `ramcli tag`) on Ray; returns what `TagSession.execute` returns.
    `sources`: the paths as typed, URIs among them; `stop`: as `TagSession`'s."""
    if run.cache_embeddings:
        raise UsageError("--ray does not support --cache-embeddings (run it locally)")
    uris = [s for s in sources if is_uri(s) and not os.path.lexists(s)]
    local = [Path(s) for s in sources if s not in uris]
    if uris and run.write:
        raise UsageError("photos on object storage are indexed, not written (ExifTool writes local files): "
                         "add --no-write")
    ray = connect(address)
    cluster = plan(ray, run.device, actors, actor_cpus)
    actors_run = dataclasses.replace(run, paths=local)
    # The driver's model only decides and records: it stays in fp32 on the CPU, uncompiled.
    driver = dataclasses.replace(actors_run, device="cpu", precision="fp32", compile_model=False, decode="workers",
                                 precision_check=0)
    with RaySession(driver, uris, listener, stop=stop) as session:
        session.runner = RayRunner(ray, actors_run, cluster, session)
        return session.execute()


def score_files(model, paths: list[Path], batch_size: int = 8, device: str = "cpu", workers: int | None = None,
                precision: str = "auto", decode: str = "auto", *, actor_device: str = "auto",
                address: str | None = None, actors: int | None = None, actor_cpus: float | None = None) -> ScoreResult:
    """`pipeline.score_files` on Ray (`ramcli eval --ray`): the same matrix of every class's
    scores, computed by the actors on `actor_device`; `device`, `workers` and `decode` are the
    driver's and unused (decoding is the tasks' full decode, as locally on the CPU)."""
    ray = connect(address)
    cluster = plan(ray, actor_device, actors, actor_cpus)
    placing = Tagger(model, torch.device("cpu"), "fp32")  # maps the actors' active classes to all classes
    done: list[Path] = []
    rows_of: list[np.ndarray] = []
    failures: dict[Path, str] = {}
    for rows in scored_batches(ray, cluster, paths, model, batch_size, precision):
        ok = rows["ok"].astype(bool)
        done += [Path(_text(p)) for p in rows["path"][ok]]
        rows_of.append(placing.full_scores(torch.from_numpy(np.ascontiguousarray(rows["scores"][ok]))))
        failures.update({Path(_text(p)): _text(e) for p, e, good in zip(rows["path"], rows["error"], ok) if not good})
    matrix = np.concatenate(rows_of) if rows_of else np.zeros((0, len(model.labels)), dtype=np.float32)
    return ScoreResult(done, matrix, failures)
