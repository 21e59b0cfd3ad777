"""The one tagging pipeline: files -> decode workers -> batches -> model scores -> decisions -> sinks.

`ramcli tag`, `ramcli eval` and `ramcli engine generate` all run through here, so a photo gets the
same scores whichever command looks at it.

- `Tagger` owns the model on its device with its precision, the active classes (disabled,
  excluded and Tag2Text's deleted tags are removed from the label queries, so they cost nothing)
  and the thresholds: per class unless `threshold` overrides them all; the rule itself
  (sigmoid(logit) > threshold, strict, as the official code) is `ramcli.decision.emitted`.
- `tag_files` streams batches from `ramcli.loader` through the Tagger and hands every
  `PhotoResult` to the sinks batch by batch, so a killed run loses at most the batch in flight.
- `score_files` returns the raw score matrix (evaluation, data engine).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ramcli.decision import check_threshold, emitted
from ramcli.embed_cache import EmbeddingCache, rescore
from ramcli.errors import UsageError
from ramcli.imaging import normalize
from ramcli.loader import Batch, Item, decode_deferred, make_loader
from ramcli.models import RecognitionModel
from ramcli.records import PhotoResult, TagScore

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' picks CUDA when present (this rank's GPU under torchrun), else the CPU."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UsageError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here (try --device cpu)")
    return dev


def resolve_precision(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32.

    auto: bf16 on CUDA (fp16 where the GPU has no bf16); fp32 on the CPU. CPU bf16 is faster but
    stays opt-in: its tag agreement with fp32 (bench/tag_cpu.py) is below the 99% the project
    requires. The figures are in docs/performance.md.
    """
    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None


