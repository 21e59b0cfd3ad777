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
    root: Path

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def index(self) -> Path:
        return self.root / "index.db"

    @property
    def vocab(self) -> Path:
        return self.root / "vocab"

    @property
    def cache(self) -> Path:
        return self.root / "cache"


def home() -> Home:
    """The state directory: `$RAMCLI_HOME` or the platform's user data dir."""
    env = os.environ.get("RAMCLI_HOME")
    root = Path(env).expanduser() if env else Path(platformdirs.user_data_dir("ramcli"))
    return Home(root)
