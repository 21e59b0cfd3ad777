"""The tagging graph (pixels -> logits) on OpenVINO, Intel's inference runtime for CPUs (AVX2,
AVX-512, AMX; ARM too) and Intel GPUs and NPUs.

The graph is `RecognitionModel.forward` with the label queries (the vocabulary's custom tags
included) as constants, converted once into OpenVINO's IR (`.xml` + `.bin`): by `ramcli models
convert SRC DST.xml`, or on the first `ramcli tag --runtime openvino` into RAMCLI_HOME/cache/openvino,
keyed by what the graph is made of (see `cache_key`). The ramcli metadata (architecture, label
system, model id, data config) travels in the IR's `rt_info`, as it does in an ONNX file's
`metadata_props`, so `--weights model.xml` needs nothing else.

Arithmetic, one compiled copy each (`OpenVinoModel.at`):
  fp32   OpenVINO's f32 inference precision. Its CPU plugin runs *bf16* by default on CPUs with
         AMX or AVX512-BF16, so fp32 is asked for explicitly.
  bf16   the bf16 inference-precision hint (native on AMX and AVX512-BF16).
  int8   NNCF post-training static quantisation (weights and activations), calibrated on the
         first batch of photos the model sees: the user's own library.
  int8-weights  NNCF `compress_weights`: int8 weights, activations in the default precision.
  int8-encoder  int8 weights in the image encoder only; the recognition decoder (from the image
         projection to the logits) keeps its float weights, and the graph computes in bf16 where
         the CPU has it natively. On trained models the decoder is where int8 weights flip
         tags, the encoder where the time goes (docs/performance.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ramcli.config import home
from ramcli.errors import CheckpointError, UsageError
from ramcli.fileio import atomic_output
from ramcli.hashing import file_sha256
from ramcli.models.labels import LabelSet, resolve_labels
from ramcli.models.converted import converted_arch
from ramcli.models.fixed_graph import FixedGraph
from ramcli.models.scratch import private_folder

INSTALL = "the OpenVINO runtime is not installed: pip install 'ramcli[openvino]'"
FORMAT = "ramcli-openvino-tagger"
PRECISIONS = ("fp32", "bf16", "int8", "int8-weights", "int8-encoder")
#: OpenVINO's name of each arithmetic's inference precision hint (None: the plugin's default,
#: which is bf16 on CPUs with native bf16 and f32 elsewhere)
HINTS = {"fp32": "f32", "bf16": "bf16", "int8": None, "int8-weights": None, "int8-encoder": None}


def require():
    """The `openvino` module, or a UsageError that says how to install it."""
    try:
        import openvino
    except ImportError:
        raise UsageError(INSTALL) from None
    return openvino


def is_ir(path: Path) -> bool:
    return Path(path).suffix.lower() == ".xml"


def device_name(device: str) -> str:
    """--device for OpenVINO: auto and cpu are its CPU; gpu, gpu.1, npu... its own device names."""
    name = device.strip().upper()
    return "CPU" if name in ("AUTO", "") else name


# ---------------------------------------------------------------------------- files
def companions(path: Path) -> list[Path]:
    """The files a model file's weights live in besides itself: an IR's `.bin`, an ONNX file's
    external data files (named in its graph)."""
    path = Path(path)
    if is_ir(path):
        return [path.with_suffix(".bin")]
    if path.suffix.lower() == ".onnx":
        import onnx

        try:
            proto = onnx.load(str(path), load_external_data=False)
        except Exception as exc:  # protobuf's DecodeError and friends
            raise CheckpointError(f"cannot read {path.name}: not a valid ONNX file ({type(exc).__name__})") from None
        names = {entry.value for t in proto.graph.initializer for entry in t.external_data if entry.key == "location"}
        return [path.parent / n for n in sorted(names) if (path.parent / n).is_file()]
    return []


def cache_key(source: Path, labels: LabelSet, precision: str = "fp32") -> str:
    """What a converted graph is made of: the model file and its external weights, the label
    system (custom tags are baked in), the arithmetic and the OpenVINO version."""
    ov = require()
    parts = [file_sha256(p) for p in (Path(source), *companions(source))]
    parts += [labels.checksum(), precision, ov.__version__, FORMAT]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


def metadata(model: nn.Module, source: str = "", vocab_version: str = "builtin") -> dict[str, str]:
    from ramcli.models.onnx import data_config

    return {"format": FORMAT, "arch": model.arch.to_json(), "model_id": f"{model.model_id}+openvino",
            "source": source, "vocab_version": vocab_version, "data_config": json.dumps(data_config(model.arch)),
            "labels_checksum": model.labels.checksum(), **model.labels.to_metadata()}


def convert_graph(model: nn.Module):
    """An `openvino.Model` of `model`'s tagging graph: a PyTorch model traced, an ONNX model read."""
    ov = require()
    size = model.arch.image_size
    if getattr(model, "path", None) is not None and Path(model.path).suffix.lower() == ".onnx":
        graph = ov.convert_model(str(model.path))
    else:
        # torch.export, not the TorchScript tracer: the traced Swin gives NaN in bf16
        batch = torch.export.Dim("batch", min=1, max=4096)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.export.export(model.float().eval(), (torch.zeros(2, 3, size, size),),
                                          dynamic_shapes=({0: batch},))
            graph = ov.convert_model(program)
    graph.inputs[0].get_tensor().set_names({"pixels"})
    graph.outputs[0].get_tensor().set_names({"logits"})
    return graph


