"""CPU precision: the fast-path policy, int8, the auto check on the first photos and its cache."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from typer.testing import CliRunner

import ramcli.tagging.cpu_features as cpu_features
import ramcli.tagging.precision as precision
from ckpt_factory import make_labels_dir, make_official_checkpoint
from images import photo_like
from ramcli.cli.app import app
from ramcli.errors import UsageError
from ramcli.models import load_any
from ramcli.tagging import runtimes
from ramcli.tagging.options import TagOptions
from ramcli.tagging.precision import Decision, DecisionCache, Measured, decide, resolve_precision
from ramcli.tagging.runtimes import pytorch as pytorch_paths
from ramcli.tagging.runtimes.pytorch import quantize_int8
from ramcli.tagging.tagger import Tagger

N = 30
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("model")
    return (make_official_checkpoint(root / "ram_tiny.pth", "ram_tiny", num_classes=N), make_labels_dir(root, N))


@pytest.fixture
def model(model_files):
    weights, labels = model_files
    return load_any(weights, labels_dir=labels)


def _pixels(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ the policy
def test_policy_picks_the_fastest_path_that_agrees():
    measured = [Measured("fp32", 2.0, 1.0, 0.0), Measured("bf16", 0.5, 0.97, 0.004, 9),
                Measured("int8", 1.0, 0.995, 0.002, 1)]
    d = decide(measured, photos=8)
    assert d.precision == "int8"  # bf16 is faster but changes 3% of the tags
    assert "2.00x fp32" in d.reason and "bf16 agrees 97.0% < 99%" in d.reason
    assert "int8" in d.describe() and "99.5%" in d.describe()


def test_policy_keeps_fp32_and_says_why():
    slow = decide([Measured("fp32", 1.0, 1.0, 0.0), Measured("bf16", 1.1, 1.0, 0.0)], photos=8)
    assert slow.precision == "fp32" and "bf16 only 0.91x fp32 here" in slow.reason
    flips = decide([Measured("fp32", 1.0, 1.0, 0.0), Measured("int8", 0.3, 0.95, 0.01, 5)], photos=8)
    assert flips.precision == "fp32" and "int8 agrees 95.0% < 99%" in flips.reason
    assert decide([Measured("fp32", 1.0, 1.0, 0.0)], photos=8).reason == "no fast path on this CPU"


def test_native_bf16_needs_the_instructions_and_pytorch_using_them(monkeypatch):
    monkeypatch.setattr(cpu_features.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert cpu_features.native_bf16({"avx2", "avx512f", "avx512_bf16"})
    assert not cpu_features.native_bf16({"avx2", "avx512f"})  # AVX-512 without bf16: emulated, slow
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")  # ATEN_CPU_CAPABILITY=avx2
    assert not cpu_features.native_bf16({"avx2", "avx512f", "avx512_bf16"})


# ------------------------------------------------------------------ int8
def test_int8_quantises_every_linear_layer_and_keeps_scores_close(model):
    linears = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    q = quantize_int8(model)
    assert sum(isinstance(m, torch.nn.Linear) for m in q.modules()) == 0
    assert sum(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in q.modules()) == linears
    assert any(isinstance(m, torch.nn.Linear) for m in model.modules())  # the fp32 model is untouched
    exact = Tagger(model, CPU, "fp32").scores(_pixels(4))
    fast = Tagger(model, CPU, "int8").scores(_pixels(4))
    change = (exact - fast).abs()
    # 16-64 wide random layers: how far int8 moves a score depends on the CPU's int8 kernels
    # (0.100 at most with AVX-512 VNNI, below that with AVX2); a full-size Swin-L moves them far
    # less (bench/tag_cpu.py). A wrong scale or zero point moves them by tenths on average.
    assert 0 < change.max() < 0.15 and change.mean() < 0.03


def test_int8_is_cpu_only():
    assert resolve_precision(CPU, "int8") == "int8"
    with pytest.raises(UsageError, match="CPU only"):
        resolve_precision(torch.device("cuda"), "int8")
    with pytest.raises(UsageError, match="unknown precision"):
        resolve_precision(CPU, "int4")


# ------------------------------------------------------------------ the auto check
def _auto(model, monkeypatch, key=None, photos=4, decisions=None, **kw) -> Tagger:
    monkeypatch.setattr(runtimes, "fast_paths", lambda *model: ["int8"])
    return Tagger(model, CPU, "auto", check_photos=photos, cache_key=key,
                  on_decision=(decisions.append if decisions is not None else None), **kw)


def _accept_any(monkeypatch):
    """Any speed, agreement and score change: what is tested must not depend on timing or on how
    a tiny random model's scores sit at its thresholds."""
    monkeypatch.setattr(precision, "MIN_SPEEDUP", 0.0)
    monkeypatch.setattr(precision, "MIN_AGREEMENT", 0.0)
    monkeypatch.setattr(precision, "MAX_SCORE_CHANGE", 1.0)


