"""The tagging graph (pixels -> logits) on OpenVINO, Intel's inference runtime for CPUs (AVX2,
AVX-512, AMX; ARM too) and Intel GPUs and NPUs.

The graph is `RecognitionModel.forward` with the label queries (the vocabulary's custom tags
included) as constants, converted once into OpenVINO's IR (`.xml` + `.bin`): by `ramcli models
convert SRC DST.xml`, or on the first `ramcli tag --runtime openvino` into RAMCLI_HOME/cache/openvino,
keyed by what the graph is made of (see `cache_key`). The ramcli metadata (architecture, label
system, model id, data config) travels in the IR's `rt_info`, as it does in an ONNX file's
`metadata_props`, so `--weights model.xml` needs nothing else.

Each arithmetic (fp32, bf16, int8 ...) is one compiled copy of the graph (`OpenVinoModel.at`),
described with the other runtimes' in `ramcli.tagging.runtimes.openvino`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from collections.abc import Callable
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
    device_advice = "with --runtime openvino, --device names OpenVINO's device (cpu, gpu, npu)"

    def __init__(self, path: Path, labels_dir: Path | None = None, device: str = "CPU",
                 precision: str = "fp32", threads: int | None = None, hint: str | None = "f32",
                 transform: Callable | None = None):
        super().__init__()
        ov = require()
        self.path, self.device_name, self.precision = Path(path), device_name(device), precision
        self._labels_dir, self._threads = labels_dir, threads
        self._ready, self._compiled, self._batch = None, None, 0
        self._hint, self._transform = hint, transform
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
        # no CACHE_DIR (OpenVINO's compiled-model cache): it saves under a second per start
        # and keeps another copy of the weights per model, arithmetic and vocabulary
        # (bench/openvino_cache.py)

    def at(self, precision: str, hint: str | None = None, transform: Callable | None = None) -> OpenVinoModel:
        """This graph in another arithmetic, compiled on first use: with OpenVINO's inference
        precision `hint` (None: the plugin's default, which is bf16 on CPUs with native bf16 and
        f32 elsewhere), after `transform(model, calibration)` has rewritten the graph (NNCF's
        int8; calibration: the first pixels it scores). The paths: `ramcli.tagging.runtimes.openvino`."""
        if precision == self.precision:
            return self
        copy = OpenVinoModel(self.path, self._labels_dir, self.device_name, precision, self._threads, hint, transform)
        copy.model_id = self.model_id
        return copy

    def _compile(self, batch: int):
        """The graph compiled for exactly `batch` images. A static shape: OpenVINO's CPU plugin
        runs it far faster than the IR's free batch, since Swin's window masks and position
        biases fold into constants instead of being broadcast at every call."""
        graph = self._ready.clone()
        graph.reshape([batch, 3, self.arch.image_size, self.arch.image_size])
        config = {"PERFORMANCE_HINT": "LATENCY"}
        if self.device_name == "CPU":
            config["INFERENCE_NUM_THREADS"] = self._threads or torch.get_num_threads()
        if self._hint is not None:
            config["INFERENCE_PRECISION_HINT"] = self._hint
        try:
            return self.core.compile_model(graph, self.device_name, config)
        except Exception as exc:
            raise CheckpointError(f"OpenVINO cannot compile {self.path.name} for {self.device_name} "
                                  f"in {self.precision}: {str(exc).splitlines()[0][:200] if str(exc) else ''}") from None

    def run(self, pixels):
        """Logits of `pixels` by the graph compiled for the largest batch seen: a run compiles
        once for its batch size and pads a smaller batch (its last) up to it."""
        n = pixels.shape[0]
        if self._ready is None:  # the first pixels also calibrate a transform (NNCF's int8)
            self._ready = self.graph if self._transform is None else self._transform(self, pixels)
        if n > self._batch:
            self._compiled = None  # the smaller copy's memory goes first
            self._compiled, self._batch = self._compile(n), n
        if n < self._batch:
            pixels = np.concatenate([pixels, np.zeros((self._batch - n, *pixels.shape[1:]), pixels.dtype)])
        return self._compiled(pixels)[0][:n]


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
