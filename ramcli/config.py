"""Where ramcli keeps its state.

One home, `RAMCLI_HOME` (default: the platform's user data dir), holds models, the vocabulary
and the index, so that `doctor` can show it and a user can move or wipe it in one place.
Every command also accepts explicit paths, which win over the home.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import platformdirs


@dataclass(frozen=True)
class Home:
    """The state directory and the places in it, laid out by `home()`."""

    root: Path
    models: Path
    index: Path
    vocab: Path
    cache: Path


def home() -> Home:
    """The state directory: `$RAMCLI_HOME` or the platform's user data dir."""
    env = os.environ.get("RAMCLI_HOME")
    root = Path(env).expanduser() if env else Path(platformdirs.user_data_dir("ramcli"))
    return Home(root, models=root / "models", index=root / "index.db", vocab=root / "vocab", cache=root / "cache")
