"""OpenVINO: the tagging graph converted from PyTorch, its arithmetics, its cache, and the command."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from typer.testing import CliRunner

from ckpt_factory import make_labels_dir, make_official_checkpoint
from images import photo_like
from ramcli.cli.app import app
from ramcli.config import home
from ramcli.errors import UsageError
from ramcli.models import load_any
from ramcli.models.openvino_runtime import OpenVinoModel, cache_key, to_openvino
from ramcli.tagging import runtimes
from ramcli.tagging.tagger import Tagger

N = 30
CPU = torch.device("cpu")
FAMILIES = [("ram_tiny", "ram"), ("ram_plus_tiny", "ram"), ("tag2text_tiny", "tag2text")]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ov")
    return {arch: (make_official_checkpoint(root / f"{arch}.pth", arch, num_classes=N),
                   make_labels_dir(root / arch, N, family)) for arch, family in FAMILIES}


def _pixels(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.slow
@pytest.mark.parametrize("arch", [a for a, _ in FAMILIES])
def test_fp32_logits_match_pytorch(checkpoints, arch):
    weights, labels = checkpoints[arch]
    model = load_any(weights, labels_dir=labels).eval()
    converted = to_openvino(model, weights)
    assert isinstance(converted, OpenVinoModel) and converted.model_id == model.model_id
    assert converted.labels == model.labels and converted.arch == model.arch
    # the batch size is free, not the one the graph was traced with: compiled for 1, then for
    # 3, and a batch of 2 is padded to 3 and cut back
    for batch in (1, 3, 2):
        x = _pixels(batch, batch)
        with torch.no_grad():
            expected = model(x)
        torch.testing.assert_close(converted(x), expected, atol=1e-4, rtol=0)


def test_a_run_compiles_one_static_shape_and_pads_its_last_batch(checkpoints, monkeypatch):
    weights, labels = checkpoints["ram_tiny"]
    model = load_any(weights, labels_dir=labels).eval()
    converted = to_openvino(model, weights)
    shapes = []
    compile_model = converted.core.compile_model

    def spy(graph, *args):
        shapes.append(graph.inputs[0].get_partial_shape())
        return compile_model(graph, *args)

    monkeypatch.setattr(converted.core, "compile_model", spy)
    for batch in (4, 4, 3, 1):
        x = _pixels(batch, batch)
        with torch.no_grad():
            torch.testing.assert_close(converted(x), model(x), atol=1e-4, rtol=0)
    size = model.arch.image_size
    assert [list(s.to_shape()) for s in shapes] == [[4, 3, size, size]] and shapes[0].is_static
    assert converted.graph.inputs[0].get_partial_shape()[0].is_dynamic  # the IR keeps its free batch


def test_conversion_is_cached_by_content(checkpoints, tmp_path):
    weights, labels = checkpoints["ram_tiny"]
    model = load_any(weights, labels_dir=labels)
    first = to_openvino(model, weights).path
    made = first.stat().st_mtime_ns
    assert to_openvino(model, weights).path == first and first.stat().st_mtime_ns == made  # not converted again
    assert first.is_relative_to(home().cache) and first.with_suffix(".bin").is_file()
    assert not list(first.parent.glob(".ramcli-*")) and not list((home().root / "tmp").glob("*"))  # nothing left behind
    changed = tmp_path / "changed.pth"
    changed.write_bytes(weights.read_bytes()[:-1] + bytes([weights.read_bytes()[-1] ^ 1]))
    assert cache_key(changed, model.labels) != cache_key(weights, model.labels)  # one byte: another graph
    fewer = model.labels.extend(["tram"], ["电车"], [0.7])
    assert cache_key(weights, fewer) != cache_key(weights, model.labels)  # custom tags are baked in


def test_convert_writes_an_ir_that_tags_alone(checkpoints, tmp_path):
    weights, labels = checkpoints["ram_plus_tiny"]
    dst = tmp_path / "out" / "model.xml"
    res = CliRunner().invoke(app, ["models", "convert", str(weights), str(dst), "--labels", str(labels)],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in dst.parent.iterdir()) == ["model.bin", "model.xml"]
    converted = load_any(dst)  # no --labels: they travel in the IR
    model = load_any(weights, labels_dir=labels).eval()
    assert converted.labels == model.labels and converted.model_id.endswith("+openvino")
    with torch.no_grad():
        torch.testing.assert_close(converted(_pixels(2)), model(_pixels(2)), atol=1e-4, rtol=0)


def test_every_arithmetic_runs_and_int8_is_calibrated_once(checkpoints):
    weights, labels = checkpoints["ram_tiny"]
    model = load_any(weights, labels_dir=labels).eval()
    fp32 = to_openvino(model, weights)
    with torch.no_grad():
        expected = torch.sigmoid(model(_pixels(4)))
    for name in ("bf16", "int8", "int8-weights", "int8-encoder"):
        scores = torch.sigmoid(runtimes.lookup(fp32, name).build(fp32)(_pixels(4)))
        assert scores.shape == expected.shape and not torch.equal(scores, expected)
    calibrated = sorted(fp32.path.parent.glob("*-int8.xml"))
    assert len(calibrated) == 1  # the first photos calibrate it; later runs reuse that copy
    made = calibrated[0].stat().st_mtime_ns
    runtimes.lookup(fp32, "int8").build(fp32)(_pixels(2, 9))
    assert calibrated[0].stat().st_mtime_ns == made


def _int8_matmuls(graph) -> set[str]:
    """The matmuls whose weights are stored in int8 (NNCF's Constant -> Convert -> ... chain)."""
    import openvino as ov

    found = set()
    for op in graph.get_ordered_ops():
        if op.get_type_name() == "MatMul":
            node = op.input_value(1).get_node()
            while node.get_type_name() in ("Convert", "Subtract", "Multiply", "Reshape", "Transpose"):
                node = node.input_value(0).get_node()
            if node.get_type_name() == "Constant" and node.get_element_type() in (ov.Type.i8, ov.Type.u8):
                found.add(op.get_friendly_name())
    return found


def test_int8_encoder_keeps_the_decoder_weights_float(checkpoints):
    from ramcli.tagging.runtimes.openvino import decoder_ops, int8_weights

    weights, labels = checkpoints["ram_plus_tiny"]
    graph = to_openvino(load_any(weights, labels_dir=labels), weights).graph
    decoder = set(decoder_ops(graph))
    everywhere, encoder = _int8_matmuls(int8_weights(graph)), _int8_matmuls(int8_weights(graph, keep_decoder=True))
    assert encoder and not encoder & decoder and everywhere & decoder and encoder < everywhere
    assert not _int8_matmuls(graph)  # the fp32 graph itself is left alone


def _library(folder, n):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        photo_like(96, 72, seed=i).save(folder / f"p{i}.jpg", quality=85)
    return folder


def _tags(output: str) -> dict[str, dict[str, float]]:
    rows = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    return {r["path"]: {t["name"]: t["score"] for t in r["tags"]} for r in rows}


@pytest.mark.slow
def test_tag_runtime_openvino_end_to_end(checkpoints, tmp_path):
    weights, labels = checkpoints["ram_tiny"]
    lib = _library(tmp_path / "lib", 3)
    base = ["tag", str(lib), "--weights", str(weights), "--labels", str(labels), "--workers", "0",
            "--no-write", "--no-index", "-f", "jsonl", "--precision", "fp32", "--threshold", "0.5"]
    exact = CliRunner().invoke(app, base, catch_exceptions=False)
    res = CliRunner().invoke(app, [*base, "--runtime", "openvino"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "converting the model for OpenVINO" in res.stderr
    got, expected = _tags(res.stdout), _tags(exact.stdout)
    assert len(got) == 3 and got.keys() == expected.keys()
    for path, tags in expected.items():
        assert got[path].keys() == tags.keys()
        assert all(abs(got[path][name] - score) < 1e-4 for name, score in tags.items())
    again = CliRunner().invoke(app, [*base, "--runtime", "openvino"], catch_exceptions=False)
    assert again.exit_code == 0 and "converting" not in again.stderr  # the cached IR
    bad = CliRunner().invoke(app, [*base[:-4], "--runtime", "openvino", "--precision", "fp16"])
    assert isinstance(bad.exception, UsageError) and "OpenVINO model runs --precision auto, fp32, bf16" in str(bad.exception)  # exit 2 in main()


def test_without_the_extra_the_message_says_how_to_install(checkpoints, tmp_path, monkeypatch):
    weights, labels = checkpoints["ram_tiny"]
    lib = _library(tmp_path / "lib", 1)
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino raises ImportError
    res = CliRunner().invoke(app, ["tag", str(lib), "--weights", str(weights), "--labels", str(labels),
                                   "--no-write", "--no-index", "--runtime", "openvino"])
    # a UsageError: `ramcli` prints its one line and exits 2
    assert isinstance(res.exception, UsageError) and "pip install 'ramcli[openvino]'" in str(res.exception)
    # the other runtimes do not need it
    ok = CliRunner().invoke(app, ["tag", str(lib), "--weights", str(weights), "--labels", str(labels),
                                  "--no-write", "--no-index", "--precision", "fp32", "-f", "jsonl"])
    assert ok.exit_code == 0, ok.output


def test_auto_on_openvino_checks_its_own_paths_against_its_fp32(checkpoints, monkeypatch):
    import ramcli.tagging.precision as precision

    monkeypatch.setattr(precision, "MIN_SPEEDUP", 0.0)
    monkeypatch.setattr(precision, "MAX_SCORE_CHANGE", 1.0)
    monkeypatch.setattr(precision, "MIN_AGREEMENT", 0.0)  # any: which path is picked is not the point
    weights, labels = checkpoints["ram_tiny"]
    converted = to_openvino(load_any(weights, labels_dir=labels), weights)
    decisions: list = []
    tagger = Tagger(converted, CPU, "auto", check_photos=4, on_decision=decisions.append)
    pixels = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    exact = Tagger(converted, CPU, "fp32").scores(pixels)
    assert torch.equal(tagger.scores(pixels), exact)  # the check photos keep OpenVINO fp32's scores
    (d,) = decisions
    assert [m.name for m in d.measured] == ["fp32", *runtimes.fast_paths(converted)]
    assert "int8-encoder" in runtimes.fast_paths(converted) and d.precision in runtimes.fast_paths(converted)
