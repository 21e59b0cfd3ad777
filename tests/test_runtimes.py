"""The precision paths' registry: one `register` call makes a path a `--precision` everywhere."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import ramcli.tagging.precision as precision
from ckpt_factory import make_labels_dir, make_official_checkpoint
from ramcli.errors import UsageError
from ramcli.models import load_any
from ramcli.tagging import runtimes
from ramcli.tagging.options import TagOptions
from ramcli.tagging.precision import Arithmetic, resolve_precision
from ramcli.tagging.runtimes import PrecisionPath
from ramcli.tagging.tagger import Tagger

CPU = torch.device("cpu")


class Shifted(torch.nn.Module):
    """A toy arithmetic whose logits are visibly not fp32's."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, classes=None):
        return self.model(x, classes) + 0.5


@pytest.fixture
def model(tmp_path):
    return load_any(make_official_checkpoint(tmp_path / "ram_tiny.pth", "ram_tiny", num_classes=20),
                    labels_dir=make_labels_dir(tmp_path, 20))


@pytest.fixture
def shifted(monkeypatch):
    """The registry with one more PyTorch path, checked by auto; restored afterwards."""
    monkeypatch.setattr(runtimes, "_PATHS", list(runtimes.paths()))
    return runtimes.register(PrecisionPath("shifted", "pytorch", "fp32 plus one half", Shifted,
                                           checked=lambda model: True))


def _pixels(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_a_registered_path_is_a_precision_everywhere(model, shifted, monkeypatch):
    assert "shifted" in runtimes.names() and runtimes.runtimes_of("shifted") == ["pytorch"]
    assert resolve_precision(CPU, "shifted") == "shifted"
    with pytest.raises(UsageError, match="CPU only"):
        resolve_precision(torch.device("cuda"), "shifted")
    TagOptions(paths=[], precision="shifted", write=False, use_index=False).validate()
    pixels = _pixels(2)
    exact, moved = Tagger(model, CPU, "fp32").scores(pixels), Tagger(model, CPU, "shifted").scores(pixels)
    torch.testing.assert_close(torch.logit(moved.double()), torch.logit(exact.double()) + 0.5, atol=1e-4, rtol=0)
    for name in ("MIN_SPEEDUP", "MIN_AGREEMENT"):
        monkeypatch.setattr(precision, name, 0.0)
    monkeypatch.setattr(precision, "MAX_SCORE_CHANGE", 1.0)
    decisions = []
    Tagger(model, CPU, "auto", check_photos=2, on_decision=decisions.append).scores(pixels)
    assert "shifted" in [m.name for m in decisions[0].measured]  # auto checks it against fp32


def test_a_path_of_another_runtime_is_refused_with_what_the_model_runs(model, monkeypatch):
    monkeypatch.setattr(runtimes, "_PATHS", list(runtimes.paths()))
    runtimes.register(PrecisionPath("only-elsewhere", "openvino", "a path only OpenVINO has", Shifted))
    with pytest.raises(UsageError, match="runs --precision auto, fp32, bf16, fp16, int8; not only-elsewhere"):
        Tagger(model, CPU, "only-elsewhere")
    with pytest.raises(UsageError, match="no --precision only-elsewhere"):
        Arithmetic.build("only-elsewhere", model, CPU)
    with pytest.raises(UsageError, match="is an OpenVINO path: add --runtime openvino"):
        TagOptions(paths=[], precision="only-elsewhere", write=False, use_index=False).validate()


def test_a_runtime_has_one_path_of_each_name(monkeypatch):
    monkeypatch.setattr(runtimes, "_PATHS", list(runtimes.paths()))
    with pytest.raises(ValueError, match="already has a path named bf16"):
        runtimes.register(PrecisionPath("bf16", "pytorch", "again", Shifted))


def test_the_registry_lists_every_runtime_without_importing_torch():
    code = ("import sys; from ramcli.tagging import runtimes; "
            "print(' '.join(runtimes.names()), sorted({p.runtime for p in runtimes.paths()}), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[:7] == ["auto", "fp32", "bf16", "fp16", "int8", "int8-weights", "int8-encoder"]
    assert out[-1] == "False"
