"""ONNX export of the tagging graph, and a model that runs such a file with ONNX Runtime.

The exported graph is exactly `RecognitionModel.forward`: normalised pixels (B, 3, S, S)
float32 -> per-class logits (B, C), batch size free. Everything else a tagger needs travels in
the file's `metadata_props`: the architecture, the label system (names, Chinese names,
thresholds, never-emitted tags), the model id and the data config (input size, resize,
normalisation), so `ramcli tag --weights model.onnx` needs nothing else, and so does any other
ONNX Runtime user.

Open vocabulary: the label queries are constants of the graph, so custom tags of the
vocabulary are baked in at export time; a tag added later is refused with a message that says
to export again.

int8: ONNX Runtime's dynamic quantisation of the MatMul/Gemm weights (`quantize_onnx`). On x86
CPUs without VNNI its u8 x s8 kernels add pairs of products in saturating 16-bit registers,
which moved full-size scores by up to 0.08; there the weights are quantised as uint8 (the U8U8
kernels, which do not saturate), as ONNX Runtime's quantisation guide recommends. `tag
--precision int8|auto` on an fp32 file makes that copy once and caches it in RAMCLI_HOME.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from ramcli.config import home
from ramcli.errors import CheckpointError, UsageError
from ramcli.fileio import atomic_output
from ramcli.labels import LabelSet, resolve_labels
from ramcli.models.configs import ArchConfig
from ramcli.models.ram import RecognitionModel

FORMAT = "ramcli-onnx-tagger"
ONNX_DTYPES = ("fp32", "int8")
#: Only the weight matmuls are quantised; everything else (norms, softmax, GELU) stays fp32.
QUANTIZED_OPS = ("MatMul", "Gemm")


def data_config(arch: ArchConfig) -> dict:
    """How pixels must be prepared for the graph: the model's data config (timm's keys), and
    what the graph's input is."""
    return {**arch.data_config, "graph_input": "float32 NCHW RGB, scaled to 0-1, then (x - mean) / std",
            "resize": "squash to input_size", "exif_orientation": "applied before resizing"}


def export_onnx(model: RecognitionModel, dst: Path, dtype: str = "fp32", source: str = "",
                vocab_version: str = "builtin") -> Path:
    """Write `model` (with any custom tags already added) as a self-contained ONNX file."""
    import onnx

    if dtype not in ONNX_DTYPES:
        raise CheckpointError(f"unknown ONNX dtype {dtype!r}; use one of {', '.join(ONNX_DTYPES)}")
    if dtype == "int8":  # the fp32 graph first, then its quantised copy in its place
        exported = export_onnx(model, Path(dst).with_name(Path(dst).name + ".fp32"), "fp32", source, vocab_version)
        try:
            return quantize_onnx(exported, dst)
        finally:
            exported.unlink(missing_ok=True)
            exported.with_name(exported.name + ".data").unlink(missing_ok=True)
    if model.labels is None:
        raise CheckpointError("cannot export without the label system (pass --labels DIR)")
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    model = model.float().eval()
    size = model.arch.image_size
    example = torch.zeros(2, 3, size, size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's notes on its own internals
        program = torch.onnx.export(model, (example,), input_names=["pixels"], output_names=["logits"],
                                    dynamic_shapes=({0: batch},), dynamo=True, verbose=False)
    proto = program.model_proto
    meta = {
        "format": FORMAT,
        "arch": model.arch.to_json(),
        "model_id": f"{model.model_id}+onnx-{dtype}",
        "source": source,
        "dtype": dtype,
        "vocab_version": vocab_version,
        "data_config": json.dumps(data_config(model.arch)),
        "labels_checksum": model.labels.checksum(),
        **model.labels.to_metadata(),
    }
    del proto.metadata_props[:]
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)
    big = proto.ByteSize() > 1_900_000_000  # protobuf's 2 GB limit: weights go to a side file
    with atomic_output(dst) as tmp:
        onnx.save_model(proto, tmp, save_as_external_data=big, location=dst.name + ".data")
    return dst


def int8_weight_type(flags: set[str] | None = None) -> str:
    """"QInt8" where the CPU has VNNI (its s8 kernels are exact and fastest), else "QUInt8"."""
    from ramcli.precision import cpu_flags

    flags = cpu_flags() if flags is None else flags
    vnni = {"avx512_vnni", "avx_vnni", "amx_int8", "avx512vnni", "avxvnni"}
    return "QInt8" if flags & vnni else "QUInt8"