def test_auto_scores_the_first_photos_in_fp32_then_switches(model, monkeypatch):
    _accept_any(monkeypatch)
    decisions: list[Decision] = []
    tagger = _auto(model, monkeypatch, decisions=decisions)
    exact = Tagger(model, CPU, "fp32")
    first, second, third = _pixels(2, 1), _pixels(2, 2), _pixels(2, 3)
    assert torch.equal(tagger.scores(first), exact.scores(first))  # the check photos keep fp32 scores
    assert tagger.checking and not decisions
    assert torch.equal(tagger.scores(second), exact.scores(second))
    assert not tagger.checking and [d.precision for d in decisions] == ["int8"]
    d = decisions[0]
    assert d.photos == 4 and [m.name for m in d.measured] == ["fp32", "int8"]
    assert d.measured[1].max_change > 0
    after = tagger.scores(third)
    assert not torch.equal(after, exact.scores(third))  # now int8
    torch.testing.assert_close(after, Tagger(model, CPU, "int8").scores(third), atol=1e-6, rtol=0)


def test_auto_measures_agreement_against_fp32_tags(model, monkeypatch):
    """The agreement the decision reports is the share of fp32's tag set that int8 reproduces."""
    decisions: list[Decision] = []
    thresholds = [0.5 + 0.003 * i for i in range(N)]  # scores of the random model sit around here
    model.labels = dataclasses.replace(model.labels, thresholds=tuple(thresholds))
    tagger = _auto(model, monkeypatch, decisions=decisions, photos=4)
    pixels = _pixels(4, 7)
    tagger.scores(pixels)
    exact = Tagger(model, CPU, "fp32", thresholds=thresholds)
    fast = Tagger(model, CPU, "int8", thresholds=thresholds)
    a = {(i, t.name) for i, row in enumerate(exact.decide(exact.scores(pixels))) for t in row}
    b = {(i, t.name) for i, row in enumerate(fast.decide(fast.scores(pixels))) for t in row}
    (d,) = decisions
    assert d.measured[1].agreement == pytest.approx(len(a & b) / len(a | b))
    assert d.measured[1].differ == len(a ^ b)


def test_auto_keeps_fp32_when_the_fast_path_is_not_faster(model, monkeypatch):
    _accept_any(monkeypatch)
    monkeypatch.setattr(precision, "MIN_SPEEDUP", 1e9)
    decisions: list[Decision] = []
    tagger = _auto(model, monkeypatch, decisions=decisions)
    tagger.scores(_pixels(4))
    assert decisions[0].precision == "fp32" and "int8 only" in decisions[0].reason
    torch.testing.assert_close(tagger.scores(_pixels(2, 5)), Tagger(model, CPU, "fp32").scores(_pixels(2, 5)),
                               atol=0, rtol=0)


