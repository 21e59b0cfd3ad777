"""An opt-in on-disk cache of image embeddings, so new tags can be scored without the backbone.

The Swin backbone is nearly all of RAM's cost; the recognition decoder that turns image
embeddings into tag scores is small. With `--cache-embeddings`, `ramcli tag` keeps each photo's
`model.encode_image` output (fp16, ~145 KB for a 384-px RAM/RAM++ photo) keyed by model and
photo content hash; adding a tag later re-runs only the decoder for that tag (`rescore`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from ramcli.errors import RamcliError
from ramcli.fileio import atomic_write

_KEY = re.compile(r"^[A-Za-z0-9_-]{8,128}$")
_TENSOR = "image_embeds"


class EmbeddingCache:
    """fp16 image embeddings of one model, one small safetensors file per photo."""

    def __init__(self, model_id: str, root: Path | None = None):
        if root is None:
            from ramcli.config import home

            root = home().cache / "embeddings"
        # model ids like "file:<sha>" become safe folder names
        self.dir = Path(root) / re.sub(r"[^A-Za-z0-9_.-]", "_", model_id)

    def _path(self, key: str) -> Path:
        if not _KEY.match(key):
            raise RamcliError(f"bad embedding-cache key {key!r}: expected a content hash")
        return self.dir / key[:2] / f"{key}.safetensors"

    def __contains__(self, key: str) -> bool:
        return self._path(key).is_file()

    def put(self, keys: Sequence[str], image_embeds: torch.Tensor) -> None:
        """Store (B, 1+L, D) embeddings, one per key, as fp16 (atomic per file)."""
        if len(keys) != image_embeds.shape[0]:
            raise ValueError(f"{len(keys)} keys for {image_embeds.shape[0]} embeddings")
        half = image_embeds.detach().to("cpu", torch.float16)
        for key, embeds in zip(keys, half):
            path = self._path(key)
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, save({_TENSOR: embeds.contiguous()}))

    def get(self, keys: Sequence[str]) -> torch.Tensor:
        """(B, 1+L, D) fp16 embeddings of `keys`; a one-line error names how many are missing."""
        paths = [self._path(k) for k in keys]
        missing = [k for k, p in zip(keys, paths) if not p.is_file()]
        if missing:
            raise RamcliError(f"{len(missing)} photos have no cached embeddings (first: {missing[0]}); "
                              f"tag them again with --cache-embeddings")
        return torch.stack([load_file(str(p))[_TENSOR] for p in paths])

    def keys(self) -> Iterator[str]:
        for path in sorted(self.dir.glob("*/*.safetensors")):
            yield path.stem

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.dir.glob("*/*.safetensors"))


@torch.no_grad()
def rescore(model, cache: EmbeddingCache, keys: Sequence[str], classes: torch.Tensor | Sequence[int],
            batch_size: int = 64) -> torch.Tensor:
    """Scores (N, K) in [0, 1] of label `classes` (e.g. the new custom tags' indices after
    `vocab_apply.apply_to_model`) for cached photos, running only the recognition decoder.

    Works for RAM and RAM++ alike: RAM++'s per-image description reweighting needs only the
    pooled token, which the cached embeddings hold.
    """
    classes = torch.as_tensor(classes, dtype=torch.long)
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    scores = []
    for start in range(0, len(keys), batch_size):
        embeds = cache.get(keys[start:start + batch_size]).to(device, dtype)
        scores.append(torch.sigmoid(model.decode(embeds, classes=classes.to(device)).float()).cpu())
    if not scores:
        return torch.zeros(0, len(classes))
    return torch.cat(scores)