def save_ir(graph, meta: dict[str, str], dst: Path) -> Path:
    """Write `graph` with ramcli's metadata as DST (.xml) and its .bin: made in a private folder
    in RAMCLI_HOME, then each file moved in atomically (.bin first), so a reader never sees half
    of one and a link at DST is replaced, never followed."""
    ov = require()
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    for key, value in meta.items():
        graph.set_rt_info(value, ["ramcli", key])
    with private_folder("openvino-ir") as work:
        ov.save_model(graph, str(work / "model.xml"), compress_to_fp16=False)
        for name, target in (("model.bin", dst.with_suffix(".bin")), ("model.xml", dst)):
            with atomic_output(target) as tmp:
                shutil.move(work / name, tmp)
    return dst


def export_ir(model: nn.Module, dst: Path, source: str = "", vocab_version: str = "builtin") -> Path:
    """`ramcli models convert SRC DST.xml`: the tagging graph as an OpenVINO IR (fp32 weights)."""
    if model.labels is None:
        raise CheckpointError("cannot export without the label system (pass --labels DIR)")
    return save_ir(convert_graph(model), metadata(model, source, vocab_version), dst)


def cached_ir(model: nn.Module, source: Path, vocab_version: str = "builtin", on_convert=None) -> Path:
    """The IR of `model` (loaded from `source`, its vocabulary applied) in RAMCLI_HOME's cache,
    converted on first use (a Swin-L takes minutes) under a key of its content."""
    folder = home().cache / "openvino"
    dst = folder / f"{cache_key(source, model.labels)}.xml"
    if not (dst.is_file() and dst.with_suffix(".bin").is_file()):
        if on_convert is not None:
            on_convert()
        export_ir(model, dst, source=Path(source).name, vocab_version=vocab_version)
    return dst


# ---------------------------------------------------------------------------- the model
class OpenVinoModel(FixedGraph):
    """A tagging graph compiled by OpenVINO in one arithmetic, with the `RecognitionModel` surface
    the pipeline uses: `arch`, `labels`, `model_id`, `num_classes` and `forward(x, classes)`."""

    kind = "OpenVINO model"
    remake = "`ramcli models convert SRC DST.xml`"

    runtime = "openvino"

    def __init__(self, path: Path, labels_dir: Path | None = None, device: str = "CPU",
                 precision: str = "fp32", threads: int | None = None):
        super().__init__()
        ov = require()
        self.path, self.device_name, self.precision = Path(path), device_name(device), precision
        self._labels_dir, self._threads, self._compiled = labels_dir, threads, None
        self.core = ov.Core()
        try:
            self.graph = self.core.read_model(str(self.path))
            info = self.graph.get_rt_info()["ramcli"] if self.graph.has_rt_info(["ramcli"]) else {}
            meta = {str(key): value.astype(str) for key, value in dict(info).items()}
        except Exception as exc:  # OpenVINO's own parse errors
            raise CheckpointError(f"cannot read {self.path.name}: not a valid OpenVINO model "
                                  f"({str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__})") from None
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"{self.path.name} is not a ramcli tagger "
                                  "(convert one with `ramcli models convert SRC DST.xml`)")
        self.arch = converted_arch(meta, self.path.name)
        try:
            embedded = LabelSet.from_metadata(meta)
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{self.path.name}: damaged ramcli metadata ({type(exc).__name__})") from None
        self.labels = resolve_labels(self.arch.family, labels_dir=labels_dir, embedded=embedded)
        self.model_id = meta.get("model_id", self.path.stem)
        self.vocab_version = meta.get("vocab_version", "builtin")
        classes = self.graph.outputs[0].get_partial_shape()[-1]
        if self.labels is None or (classes.is_static and classes.get_length() != len(self.labels)):
            raise CheckpointError(f"{self.path.name}: the label system does not match the graph's outputs")
        if precision not in PRECISIONS:
            raise UsageError(f"OpenVINO runs {', '.join(PRECISIONS)}; not {precision!r}")
        # no CACHE_DIR (OpenVINO's compiled-model cache): it saves about a second per start
        # (docs/performance.md), and a bf16 Swin-L imported from it crashed (segfault) on an AMX
        # CPU with OpenVINO 2026.4; retested only on small models, where it ran

    def fast_paths(self) -> list[str]:
        """The arithmetics worth checking against fp32 on this device: bf16 where the CPU computes
        it natively (or a GPU), and int8 weights in the image encoder. Static int8 and int8 weights
        everywhere flip more than 1% of a trained model's tags (docs/performance.md): they run
        when asked for, never by auto."""
        from ramcli.tagging.cpu_features import cpu_flags

        native = self.device_name != "CPU" or bool(cpu_flags() & {"avx512_bf16", "amx_bf16", "bf16"})
        return (["bf16"] if native else []) + ["int8-encoder"]

    def at(self, precision: str) -> OpenVinoModel:
        """This graph in another arithmetic (compiled on first use)."""
        if precision == self.precision:
            return self
        copy = OpenVinoModel(self.path, self._labels_dir, self.device_name, precision, self._threads)
        copy.model_id = self.model_id
        return copy

    def _compile(self, calibration: np.ndarray):
        graph = self.graph
        if self.precision in ("int8-weights", "int8-encoder"):
            graph = int8_weights(graph, keep_decoder=self.precision == "int8-encoder")
        elif self.precision == "int8":
            graph = quantized_graph(self, calibration)
        config = {"PERFORMANCE_HINT": "LATENCY"}
        if self.device_name == "CPU":
            config["INFERENCE_NUM_THREADS"] = self._threads or torch.get_num_threads()
        if HINTS[self.precision] is not None:
            config["INFERENCE_PRECISION_HINT"] = HINTS[self.precision]
        try:
            return self.core.compile_model(graph, self.device_name, config)
        except Exception as exc:
            raise CheckpointError(f"OpenVINO cannot compile {self.path.name} for {self.device_name} "
                                  f"in {self.precision}: {str(exc).splitlines()[0][:200] if str(exc) else ''}") from None

    def run(self, pixels):
        if self._compiled is None:
            self._compiled = self._compile(pixels)
        return self._compiled(pixels)[0]


