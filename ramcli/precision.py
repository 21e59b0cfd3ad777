"""Which arithmetic the model runs in: fp32, bf16, fp16 or int8, and the CPU's self-check.

Reduced precision moves scores a little. Whether that flips tags depends on the weights (a
trained model's scores are spread out; random weights put many right at a threshold), and
whether it is faster depends on the CPU (bf16 without native bf16 instructions is slower than
fp32). So on the CPU `--precision auto` does not guess: `PrecisionCheck` scores the first
photos of a run in fp32 *and* in each fast path this CPU supports, and `decide` keeps the
fastest path whose tags agree with fp32's on >= 99% and that is really faster here. The run
keeps the fp32 scores of those photos, so the check costs only the fast paths' time, and the
decision is cached per (model file, CPU) in RAMCLI_HOME so later runs skip it.

An exported fp32 ONNX file has one fast path, ONNX Runtime's int8 copy of it, checked the same
way against ONNX Runtime fp32.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import platform
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ramcli.config import home
from ramcli.decision import emitted
from ramcli.fileio import atomic_write

#: Share of fp32's emitted tags a fast path must reproduce (tags emitted by both / by either).
MIN_AGREEMENT = 0.99
#: A fast path must beat fp32 by this factor on the check photos: less is timing noise.
MIN_SPEEDUP = 1.15
DEFAULT_CHECK_PHOTOS = 8


# ---------------------------------------------------------------------------- what this CPU has
def cpu_flags() -> set[str]:
    """Instruction-set flags from /proc/cpuinfo (x86 'flags', ARM 'Features'); empty elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "CPU part"):
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def native_bf16(flags: set[str] | None = None) -> bool:
    """bf16 matmuls in hardware (AVX512-BF16, AMX-BF16, Arm BF16), and PyTorch using them: an
    `ATEN_CPU_CAPABILITY=avx2` process runs bf16 through emulation even on such a CPU."""
    flags = cpu_flags() if flags is None else flags
    if platform.machine().lower() in ("aarch64", "arm64"):
        return "bf16" in flags
    capability = torch.backends.cpu.get_cpu_capability()
    return bool(flags & {"avx512_bf16", "amx_bf16"}) and capability.startswith("AVX512")


def int8_engine() -> str | None:
    """The quantized-kernel backend for dynamic int8 Linear layers, or None."""
    engines = torch.backends.quantized.supported_engines
    for name in ("x86", "fbgemm", "qnnpack"):
        if name in engines:
            return name
    return None


def _exported(model: nn.Module | None) -> bool:
    return getattr(model, "fixed_precision", None) is not None


def fast_paths(model: nn.Module | None = None) -> list[str]:
    """The CPU fast paths worth checking for `model` on this machine, fastest-first by
    expectation. An fp32 ONNX file has ONNX Runtime's int8; an int8 one none."""
    if _exported(model):
        return ["int8"] if model.fixed_precision == "fp32" else []
    paths = []
    if native_bf16():
        paths.append("bf16")
    if int8_engine() is not None:
        paths.append("int8")
    return paths


