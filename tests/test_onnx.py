"""ONNX export (`ramcli models convert SRC DST.onnx`) and tagging with ONNX Runtime.

The exported graph must give PyTorch fp32's logits within 1e-4 on the same pixels, for every
family and any batch size, and carry its labels, thresholds and data config.
"""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from ckpt_factory import make_labels_dir, make_official_checkpoint
from images import photo_like
from ramcli.cli.app import app
from ramcli.errors import CheckpointError, UsageError
from ramcli.models import load_any
from ramcli.models.onnx import OnnxModel, export_onnx, read_onnx_metadata
from ramcli.pipeline import Tagger

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


def test_tag_with_onnx_weights_gives_the_pytorch_tags(exported, tmp_path):
    pth, labels, dst = exported["ram_tiny"]
    lib = tmp_path / "lib"
    lib.mkdir()
    for i in range(3):
        photo_like(120, 90, seed=i).save(lib / f"p{i}.jpg", quality=85)
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
    with pytest.raises(UsageError, match="not in this ONNX file.*Export it again"):
        onnx_model.add_label_queries(embeds[:1], ["cable car"], ["缆车"], [0.5])


def test_onnx_runs_on_the_cpu_in_its_own_arithmetic(exported):
    _, _, dst = exported["tag2text_tiny"]
    model = load_any(dst)
    with pytest.raises(UsageError, match="computes in fp32"):
        Tagger(model, torch.device("cpu"), "int8")
    with pytest.raises(UsageError, match="logits only"):
        Tagger(model, torch.device("cpu"), "fp32", cache=object())
    decisions = []
    Tagger(model, torch.device("cpu"), "auto", on_decision=decisions.append)
    assert decisions[0].precision == "fp32" and "ONNX" in decisions[0].reason


def test_onnx_is_exported_in_fp32_only(exported, tmp_path, capsys):
    from conftest import run_cli

    pth, labels, _ = exported["ram_tiny"]
    code = run_cli(["models", "convert", str(pth), str(tmp_path / "q.onnx"), "--dtype", "bf16", "--labels", str(labels)])
    err = capsys.readouterr().err
    assert code != 0 and "unknown ONNX dtype" in err and "Traceback" not in err
    assert not (tmp_path / "q.onnx").exists()


def test_not_an_onnx_tagger_is_a_clear_error(tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(CheckpointError, match="not a valid ONNX file"):
        load_any(junk)
    res = CliRunner().invoke(app, ["tag", str(tmp_path), "--weights", str(junk), "--no-write", "--no-index"])
    assert res.exit_code != 0 and "Traceback" not in res.output