def decoder_ops(graph) -> list[str]:
    """The names of the operations from the image projection to the logits: the recognition
    decoder, the label side and the final projection. The image projection is the first matmul
    of the mean-pooled token concatenated with the image tokens (`RecognitionModel.encode_image`)."""
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
    with _quiet():
        return nncf.compress_weights(graph.clone(), ignored_scope=nncf.IgnoredScope(names=keep, validate=False))


def _nncf():
    try:
        import nncf
    except ImportError:
        raise UsageError(INSTALL) from None
    nncf.set_log_level(logging.ERROR)
    return nncf


@contextlib.contextmanager
def _quiet():
    """NNCF draws progress bars and tables on stdout, where ramcli's results go."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def quantized_graph(model: OpenVinoModel, calibration: np.ndarray):
    """The statically quantised graph (NNCF, transformer preset: int8 matmuls, softmax and norms
    left in float), calibrated on `calibration` (the first photos this model scores), cached
    beside the fp32 IR: the first library's photos calibrate it, later runs reuse it."""
    nncf = _nncf()
    dst = model.path.with_name(f"{model.path.stem}-int8.xml")
    if not model.path.is_relative_to(home().cache):  # a user's IR: the int8 copy goes to the cache
        dst = home().cache / "openvino" / f"{cache_key(model.path, model.labels)}-int8.xml"
    if dst.is_file() and dst.with_suffix(".bin").is_file():
        return model.core.read_model(str(dst))
    samples = [calibration[i: i + 1] for i in range(calibration.shape[0])]
    with _quiet():
        graph = nncf.quantize(model.graph, nncf.Dataset(samples), model_type=nncf.ModelType.TRANSFORMER,
                              subset_size=len(samples))
    save_ir(graph, {}, dst)
    return graph


def load_ir(path: Path, labels_dir: Path | None = None, device: str = "CPU") -> OpenVinoModel:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    return OpenVinoModel(path, labels_dir, device)


def to_openvino(model: nn.Module, source: Path, device: str = "CPU", vocab_version: str = "builtin",
                on_convert=None) -> OpenVinoModel:
    """`model` (loaded from `source`, its vocabulary applied) on OpenVINO: the cached IR, converted
    on first use (after `on_convert()`, which may say so: a Swin-L takes minutes)."""
    if isinstance(model, OpenVinoModel):  # an .xml: only the device to choose
        return model if model.device_name == device_name(device) else OpenVinoModel(model.path, model._labels_dir, device)
    converted = OpenVinoModel(cached_ir(model, source, vocab_version, on_convert), device=device)
    converted.model_id = model.model_id  # the same weights: the index keeps their tags as they are
    return converted
