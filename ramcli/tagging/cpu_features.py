"""What this CPU offers the model: its instruction-set flags, whether PyTorch computes bf16 and int8
natively on it, and its identity, under which `--precision auto`'s decisions are cached."""

from __future__ import annotations

import platform
from pathlib import Path

import torch


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


def bf16_instructions(flags: set[str] | None = None) -> bool:
    """bf16 matmuls in hardware: AVX512-BF16, AMX-BF16, Arm BF16 (what OpenVINO's kernels use)."""
    flags = cpu_flags() if flags is None else flags
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def native_bf16(flags: set[str] | None = None) -> bool:
    """bf16 matmuls in hardware, and PyTorch using them: an `ATEN_CPU_CAPABILITY=avx2` process
    runs bf16 through emulation even on such a CPU."""
    flags = cpu_flags() if flags is None else flags
    if platform.machine().lower() in ("aarch64", "arm64"):
        return bf16_instructions(flags)
    return bf16_instructions(flags) and torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def int8_engine() -> str | None:
    """The quantized-kernel backend for dynamic int8 Linear layers, or None."""
    engines = torch.backends.quantized.supported_engines
    for name in ("x86", "fbgemm", "qnnpack"):
        if name in engines:
            return name
    return None


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
