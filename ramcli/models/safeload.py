"""Read weights files without running code from them.

A `.pth` is a pickle, and unpickling a file from the internet can run anything. Every weights file
ramcli reads (published checkpoints, CLIP weights, label embeddings, training checkpoints) comes
through `load_weights`: `torch.load(weights_only=True)`, which only rebuilds tensors and plain
containers, or safetensors, which holds nothing else. A refusal or a damaged file becomes one
`CheckpointError` line.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from ramcli.errors import CheckpointError


def load_weights(path: Path | str, mmap: bool = False) -> Any:
    """The contents of a PyTorch file (tensors, dicts, lists, numbers, strings) or a
    `.safetensors` file's tensors, on the CPU.

    `mmap=True` maps a zip-format PyTorch file instead of reading it: a multi-GB checkpoint of
    which only the tagging tensors are needed then costs no copy of the rest.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"cannot read {path.name}: empty file (0 bytes)")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"cannot read {path.name}: not a valid safetensors file ({_first_line(exc)})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except pickle.UnpicklingError as exc:
        refused = re.search(r"GLOBAL ([\w.]+)", str(exc))  # torch's message is a paragraph
        if refused:
            raise CheckpointError(
                f"refusing to load {path.name}: it needs full unpickling (of {refused.group(1)[:120]}), "
                "which could run code"
            ) from None
        raise CheckpointError(f"cannot read {path.name}: not a PyTorch checkpoint") from None
    except Exception as exc:  # noqa: BLE001 - a damaged pickle or zip fails wherever its bytes lead (IndexError, KeyError, ...)
        raise CheckpointError(
            f"cannot read {path.name}: truncated or not a PyTorch checkpoint ({_first_line(exc)})"
        ) from None


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:160]