@dataclass
class Tagger:
    """A model ready to tag: device, precision, active classes and the decision rule."""

    model: RecognitionModel
    device: torch.device
    autocast: torch.dtype | None = None
    threshold: float | None = None
    thresholds: Sequence[float] | None = None
    exclude: Iterable[str] = ()
    top_k: int | None = None
    compile: bool = False
    cache: EmbeddingCache | None = None  # keep image embeddings for decoder-only re-scoring
    captioner: torch.nn.Module | None = None  # Tag2Text's tag-guided caption generator
    classes: torch.Tensor | None = field(init=False, default=None)
    _class_thresholds: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        labels = self.model.labels
        if labels is None:
            raise UsageError("the model has no label system (pass --labels DIR)")
        names = labels.names
        excluded = {n.strip().lower() for n in self.exclude if n.strip()}
        unknown = excluded - {n.lower() for n in names}
        if unknown:
            raise UsageError(f"--exclude-tags: unknown tag(s): {', '.join(sorted(unknown)[:5])}")
        # `deleted` holds Tag2Text's caption-disturbing tags and the vocabulary's disabled ones
        dropped = set(labels.deleted) | {i for i, n in enumerate(names) if n.lower() in excluded}
        active = [i for i in range(len(names)) if i not in dropped]
        if not active:
            raise UsageError("every tag is disabled or excluded: nothing to tag")
        self.classes = None if len(active) == len(names) else torch.tensor(active)
        if self.threshold is not None:
            check_threshold(self.threshold, "--threshold")
        base = list(self.thresholds) if self.thresholds is not None else list(labels.thresholds)
        chosen = [self.threshold if self.threshold is not None else base[i] for i in active]
        self._class_thresholds = torch.tensor(chosen, dtype=torch.float32)
        self.active = active  # label indices that are computed, in output order
        self.model = self.model.to(self.device).eval()
        if self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if self.captioner is not None:
            self.captioner = self.captioner.to(self.device).eval()
        self._forward: Callable = self.model
        self._compiled_batch: int | None = None
        if self.compile:
            self._forward = torch.compile(self.model, dynamic=False)
        if self.classes is not None:
            self.classes = self.classes.to(self.device)

    @property
    def image_size(self) -> int:
        return self.model.arch.image_size

    def _amp(self):
        return torch.autocast(self.device.type, dtype=self.autocast) if self.autocast else contextlib.nullcontext()

    def scores(self, pixels: torch.Tensor, keys: Sequence[str] | None = None) -> torch.Tensor:
        """uint8 (B,3,S,S) -> sigmoid scores (B, active classes), float32 on the CPU."""
        return self.forward_batch(pixels, keys)[0]

    @torch.inference_mode()
    def forward_batch(self, pixels: torch.Tensor, keys: Sequence[str] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(scores, image embeddings or None). Embeddings are computed separately only when they
        are needed afterwards: stored in the embedding cache under `keys`, or for captions."""
        x = normalize(pixels.to(self.device, non_blocking=True), self.model.pretrained_cfg)
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        embeds = None
        with self._amp():
            if self.captioner is not None or (self.cache is not None and keys is not None):
                embeds = self.model.encode_image(x)
                if self.cache is not None and keys is not None:
                    self.cache.put(keys, embeds)
                logits = self.model.decode(embeds, self.classes)
            else:
                logits = self._compiled_forward(x) if self.compile else self._forward(x, self.classes)
        return torch.sigmoid(logits.float()).cpu(), embeds

    def _compiled_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The compiled graph has a fixed batch size (the first one seen): a smaller last batch is
        padded to it rather than paying for a second compilation."""
        if self._compiled_batch is None:
            self._compiled_batch = x.shape[0]
        n = x.shape[0]
        if n < self._compiled_batch:
            x = torch.cat([x, x.new_zeros(self._compiled_batch - n, *x.shape[1:])])
        try:
            return self._forward(x, self.classes)[:n]
        except Exception as exc:  # no C++ compiler, unsupported op...: tag anyway, just slower
            warnings.warn(f"torch.compile failed ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); "
                          "continuing without it", stacklevel=2)
            self.compile, self._forward = False, self.model
            return self.model(x[:n], self.classes)

    @torch.inference_mode()
    def captions(self, embeds: torch.Tensor, tags: list[list[TagScore]]) -> list[str]:
        """Tag2Text captions guided by each photo's emitted tags (official: joined with ' | ')."""
        with self._amp():
            return self.captioner.generate(embeds, [" | ".join(t.name for t in row) for row in tags])

    @torch.inference_mode()
    def rescore_cached(self, keys: Sequence[str]) -> torch.Tensor:
        """Scores of cached photos from their stored embeddings: the recognition decoder only."""
        with self._amp():
            return rescore(self.model, self.cache, keys, self._active_tensor())

    def _active_tensor(self) -> torch.Tensor:
        return self.classes if self.classes is not None else torch.arange(len(self.active), device=self.device)

    def decide(self, scores: torch.Tensor) -> list[list[TagScore]]:
        """Scores -> emitted tags per image: score > threshold (strict), sorted by score, top-k."""
        labels = self.model.labels
        keep = emitted(scores, self._class_thresholds)
        out = []
        for row, mask in zip(scores, keep):
            idx = mask.nonzero().flatten().tolist()
            idx.sort(key=lambda j: -float(row[j]))
            if self.top_k is not None:
                idx = idx[: self.top_k]
            out.append([TagScore(labels.names[self.active[j]], labels.names_zh[self.active[j]], float(row[j])) for j in idx])
        return out

    def full_scores(self, scores: torch.Tensor) -> np.ndarray:
        """Active-class scores placed into a (B, all classes) matrix; inactive classes score 0."""
        out = np.zeros((scores.shape[0], len(self.model.labels)), dtype=np.float32)
        out[:, self.active] = scores.numpy()
        return out


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
    return decode


def default_workers() -> int:
    """Decode workers: all cores (max 8) with a GPU, where decoding is the bottleneck; on the
    CPU at most 2 (never every core): decoding a photo costs a small fraction of the Swin-L
    forward there (docs/performance.md), so more workers would only take cores from the model."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(8, cores) if torch.cuda.is_available() else max(0, min(2, cores - 1))


def default_batch_size(device: torch.device) -> int:
    return 64 if device.type == "cuda" else 4


def iter_batches(paths: list[Path], tagger: Tagger, batch_size: int, workers: int,
                 skip: Callable[[Item], bool] | None = None, decode: str = "workers",
                 ) -> Iterator[tuple[Batch, torch.Tensor, torch.Tensor | None]]:
    """(batch, scores of its decoded photos, their image embeddings or None) in input order.

    `skip(item)` may drop decoded photos before the model runs (e.g. a moved photo the index
    already knows); their pixels are removed from the batch. `decode` (see `resolve_decode`):
    "workers" decodes everything in the worker processes (Pillow; JPEG draft mode only when they
    feed a GPU), "draft" likewise always in draft mode, "device" leaves plain JPEGs to the
    model's device (nvJPEG on CUDA). Sizes and interpolation are the model's data config.
    """
    feeds_gpu = tagger.device.type == "cuda"
    interpolation = tagger.model.pretrained_cfg["interpolation"]
    loader = make_loader(paths, tagger.image_size, batch_size, workers=workers, pin_memory=feeds_gpu,
                         draft=decode == "draft" or feeds_gpu, defer_jpeg=decode == "device",
                         interpolation=interpolation)
    for batch in loader:
        if skip is not None and batch.items:
            keep = [i for i, item in enumerate(batch.items) if not skip(item)]
            if len(keep) != len(batch.items):
                batch = batch.select(keep)
        if batch.deferred:
            batch = decode_deferred(batch, tagger.image_size, tagger.device, interpolation)
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
    the same device, precision and decode defaults as `ramcli tag`, so the scores match."""
    dev = resolve_device(device)
    tagger = Tagger(model, dev, resolve_precision(dev, precision))
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
