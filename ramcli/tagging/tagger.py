"""`Tagger`: a model ready to tag, on its device with its precision, its active classes and the
decision rule.

Disabled, excluded and Tag2Text's deleted tags are removed from the label queries, so they cost
nothing; thresholds are per class unless `threshold` overrides them all (both policies:
`ramcli.tagging.decision.class_policy`); the rule itself (sigmoid(logit) > threshold, strict,
as the official code) is `ramcli.tagging.decision.emitted`.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ramcli.errors import UsageError
from ramcli.media.decode import normalize
from ramcli.models import RecognitionModel
from ramcli.tagging import runtimes
from ramcli.tagging.decision import class_policy, emitted
from ramcli.tagging.embed_cache import EmbeddingCache, rescore
from ramcli.tagging.precision import (
    DEFAULT_CHECK_PHOTOS,
    Arithmetic,
    Decision,
    DecisionCache,
    PrecisionCheck,
    one_line,
    runtime_identity,
)
from ramcli.tagging.records import TagScore


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
        self._choose_path()

    # ------------------------------------------------------------------ precision
    def _use(self, path: Arithmetic) -> None:
        self._path = path
        self._forward: Callable = path.module
        if self.compile and self._check is None:
            self._forward = torch.compile(path.module, dynamic=False)

    def _choose_path(self) -> None:
        """Run the path `precision` names on the model's runtime (`ramcli.tagging.runtimes`), or
        with auto check the fast paths it has against fp32. A graph converted for another runtime
        (ONNX Runtime, OpenVINO) runs there, gives logits only and is optimised by its runtime."""
        offered = runtimes.offered(self.model)
        if runtimes.runtime_of(self.model) != "pytorch":
            if self.device.type != "cpu":
                raise UsageError(self.model.device_advice)
            if self.captioner is not None or self.cache is not None:
                raise UsageError(self.model.logits_only)
            self.compile = False
        if self.precision not in ("auto", *offered):
            raise UsageError(f"this {getattr(self.model, 'kind', 'model')} runs --precision "
                             f"{', '.join(('auto', *offered))}; not {self.precision}")
        if self.precision != "auto":
            return self._use(Arithmetic.build(self.precision, self.model, self.device))
        if "fp32" not in offered:  # an int8 ONNX file: its own arithmetic is the reference
            self._use(Arithmetic.build(offered[0], self.model, self.device))
            self.decision = Decision(offered[0], f"this {self.model.kind} runs in the arithmetic it was exported with")
            if self.on_decision is not None:
                self.on_decision(self.decision)
            return
        self._start_check()

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
        candidates = runtimes.fast_paths(self.model)
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
