"""OpenVINO's paths for a tagging graph on OpenVINO (`ramcli.models.openvino_runtime`), each one
compiled copy of the graph (`OpenVinoModel.at`):

  fp32          OpenVINO's f32 inference precision. Its CPU plugin runs *bf16* by default on
                CPUs with AMX or AVX512-BF16, so fp32 is asked for explicitly.
  bf16          the bf16 inference-precision hint (native on AMX and AVX512-BF16).
  int8          NNCF post-training static quantisation (weights and activations), calibrated on
                the first batch of photos the model sees: the user's own library.
  int8-weights  NNCF `compress_weights`: int8 weights, activations in the default precision.
  int8-encoder  int8 weights in the image encoder only; the recognition decoder (from the image
                projection to the logits) keeps its float weights, and the graph computes in
                bf16 where the CPU has it natively. On trained models the decoder is where int8
                weights flip tags, the encoder where the time goes.

auto checks bf16 (where it is native, or on an Intel GPU/NPU) and int8-encoder. Static int8 and
int8 weights everywhere flip more than 1% of a trained model's tags (docs/performance.md): they
run when asked for, never by auto.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings

from ramcli.tagging.runtimes import PrecisionPath, always, register


def compiled(name: str, hint: str | None = None, transform=None):
    """Build: the model's graph compiled with OpenVINO's inference-precision `hint` (None: the
    plugin's default, bf16 on CPUs with native bf16, else f32), after `transform(model,
    calibration)` has rewritten it."""
    return lambda model: model.at(name, hint=hint, transform=transform)


def _native_bf16(model) -> bool:
    from ramcli.tagging.cpu_features import bf16_instructions

    return model.device_name != "CPU" or bf16_instructions()


def decoder_ops(graph) -> list[str]:
    """The names of the operations from the image projection to the logits: the recognition
    decoder, the label side and the final projection. The image projection is the first matmul
    of the mean-pooled token concatenated with the image tokens (`RecognitionModel.encode_image`)."""
    from ramcli.errors import CheckpointError

    ops = list(graph.get_ordered_ops())
    start = next((i for i, op in enumerate(ops) if op.get_type_name() == "MatMul"
                  and op.input_value(0).get_node().get_type_name() == "Concat"), None)
    if start is None:
        raise CheckpointError("cannot find the image projection in this graph to keep the decoder in float")
    return [op.get_friendly_name() for op in ops[start:] if op.get_type_name() not in ("Constant", "Parameter", "Result")]


def int8_weights(graph, keep_decoder: bool = False):
    """A copy of `graph` with int8 weights (NNCF `compress_weights`), the decoder's kept float
    if `keep_decoder`."""
    nncf = _nncf()
    keep = decoder_ops(graph) if keep_decoder else []
    with quiet():
        return nncf.compress_weights(graph.clone(), ignored_scope=nncf.IgnoredScope(names=keep, validate=False))


def _nncf():
    from ramcli.errors import UsageError
    from ramcli.models.openvino_runtime import INSTALL

    try:
        import nncf
    except ImportError:
        raise UsageError(INSTALL) from None
    nncf.set_log_level(logging.ERROR)
    return nncf


@contextlib.contextmanager
def quiet():
    """NNCF draws progress bars and tables on stdout, where ramcli's results go."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def quantized_graph(model, calibration):
    """The statically quantised graph (NNCF, transformer preset: int8 matmuls, softmax and norms
    left in float), calibrated on `calibration` (the first photos this model scores), cached
    beside the fp32 IR: the first library's photos calibrate it, later runs reuse it."""
    from ramcli.config import home
    from ramcli.models.openvino_runtime import cache_key, save_ir

    nncf = _nncf()
    dst = model.path.with_name(f"{model.path.stem}-int8.xml")
    if not model.path.is_relative_to(home().cache):  # a user's IR: the int8 copy goes to the cache
        dst = home().cache / "openvino" / f"{cache_key(model.path, model.labels)}-int8.xml"
    if dst.is_file() and dst.with_suffix(".bin").is_file():
        return model.core.read_model(str(dst))
    samples = [calibration[i: i + 1] for i in range(calibration.shape[0])]
    with quiet():
        graph = nncf.quantize(model.graph, nncf.Dataset(samples), model_type=nncf.ModelType.TRANSFORMER,
                              subset_size=len(samples))
    save_ir(graph, {}, dst)
    return graph


register(PrecisionPath("fp32", "openvino", "OpenVINO f32", compiled("fp32", "f32")))
register(PrecisionPath("bf16", "openvino", "OpenVINO bf16", compiled("bf16", "bf16"), checked=_native_bf16))
register(PrecisionPath("int8", "openvino", "NNCF static int8, calibrated on the first photos",
                       compiled("int8", transform=quantized_graph)))
register(PrecisionPath("int8-weights", "openvino", "NNCF int8 weights everywhere",
                       compiled("int8-weights", transform=lambda model, _: int8_weights(model.graph))))
register(PrecisionPath("int8-encoder", "openvino", "NNCF int8 weights in the image encoder, the decoder float",
                       compiled("int8-encoder", transform=lambda model, _: int8_weights(model.graph, keep_decoder=True)),
                       checked=always))
