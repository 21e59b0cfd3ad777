"""The one tagging pipeline: files -> decode workers -> batches -> model scores -> decisions -> sinks.

`ramcli tag`, `ramcli eval` and `ramcli engine generate` all run through here, so a photo gets the
same scores whichever command looks at it.

- `Tagger` owns the model on its device with its precision, the active classes (disabled,
  excluded and Tag2Text's deleted tags are removed from the label queries, so they cost nothing)
  and the thresholds: per class unless `threshold` overrides them all; the rule itself
  (sigmoid(logit) > threshold, strict, as the official code) is `ramcli.tagging.decision.emitted`.
- `tag_files` streams batches from `ramcli.media.loader` through the Tagger and hands every
  `PhotoResult` to the sinks batch by batch, so a killed run loses at most the batch in flight.
- `score_files` returns the raw score matrix (evaluation, data engine).
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ramcli.tagging.decision import class_policy, emitted
from ramcli.tagging.embed_cache import EmbeddingCache, rescore
from ramcli.errors import UsageError
from ramcli.media.decode import normalize
from ramcli.media.loader import Batch, Item, decode_deferred, make_loader
from ramcli.models import RecognitionModel
from ramcli.tagging.precision import (
    DEFAULT_CHECK_PHOTOS,
    Arithmetic,
    Decision,
    DecisionCache,
    PrecisionCheck,
    fast_paths,
    one_line,
    resolve_precision,
    runtime_identity,
)
from ramcli.tagging.records import PhotoResult, TagScore

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


@dataclass
class Tagger:
    """A model ready to tag: device, precision, active classes and the decision rule.

    `precision` is a name from `resolve_precision`. With "auto" (the CPU) the first
    `check_photos` photos are scored in fp32 and in each fast path this CPU has; the Tagger then
    switches to the decision of `ramcli.tagging.precision.decide` and reports it through `on_decision`.
    It is cached when `cache_key` is given (`DecisionCache.key`: the model file and the CPU),
    under that key extended with the rest of what decides it: the label system and thresholds
    judged at, the active classes, `vocab_version` and the runtime. Auto never makes a run fail:
    a fast path that fails to build, run or be cached falls back to fp32, saying why.
    """

    model: RecognitionModel
    device: torch.device
    precision: str = "fp32"
    threshold: float | None = None
    thresholds: Sequence[float] | None = None
    exclude: Iterable[str] = ()
    top_k: int | None = None
    compile: bool = False
    cache: EmbeddingCache | None = None  # keep image embeddings for decoder-only re-scoring
    captioner: torch.nn.Module | None = None  # Tag2Text's tag-guided caption generator
    check_photos: int = DEFAULT_CHECK_PHOTOS
    cache_key: str | None = None
    vocab_version: str = "builtin"
    on_decision: Callable[[Decision], None] | None = None
    decision: Decision | None = field(init=False, default=None)
    classes: torch.Tensor | None = field(init=False, default=None)
    _class_thresholds: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        if self.model.labels is None:
            raise UsageError("the model has no label system (pass --labels DIR)")
        policy = class_policy(self.model.labels, self.threshold, self.thresholds, self.exclude)
        active = policy.active
        self.classes = None if len(active) == len(self.model.labels) else torch.tensor(active)
        self._class_thresholds = policy.thresholds
        self.active = active  # label indices that are computed, in output order
        self.model = self.model.to(self.device).eval()
        if self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if self.captioner is not None:
            self.captioner = self.captioner.to(self.device).eval()
        if self.classes is not None:
            self.classes = self.classes.to(self.device)
        self._compiled_batch: int | None = None
        self._check: PrecisionCheck | None = None
        self._key: str | None = None
        fixed = getattr(self.model, "fixed_precision", None)
        if getattr(self.model, "runtime", None) == "openvino":
            self._run_openvino()
        elif fixed is not None:
            self._run_exported(fixed)
        elif self.precision == "auto":
            self._start_check()
        else:
            self._use(Arithmetic.build(self.precision, self.model, self.device))

    # ------------------------------------------------------------------ precision
    def _use(self, path: Arithmetic) -> None:
        self._path = path
        self._forward: Callable = path.module
        if self.compile and self._check is None:
            self._forward = torch.compile(path.module, dynamic=False)

    def _run_exported(self, fixed: str) -> None:
        """An exported graph (ONNX) runs on the CPU with ONNX Runtime: in the arithmetic it was
        exported with, or, from an fp32 file, in int8 (its quantised copy), which auto checks."""
        if self.device.type != "cpu":
            raise UsageError("ONNX models run on the CPU (ONNX Runtime); use --device cpu or the .pth/.safetensors weights")
        faster = fast_paths(self.model)
        allowed = ("auto", fixed, *faster)
        if self.precision not in allowed:
            raise UsageError(f"this ONNX file computes in {fixed}; it runs with --precision "
                             f"{' or '.join(allowed)} (bf16/fp16 need the .pth/.safetensors weights)")
        if self.captioner is not None or self.cache is not None:
            raise UsageError("an ONNX model gives logits only: --caption and --cache-embeddings need the "
                             ".pth/.safetensors weights")
        self.compile = False  # ONNX Runtime optimises the graph itself
        if self.precision == "auto" and faster:
            return self._start_check()
        self._use(Arithmetic.build(fixed if self.precision == "auto" else self.precision, self.model, self.device))
        if self.precision == "auto":
            self.decision = Decision(fixed, "an ONNX file runs in the arithmetic it was exported with")
            if self.on_decision is not None:
                self.on_decision(self.decision)

    def _run_openvino(self) -> None:
        """An OpenVINO graph computes in the arithmetic it was compiled for: fp32, bf16 or int8
        (`ramcli.models.openvino_runtime`), which auto checks like PyTorch's."""
        from ramcli.models.openvino_runtime import PRECISIONS as OPENVINO

        if self.device.type != "cpu":
            raise UsageError("with --runtime openvino, --device names OpenVINO's device (cpu, gpu, npu)")
        if self.precision not in ("auto", *OPENVINO):
            raise UsageError(f"OpenVINO runs --precision auto, {', '.join(OPENVINO)}; not {self.precision}")
        if self.captioner is not None or self.cache is not None:
            raise UsageError("an OpenVINO model gives logits only: --caption and --cache-embeddings need the "
                             "PyTorch runtime")
        self.compile = False  # OpenVINO optimises the graph itself
        if self.precision == "auto":
            return self._start_check()
        self._use(Arithmetic.build(self.precision, self.model, self.device))

    def _judged_thresholds(self) -> list[torch.Tensor]:
        """The thresholds auto compares tags at: the model's own, and the user's as well where
        they decide something (not --threshold 0, where every tag is emitted, nor 1)."""
        own = torch.tensor([self.model.labels.thresholds[i] for i in self.active], dtype=torch.float32)
        user = self._class_thresholds
        decides = not torch.equal(user, own) and bool(((user > 0) & (user < 1)).any())
        return [own, user] if decides else [own]

    def _decision_key(self, judged: list[torch.Tensor]) -> str | None:
        if not self.cache_key:
            return None
        import hashlib

        parts = [self.cache_key, self.model.labels.checksum(), self.vocab_version, runtime_identity(self.model),
                 hashlib.sha256(np.asarray(self.active, dtype=np.int64).tobytes()).hexdigest(),
                 *(hashlib.sha256(t.numpy().tobytes()).hexdigest() for t in judged[1:])]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]

    def _start_check(self) -> None:
        judged = self._judged_thresholds()
        self._key = self._decision_key(judged)
        candidates = fast_paths(self.model)
        cached = DecisionCache().get(self._key, candidates) if self._key else None
        if cached is not None:
            return self._decided(cached)
        if not candidates:
            return self._decided(Decision("fp32", "no fast path on this CPU (no native bf16, no int8 kernels)"))
        if self.check_photos <= 0:
            return self._decided(Decision("fp32", "no fast-path check: too few photos to tag (or 0 check photos)"))
        built, failed = [], {}
        for name in candidates:
            try:
                built.append(Arithmetic.build(name, self.model, self.device))
            except Exception as exc:  # a quantised copy that cannot be made (read-only RAMCLI_HOME...)
                failed[name] = one_line(exc)
        self._check = PrecisionCheck(built, judged, self.check_photos, failed)
        self._use(Arithmetic("fp32", self.model, self.device.type))

    def _decided(self, decision: Decision) -> None:
        check, self._check = self._check, None
        built = {c.name: c for c in check.candidates} if check is not None else {}
        try:
            self._use(built.get(decision.precision) or Arithmetic.build(decision.precision, self.model, self.device))
        except Exception as exc:  # e.g. a damaged cached int8 copy
            return self._fall_back(exc, decision)
        self.decision = decision
        if check is not None and self._key:
            try:
                DecisionCache().put(self._key, decision)
            except OSError as exc:  # a read-only RAMCLI_HOME: decided, but checked again next run
                decision.reason += f" (not cached: {one_line(exc)})"
        if self.on_decision is not None:
            self.on_decision(decision)

    def _fall_back(self, exc: BaseException, failed: Decision) -> None:
        """Auto's chosen fast path failed: exact fp32 from here on, and one line saying why."""
        self._check = None
        self.decision = Decision("fp32", f"fell back to exact fp32: {failed.precision} failed ({one_line(exc)})",
                                 failed.photos, failed.measured)
        self._use(Arithmetic.build("fp32", self.model, self.device))
        if self.on_decision is not None:
            self.on_decision(self.decision)

    @property
    def checking(self) -> bool:
        """True while the first photos are being scored both ways (auto precision on the CPU)."""
        return self._check is not None

    @property
    def image_size(self) -> int:
        return self.model.arch.image_size

    def _amp(self):
        return self._path.context()

    def scores(self, pixels: torch.Tensor, keys: Sequence[str] | None = None) -> torch.Tensor:
        """uint8 (B,3,S,S) -> sigmoid scores (B, active classes), float32 on the CPU."""
        return self.forward_batch(pixels, keys)[0]

    @torch.inference_mode()
    def forward_batch(self, pixels: torch.Tensor, keys: Sequence[str] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(scores, image embeddings or None). Embeddings are computed separately only when they
        are needed afterwards: stored in the embedding cache under `keys`, or for captions."""
        x = self._input(pixels)
        embeds = None
        net = self._path.module
        started = time.perf_counter()
        with self._amp():
            if self.captioner is not None or (self.cache is not None and keys is not None):
                embeds = net.encode_image(x)
                if self.cache is not None and keys is not None:
                    self.cache.put(keys, embeds)
                logits = net.decode(embeds, self.classes)
            else:
                logits = self._logits(x)
        scores = torch.sigmoid(logits.float()).cpu()
        if self._check is not None:
            self._check.observe(x, self.classes, logits, time.perf_counter() - started)
            if self._check.complete:
                self._decided(self._check.decide(self._path))
        return scores, embeds

    def _input(self, pixels: torch.Tensor) -> torch.Tensor:
        x = normalize(pixels.to(self.device, non_blocking=True), self.model.pretrained_cfg)
        return x.contiguous(memory_format=torch.channels_last) if self.device.type == "cuda" else x

    @torch.inference_mode()
    def outputs(self, pixels: torch.Tensor | None = None, keys: Sequence[str] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits of every class, image embeddings) on the model's device: of decoded photos
        `pixels`, or of the cached photos `keys`, from their stored embeddings through the
        recognition decoder only. What a student learns from its teacher (`ramcli distill`)."""
        net = self._path.module
        with self._amp():
            if pixels is not None:
                embeds = net.encode_image(self._input(pixels))
            else:
                embeds = self.cache.get(keys).to(self.device, torch.float32)
            return net.decode(embeds), embeds

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        compiled = self.compile and self._check is None
        if self.precision != "auto" or self._path.name == "fp32":
            return self._compiled_forward(x) if compiled else self._forward(x, self.classes)
        try:  # auto's fast path: a failure (a damaged cached copy) costs speed, never the run
            return self._compiled_forward(x) if compiled else self._forward(x, self.classes)
        except Exception as exc:
            self._fall_back(exc, self.decision or Decision(self._path.name, ""))
            return self._forward(x, self.classes)

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
            self.compile, self._forward = False, self._path.module
            return self._forward(x[:n], self.classes)

    @torch.inference_mode()
    def captions(self, embeds: torch.Tensor, tags: list[list[TagScore]]) -> list[str]:
        """Tag2Text captions guided by each photo's emitted tags (official: joined with ' | ')."""
        with self._amp():
            return self.captioner.generate(embeds, [" | ".join(t.name for t in row) for row in tags])

    @torch.inference_mode()
    def rescore_cached(self, keys: Sequence[str]) -> torch.Tensor:
        """Scores of cached photos from their stored embeddings: the recognition decoder only."""
        with self._amp():
            return rescore(self._path.module, self.cache, keys, self._active_tensor())

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
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
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
