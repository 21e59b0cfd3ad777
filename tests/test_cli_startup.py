"""The command line answers at once: `--help` and usage errors load no heavy library.

Each case runs in a fresh interpreter (this test process has long imported everything) and
reports which of the heavy modules the run loaded. Heavy means a noticeable share of a second in
`python -X importtime` on a 2-core machine: torch and what builds on it, NumPy, pandas (which
sqlite-utils pulls in when it is installed), the image codecs, ONNX Runtime, the lemmatizer.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from fresh_cli import REPO, FreshRun, run_ramcli

HEAVY = ("torch", "torchvision", "timm", "open_clip", "numpy", "pandas", "sqlite_utils", "onnx", "onnxruntime",
         "PIL", "pillow_heif", "rawpy", "transformers", "simplemma", "safetensors", "huggingface_hub", "watchfiles",
         "ramcli_train")


def run(*args: str, tmp_path: Path) -> FreshRun:
    return run_ramcli(*args, home=tmp_path / "home", cwd=tmp_path, extra_env={"COLUMNS": "100"}, timeout=120)


COMMANDS = ["tag", "watch", "search", "show", "stats", "write", "untag", "vocab", "vocab add", "vocab list",
            "models", "models pull", "train", "finetune", "distill", "eval", "engine generate", "doctor", "parse",
            "synth", "index merge"]


@pytest.mark.parametrize("command", ["", *COMMANDS])
def test_help_loads_nothing_heavy(command, tmp_path):
    result = run(*command.split(), "--help", tmp_path=tmp_path)
    assert result.code == 0 and "Usage: ramcli" in result.stdout
    assert result.modules_of(HEAVY) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["tag", "--format", "yaml", "photo.jpg"], "'yaml' is not one of"),
        (["tag", "--batch-size", "many", "photo.jpg"], "--batch-size"),
        (["tag", "--weights", "missing.pth", "."], "weights file not found: missing.pth"),
        (["tag", "no-such-folder"], "no such file or folder"),
        (["tga", "photo.jpg"], "Did you mean 'tag'?"),
        (["search", "--limit"], "--limit"),
        (["search", "dog", "-night"], "not night"),
        (["models", "pull", "--frobnicate"], "No such option"),
    ],
)
def test_usage_errors_are_one_line_exit_2_and_load_nothing_heavy(args, message, tmp_path):
    result = run(*args, tmp_path=tmp_path)
    err = result.stderr.splitlines()
    assert result.code == 2, result.stderr
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert result.modules_of(HEAVY) == []
    assert not (tmp_path / "home").exists()  # nothing created for a command that did not run


def test_version(tmp_path):
    for flag in ("-V", "--version"):
        result = run(flag, tmp_path=tmp_path)
        assert result.code == 0 and result.stdout.startswith("ramcli ") and result.modules_of(HEAVY) == []


def test_no_color_means_no_escape_codes_even_on_a_terminal(tmp_path):
    env = {**os.environ, "FORCE_COLOR": "1", "TTY_COMPATIBLE": "1", "PYTHONPATH": str(REPO),
           "RAMCLI_HOME": str(tmp_path)}
    for args in (["--help"], ["tag", "no-such-folder"]):
        coloured = subprocess.run([sys.executable, "-m", "ramcli", *args], capture_output=True, text=True, env=env)
        assert "\x1b[" in coloured.stdout + coloured.stderr  # the check can see escape codes
        plain = subprocess.run([sys.executable, "-m", "ramcli", *args], capture_output=True, text=True,
                               env={**env, "NO_COLOR": "1"})
        assert "\x1b[" not in plain.stdout + plain.stderr and ("Usage: ramcli" in plain.stdout or plain.stderr.startswith("error: "))
