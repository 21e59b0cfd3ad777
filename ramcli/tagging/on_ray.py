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
addresses (`s3://`, `gs://`, `file://`) listed through pyarrow's file systems, whose photos are
recognised by extension and recorded under their address. Ray is imported only here, lazily.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from ramcli.media.discover import (PHOTO_KINDS, PHOTO_SUFFIXES, RAW_SUFFIXES, SIDECAR_SUFFIXES, VIDEO_SUFFIXES, Found,
                                   os_reason, walk_reaches)
from ramcli.errors import RamcliError, UsageError
from ramcli.media.loader import Batch, Failure, Item, PhotoDataset
from ramcli.pathnames import is_uri
from ramcli.tagging.pipeline import ScoreResult, resolve_device, results_of
from ramcli.tagging.tagger import Tagger
from ramcli.tagging.precision import resolve_precision
from ramcli.tagging.listener import Listener
from ramcli.tagging.options import TagOptions
from ramcli.tagging.session import TagSession
from ramcli.tagging.tagger_setup import should_compile

INSTALL = "--ray needs Ray: pip install 'ramcli[ray]'"
#: Upper bound on the blocks the photo list is cut into: a block is the unit Ray schedules and retries.
MAX_BLOCKS = 2000
#: Memory a decode task holds besides its batch's pixels: one photo decoded at full size (a
#: 50 MP RGB frame with Pillow's working copy). Declaring it also keeps Ray Data from fusing
#: decoding into the model actors, whose cores it would take.
DECODE_MEMORY = 256 * 2**20


def import_ray():
    """Ray, or a one-line usage error (exit 2) naming the extra to install."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise UsageError(INSTALL) from None
    return ray


# ----------------------------------------------------------------------------- sources


def list_objects(uri: str, include: Sequence[str] = (), exclude: Sequence[str] = ()) -> tuple[list[Found], Counter]:
    """The photos under an object-storage address, with the counts of what else was there.

    Listing reads no object, so photos are told by their extension (local discovery sniffs
    content); hidden and junk names, sidecars and the globs follow the local walk's rules. Each
    photo's `path` is its full address (a `str`), `size` and `mtime_ns` those of the listing.
    """
    import pyarrow as pa
    from pyarrow import fs as pafs

    try:
        filesystem, root = pafs.FileSystem.from_uri(uri)
        base = filesystem.get_file_info(root)
        if base.type == pafs.FileType.File:
            files = [(base.path, base.size, base.mtime_ns)]
        elif base.type == pafs.FileType.Directory:
            files = sorted((i.path, i.size, i.mtime_ns) for i in filesystem.get_file_info(
                pafs.FileSelector(root, recursive=True)) if i.type == pafs.FileType.File)
        else:
            raise UsageError(f"no such object or folder: {uri}")
    except UnicodeDecodeError:
        raise UsageError(f"cannot list {uri}: a name under it is not UTF-8 (object keys always are; "
                         "give a local folder as a path, not a file:// address)") from None
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise UsageError(f"cannot list {uri}: {' '.join(str(exc).split())[:200]}") from None
    scheme = uri.split("://", 1)[0]
    photos, counts = [], Counter()
    for path, size, mtime_ns in files:
        if path != base.path and not walk_reaches(Path(root), Path(path), include, exclude):
            continue
        suffix = PurePosixPath(path).suffix.lower()
        if suffix in SIDECAR_SUFFIXES:
            continue
        kind = "raw" if suffix in RAW_SUFFIXES else "image" if suffix in PHOTO_SUFFIXES else \
            "video" if suffix in VIDEO_SUFFIXES else "unsupported"
        counts[kind] += 1
        if kind in PHOTO_KINDS:
            photos.append(Found(f"{scheme}://{path}", kind, size=size, mtime_ns=mtime_ns or 0))
    return photos, counts


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
                data, stat_size, stat_mtime = _read_object(path, filesystems)
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


def _read_object(uri: str, filesystems: dict) -> tuple[bytes, int, int]:
    """An object's bytes with its size and mtime as read (as the local loader stats the file);
    one pyarrow file system per bucket, reused for the rest of the task."""
    from pyarrow import fs as pafs

    scheme, key = uri.split("://", 1)
    bucket = "" if scheme == "file" else key.split("/", 1)[0]
    if (scheme, bucket) not in filesystems:  # from the bucket's address: a key need not be a valid URI
        filesystems[scheme, bucket] = pafs.FileSystem.from_uri(f"{scheme}://{bucket or '/'}")[0]
    filesystem = filesystems[scheme, bucket]
    info = filesystem.get_file_info(key)
    with filesystem.open_input_file(key) as fh:
        return fh.readall(), int(info.size or 0), int(info.mtime_ns or 0)


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


@dataclasses.dataclass
class Cluster:
    """How the model is spread: `actors` model actors of `cpus` CPUs and `gpus` GPUs each."""

    actors: int
    cpus: float
    gpus: float
    device: str  # the actors' --device


def plan(ray, device: str, actors: int | None, actor_cpus: float | None) -> Cluster:
    """One actor per GPU when the cluster has GPUs (and --device is not cpu); otherwise one CPU
    actor per node, each with all of the smallest node's CPUs but one (left to decode tasks)."""
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if device.startswith("cuda") and not gpus:
        raise UsageError(f"--device {device}: the Ray cluster has no GPU")
    if device == "mps":
        raise UsageError("--ray runs the model on CUDA or CPU actors (--device cpu, cuda or auto)")
    if gpus and device != "cpu":
        return Cluster(actors or gpus, actor_cpus or 1, 1, "cuda")
    nodes = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")] or [resources.get("CPU", 1)]
    cluster = Cluster(actors or len(nodes), actor_cpus or max(1, int(min(nodes)) - 1), 0, "cpu")
    if cluster.cpus > max(nodes):
        raise UsageError(f"--ray-actor-cpus {cluster.cpus:g}: no node of the Ray cluster has that many CPUs "
                         f"(the largest has {max(nodes):g})")
    if cluster.actors * cluster.cpus >= sum(nodes):
        raise UsageError(f"{cluster.actors} model actors of {cluster.cpus:g} CPUs take all {sum(nodes):g} CPUs of "
                         "the Ray cluster: leave at least one for decoding (fewer --ray-actors or --ray-actor-cpus)")
    return cluster


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


