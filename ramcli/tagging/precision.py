"""Which arithmetic the model runs in: fp32, bf16, fp16 or int8, and the CPU's self-check.

Reduced precision moves scores a little. Whether that flips tags depends on the weights (a
trained model's scores are spread out; random weights put many right at a threshold), and
whether it is faster depends on the CPU (bf16 without native bf16 instructions is slower than
fp32). So on the CPU `--precision auto` does not guess: `PrecisionCheck` scores the first
photos of a run in fp32 *and* in each fast path this CPU supports, and `decide` keeps the
fastest path whose tags agree with fp32's on >= 99%, whose largest score change stays within
MAX_SCORE_CHANGE and that is really faster here. The run keeps the fp32 scores of those photos,
so the check costs only the fast paths' time.

The tags compared are those the model's own thresholds emit (and the user's thresholds as well,
where they decide something): with `--threshold 0` every tag is emitted by both paths, which
would make any arithmetic "agree". The decision is cached in RAMCLI_HOME under everything that
decided it (`DecisionCache.key` and `Tagger`'s part of the key), so later runs skip the check,
and a run with other thresholds never changes what a default run uses.

The paths themselves, and which of them auto checks for a model, are `ramcli.tagging.runtimes`:
an exported fp32 ONNX file has one fast path, ONNX Runtime's int8 copy of it, checked against
ONNX Runtime fp32; an OpenVINO model has its own (bf16, int8 weights), checked against OpenVINO
fp32. The check never makes a run fail: a path that cannot be built or run drops out,
and a chosen path that fails later falls back to fp32 (`Tagger`), each saying why.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ramcli.config import home
from ramcli.errors import UsageError
from ramcli.fileio import atomic_write
from ramcli.tagging import runtimes
from ramcli.tagging.cpu_features import cpu_identity
from ramcli.tagging.decision import emitted


def resolve_precision(device: torch.device, precision: str = "auto") -> str:
    """The arithmetic the Tagger runs: a path's name (`ramcli.tagging.runtimes`), or 'auto' on
    the CPU.

    auto: bf16 on CUDA (fp16 where the GPU has no bf16); fp16 on MPS (its autocast supports
    fp16 on every macOS that has MPS, bf16 only on newer ones); on the CPU the Tagger checks the
    fast paths this CPU has against fp32 on the first photos of the run (`PrecisionCheck`).
    """
    if precision not in runtimes.names():
        raise UsageError(f"unknown precision {precision!r}; use one of {', '.join(runtimes.names())}")
    if precision != "auto" and device.type not in {d for p in runtimes.paths() if p.name == precision for d in p.devices}:
        raise UsageError(f"--precision {precision} runs on the CPU only (use bf16 or fp16 on a GPU)")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "mps":
        return "fp16"
    return "auto"


#: Share of fp32's emitted tags a fast path must reproduce (tags emitted by both / by either).
MIN_AGREEMENT = 0.99
#: Largest |score - fp32 score| a fast path may show on the check photos. A few photos hold only
#: about a hundred emitted tags, so agreement alone cannot see a flip rate of 1%; a path that
#: moves some score by more than this will flip the tags that sit that close to a threshold on
#: later photos. The paths that keep 99% of a trained model's tags move scores well below it, the
#: int8 paths that lose more move some far above it (docs/performance.md).
MAX_SCORE_CHANGE = 0.02
#: A fast path must beat fp32 by this factor on the check photos: less is timing noise.
MIN_SPEEDUP = 1.15
DEFAULT_CHECK_PHOTOS = 8


def runtime_identity(model: nn.Module | None) -> str:
    """The runtime that computes `model` and its version: a cached decision holds for it only."""
    runtime = runtimes.runtime_of(model)
    if runtime == "openvino":
        import openvino

        return f"openvino {openvino.__version__} {model.device_name}"
    return runtime  # onnxruntime's version is part of cpu_identity(onnx=True)


def model_fingerprint(path: Path) -> str:
    """Size, mtime and the first and last MiB of the file: cheap on a 3 GB model, and a rewritten
    or replaced file gets a new fingerprint."""
    st = path.stat()
    h = hashlib.sha256(f"{st.st_size}:{st.st_mtime_ns}".encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, st.st_size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()[:32]


# ---------------------------------------------------------------------------- the paths
@dataclass
class Arithmetic:
    """One way to run the model, built from its path (`ramcli.tagging.runtimes`): the module (the
    model, a quantised copy, a compiled graph) and the dtype PyTorch autocasts to."""

    name: str
    module: nn.Module
    device_type: str = "cpu"
    autocast: str | None = None

    @classmethod
    def build(cls, name: str, model: nn.Module, device: torch.device) -> Arithmetic:
        path = runtimes.lookup(model, name)
        if path is None:
            raise UsageError(f"{runtimes.runtime_of(model)} has no --precision {name} for this model")
        return cls(name, path.build(model).eval(), device.type, path.autocast)

    def context(self):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=getattr(torch, self.autocast))

    def __call__(self, x: torch.Tensor, classes: torch.Tensor | None) -> torch.Tensor:
        with self.context():
            return self.module(x, classes).float()


# ---------------------------------------------------------------------------- the decision
@dataclass
class Measured:
    name: str
    seconds_per_photo: float
    agreement: float  # tags emitted by both / tags emitted by either, vs fp32
    max_change: float  # largest |score - fp32 score|
    differ: int = 0  # tags emitted by only one of the two
    failed: str = ""  # why this path could not be built or run (then it is never picked)


@dataclass
class Decision:
    precision: str
    reason: str
    photos: int = 0
    measured: list[Measured] = field(default_factory=list)
    cached: bool = False

    def describe(self) -> str:
        lines = [f"precision {self.precision}{' (cached check)' if self.cached else ''}: {self.reason}"]
        fp32 = next((m for m in self.measured if m.name == "fp32"), None)
        for m in self.measured:
            if m.failed:
                lines.append(f"  {m.name:5} failed: {m.failed}")
                continue
            speed = f"{1 / m.seconds_per_photo:.2f} img/s" if m.seconds_per_photo > 0 else "-"
            ratio = f" ({fp32.seconds_per_photo / m.seconds_per_photo:.2f}x fp32)" if fp32 and m is not fp32 else ""
            quality = "" if m is fp32 else f", tags agree {100 * m.agreement:.1f}% ({m.differ} differ), max score change {m.max_change:.4f}"
            lines.append(f"  {m.name:5} {speed}{ratio}{quality}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Decision:
        measured = [Measured(**m) for m in data.get("measured", [])]
        return cls(str(data["precision"]), str(data["reason"]), int(data.get("photos", 0)), measured, cached=True)


def decide(measured: list[Measured], photos: int, min_agreement: float | None = None,
           min_speedup: float | None = None, max_change: float | None = None) -> Decision:
    """The policy, in one place: the fastest path that agrees >= MIN_AGREEMENT with fp32, moves
    no score by more than MAX_SCORE_CHANGE and is >= MIN_SPEEDUP x faster than fp32 on these
    photos; otherwise fp32, saying why."""
    min_agreement = MIN_AGREEMENT if min_agreement is None else min_agreement
    min_speedup = MIN_SPEEDUP if min_speedup is None else min_speedup
    max_change = MAX_SCORE_CHANGE if max_change is None else max_change
    fp32 = next(m for m in measured if m.name == "fp32")
    eligible, rejected = [], []
    for m in measured:
        if m is fp32:
            continue
        speedup = fp32.seconds_per_photo / m.seconds_per_photo if m.seconds_per_photo > 0 else 0.0
        if m.failed:
            rejected.append(f"{m.name} failed ({m.failed})")
        elif m.agreement < min_agreement:
            rejected.append(f"{m.name} agrees {100 * m.agreement:.1f}% < {100 * min_agreement:.0f}%")
        elif m.max_change > max_change:
            rejected.append(f"{m.name} moves a score by {m.max_change:.3f} > {max_change}")
        elif speedup < min_speedup:
            rejected.append(f"{m.name} only {speedup:.2f}x fp32 here")
        else:
            eligible.append((speedup, m))
    if eligible:
        speedup, best = max(eligible, key=lambda e: e[0])
        reason = (f"{speedup:.2f}x fp32, tags agree {100 * best.agreement:.1f}% at the model's thresholds, "
                  f"max score change {best.max_change:.4f}, on {photos} photos")
        if rejected:
            reason += "; " + "; ".join(rejected)
        return Decision(best.name, reason, photos, measured)
    if not rejected:
        return Decision("fp32", "no fast path on this CPU", photos, measured)
    return Decision("fp32", "kept exact fp32: " + "; ".join(rejected), photos, measured)


class DecisionCache:
    """Decisions in RAMCLI_HOME/cache/precision.json, per (model file, CPU) here and the rest of
    what decides them (labels, thresholds, vocabulary, runtime) added by the `Tagger`."""

    def __init__(self, path: Path | None = None):
        self.path = path or home().cache / "precision.json"

    @staticmethod
    def key(model_path: Path) -> str:
        """The model's content (with the files its weights live in: an ONNX file's external data,
        an OpenVINO IR's .bin) and the CPU."""
        from ramcli.models.openvino_runtime import companions

        model_path = Path(model_path)
        onnx = model_path.suffix.lower() == ".onnx"
        prints = [model_fingerprint(p) for p in (model_path, *companions(model_path))]
        return hashlib.sha256(f"{'|'.join(prints)}|{cpu_identity(onnx)}".encode()).hexdigest()[:32]

    def _read(self) -> dict:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def get(self, key: str, paths: list[str] | None = None) -> Decision | None:
        """The cached decision, if it names fp32 or one of `paths` (default: this CPU's)."""
        entry = self._read().get(key)
        if not isinstance(entry, dict):
            return None
        try:
            decision = Decision.from_json(entry)
        except (KeyError, TypeError, ValueError):
            return None
        return decision if decision.precision in ("fp32", *(runtimes.fast_paths() if paths is None else paths)) else None

    def put(self, key: str, decision: Decision) -> None:
        data = self._read()
        data[key] = decision.to_json() | {"cached": False}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, json.dumps(data, indent=1).encode("utf-8"))


