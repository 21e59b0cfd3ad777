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
--precision int8|auto` on an fp32 file makes that copy once and caches it in RAMCLI_HOME, named
by the content of the model and of every external data file it references.

Files: ONNX Runtime's quantiser writes a shape-inferred copy beside its input, and the exporter
writes the weights of a large graph beside its output. Both therefore work on copies in a
private folder of their own in RAMCLI_HOME (`scratch.private_folder`), and only the finished file is
moved into place, atomically: nothing is ever written beside a user's model or through a link
found there, a read-only model folder is fine, and two runs at once never share a file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import warnings
from pathlib import Path
from typing import NamedTuple

import torch

from ramcli.config import home
from ramcli.errors import CheckpointError
from ramcli.fileio import atomic_output, atomic_write
from ramcli.hashing import file_sha256
from ramcli.models.labels import LabelError, LabelSet, check_name, resolve_labels
from ramcli.models.converted import converted_arch
from ramcli.models.configs import ArchConfig
from ramcli.models.fixed_graph import FixedGraph
from ramcli.models.ram import RecognitionModel
from ramcli.models.scratch import private_folder

FORMAT = "ramcli-onnx-tagger"
ONNX_DTYPES = ("fp32", "int8")
#: Only the weight matmuls are quantised; everything else (norms, softmax, GELU) stays fp32.
QUANTIZED_OPS = ("MatMul", "Gemm")
#: protobuf cannot hold a message of 2 GiB or more: a larger .onnx is refused before it is read
#: (the weights of a larger graph live in external data files).
MAX_ONNX_BYTES = (1 << 31) - 1


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
    if model.labels is None:
        raise CheckpointError("cannot export without the label system (pass --labels DIR)")
    dst = Path(dst)
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
        "model_id": f"{model.model_id}+onnx-fp32",
        "source": source,
        "dtype": "fp32",
        "vocab_version": vocab_version,
        "data_config": json.dumps(data_config(model.arch)),
        "labels_checksum": model.labels.checksum(),
        **model.labels.to_metadata(),
    }
    del proto.metadata_props[:]
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)
    big = proto.ByteSize() > 1_900_000_000  # protobuf's 2 GB limit: weights go to a side file
    with private_folder("onnx-export") as work:
        staged = work / "fp32" / dst.name
        staged.parent.mkdir()
        onnx.save_model(proto, str(staged), save_as_external_data=big, location=dst.name + ".data")
        del proto, program
        if dtype == "int8":  # the fp32 graph first, then its quantised copy in its place
            return _quantize_staged(staged, dst, int8_weight_type(), work)
        return _place(staged, dst)


def _place(staged: Path, dst: Path) -> Path:
    """Move a finished ONNX file (its external data files first) from a private folder to `dst`,
    each file atomically: a reader sees the old file or the new one, and a link at the target
    is replaced, never followed."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    for location in read_header(staged).data_files:
        target = dst.parent / location
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(target) as tmp:
            shutil.move(staged.parent / location, tmp)
    with atomic_output(dst) as tmp:
        shutil.move(staged, tmp)
    return dst


def int8_weight_type(flags: set[str] | None = None) -> str:
    """"QInt8" where the CPU has VNNI (its s8 kernels are exact and fastest), else "QUInt8"."""
    from ramcli.tagging.cpu_features import cpu_flags

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
    quantised activations to `dst`, keeping its ramcli metadata (dtype "int8"). The quantiser
    works on a copy in a private folder; `src`'s folder is only read."""
    with private_folder("onnx-int8") as work:
        return _quantize_staged(_stage(Path(src), work / "fp32"), Path(dst), weight_type or int8_weight_type(), work)


def _stage(src: Path, folder: Path) -> Path:
    """A copy of the ONNX file `src` and of its external data files (at their places relative to
    it) in `folder`, which is created."""
    header = read_header(src)
    if header.meta.get("dtype", "fp32") != "fp32":
        raise CheckpointError(f"{src.name} is already {header.meta['dtype']}; quantise the fp32 export")
    folder.mkdir()
    staged = folder / "model.onnx"
    shutil.copyfile(src, staged)
    for location in header.data_files:
        target = folder / location
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src.parent / location, target)
    return staged


def _quantize_staged(staged: Path, dst: Path, weight_type: str, work: Path) -> Path:
    """`quantize_onnx` of a file that already sits in the private folder `work`."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    meta = read_onnx_metadata(staged)
    out = work / "int8.onnx"
    with _quiet(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_dynamic(str(staged), str(out), weight_type=getattr(QuantType, weight_type), per_channel=False,
                         reduce_range=False, op_types_to_quantize=list(QUANTIZED_OPS))
    proto = onnx.load(str(out), load_external_data=False)
    values = {"dtype": "int8", "int8_weights": weight_type,
              "model_id": meta.get("model_id", dst.stem).replace("+onnx-fp32", "") + "+onnx-int8"}
    for prop in proto.metadata_props:
        if prop.key in values:
            prop.value = values.pop(prop.key)
    for key, value in values.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.save_model(proto, str(out))
    return _place(out, dst)


def content_key(path: Path) -> str:
    """A digest of everything an ONNX model computes with: the file and every external data file
    it references (their SHA-256 and their names relative to it)."""
    path = Path(path)
    h = hashlib.sha256(_digest(path).encode())
    for location in read_header(path).data_files:
        h.update(f"|{location}:{_digest(path.parent / location)}".encode())
    return h.hexdigest()[:32]


def _digest(path: Path) -> str:
    """The file's SHA-256, remembered in RAMCLI_HOME/cache/onnx-digests.json under its inode,
    size, mtime and ctime (which no tool can set back after a write), so that a run that uses
    the cached int8 copy of a 1 GB model does not read the model again."""
    st = path.stat()
    memo = home().cache / "onnx-digests.json"
    key = f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"
    try:
        known = json.loads(memo.read_text(encoding="utf-8"))
        known = known if isinstance(known, dict) else {}
    except (OSError, ValueError):
        known = {}
    if isinstance(known.get(key), str):
        return known[key]
    known[key] = file_sha256(path)
    with contextlib.suppress(OSError):  # a read-only home: hashed again next time
        memo.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(memo, json.dumps(dict(list(known.items())[-256:])).encode("utf-8"))
    return known[key]


def int8_copy(path: Path) -> Path:
    """The int8 copy of an fp32 ONNX file, made once per (content, weight type) and cached in
    RAMCLI_HOME/cache/onnx-int8 (quantising Swin-L takes seconds, its fp32 export minutes). The
    copy is named by the content of the files it was made from, so a file that changes while
    it is quantised never leaves a copy under the other content's name."""
    weight_type = int8_weight_type()
    folder = home().cache / "onnx-int8"
    dst = folder / f"{content_key(path)}-{weight_type.lower()}.onnx"
    if dst.is_file():
        return dst
    with private_folder("onnx-int8") as work:
        staged = _stage(Path(path), work / "fp32")
        dst = folder / f"{content_key(staged)}-{weight_type.lower()}.onnx"
        return dst if dst.is_file() else _quantize_staged(staged, dst, weight_type, work)


class Header(NamedTuple):
    meta: dict[str, str]
    classes: int | None  # the class count of the graph's output, if fixed
    data_files: list[str]  # the external data files the graph references, each once, relative to it


def read_header(path: Path) -> Header:
    """The ramcli metadata of an ONNX file, its class count and its external data files, reading
    the graph but not its weights. A file protobuf cannot hold is refused before it is read, and
    so is a reference to data outside the model's folder."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

    path = Path(path)
    size = path.stat().st_size
    if size > MAX_ONNX_BYTES:
        raise CheckpointError(f"cannot read {path.name}: {size / 1e9:.1f} GB is over the 2 GB an ONNX file "
                              "can hold (larger weights go in an external data file)")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise CheckpointError(f"cannot read {path.name}: not a valid ONNX file ({type(exc).__name__})") from None
    meta = {p.key: p.value for p in proto.metadata_props}
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path.name} is an ONNX file but not a ramcli tagger "
                              "(export one with `ramcli models convert SRC DST.onnx`)")
    folder = path.parent.resolve()
    files: dict[str, None] = {}
    for tensor in _get_all_tensors(proto):
        if not uses_external_data(tensor):
            continue
        location = ExternalDataInfo(tensor).location
        data = path.parent / location
        if not location or os.path.isabs(location) or not data.resolve().is_relative_to(folder):
            raise CheckpointError(f"{path.name}: its weights must be in a data file in its own folder, "
                                  f"not {location[:80]!r}")
        if not data.is_file():
            raise CheckpointError(f"{path.name}: its weights file {location[:80]!r} is missing")
        files[Path(os.path.normpath(location)).as_posix()] = None
    outputs = proto.graph.output
    dims = outputs[0].type.tensor_type.shape.dim if outputs else []
    return Header(meta, (dims[-1].dim_value or None) if dims else None, list(files))


def read_onnx_metadata(path: Path) -> dict[str, str]:
    """The ramcli metadata of an ONNX file, reading the graph but not its weights."""
    return read_header(path).meta


class OnnxModel(FixedGraph):
    """An exported tagger run by ONNX Runtime on the CPU."""

    kind = "ONNX file"
    remake = "`ramcli models convert SRC DST.onnx`"
    runtime = "onnxruntime"

    #: The Tagger runs an exported graph as it was exported, in this arithmetic.
    fixed_precision: str

    def __init__(self, path: Path, labels_dir: Path | None = None, threads: int | None = None):
        super().__init__()
        self.path, self._labels_dir, self._threads = Path(path), labels_dir, threads
        self._session, self.display_name = None, self.path.name
        name = self.path.name
        meta, classes, _ = read_header(path)
        self.arch = converted_arch(meta, name)
        embedded = LabelSet.from_metadata(meta, name)
        # the usual order (--labels, RAMCLI_LABELS, the file's own); custom tags baked in at
        # export make an outside label folder too short, which the check below reports
        self.labels = resolve_labels(self.arch.family, labels_dir=labels_dir, embedded=embedded)
        try:
            self.model_id = check_name(meta.get("model_id", self.path.stem), "model_id")
            self.vocab_version = check_name(meta.get("vocab_version", "builtin"), "vocab_version")
            self.fixed_precision = meta.get("dtype", "fp32")
            if self.fixed_precision not in ONNX_DTYPES:
                raise LabelError(f"dtype {self.fixed_precision[:40]!r} is not one of {', '.join(ONNX_DTYPES)}")
            self.data_config = json.loads(meta.get("data_config", "{}"))
            if not isinstance(self.data_config, dict):
                raise LabelError("data_config is not a JSON object")
        except ValueError:
            raise CheckpointError(f"{name}: damaged ramcli metadata (data_config is not JSON)") from None
        except LabelError as exc:
            raise CheckpointError(f"{name}: damaged ramcli metadata ({exc})") from None
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

    def run(self, pixels):
        return self.session.run(["logits"], {"pixels": pixels})[0]

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


def is_onnx(path: Path) -> bool:
    return Path(path).suffix.lower() == ".onnx"


def load_onnx(path: Path, labels_dir: Path | None = None) -> OnnxModel:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    return OnnxModel(path, labels_dir)