def test_decision_is_cached_per_model_file_and_cpu(model, model_files, monkeypatch, tmp_path):
    _accept_any(monkeypatch)
    key = DecisionCache.key(model_files[0])
    first: list[Decision] = []
    _auto(model, monkeypatch, key=key, decisions=first, threshold=0.0).scores(_pixels(4))
    assert first[0].precision == "int8" and not first[0].cached
    later: list[Decision] = []
    tagger = _auto(model, monkeypatch, key=key, decisions=later, threshold=0.0)
    assert not tagger.checking and later[0].cached and later[0].precision == "int8"  # no check this time
    assert later[0].measured == first[0].measured
    # another CPU (or another PyTorch, thread count...) gets its own check
    monkeypatch.setattr(precision, "cpu_identity", lambda *onnx: "another cpu")
    assert DecisionCache().get(DecisionCache.key(model_files[0])) is None
    # a changed model file too
    copy = tmp_path / "copy.pth"
    copy.write_bytes(model_files[0].read_bytes()[:-1] + b"\0")
    assert precision.model_fingerprint(copy) != precision.model_fingerprint(model_files[0])


def test_a_broken_or_foreign_cache_file_only_means_a_new_check(model_files, tmp_path):
    cache = DecisionCache(tmp_path / "precision.json")
    key = DecisionCache.key(model_files[0])
    cache.path.write_text("{not json")
    assert cache.get(key) is None
    cache.path.write_text(json.dumps({key: {"precision": "int4", "reason": "x"}}))
    assert cache.get(key) is None  # a path this CPU does not have
    cache.path.write_text(json.dumps({key: {"precision": "fp32"}}))
    assert cache.get(key) is None
    cache.put(key, Decision("fp32", "kept exact fp32: int8 agrees 90.0% < 99%", 8))
    assert cache.get(key).reason.startswith("kept exact fp32")


# ------------------------------------------------------------------ judged honestly
def _near_threshold(model) -> None:
    """Model thresholds where the random tiny model's scores sit, so int8 flips some tags."""
    model.labels = dataclasses.replace(model.labels, thresholds=tuple(0.5 + 0.003 * i for i in range(N)))


def test_policy_bounds_the_largest_score_change():
    moved = decide([Measured("fp32", 1.0, 1.0, 0.0), Measured("int8", 0.2, 1.0, 0.28)], photos=8)
    assert moved.precision == "fp32" and "int8 moves a score by 0.280 > 0.02" in moved.reason
    kept = decide([Measured("fp32", 1.0, 1.0, 0.0), Measured("bf16", 0.2, 0.995, 0.004, 1)], photos=8)
    assert kept.precision == "bf16"
    assert "tags agree 99.5% at the model's thresholds" in kept.reason and "max score change 0.0040" in kept.reason


def test_threshold_0_is_judged_at_the_models_own_thresholds(model, monkeypatch):
    """--threshold 0 emits every tag in every arithmetic; agreement there would say nothing."""
    monkeypatch.setattr(precision, "MIN_SPEEDUP", 0.0)
    _near_threshold(model)
    pixels = _pixels(4, 7)
    every: list[Decision] = []
    _auto(model, monkeypatch, decisions=every, threshold=0.0).scores(pixels)
    default: list[Decision] = []
    _auto(model, monkeypatch, decisions=default).scores(pixels)
    assert every[0].measured[1].agreement == default[0].measured[1].agreement < 0.99
    assert every[0].precision == default[0].precision == "fp32"


def test_a_threshold_0_or_top_k_run_never_changes_what_a_default_run_uses(model, model_files, monkeypatch):
    _accept_any(monkeypatch)
    key = DecisionCache.key(model_files[0])
    _auto(model, monkeypatch, key=key, threshold=0.3).scores(_pixels(4))  # decides something: its own key
    assert _auto(model, monkeypatch, key=key).checking  # so a default run still checks
    _auto(model, monkeypatch, key=key, threshold=0.0, top_k=2).scores(_pixels(4))  # judged as a default run
    assert not _auto(model, monkeypatch, key=key).checking  # the same judgement: its decision is reused


