"""ONNX export (`ramcli models convert SRC DST.onnx`) and tagging with ONNX Runtime.

The exported graph must give PyTorch fp32's logits within 1e-4 on the same pixels, for every
family and any batch size, and carry its labels, thresholds and data config. Its int8 copy
(ONNX Runtime's dynamic quantisation) must stay close to it and be made once.
"""

from __future__ import annotations

import json
import os
import threading

import onnx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from ckpt_factory import make_labels_dir, make_official_checkpoint
from images import photo_like
import ramcli.tagging.precision as precision
from ramcli.cli.app import app
from ramcli.config import home
from ramcli.errors import CheckpointError, UsageError
from ramcli.models import load_any
from ramcli.models.onnx import OnnxModel, export_onnx, int8_copy, int8_weight_type, quantize_onnx, read_onnx_metadata
from ramcli.tagging.tagger import Tagger
from ramcli.tagging.precision import DecisionCache
from test_models_files import JSON, _plain

pytestmark = pytest.mark.slow  # each export traces the model with torch.export (~10-60 s)

N = 40
FAMILIES = [("ram_tiny", "ram"), ("ram_plus_tiny", "ram"), ("tag2text_tiny", "tag2text")]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, tuple]:
    """(official .pth, labels dir, .onnx written by the CLI) per family."""
    root = tmp_path_factory.mktemp("onnx")
    out = {}
    for arch, family in FAMILIES:
        pth = make_official_checkpoint(root / f"{arch}.pth", arch, num_classes=N, des_per_class=3)
        labels = make_labels_dir(root, N, family)
        dst = root / f"{arch}.onnx"
        res = CliRunner().invoke(app, ["models", "convert", str(pth), str(dst), "--labels", str(labels)],
                                 catch_exceptions=False)
        assert res.exit_code == 0, res.output
        out[arch] = (pth, labels, dst)
    return out


