"""PyTorch's paths: fp32, bf16 and fp16 under autocast, and int8 (dynamic quantisation of the
Linear layers). auto checks bf16 where the CPU computes it natively and int8 where PyTorch has
quantised CPU kernels; fp16 is for GPUs (MPS's autocast supports it on every macOS)."""

from __future__ import annotations

import warnings

from ramcli.tagging.runtimes import PrecisionPath, itself, register


def _native_bf16(model) -> bool:
    from ramcli.tagging.cpu_features import native_bf16

    return native_bf16()


def _has_int8_kernels(model) -> bool:
    from ramcli.tagging.cpu_features import int8_engine

    return int8_engine() is not None


def quantize_int8(model):
    """A copy of `model` whose Linear layers (backbone and decoder) run dynamic int8: weights
    quantised per output channel once, activations per batch. Attention products, norms and the
    RAM++ description reweighting stay fp32."""
    import torch
    from torch import nn
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    from ramcli.tagging.cpu_features import int8_engine

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


GPU_AND_CPU = ("cpu", "cuda", "mps")

register(PrecisionPath("fp32", "pytorch", "exact float32", itself, GPU_AND_CPU))
register(PrecisionPath("bf16", "pytorch", "bfloat16 autocast", itself, GPU_AND_CPU, autocast="bfloat16",
                       checked=_native_bf16))
register(PrecisionPath("fp16", "pytorch", "float16 autocast (GPUs)", itself, GPU_AND_CPU, autocast="float16"))
register(PrecisionPath("int8", "pytorch", "dynamic int8 Linear layers", lambda model: quantize_int8(model),
                       checked=_has_int8_kernels))