def test_the_cached_decision_follows_labels_vocabulary_and_runtime(model, model_files, monkeypatch):
    _accept_any(monkeypatch)
    key = DecisionCache.key(model_files[0])
    _auto(model, monkeypatch, key=key, vocab_version="v1").scores(_pixels(4))
    assert not _auto(model, monkeypatch, key=key, vocab_version="v1").checking
    assert _auto(model, monkeypatch, key=key, vocab_version="v2").checking  # a tag's embedding changed
    assert _auto(model, monkeypatch, key=key, vocab_version="v1", exclude=[model.labels.names[0]]).checking
    monkeypatch.setattr("ramcli.tagging.tagger.runtime_identity", lambda model: "another runtime")
    assert _auto(model, monkeypatch, key=key, vocab_version="v1").checking
    monkeypatch.undo()
    _accept_any(monkeypatch)
    _near_threshold(model)  # other thresholds (a label system edited): another check
    assert _auto(model, monkeypatch, key=key, vocab_version="v1").checking


def test_the_cache_key_follows_an_onnx_files_external_data(tmp_path):
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((4, 4), dtype=np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])], [weight])
    path = tmp_path / "m.onnx"
    onnx.save_model(helper.make_model(graph), path, save_as_external_data=True, location="m.onnx.data",
                    size_threshold=0)
    data = tmp_path / "m.onnx.data"
    before = DecisionCache.key(path)
    data.write_bytes(np.full((4, 4), 2, dtype=np.float32).tobytes())  # new weights, same graph file
    assert DecisionCache.key(path) != before


# ------------------------------------------------------------------ never a failed run
def test_a_fast_path_that_cannot_be_built_leaves_fp32(model, monkeypatch):
    _accept_any(monkeypatch)

    def read_only(model):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(pytorch_paths, "quantize_int8", read_only)
    decisions: list[Decision] = []
    tagger = _auto(model, monkeypatch, decisions=decisions)
    scores = tagger.scores(_pixels(4))
    assert decisions[0].precision == "fp32" and "int8 failed (OSError: [Errno 30] Read-only" in decisions[0].reason
    assert "failed" in decisions[0].describe()
    assert torch.equal(scores, Tagger(model, CPU, "fp32").scores(_pixels(4)))


def test_a_cached_path_that_fails_falls_back_to_fp32_saying_why(model, model_files, monkeypatch):
    _accept_any(monkeypatch)
    key = DecisionCache.key(model_files[0])
    _auto(model, monkeypatch, key=key).scores(_pixels(4))  # int8 decided and cached

    class Damaged(torch.nn.Module):
        def forward(self, x, classes=None):
            raise RuntimeError("damaged cached copy")

    monkeypatch.setattr(pytorch_paths, "quantize_int8", lambda model: Damaged())
    decisions: list[Decision] = []
    tagger = _auto(model, monkeypatch, key=key, decisions=decisions)
    assert decisions[0].precision == "int8" and decisions[0].cached
    scores = tagger.scores(_pixels(2, 5))  # fails in the run: the batch is scored in fp32 instead
    assert torch.equal(scores, Tagger(model, CPU, "fp32").scores(_pixels(2, 5)))
    assert decisions[-1].precision == "fp32" and "fell back to exact fp32: int8 failed" in decisions[-1].reason
    assert "damaged cached copy" in decisions[-1].reason

    def unbuildable(model):
        raise OSError("no space left")

    monkeypatch.setattr(pytorch_paths, "quantize_int8", unbuildable)
    later: list[Decision] = []
    _auto(model, monkeypatch, key=key, decisions=later).scores(_pixels(2))
    assert later[-1].precision == "fp32" and "no space left" in later[-1].reason


