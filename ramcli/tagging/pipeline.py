"""The one tagging pipeline: files -> decode workers -> batches -> model scores -> decisions -> sinks.

`ramcli tag`, `ramcli eval`, `ramcli engine generate` and `ramcli distill` all run through here, so a photo gets the
same scores whichever command looks at it.

- `ramcli.tagging.tagger.Tagger` owns the model on its device with its precision, the active
  classes and the thresholds.
- `tag_files` streams batches from `ramcli.media.loader` through the Tagger and hands every
  `PhotoResult` to the sinks batch by batch, so a killed run loses at most the batch in flight.
- `score_files` returns the raw score matrix (evaluation, data engine); `decoded_batches` and
  `Tagger.outputs` give a distillation its teacher's logits and image embeddings.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ramcli.errors import UsageError
from ramcli.media.loader import Batch, Item, decode_deferred, make_loader, usable_cores
from ramcli.models import RecognitionModel
from ramcli.tagging.precision import resolve_precision
from ramcli.tagging.records import PhotoResult, TagScore
from ramcli.tagging.tagger import Tagger

#: auto: PyTorch for .pth/.safetensors, ONNX Runtime for .onnx, OpenVINO for .xml; openvino: any
#: model converted to OpenVINO (once, cached in RAMCLI_HOME)
RUNTIMES = ("auto", "openvino")


def mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' picks CUDA when present (this rank's GPU under torchrun), then Apple's MPS, else the CPU."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UsageError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here (try --device cpu)")
    if dev.type == "mps" and not mps_available():
        raise UsageError("--device mps: Apple's Metal backend is not available here (macOS 12.3+ on Apple "
                         "silicon with an arm64 Python; try --device cpu)")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"unsupported device {device!r}; use auto, cpu, cuda, cuda:N or mps")
    return dev


DECODES = ("auto", "workers", "draft", "device")


def resolve_decode(device: torch.device, decode: str = "auto") -> str:
    """Where and how JPEGs are decoded. auto: on the GPU (nvJPEG) when the model runs on CUDA,
    where CPU decoding of 12 MP photos is the bottleneck; on the CPU in the decode workers, with
    the official full decode (the model dominates there: draft mode would save little and move
    scores). "workers" decodes in the workers, in draft mode when they feed a GPU; "draft" always
    in draft mode (the fastest CPU decode, scores move slightly: docs/performance.md)."""
    if decode not in DECODES:
        raise UsageError(f"unknown decode {decode!r}; use one of {', '.join(DECODES)}")
    if decode == "auto":
        return "device" if device.type == "cuda" else "workers"
    if decode == "device" and device.type == "mps":
        raise UsageError("--decode device: torchvision cannot decode JPEGs on MPS; they are decoded in the workers")
    return decode


#: Below this many cores a CPU run decodes in-process: a decode worker takes a core from the
#: model's threads, which then wait for each other (measured on 2 cores: in-process was 1.25x
#: faster in fp32 and 1.5x in ONNX int8 end to end, docs/performance.md).
CPU_WORKERS_FROM_CORES = 4


def default_workers() -> int:
    """Decode workers: all cores (max 8) with a GPU, where decoding is the bottleneck; on the
    CPU none below CPU_WORKERS_FROM_CORES cores, else at most 2 (never every core): decoding a
    photo costs a small fraction of the Swin-L forward there, so more workers would only take
    cores from the model."""
    cores = usable_cores()
    if torch.cuda.is_available() or mps_available():
        return min(8, cores)
    return 0 if cores < CPU_WORKERS_FROM_CORES else min(2, cores - 1)


def default_batch_size(device: torch.device) -> int:
    """CUDA 64, MPS 16 (shares the Mac's memory with everything else; not measured), CPU 4."""
    return {"cuda": 64, "mps": 16}.get(device.type, 4)


def decoded_batches(paths: list[Path], model: RecognitionModel, batch_size: int, workers: int,
                    device: torch.device, skip: Callable[[Item], bool] | None = None,
                    decode: str = "workers") -> Iterator[Batch]:
    """Batches of `paths` decoded as `model` takes them (its size and interpolation) for
    `device`, in input order.

    `skip(item)` may drop decoded photos before the model runs (e.g. a moved photo the index
    already knows); their pixels are removed from the batch. `decode` (see `resolve_decode`):
    "workers" decodes everything in the worker processes (Pillow; JPEG draft mode only when they
    feed a GPU), "draft" likewise always in draft mode, "device" leaves plain JPEGs to the
    model's device (nvJPEG on CUDA).
    """
    feeds_gpu = device.type == "cuda"
    size, interpolation = model.arch.image_size, model.pretrained_cfg["interpolation"]
    loader = make_loader(paths, size, batch_size, workers=workers, pin_memory=feeds_gpu,
                         draft=decode == "draft" or feeds_gpu, defer_jpeg=decode == "device",
                         interpolation=interpolation)
    for batch in loader:
        if skip is not None and batch.items:
            keep = [i for i, item in enumerate(batch.items) if not skip(item)]
            if len(keep) != len(batch.items):
                batch = batch.select(keep)
        if batch.deferred:
            batch = decode_deferred(batch, size, device, interpolation)
        yield batch


def iter_batches(paths: list[Path], tagger: Tagger, batch_size: int, workers: int,
                 skip: Callable[[Item], bool] | None = None, decode: str = "workers",
                 ) -> Iterator[tuple[Batch, torch.Tensor, torch.Tensor | None]]:
    """(batch, scores of its decoded photos, their image embeddings or None) in input order, of
    the `decoded_batches` of `paths`."""
    for batch in decoded_batches(paths, tagger.model, batch_size, workers, tagger.device, skip, decode):
        if not batch.items:
            yield batch, torch.zeros(0, len(tagger.active)), None
            continue
        scores, embeds = tagger.forward_batch(batch.pixels, [item.content_hash for item in batch.items])
        yield batch, scores, embeds


def results_of(batch: Batch, tags: list[list[TagScore]], tagger: Tagger, vocab_version: str,
               captions: list[str] | None = None) -> list[PhotoResult]:
    out = [
        PhotoResult(
            path=str(item.path), status="tagged", size=item.size, mtime_ns=item.mtime_ns,
            content_hash=item.content_hash, width=item.width, height=item.height, taken_at=item.taken_at,
            model_id=tagger.model.model_id, vocab_version=vocab_version, tags=t,
            caption=captions[i] if captions else None,
        )
        for i, (item, t) in enumerate(zip(batch.items, tags))
    ]
    for failure in batch.failures:
        try:
            st = os.stat(failure.path)
            size, mtime = st.st_size, st.st_mtime_ns
        except OSError:
            size, mtime = 0, 0
        out.append(PhotoResult(path=str(failure.path), status="failed", size=size, mtime_ns=mtime,
                               model_id=tagger.model.model_id, vocab_version=vocab_version, error=failure.reason))
    return out


def tag_files(paths: list[Path], tagger: Tagger, sinks: Sequence[Callable[[list[PhotoResult]], None]],
              batch_size: int, workers: int, vocab_version: str = "builtin",
              on_batch: Callable[[int, int], None] | None = None,
              skip: Callable[[Item], bool] | None = None, decode: str = "workers") -> None:
    """Tag `paths` and hand each batch's results to every sink, in order."""
    for batch, scores, embeds in iter_batches(paths, tagger, batch_size, workers, skip, decode):
        tags = tagger.decide(scores)
        captions = tagger.captions(embeds, tags) if tagger.captioner is not None and batch.items else None
        results = results_of(batch, tags, tagger, vocab_version, captions)
        for sink in sinks:
            sink(results)
        if on_batch is not None:
            on_batch(len(batch.items) + len(batch.failures), len(batch.failures))


@dataclass
class ScoreResult:
    paths: list[Path]
    scores: np.ndarray  # (N, C) sigmoid scores in model.labels order
    failures: dict[Path, str]


def score_files(model: RecognitionModel, paths: list[Path], batch_size: int = 8, device: str = "auto",
                workers: int | None = None, precision: str = "auto", decode: str = "auto") -> ScoreResult:
    """Raw scores of every class for every decodable photo (evaluation, the data engine), with
    the same device and decode defaults as `ramcli tag`; auto precision on the CPU is exact fp32
    here (a fast path picked mid-run would mix two arithmetics in one score matrix)."""
    dev = resolve_device(device)
    chosen = resolve_precision(dev, precision)
    tagger = Tagger(model, dev, "fp32" if chosen == "auto" else chosen)
    done: list[Path] = []
    rows: list[np.ndarray] = []
    failures: dict[Path, str] = {}
    workers = default_workers() if workers is None else workers
    for batch, scores, _ in iter_batches(list(paths), tagger, batch_size, workers, decode=resolve_decode(dev, decode)):
        done.extend(item.path for item in batch.items)
        rows.append(tagger.full_scores(scores))
        failures.update({f.path: f.reason for f in batch.failures})
    matrix = np.concatenate(rows) if rows else np.zeros((0, len(model.labels)), dtype=np.float32)
    return ScoreResult(done, matrix, failures)
