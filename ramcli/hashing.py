"""SHA-256 of a file: what verifies a download against its pinned digest and names the weights
that made an embedding. One implementation, read in blocks so a 4.5 GB checkpoint costs no memory."""

from __future__ import annotations

import hashlib
from pathlib import Path

BLOCK = 16 << 20


def file_sha256(path: Path | str) -> str:
    """The hex SHA-256 of the file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(BLOCK):
            digest.update(block)
    return digest.hexdigest()