def test_a_read_only_cache_keeps_the_decision_and_says_it_is_not_cached(model, model_files, monkeypatch):
    _accept_any(monkeypatch)

    def read_only(path, data):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(precision, "atomic_write", read_only)
    decisions: list[Decision] = []
    _auto(model, monkeypatch, key=DecisionCache.key(model_files[0]), decisions=decisions).scores(_pixels(4))
    assert decisions[0].precision == "int8" and "not cached: OSError" in decisions[0].reason


# ------------------------------------------------------------------ the command
def _photos(folder, n):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        photo_like(96, 72, seed=i).save(folder / f"p{i}.jpg", quality=85)
    return folder


def test_tag_prints_and_caches_the_decision(model_files, tmp_path):
    weights, labels = model_files
    lib = _photos(tmp_path / "lib", 3)
    base = ["tag", str(lib), "--weights", str(weights), "--labels", str(labels), "--workers", "0",
            "--no-write", "--no-index", "-f", "jsonl", "--batch-size", "1"]
    args = [*base, "--precision", "auto", "--precision-check", "2"]
    first = CliRunner().invoke(app, args, catch_exceptions=False)
    assert first.exit_code == 0, first.output
    assert "precision: " in first.stderr and "auto:" in first.stderr  # in the run summary
    assert "fp32" in first.stderr and ("int8" in first.stderr or "no fast path" in first.stderr)
    assert sum(line.startswith("{") for line in first.stdout.splitlines()) == 3
    def report(stderr: str) -> list[str]:  # the decision's own lines ("precision int8: ..."), not the summary's
        return [line for line in stderr.splitlines() if line.startswith("precision ")]

    assert len(report(first.stderr)) == 1  # the measurements, once
    second = CliRunner().invoke(app, args, catch_exceptions=False)
    assert "auto, checked before:" in second.stderr and report(second.stderr) == []
    exact = CliRunner().invoke(app, [*base, "--precision", "fp32"], catch_exceptions=False)
    assert "precision: fp32" in exact.stderr and "auto" not in exact.stderr


def test_a_job_smaller_than_the_check_stays_fp32_and_says_so(model_files, tmp_path):
    weights, labels = model_files
    lib = _photos(tmp_path / "lib", 2)
    res = CliRunner().invoke(app, ["tag", str(lib), "--weights", str(weights), "--labels", str(labels),
                                   "--workers", "0", "--no-write", "--no-index", "-f", "jsonl"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "precision: fp32 (auto:" in res.stderr and "too few photos" in res.stderr


def test_the_bar_says_checking_precision_while_the_check_runs(model_files, tmp_path, monkeypatch):
    import io

    from rich.console import Console

    from ramcli.cli.progress import ConsoleListener
    from ramcli.tagging.options import TagOptions
    from ramcli.tagging.session import TagSession

    monkeypatch.setattr(runtimes, "fast_paths", lambda *model: ["int8"])
    weights, labels = model_files
    lib = _photos(tmp_path / "lib", 4)
    terminal = io.StringIO()
    err = Console(file=terminal, force_terminal=True, width=160)
    options = TagOptions(paths=[lib], weights=str(weights), labels=labels, precision="auto", precision_check=4,
                         batch_size=1, workers=0, write=False, use_index=False, fmt="jsonl",
                         output=tmp_path / "out.jsonl")
    with TagSession(options, ConsoleListener(Console(file=io.StringIO()), err)) as session:
        assert session.execute() == 0
    shown = terminal.getvalue()
    assert "checking precision" in shown and "tagging" in shown


@pytest.mark.parametrize("name", ["int8-weights", "int8-encoder"])
def test_openvinos_own_precisions_need_openvino(name, tmp_path):
    with pytest.raises(UsageError, match="--runtime openvino"):
        TagOptions([tmp_path], weights="model.pth", precision=name, write=False).validate()
    TagOptions([tmp_path], weights="model.pth", precision=name, runtime="openvino", write=False).validate()
    TagOptions([tmp_path], weights="model.xml", precision=name, write=False).validate()