def one_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return (lines[-1] if lines else type(exc).__name__)[:200]


def connect(address: str | None):
    """Ray, connected: to `address` ('auto' for the cluster this machine belongs to, or
    'ray://host:10001'), to a running session, or to a new local one. Quiet: ramcli's own
    progress bar and summary are the output."""
    ray = import_ray()
    if not ray.is_initialized():
        _reachable(address)
        try:
            starts = address is None and not os.environ.get("RAY_ADDRESS")  # a new local Ray: no dashboard
            ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False,
                     **({"include_dashboard": False} if starts else {}))
        except (ConnectionError, ValueError, RuntimeError) as exc:
            raise UsageError(f"cannot reach the Ray cluster at {address}: {one_line(exc)}") from None
        # log_to_driver=False silences the workers' output, but the driver's thread that prints the
        # cluster's error messages (an actor that died and is retried) writes them on stdout, where
        # the results go, and Ray has no public switch for it (LoggingConfig sets up loggers; this
        # is a print). So the private flag Ray's debugger uses; ramcli reports what failed itself.
        import ray._private.worker as worker

        if hasattr(worker, "_worker_logs_enabled"):
            worker._worker_logs_enabled = False
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # the output in discovery order, as a local run
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.CRITICAL)  # failures end in one RamcliError line
    return ray


def _reachable(address: str | None) -> None:
    """A `host:port` (or `ray://host:port`) that does not answer is a one-line error at once;
    Ray itself would retry for minutes."""
    import socket

    host, _, port = (address or "").removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return  # None, "auto", "local": Ray finds the cluster itself
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as exc:
        raise UsageError(f"cannot reach the Ray cluster at {address}: {os_reason(exc)}") from None


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