def cpu_identity(onnx: bool = False) -> str:
    """What a cached decision depends on besides the weights: the CPU, the kernels PyTorch (or
    ONNX Runtime, for an ONNX file) picks for it (capability, version) and the threads it runs on."""
    flags = sorted(f for f in cpu_flags() if f.startswith(("avx", "amx", "fma", "bf16", "i8mm", "sve", "asimd")))
    parts = [cpu_name(), platform.machine(), torch.__version__, torch.backends.cpu.get_cpu_capability(),
             str(torch.get_num_threads()), " ".join(flags)]
    if onnx:
        import onnxruntime

        parts.append(f"onnxruntime {onnxruntime.__version__}")
    return "|".join(parts)


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
def quantize_int8(model: nn.Module) -> nn.Module:
    """A copy of `model` whose Linear layers (backbone and decoder) run dynamic int8: weights
    quantised per output channel once, activations per batch. Attention products, norms and the
    RAM++ description reweighting stay fp32. An ONNX model gives its ONNX Runtime int8 copy."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    if _exported(model):
        return model.quantized()
    engine = int8_engine()
    if engine is None:
        raise RuntimeError("this PyTorch build has no quantized CPU kernels")
    torch.backends.quantized.engine = engine
    with torch.no_grad(), warnings.catch_warnings():
        # torch.ao's eager quantisation is marked deprecated in favour of torchao; it is still the
        # one with fast x86/ARM int8 kernels for eager CPU inference (docs/performance.md)
        warnings.filterwarnings("ignore", message=".*quantize_per_", category=UserWarning)
        warnings.filterwarnings("ignore", message="torch.ao.quantization is deprecated", category=DeprecationWarning)
        return quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)


AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": None}


@dataclass
class Arithmetic:
    """One way to run the model: the module (the model, or its int8 copy) and the autocast dtype."""

    name: str
    module: nn.Module
    device_type: str = "cpu"

    @classmethod
    def build(cls, name: str, model: nn.Module, device: torch.device) -> Arithmetic:
        module = quantize_int8(model) if name == "int8" else model
        return cls(name, module.eval(), device.type)

    def context(self):
        dtype = AUTOCAST[self.name]
        return torch.autocast(self.device_type, dtype=dtype) if dtype is not None else contextlib.nullcontext()

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
           min_speedup: float | None = None) -> Decision:
    """The policy, in one place: the fastest path that agrees >= MIN_AGREEMENT with fp32 and is
    >= MIN_SPEEDUP x faster than fp32 on these photos; otherwise fp32, saying why."""
    min_agreement = MIN_AGREEMENT if min_agreement is None else min_agreement
    min_speedup = MIN_SPEEDUP if min_speedup is None else min_speedup
    fp32 = next(m for m in measured if m.name == "fp32")
    eligible, rejected = [], []
    for m in measured:
        if m is fp32:
            continue
        speedup = fp32.seconds_per_photo / m.seconds_per_photo if m.seconds_per_photo > 0 else 0.0
        if m.agreement < min_agreement:
            rejected.append(f"{m.name} agrees {100 * m.agreement:.1f}% < {100 * min_agreement:.0f}%")
        elif speedup < min_speedup:
            rejected.append(f"{m.name} only {speedup:.2f}x fp32 here")
        else:
            eligible.append((speedup, m))
    if eligible:
        speedup, best = max(eligible, key=lambda e: e[0])
        reason = (f"{speedup:.2f}x fp32, tags agree {100 * best.agreement:.1f}% on {photos} photos")
        if rejected:
            reason += "; " + "; ".join(rejected)
        return Decision(best.name, reason, photos, measured)
    if not rejected:
        return Decision("fp32", "no fast path on this CPU", photos, measured)
    return Decision("fp32", "kept exact fp32: " + "; ".join(rejected), photos, measured)


class DecisionCache:
    """Decisions per (model file, CPU) in RAMCLI_HOME/cache/precision.json."""

    def __init__(self, path: Path | None = None):
        self.path = path or home().cache / "precision.json"

    @staticmethod
    def key(model_path: Path) -> str:
        onnx = Path(model_path).suffix.lower() == ".onnx"
        return hashlib.sha256(f"{model_fingerprint(model_path)}|{cpu_identity(onnx)}".encode()).hexdigest()[:32]

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
        return decision if decision.precision in ("fp32", *(fast_paths() if paths is None else paths)) else None

    def put(self, key: str, decision: Decision) -> None:
        data = self._read()
        data[key] = decision.to_json() | {"cached": False}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, json.dumps(data, indent=1).encode("utf-8"))


# ---------------------------------------------------------------------------- the check
class PrecisionCheck:
    """Scores the run's first photos with every candidate path beside fp32 and decides.

    `observe` takes each batch's pixels with the fp32 logits the run computed and the time that
    took; the candidates score the same pixels. A path's first batch is a warm-up (lazy weight
    reads, kernel setup) and is not timed when later batches exist.
    """

    def __init__(self, candidates: list[Arithmetic], thresholds: torch.Tensor, photos: int = DEFAULT_CHECK_PHOTOS):
        self.candidates = candidates
        self.thresholds = thresholds
        self.photos = photos
        self.seen = 0
        self._times: dict[str, list[tuple[float, int]]] = {"fp32": []}
        self._counts = {c.name: [0, 0, 0.0] for c in candidates}  # both, either, max change
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
        ref_tags = emitted(ref, self.thresholds)
        self._times["fp32"].append((fp32_seconds, n))
        for c in self.candidates:
            t0 = time.perf_counter()
            with torch.inference_mode():
                scores = torch.sigmoid(c(x, classes)).cpu()
            self._times[c.name].append((time.perf_counter() - t0, n))
            tags = emitted(scores, self.thresholds)
            counts = self._counts[c.name]
            counts[0] += int((tags & ref_tags).sum())
            counts[1] += int((tags | ref_tags).sum())
            counts[2] = max(counts[2], float((scores - ref).abs().max()) if n else 0.0)
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
            both, either, change = self._counts[c.name]
            measured.append(Measured(c.name, self._seconds_per_photo(c.name, c),
                                     both / either if either else 1.0, change, either - both))
        return decide(measured, self.seen)
