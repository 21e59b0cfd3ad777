"""Device resolution: CUDA, then Apple's MPS, then the CPU; MPS precision, decoding and fallback.

No Mac has run these: availability is monkeypatched, which checks ramcli's choices, not Metal.
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

import ramcli
from ramcli.tagging import pipeline
from ramcli.errors import UsageError
from ramcli.tagging.pipeline import default_batch_size, default_workers, resolve_decode, resolve_device
from ramcli.tagging.precision import resolve_precision

MPS = torch.device("mps")


@pytest.fixture
def gpus(monkeypatch):
    """Set what this 'machine' has: gpus(cuda=False, mps=True)."""
    def have(cuda: bool = False, mps: bool = False) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    return have


def test_auto_prefers_cuda_then_mps_then_cpu(gpus):
    gpus(cuda=False, mps=True)
    assert resolve_device("auto") == MPS
    gpus(cuda=False, mps=False)
    assert resolve_device("auto") == torch.device("cpu")
    gpus(cuda=True, mps=True)
    assert resolve_device("auto").type == "cuda"


def test_asking_for_a_missing_device_is_a_usage_error(gpus):
    gpus(cuda=False, mps=False)
    with pytest.raises(UsageError, match="--device mps: Apple's Metal backend is not available"):
        resolve_device("mps")
    with pytest.raises(UsageError, match="no CUDA device"):
        resolve_device("cuda")
    with pytest.raises(UsageError, match="unknown device"):
        resolve_device("tpu:0")
    gpus(cuda=False, mps=True)
    assert resolve_device("mps") == MPS


def test_mps_precision_decoding_and_sizes(gpus):
    assert resolve_precision(MPS, "auto") == "fp16"
    assert resolve_precision(MPS, "bf16") == "bf16" and resolve_precision(MPS, "fp32") == "fp32"
    with pytest.raises(UsageError, match="CPU only"):
        resolve_precision(MPS, "int8")
    assert resolve_decode(MPS, "auto") == "workers"  # Pillow in the CPU workers
    with pytest.raises(UsageError, match="cannot decode JPEGs on MPS"):
        resolve_decode(MPS, "device")
    assert default_batch_size(MPS) == 16
    gpus(cuda=False, mps=True)
    many = default_workers()
    gpus(cuda=False, mps=False)
    assert many >= default_workers()  # a GPU model leaves the cores to decoding


@pytest.mark.parametrize("cores, workers", [(1, 0), (2, 0), (3, 0), (4, 2), (16, 2)])
def test_cpu_decodes_in_process_on_few_cores(gpus, monkeypatch, cores, workers):
    gpus(cuda=False, mps=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    assert default_workers() == workers


def test_cpu_auto_precision_is_the_self_check():
    assert resolve_precision(torch.device("cpu"), "auto") == "auto"


def test_mps_fallback_to_the_cpu_is_switched_on_on_macos_only(monkeypatch):
    monkeypatch.delenv("PYTORCH_ENABLE_MPS_FALLBACK", raising=False)
    monkeypatch.setattr(sys, "platform", "darwin")
    importlib.reload(ramcli)
    assert pipeline.os.environ["PYTORCH_ENABLE_MPS_FALLBACK"] == "1"
    monkeypatch.setenv("PYTORCH_ENABLE_MPS_FALLBACK", "0")  # the user's own setting wins
    importlib.reload(ramcli)
    assert pipeline.os.environ["PYTORCH_ENABLE_MPS_FALLBACK"] == "0"
    monkeypatch.delenv("PYTORCH_ENABLE_MPS_FALLBACK")
    monkeypatch.setattr(sys, "platform", "linux")
    importlib.reload(ramcli)
    assert "PYTORCH_ENABLE_MPS_FALLBACK" not in pipeline.os.environ


def test_tag_command_names_the_missing_device(gpus, tmp_path, capsys):
    from conftest import run_cli

    gpus(cuda=False, mps=False)
    (tmp_path / "a.jpg").write_bytes(b"")
    assert run_cli(["tag", str(tmp_path), "--device", "mps", "--no-write", "--no-index"]) == 2
    err = capsys.readouterr().err
    assert "Metal backend is not available" in err and "Traceback" not in err


@pytest.mark.parametrize("weights", ["model.onnx", "model.XML"])
def test_a_converted_graph_runs_on_the_cpu_where_auto_would_pick_a_gpu(gpus, tmp_path, weights, monkeypatch):
    import ramcli.models
    from ramcli.tagging.options import TagOptions
    from ramcli.tagging.session import TagSession

    monkeypatch.setenv("RAMCLI_HOME", str(tmp_path))
    gpus(cuda=True, mps=False)
    monkeypatch.setattr(ramcli.models, "model_id_of", lambda weights: "a converted tagger")  # no real file needed
    options = TagOptions(paths=[tmp_path], weights=str(tmp_path / weights), write=False, use_index=False)
    assert TagSession(options).device == torch.device("cpu")
    with pytest.raises(UsageError, match="CUDA"):  # asked for by name, the GPU is still checked for
        gpus(cuda=False, mps=False)
        TagSession(TagOptions(paths=[tmp_path], weights=str(tmp_path / weights), device="cuda", write=False,
                              use_index=False))
