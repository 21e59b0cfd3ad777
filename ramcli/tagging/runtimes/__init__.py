"""The precision paths: every way a tagging graph can compute, one module per runtime.

A path is a runtime (PyTorch, ONNX Runtime, OpenVINO) and an arithmetic (fp32, bf16, int8...):
what `--precision NAME` builds, where it runs, and whether `--precision auto` checks it against
fp32 on this machine (`ramcli.tagging.precision`). Each module of this package registers its
runtime's paths with `register`; the modules are found by listing the package, so adding a path
is one `register(...)` call in its runtime's module, and adding a runtime is one new module.
`--precision`'s choices, its help and the usage errors all come from here.

Importing this package must stay cheap (`ramcli --help` lists the choices): the modules import
torch and their runtimes inside the functions they register, never at the top.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


def itself(model: Any) -> Any:
    """The build of a path that runs the model as it is (autocast, or the file's own arithmetic)."""
    return model


def always(model: Any) -> bool:
    return True


def never(model: Any) -> bool:
    return False


@dataclass(frozen=True)
class PrecisionPath:
    name: str  #: the `--precision` value
    runtime: str  #: "pytorch", "onnxruntime" or "openvino" (`runtime_of`)
    summary: str  #: one line for the docs and messages
    #: the module that computes `model` in this arithmetic (the model itself, a quantised copy,
    #: a graph compiled for it)
    build: Callable[[Any], Any]
    #: PyTorch device types it runs on ("cpu", "cuda", "mps"); other runtimes pick their own device
    devices: tuple[str, ...] = ("cpu",)
    #: the torch dtype name PyTorch autocasts to while it runs (None: none)
    autocast: str | None = None
    #: whether `model` can run this path at all (an int8 ONNX file has no fp32 path)
    offered: Callable[[Any], bool] = always
    #: whether `--precision auto` checks it against fp32 for `model` on this machine: the fast
    #: paths that can keep a trained model's tags (docs/performance.md)
    checked: Callable[[Any], bool] = never


#: The runtime of every model that does not name another: its paths are listed first.
DEFAULT = "pytorch"
_PATHS: list[PrecisionPath] = []
_loaded = False


def register(path: PrecisionPath) -> PrecisionPath:
    """Add a path (in the order auto should prefer them when they are equally fast)."""
    if any(p.runtime == path.runtime and p.name == path.name for p in _PATHS):
        raise ValueError(f"{path.runtime} already has a path named {path.name}")
    _PATHS.append(path)
    return path


def paths(runtime: str | None = None) -> list[PrecisionPath]:
    """Every registered path, or those of one runtime."""
    global _loaded
    if not _loaded:
        _loaded = True
        modules = sorted((m.name for m in pkgutil.iter_modules(__path__)), key=lambda name: name != DEFAULT)
        for name in modules:
            importlib.import_module(f"{__name__}.{name}")
    return [p for p in _PATHS if runtime is None or p.runtime == runtime]


def names() -> tuple[str, ...]:
    """Every `--precision` value: auto, then each path's name once."""
    return ("auto", *dict.fromkeys(p.name for p in paths()))


def runtimes_of(name: str) -> list[str]:
    """The runtimes that have a path called `name`."""
    return [p.runtime for p in paths() if p.name == name]


def runtime_of(model: Any) -> str:
    """Which runtime computes `model`: a converted graph says so (`runtime`), else PyTorch."""
    return getattr(model, "runtime", None) or DEFAULT


def lookup(model: Any, name: str) -> PrecisionPath | None:
    """The path called `name` of `model`'s runtime, if `model` can run it."""
    runtime = runtime_of(model)
    return next((p for p in paths(runtime) if p.name == name and p.offered(model)), None)


def offered(model: Any) -> list[str]:
    """The `--precision` values `model` runs (besides auto)."""
    return [p.name for p in paths(runtime_of(model)) if p.offered(model)]


def fast_paths(model: Any = None) -> list[str]:
    """The paths auto checks against fp32 for `model` (None: a PyTorch model) on this machine."""
    return [p.name for p in paths(runtime_of(model)) if p.offered(model) and p.checked(model)]
