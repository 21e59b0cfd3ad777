"""Weights files are read without running code from them, and hashed in one way."""

from __future__ import annotations

import hashlib
import os

import pytest
import torch
from safetensors.torch import save_file

from ramcli.errors import CheckpointError
from ramcli.hashing import file_sha256
from ramcli.models.safeload import load_weights


class Payload:
    """Unpickling this would call `os.system`: the loader must refuse before that."""

    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_plain_checkpoints_and_safetensors_load(tmp_path):
    state = {"model": {"w": torch.arange(6.0).view(2, 3)}, "epoch": 3, "names": ["a", "b"]}
    torch.save(state, tmp_path / "ckpt.pth")
    for mmap in (False, True):
        loaded = load_weights(tmp_path / "ckpt.pth", mmap=mmap)
        assert loaded["epoch"] == 3 and loaded["names"] == ["a", "b"]
        torch.testing.assert_close(loaded["model"]["w"], state["model"]["w"])
    save_file({"x": torch.ones(2)}, tmp_path / "t.safetensors")
    torch.testing.assert_close(load_weights(tmp_path / "t.safetensors")["x"], torch.ones(2))


def test_code_in_a_pickle_is_refused_not_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"model": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match=r"refusing to load evil.pth: .*\(of posix.system\)"):
        load_weights(tmp_path / "evil.pth")
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("name, content, message", [
    ("garbage.pth", b"not a checkpoint" * 10, "not a PyTorch checkpoint"),
    ("garbage.safetensors", b"not safetensors" * 10, "not a valid safetensors file"),
])
def test_damaged_files_are_one_line_errors(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(CheckpointError, match=message) as info:
        load_weights(tmp_path / name)
    assert "\n" not in str(info.value)
    with pytest.raises(CheckpointError, match="not found"):
        load_weights(tmp_path / "absent.pth")


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    torch.save({"w": torch.zeros(1000)}, tmp_path / "full.pth")
    data = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot read cut.pth"):
        load_weights(tmp_path / "cut.pth")


def test_file_sha256_reads_in_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr("ramcli.hashing.BLOCK", 7)  # many blocks and a short last one
    data = bytes(range(256)) * 5
    (tmp_path / "f").write_bytes(data)
    assert file_sha256(tmp_path / "f") == hashlib.sha256(data).hexdigest()
