"""ONNX Runtime's paths for an exported `.onnx` (`ramcli.models.onnx`): the arithmetic the file
was exported in, and from an fp32 file its int8 copy (ONNX Runtime's dynamic quantisation, made
once into RAMCLI_HOME), which auto checks."""

from __future__ import annotations

from ramcli.tagging.runtimes import PrecisionPath, itself, register


def _exported_in(name: str):
    return lambda model: model.fixed_precision == name


register(PrecisionPath("fp32", "onnxruntime", "the fp32 file as exported", itself, offered=_exported_in("fp32")))
register(PrecisionPath("int8", "onnxruntime", "the int8 file, or an fp32 file's int8 copy",
                       lambda model: model.quantized(),
                       checked=_exported_in("fp32")))