def _pixels(n: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", [a for a, _ in FAMILIES])
def test_onnx_logits_equal_pytorch_fp32(exported, arch):
    pth, labels, dst = exported[arch]
    reference = load_any(pth, labels_dir=labels).eval()
    onnx_model = load_any(dst)
    assert isinstance(onnx_model, OnnxModel)
    for n in (1, 3):  # the batch dimension is free
        x = _pixels(n, seed=n)
        with torch.no_grad():
            expected = reference(x)
        got = onnx_model(x)
        assert got.shape == expected.shape
        assert (got - expected).abs().max() <= 1e-4
    classes = torch.tensor([3, 0, 7])
    torch.testing.assert_close(onnx_model(x, classes), expected[:, classes], atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", [a for a, _ in FAMILIES])
def test_onnx_file_carries_labels_thresholds_and_data_config(exported, arch):
    pth, labels, dst = exported[arch]
    reference = load_any(pth, labels_dir=labels)
    meta = read_onnx_metadata(dst)
    config = json.loads(meta["data_config"])
    assert config["input_size"] == [3, 64, 64] and reference.arch.image_size == 64
    assert config["mean"] == list(reference.pretrained_cfg["mean"]) and config["crop_mode"] == "squash"
    assert config["interpolation"] == reference.pretrained_cfg["interpolation"]
    model = load_any(dst)  # no --labels: the file's own
    assert model.labels == reference.labels
    assert model.arch == reference.arch and model.model_id.endswith("+onnx-fp32")


def _library(folder, photos: int):
    """A folder of small photo-like JPEGs."""
    folder.mkdir()
    for i in range(photos):
        photo_like(120, 90, seed=i).save(folder / f"p{i}.jpg", quality=85)
    return folder


def test_tag_with_onnx_weights_gives_the_pytorch_tags(exported, tmp_path):
    pth, labels, dst = exported["ram_tiny"]
    lib = _library(tmp_path / "lib", 3)
    runs = {}
    for weights in (pth, dst):
        res = CliRunner().invoke(app, ["tag", str(lib), "--weights", str(weights), "--workers", "0", "-f", "jsonl",
                                       "--no-write", "--no-index", "--labels", str(labels)],
                                 catch_exceptions=False)
        assert res.exit_code == 0, res.output
        runs[weights.suffix] = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
        assert len(runs[weights.suffix]) == 3
    for a, b in zip(runs[".pth"], runs[".onnx"]):
        assert [t["name"] for t in a["tags"]] == [t["name"] for t in b["tags"]]
        assert all(abs(x["score"] - y["score"]) < 1e-4 for x, y in zip(a["tags"], b["tags"]))


def test_custom_tags_are_baked_in_at_export_and_refused_later(exported, tmp_path):
    pth, labels, _ = exported["ram_plus_tiny"]
    model = load_any(pth, labels_dir=labels).eval()
    embeds = torch.nn.functional.normalize(torch.randn(5, 512, generator=torch.Generator().manual_seed(1)), dim=-1)
    model.add_label_queries(embeds, ["tram", "funicular"], ["电车", "缆车"], [0.6, 0.7], descriptions_per_tag=[2, 3])
    dst = export_onnx(model, tmp_path / "vocab.onnx", vocab_version="v1")
    onnx_model = load_any(dst)
    assert onnx_model.labels.names[-2:] == ("tram", "funicular") and onnx_model.labels.thresholds[-1] == 0.7
    x = _pixels(2, seed=9)
    with torch.no_grad():
        expected = model(x)
    assert expected.shape[1] == N + 2 and (onnx_model(x) - expected).abs().max() <= 1e-4
    with pytest.raises(UsageError, match="not in this ONNX file.*Make it again"):
        onnx_model.add_label_queries(embeds[:1], ["cable car"], ["缆车"], [0.5])


def test_onnx_runs_on_the_cpu_in_fp32_or_its_int8_copy(exported):
    _, _, dst = exported["tag2text_tiny"]
    model = load_any(dst)
    with pytest.raises(UsageError, match="ONNX file runs --precision auto, fp32, int8; not bf16"):
        Tagger(model, torch.device("cpu"), "bf16")
    with pytest.raises(UsageError, match="logits only"):
        Tagger(model, torch.device("cpu"), "fp32", cache=object())
    int8 = Tagger(model, torch.device("cpu"), "int8")
    assert int8._path.module.model_id.endswith("+onnx-int8") and int8._path.module is not model


# ------------------------------------------------------------------ int8 (ONNX Runtime)
def test_int8_weights_avoid_the_saturating_kernels_without_vnni():
    """ONNX Runtime's u8 x s8 kernels saturate on x86 without VNNI (full-size scores moved by
    0.08); there the weights are uint8, with VNNI int8."""
    assert int8_weight_type({"avx2", "fma"}) == "QUInt8"
    assert int8_weight_type({"avx2", "avx512f"}) == "QUInt8"
    assert int8_weight_type({"avx2", "avx512f", "avx512_vnni"}) == "QInt8"
    assert int8_weight_type({"avx2", "avx_vnni"}) == "QInt8"


@pytest.mark.parametrize("arch", ["ram_tiny", "ram_plus_tiny"])
def test_onnx_int8_quantises_the_matmuls_and_keeps_scores_close(exported, arch, tmp_path):
    import onnx

    pth, labels, dst = exported[arch]
    q = quantize_onnx(dst, tmp_path / "q.onnx")
    ops = {n.op_type for n in onnx.load(str(q)).graph.node}
    assert ops & {"DynamicQuantizeMatMul", "MatMulInteger"}
    assert q.stat().st_size < 0.5 * dst.stat().st_size  # the weights are int8 now
    meta = read_onnx_metadata(q)
    assert meta["dtype"] == "int8" and meta["int8_weights"] in ("QInt8", "QUInt8")
    assert meta["model_id"].endswith("+onnx-int8") and "+onnx-fp32" not in meta["model_id"]
    x = _pixels(8, seed=3)
    exact, fast = torch.sigmoid(load_any(dst)(x)), torch.sigmoid(load_any(q)(x))
    change = (exact - fast).abs()
    # 16-64 wide layers quantise coarsely (PyTorch's int8 moves them by up to ~0.13 too); the
    # saturating s8 kernels moved them by 0.11 on average; full-size RAM Swin-L: max 0.0084
    assert 0 < change.max() < 0.25 and change.mean() < 0.05
    assert load_any(q).labels == load_any(dst).labels


def test_int8_copy_is_made_once_and_reused(exported, tmp_path):
    _, _, dst = exported["ram_tiny"]
    first = int8_copy(dst)
    made = first.stat().st_mtime_ns
    assert int8_copy(dst) == first and first.stat().st_mtime_ns == made  # not quantised again
    assert first.is_relative_to(home().cache) and not list(first.parent.glob(".ramcli-*"))
    assert not any((home().root / "tmp").iterdir())  # the private working folders are gone
    other = tmp_path / "other.onnx"
    other.write_bytes(dst.read_bytes())
    os.utime(other, ns=(1, 1))
    assert int8_copy(other) == first  # the same content, wherever it lies: the same copy
    proto = onnx.load(str(other))
    proto.metadata_props.add(key="note", value="another model")
    onnx.save_model(proto, str(other))
    assert int8_copy(other) != first  # other content: its own copy


def test_auto_on_onnx_checks_int8_against_fp32_and_caches_the_decision(exported, monkeypatch):
    _, _, dst = exported["ram_tiny"]
    monkeypatch.setattr(precision, "MIN_SPEEDUP", 0.0)  # timing noise must not decide the test
    monkeypatch.setattr(precision, "MIN_AGREEMENT", 0.0)  # nor where a tiny random model's scores sit
    monkeypatch.setattr(precision, "MAX_SCORE_CHANGE", 1.0)
    model, key = load_any(dst), DecisionCache.key(dst)
    pixels = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    decisions: list = []
    tagger = Tagger(model, torch.device("cpu"), "auto", threshold=0.0, check_photos=4, cache_key=key,
                    on_decision=decisions.append)
    exact = Tagger(model, torch.device("cpu"), "fp32").scores(pixels)
    assert tagger.checking and torch.equal(tagger.scores(pixels), exact)  # check photos keep fp32 scores
    (d,) = decisions
    assert d.precision == "int8" and [m.name for m in d.measured] == ["fp32", "int8"]
    assert 0 < d.measured[1].max_change < 0.25
    assert not torch.equal(tagger.scores(pixels), exact)  # now ONNX Runtime int8
    again: list = []
    later = Tagger(model, torch.device("cpu"), "auto", check_photos=4, cache_key=key, on_decision=again.append)
    assert not later.checking and again[0].cached and again[0].precision == "int8"
    # strict thresholds on a random tiny model: int8 flips tags, so auto keeps exact fp32 and says so
    monkeypatch.setattr(precision, "MIN_AGREEMENT", 1.01)
    kept: list = []
    strict = Tagger(model, torch.device("cpu"), "auto", check_photos=4, on_decision=kept.append)
    strict.scores(pixels)
    assert kept[0].precision == "fp32" and "int8 agrees" in kept[0].reason


def test_convert_writes_int8_onnx_that_runs_only_as_int8(exported, tmp_path):
    pth, labels, fp32 = exported["ram_tiny"]
    dst = tmp_path / "q.onnx"
    res = CliRunner().invoke(app, ["models", "convert", str(pth), str(dst), "--dtype", "int8", "--labels", str(labels)],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.onnx"]  # the fp32 intermediate is gone
    model = load_any(dst)
    assert model.fixed_precision == "int8"
    decisions: list = []
    Tagger(model, torch.device("cpu"), "auto", on_decision=decisions.append)
    assert decisions[0].precision == "int8" and "exported with" in decisions[0].reason
    with pytest.raises(UsageError, match="ONNX file runs --precision auto, int8; not fp32"):
        Tagger(model, torch.device("cpu"), "fp32")
    x = _pixels(2, seed=5)
    assert (torch.sigmoid(model(x)) - torch.sigmoid(load_any(fp32)(x))).abs().max() < 0.25


def test_tag_cli_with_onnx_int8(exported, tmp_path):
    pth, labels, dst = exported["ram_tiny"]
    lib = _library(tmp_path / "lib", 2)
    res = CliRunner().invoke(app, ["tag", str(lib), "--weights", str(dst), "--precision", "int8", "--workers", "0",
                                   "-f", "jsonl", "--no-write", "--no-index"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 2 and "precision: int8" in res.output


def test_onnx_dtype_must_be_fp32_or_int8(exported, tmp_path, capsys):
    from conftest import run_cli

    pth, labels, _ = exported["ram_tiny"]
    code = run_cli(["models", "convert", str(pth), str(tmp_path / "q.onnx"), "--dtype", "bf16", "--labels", str(labels)])
    err = capsys.readouterr().err
    assert code != 0 and "unknown ONNX dtype" in err and "Traceback" not in err
    assert not (tmp_path / "q.onnx").exists()


def test_hostile_onnx_files_are_one_line_errors(exported, tmp_path, capsys):
    """A foreign ONNX graph, damaged ramcli metadata and a truncated export: one line, exit 1."""
    import onnx
    from onnx import TensorProto, helper

    from conftest import run_cli

    _, _, dst = exported["ram_tiny"]
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    foreign = tmp_path / "foreign.onnx"
    onnx.save_model(helper.make_model(graph), str(foreign))
    damaged = tmp_path / "damaged.onnx"
    proto = onnx.load(str(dst))
    for prop in proto.metadata_props:
        if prop.key == "arch":
            prop.value = "{not json"
    onnx.save_model(proto, str(damaged))
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(dst.read_bytes()[: dst.stat().st_size // 2])
    unrunnable = tmp_path / "unrunnable.onnx"  # ramcli's metadata on a graph ONNX Runtime refuses
    proto = onnx.load(str(dst))
    proto.graph.node[0].op_type = "NoSuchOperator"
    onnx.save_model(proto, str(unrunnable))
    photo_like(80, 60, seed=1).save(tmp_path / "p.jpg")
    for bad, message in ((foreign, "not a ramcli tagger"), (damaged, "damaged ramcli header (arch:"),
                         (truncated, "not a valid ONNX file"), (unrunnable, "unrunnable.onnx")):
        for precision_name in ("auto", "fp32", "int8"):
            code = run_cli(["tag", str(tmp_path / "p.jpg"), "--weights", str(bad), "--precision", precision_name,
                            "--no-write", "--no-index"])
            err = capsys.readouterr().err
            assert code == 1 and message in err and "Traceback" not in err, err
            assert [line for line in err.splitlines() if "rror" in line] == [err.rstrip("\n").splitlines()[-1]]


def test_not_an_onnx_tagger_is_a_clear_error(tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(CheckpointError, match="not a valid ONNX file"):
        load_any(junk)
    res = CliRunner().invoke(app, ["tag", str(tmp_path), "--weights", str(junk), "--no-write", "--no-index"])
    assert res.exit_code != 0 and "Traceback" not in res.output


# ----------------------------------------------------------------------------- files that cannot hurt


def _folder_state(folder):
    return folder.stat().st_mtime_ns, sorted((p.name, p.is_symlink()) for p in folder.iterdir())


def test_quantising_never_writes_beside_the_model(exported, tmp_path):
    """ONNX Runtime's quantiser writes MODEL-inferred.onnx beside its input: a link of that name
    must not get its target overwritten, a user's own file of that name must survive, and the
    model's folder (read-only for some users) is not written at all."""
    _, _, dst = exported["ram_tiny"]
    models, elsewhere = tmp_path / "models", tmp_path / "elsewhere"
    models.mkdir()
    elsewhere.mkdir()
    model = models / "model.onnx"
    model.write_bytes(dst.read_bytes())
    victim = elsewhere / "precious.txt"
    victim.write_text("keep me")
    (models / "model-inferred.onnx").symlink_to(victim)
    (models / "model.onnx-inferred.onnx").write_text("the user's own file")
    before = _folder_state(models)
    copy = int8_copy(model)
    assert OnnxModel(copy).fixed_precision == "int8"
    assert _folder_state(models) == before
    assert victim.read_text() == "keep me"
    assert (models / "model.onnx-inferred.onnx").read_text() == "the user's own file"
    out = tmp_path / "out" / "q.onnx"
    out.parent.mkdir()
    quantize_onnx(model, out)
    assert _folder_state(models) == before and sorted(p.name for p in out.parent.iterdir()) == ["q.onnx"]


def test_convert_to_int8_never_follows_links_beside_the_destination(exported, tmp_path):
    pth, labels, _ = exported["ram_tiny"]
    victims = []
    for name in ("q.onnx.fp32", "q.onnx-inferred.fp32", "q-inferred.onnx"):
        victims.append(tmp_path / f"victim-{name}")
        victims[-1].write_text("keep me")
        (tmp_path / name).symlink_to(victims[-1])
    res = CliRunner().invoke(app, ["models", "convert", str(pth), str(tmp_path / "q.onnx"), "--dtype", "int8",
                                   "--labels", str(labels)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert all(v.read_text() == "keep me" for v in victims)
    assert all((tmp_path / name).is_symlink() for name in ("q.onnx.fp32", "q.onnx-inferred.fp32", "q-inferred.onnx"))
    assert OnnxModel(tmp_path / "q.onnx").fixed_precision == "int8"


def test_two_quantisations_at_once_do_not_collide(exported, tmp_path):
    _, _, dst = exported["ram_tiny"]
    errors, outs = [], [tmp_path / f"q{i}.onnx" for i in range(4)]

    def run(out):
        try:
            quantize_onnx(dst, out)
        except Exception as exc:  # noqa: BLE001 - collected, then asserted
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(out,)) for out in outs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and all(OnnxModel(out).fixed_precision == "int8" for out in outs)


def test_the_int8_copy_follows_the_external_data_file(exported, tmp_path):
    """A graph whose weights live in MODEL.onnx.data: when only that file changes, the int8 copy
    is made again and gives the new weights' scores."""
    from onnx import numpy_helper

    _, _, dst = exported["ram_tiny"]
    model = tmp_path / "m.onnx"
    onnx.save_model(onnx.load(str(dst)), str(model), save_as_external_data=True, location="m.onnx.data")
    first = int8_copy(model)
    x = _pixels(2, seed=9)
    before = OnnxModel(first)(x)
    proto = onnx.load(str(model))
    for tensor in proto.graph.initializer:  # other weights, the same sizes: the .onnx file is unchanged
        array = numpy_helper.to_array(tensor)
        if array.dtype.kind == "f" and array.ndim == 2 and array.nbytes >= 1024:  # those in the data file
            tensor.CopyFrom(numpy_helper.from_array(-array, tensor.name))
    other = tmp_path / "other"
    other.mkdir()
    onnx.save_model(proto, str(other / "m.onnx"), save_as_external_data=True, location="m.onnx.data")
    assert (other / "m.onnx").read_bytes() == model.read_bytes()
    (model.parent / "m.onnx.data").write_bytes((other / "m.onnx.data").read_bytes())
    second = int8_copy(model)
    assert second != first
    after = OnnxModel(second)(x)
    fp32 = OnnxModel(model)(x)
    assert (torch.sigmoid(after) - torch.sigmoid(before)).abs().max() > 0.01
    assert (torch.sigmoid(after) - torch.sigmoid(fp32)).abs().max() < 0.25


def test_the_content_key_reads_a_file_once_until_it_is_written(exported, tmp_path, monkeypatch):
    from ramcli.models import onnx as module

    _, _, dst = exported["ram_tiny"]
    model = tmp_path / "m.onnx"
    model.write_bytes(dst.read_bytes())
    hashed = []
    real = module.file_sha256
    monkeypatch.setattr(module, "file_sha256", lambda p: hashed.append(p) or real(p))
    first = module.content_key(model)
    assert module.content_key(model) == first and len(hashed) == 1
    data = bytearray(model.read_bytes())
    data[-1] ^= 1  # the same size, its old mtime put back: the write still shows (ctime)
    st = model.stat()
    model.write_bytes(bytes(data))
    os.utime(model, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert module.content_key(model) != first and len(hashed) == 2


def test_data_outside_the_models_folder_is_refused(exported, tmp_path):
    _, _, dst = exported["ram_tiny"]
    (tmp_path / "inner").mkdir()
    onnx.save_model(onnx.load(str(dst)), str(tmp_path / "m.onnx"), save_as_external_data=True, location="m.data")
    proto = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../m.data"
    onnx.save_model(proto, str(tmp_path / "inner" / "m.onnx"))
    with pytest.raises(CheckpointError, match="in its own folder"):
        load_any(tmp_path / "inner" / "m.onnx")


def _with_metadata(src, dst, **values):
    proto = onnx.load(str(src))
    props = {p.key: p.value for p in proto.metadata_props} | values
    del proto.metadata_props[:]
    for key, value in props.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.save_model(proto, str(dst))
    return dst


HOSTILE = {
    "negative threshold": ("labels.thresholds", lambda n: json.dumps([-1.0] * n), "threshold -1.0"),
    "nan threshold": ("labels.thresholds", lambda n: json.dumps([0.5] * (n - 1) + [float("nan")]), "threshold nan"),
    "threshold as text": ("labels.thresholds", lambda n: json.dumps(["0.5"] * n), "threshold '0.5'"),
    "label not text": ("labels.names", lambda n: json.dumps(list(range(n))), "label 0: name 0 is not text"),
    "escape sequence": ("labels.names", lambda n: json.dumps(["\x1b]0;pwned\x07\x1b[31mred"] * n), "control characters"),
    "labels not json": ("labels.names", lambda n: "[not json", "not JSON"),
    "data_config not json": ("data_config", lambda n: "{oops", "data_config is not JSON"),
    "data_config not an object": ("data_config", lambda n: "[1, 2]", "data_config is not a JSON object"),
    "dtype": ("dtype", lambda n: "\x1b[2J", "dtype"),
    "model id": ("model_id", lambda n: "m\x1b[2Jx", "model_id"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_metadata_is_a_one_line_error(exported, tmp_path, capsys, case):
    from conftest import run_cli

    _, _, dst = exported["ram_tiny"]
    key, value, message = HOSTILE[case]
    bad = _with_metadata(dst, tmp_path / "bad.onnx", **{key: value(N)})
    photo_like(80, 60, seed=1).save(tmp_path / "p.jpg")
    code = run_cli(["tag", str(tmp_path / "p.jpg"), "--weights", str(bad), "--no-write", "--no-index"])
    captured = capsys.readouterr()
    err = captured.err
    assert code == 1 and message in err and "bad.onnx" in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1 and "\x1b" not in err + captured.out and "\x07" not in err


def test_an_onnx_file_protobuf_cannot_hold_is_refused_unread(tmp_path, monkeypatch):
    huge = tmp_path / "huge.onnx"
    with open(huge, "wb") as f:  # sparse: 2.5 GB on paper, nothing on disk
        f.truncate(2_500_000_000)

    def never(*args, **kwargs):
        raise AssertionError("read a file that cannot be an ONNX model")

    monkeypatch.setattr(onnx, "load", never)
    monkeypatch.setattr(onnx, "load_model", never)
    with pytest.raises(CheckpointError, match="over the 2 GB"):
        load_any(huge)


FIELDS = ["labels.names", "labels.names_zh", "labels.thresholds", "labels.deleted", "data_config", "dtype",
          "model_id", "vocab_version", "arch"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_metadata_loads_as_a_sound_model_or_is_refused(exported, tmp_path, data):
    """Whatever a file's metadata holds (any JSON, lists of the right length with hostile items,
    any text), loading it gives a model whose label system passes the threshold rule and whose
    names are plain text, or one CheckpointError; never another exception."""
    from ramcli.tagging.decision import is_threshold

    _, _, dst = exported["ram_tiny"]
    key = data.draw(st.sampled_from(FIELDS))
    value = data.draw(st.one_of(
        JSON.map(lambda v: json.dumps(v)),
        st.lists(JSON, min_size=N, max_size=N).map(json.dumps),
        st.text(max_size=20),
    ))
    bad = _with_metadata(dst, tmp_path / "hostile.onnx", **{key: value})
    try:
        model = load_any(bad)
    except CheckpointError as exc:
        assert "\n" not in str(exc) and "\x1b" not in str(exc)
        return
    labels = model.labels
    assert all(is_threshold(t) for t in labels.thresholds) and len(labels) == N
    assert all(_plain(n) for n in labels.names + labels.names_zh)
    assert isinstance(model.data_config, dict) and model.fixed_precision in ("fp32", "int8")
