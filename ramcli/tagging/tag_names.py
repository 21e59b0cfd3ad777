"""Tag names as users type them: when two names are the same tag (`name_key`), and what a
typed name must be (`clean_name`). The vocabulary, its import files and the training label
systems hold names to these rules.
"""

from __future__ import annotations

from ramcli.errors import RamcliError
from ramcli.models.clip_text import processed_name


def name_key(name: str) -> str:
    """Two names with the same key would get the same CLIP embedding, so they are the same tag."""
    return " ".join(processed_name(name).split())


def clean_name(name: str, what: str = "tag name") -> str:
    """A stripped, single-spaced name, or a one-line error for empty or unprintable input."""
    cleaned = " ".join(str(name).split())
    if not cleaned:
        raise RamcliError(f"{what} is empty")
    if not cleaned.isprintable():
        raise RamcliError(f"{what} has control characters: {cleaned!r}")
    return cleaned