@contextlib.contextmanager
def _quiet():
    """ONNX Runtime's quantiser logs advice ("consider pre-processing") on the root logger."""
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def quantize_onnx(src: Path, dst: Path, weight_type: str | None = None) -> Path:
    """Write `src` (an fp32 ramcli ONNX file) with int8 MatMul/Gemm weights and dynamically
    quantised activations to `dst`, keeping its ramcli metadata (dtype "int8")."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = Path(src), Path(dst)
    meta = read_onnx_metadata(src)
    if meta.get("dtype", "fp32") != "fp32":
        raise CheckpointError(f"{src.name} is already {meta['dtype']}; quantise the fp32 export")
    weight_type = weight_type or int8_weight_type()
    dst.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(dst) as tmp, _quiet(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_dynamic(str(src), tmp, weight_type=getattr(QuantType, weight_type), per_channel=False,
                         reduce_range=False, op_types_to_quantize=list(QUANTIZED_OPS))
        proto = onnx.load(tmp, load_external_data=False)
        values = {"dtype": "int8", "int8_weights": weight_type,
                  "model_id": meta.get("model_id", src.stem).replace("+onnx-fp32", "") + "+onnx-int8"}
        for prop in proto.metadata_props:
            if prop.key in values:
                prop.value = values.pop(prop.key)
        for key, value in values.items():
            proto.metadata_props.add(key=key, value=value)
        onnx.save_model(proto, tmp)
    return dst


def int8_copy(path: Path) -> Path:
    """The int8 copy of an fp32 ONNX file, made once per (file, weight type) and cached in
    RAMCLI_HOME/cache/onnx-int8 (quantising Swin-L takes seconds, its fp32 export minutes)."""
    from ramcli.precision import model_fingerprint

    weight_type = int8_weight_type()
    dst = home().cache / "onnx-int8" / f"{model_fingerprint(Path(path))}-{weight_type.lower()}.onnx"
    if not dst.is_file():
        quantize_onnx(path, dst, weight_type)
    return dst


def _read_header(path: Path) -> tuple[dict[str, str], int | None]:
    """The ramcli metadata of an ONNX file and the class count of its output, if fixed."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise CheckpointError(f"cannot read {Path(path).name}: not a valid ONNX file ({type(exc).__name__})") from None
    meta = {p.key: p.value for p in proto.metadata_props}
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{Path(path).name} is an ONNX file but not a ramcli tagger "
                              "(export one with `ramcli models convert SRC DST.onnx`)")
    outputs = proto.graph.output
    dims = outputs[0].type.tensor_type.shape.dim if outputs else []
    return meta, (dims[-1].dim_value or None) if dims else None


def read_onnx_metadata(path: Path) -> dict[str, str]:
    """The ramcli metadata of an ONNX file, reading the graph but not its weights."""
    return _read_header(path)[0]


class OnnxModel(nn.Module):
    """An exported tagger run by ONNX Runtime on the CPU, with the `RecognitionModel` surface
    the pipeline uses: `arch`, `labels`, `model_id`, `num_classes` and `forward(x, classes)`."""

    #: The Tagger runs an exported graph as it was exported, in this arithmetic.
    fixed_precision: str

    def __init__(self, path: Path, labels_dir: Path | None = None, threads: int | None = None):
        super().__init__()
        self.path, self._labels_dir, self._threads = Path(path), labels_dir, threads
        self._session, self.display_name = None, self.path.name
        meta, classes = _read_header(path)
        try:
            self.arch = ArchConfig.from_json(meta["arch"])
            embedded = LabelSet.from_metadata(meta)
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{Path(path).name}: damaged ramcli metadata ({type(exc).__name__})") from None
        # the usual order (--labels, RAMCLI_LABELS, the file's own); custom tags baked in at
        # export make an outside label folder too short, which the check below reports
        self.labels = resolve_labels(self.arch.family, labels_dir=labels_dir, embedded=embedded)
        self.model_id = meta.get("model_id", Path(path).stem)
        self.fixed_precision = meta.get("dtype", "fp32")
        self.vocab_version = meta.get("vocab_version", "builtin")
        self.data_config = json.loads(meta.get("data_config", "{}"))
        if self.labels is None or (classes is not None and classes != len(self.labels)):
            raise CheckpointError(f"{Path(path).name}: the label system does not match the graph's outputs")

    @property
    def session(self):
        """The ONNX Runtime session, made on first use: a run that switches to the int8 copy
        (a cached `--precision auto` decision) never holds the fp32 weights. Its threads sleep
        when idle instead of spinning, as the decode workers share the same cores."""
        if self._session is None:
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = self._threads or torch.get_num_threads()
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            try:
                self._session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
            except Exception as exc:  # onnxruntime's Fail / InvalidGraph
                raise CheckpointError(f"ONNX Runtime cannot load {self.display_name}: "
                                      f"{str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}") from None
        return self._session

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def pretrained_cfg(self) -> dict:
        return self.arch.data_config

    def forward(self, images: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
        pixels = images.detach().to("cpu", torch.float32).contiguous().numpy()
        logits = torch.from_numpy(self.session.run(["logits"], {"pixels": pixels})[0])
        return logits if classes is None else logits[:, classes.cpu()]

    def quantized(self) -> OnnxModel:
        """This graph in int8 on ONNX Runtime (the cached copy of `int8_copy`)."""
        if self.fixed_precision != "fp32":
            return self
        try:
            copy = OnnxModel(int8_copy(self.path), self._labels_dir, self._threads)
            copy.display_name = f"the int8 copy of {self.display_name}"
            return copy
        except CheckpointError:
            raise
        except Exception as exc:  # the quantiser's own errors on an unusual graph
            raise CheckpointError(f"cannot quantise {self.path.name} to int8: "
                                  f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}") from None

    def add_label_queries(self, embeds, names, *args, **kwargs) -> None:
        raise UsageError(f"custom tag(s) {', '.join(list(names)[:5])} are not in this ONNX file: its label "
                         "queries are fixed at export. Export it again (`ramcli models convert SRC DST.onnx`) "
                         "to bake the vocabulary's custom tags in")

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        raise UsageError("an ONNX model gives logits only: --cache-embeddings and --caption need the "
                         ".pth or .safetensors weights")


def is_onnx(path: Path) -> bool:
    return Path(path).suffix.lower() == ".onnx"


def load_onnx(path: Path, labels_dir: Path | None = None) -> OnnxModel:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    return OnnxModel(path, labels_dir)
