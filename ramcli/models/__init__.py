"""The RAM model family: configs, the model, checkpoint loading and the published-model registry.

`load_model` (in `loading.py`) is the one entry point the rest of ramcli uses:

    from ramcli.models import load_model
    model = load_model("photo-weights.pth")            # an official checkpoint, arch inferred

The package's names load on first use (PEP 562): its light modules (`labels`, `registry`,
`configs`) are then importable by the command line without torch and timm.
"""

from __future__ import annotations

import importlib


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    return getattr(importlib.import_module("ramcli.models.loading"), name)