# ---------------------------------------------------------------------------- the check
class PrecisionCheck:
    """Scores the run's first photos with every candidate path beside fp32 and decides.

    `observe` takes each batch's pixels with the fp32 logits the run computed and the time that
    took; the candidates score the same pixels. Tags are compared at each set of `thresholds`
    (the model's own, and the user's where they decide something) and the worse agreement
    counts. A path's first batch is a warm-up (lazy weight reads, kernel setup, OpenVINO's
    calibration) and is not timed when later batches exist. A candidate that raises drops out
    with its reason (`failed`).
    """

    def __init__(self, candidates: list[Arithmetic], thresholds: list[torch.Tensor],
                 photos: int = DEFAULT_CHECK_PHOTOS, failed: dict[str, str] | None = None):
        self.candidates = candidates
        self.thresholds = thresholds
        self.photos = photos
        self.seen = 0
        self.failed = dict(failed or {})
        self._times: dict[str, list[tuple[float, int]]] = {"fp32": []}
        # per threshold set: tags emitted by both, by either; and the max change
        self._counts = {c.name: ([[0, 0] for _ in thresholds], [0.0]) for c in candidates}
        for c in candidates:
            self._times[c.name] = []
        self._last: tuple[torch.Tensor, torch.Tensor | None] | None = None

    @property
    def complete(self) -> bool:
        return self.seen >= self.photos

    def observe(self, x: torch.Tensor, classes: torch.Tensor | None, fp32_logits: torch.Tensor,
                fp32_seconds: float) -> None:
        n = x.shape[0]
        ref = torch.sigmoid(fp32_logits.float()).cpu()
        ref_tags = [emitted(ref, t) for t in self.thresholds]
        self._times["fp32"].append((fp32_seconds, n))
        for c in [c for c in self.candidates if c.name not in self.failed]:
            t0 = time.perf_counter()
            try:
                with torch.inference_mode():
                    scores = torch.sigmoid(c(x, classes)).cpu()
            except Exception as exc:  # a quantiser or compiler failing on this graph: fp32 stays
                self.failed[c.name] = one_line(exc)
                continue
            self._times[c.name].append((time.perf_counter() - t0, n))
            sets, change = self._counts[c.name]
            for counts, t, ref_t in zip(sets, self.thresholds, ref_tags):
                tags = emitted(scores, t)
                counts[0] += int((tags & ref_t).sum())
                counts[1] += int((tags | ref_t).sum())
            if n:  # a NaN score (a broken kernel) is an unbounded change
                change[0] = max(change[0], float((scores - ref).abs().nan_to_num(nan=float("inf")).max()))
        self.seen += n
        self._last = (x, classes)

    def _seconds_per_photo(self, name: str, run=None) -> float:
        times = self._times[name]
        if len(times) > 1:
            times = times[1:]
        elif run is not None and self._last is not None:  # one batch only: time a second pass
            x, classes = self._last
            t0 = time.perf_counter()
            with torch.inference_mode():
                run(x, classes)
            times = [(time.perf_counter() - t0, x.shape[0])]
        return sum(t for t, _ in times) / max(1, sum(n for _, n in times))

    def decide(self, fp32: Arithmetic) -> Decision:
        measured = [Measured("fp32", self._seconds_per_photo("fp32", fp32), 1.0, 0.0)]
        for c in self.candidates:
            if c.name not in self.failed:
                try:
                    seconds = self._seconds_per_photo(c.name, c)
                except Exception as exc:
                    self.failed[c.name] = one_line(exc)
            if c.name in self.failed:
                measured.append(Measured(c.name, 0.0, 0.0, 0.0, failed=self.failed[c.name]))
                continue
            sets, (change,) = self._counts[c.name]
            agreement, differ = min(((both / either if either else 1.0, either - both) for both, either in sets),
                                    key=lambda a: a[0])
            measured.append(Measured(c.name, seconds, agreement, change, differ))
        for name, why in self.failed.items():  # never built
            if all(m.name != name for m in measured):
                measured.append(Measured(name, 0.0, 0.0, 0.0, failed=why))
        return decide(measured, self.seen)


def one_line(exc: BaseException) -> str:
    """One line about an exception, for a decision line."""
    text = str(exc).splitlines()[0][:160] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
