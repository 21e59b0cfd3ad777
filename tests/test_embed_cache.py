"""The fp16 image-embedding cache and decoder-only re-scoring of new tags."""

from __future__ import annotations

import hashlib

import pytest
import torch
from ckpt_factory import make_labels_dir, make_official_checkpoint

from ramcli.tagging.embed_cache import EmbeddingCache, rescore
from ramcli.errors import RamcliError
from ramcli.models import load_model

NUM_CLASSES = 20


def keys_for(n: int) -> list[str]:
    return [hashlib.sha256(str(i).encode()).hexdigest() for i in range(n)]


def unit(rows: int, seed: int) -> torch.Tensor:
    x = torch.randn(rows, 512, generator=torch.Generator().manual_seed(seed))
    return x / x.norm(dim=-1, keepdim=True)


@pytest.fixture(scope="module", params=["ram_tiny", "ram_plus_tiny"])
def model(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    path = make_official_checkpoint(root / "m.pth", request.param, NUM_CLASSES, des_per_class=3, seed=1)
    return load_model(path, labels_dir=make_labels_dir(root, NUM_CLASSES))


def test_put_get_is_fp16_and_compact(tmp_path, model):
    cache = EmbeddingCache(model.model_id, tmp_path)
    x = torch.randn(4, 3, model.arch.image_size, model.arch.image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        embeds = model.encode_image(x)
    keys = keys_for(4)
    cache.put(keys, embeds)
    got = cache.get(keys[::-1])
    assert got.dtype == torch.float16 and got.shape == embeds.shape
    torch.testing.assert_close(got, embeds.flip(0).half(), atol=0, rtol=0)
    assert sorted(cache.keys()) == sorted(keys) and keys[0] in cache
    raw = embeds[0].numel() * 2
    assert raw <= cache.size_bytes() / 4 <= raw + 512  # fp16 payload plus a small header


def test_new_tag_rescoring_equals_full_scoring(tmp_path, model):
    """Decoder-only scores of tags added after caching match a full forward with those tags."""
    cache = EmbeddingCache(model.model_id, tmp_path)
    x = torch.randn(5, 3, model.arch.image_size, model.arch.image_size, generator=torch.Generator().manual_seed(1))
    keys = keys_for(5)
    with torch.no_grad():
        cache.put(keys, model.encode_image(x))
    if model.arch.family == "ram":
        model.add_label_queries(unit(2, 2), ["tram", "funicular"], ["tram", "funicular"], [0.5, 0.5])
    else:  # unequal description counts
        model.add_label_queries(unit(5, 2), ["tram", "funicular"], ["tram", "funicular"], [0.5, 0.5], [3, 2])
    new = torch.tensor([NUM_CLASSES, NUM_CLASSES + 1])
    scores = rescore(model, cache, keys, new, batch_size=2)
    with torch.no_grad():
        full = torch.sigmoid(model(x))[:, new]
        exact = torch.sigmoid(model.decode(cache.get(keys).float(), classes=new))
    assert scores.shape == (5, 2)
    torch.testing.assert_close(scores, exact, atol=1e-6, rtol=0)  # same computation
    torch.testing.assert_close(scores, full, atol=2e-3, rtol=0)  # fp16 storage costs little
    assert (scores[:, 0] - scores[:, 1]).abs().max() > 1e-3


def test_bad_and_missing_keys(tmp_path):
    cache = EmbeddingCache("file:abc", tmp_path)
    assert cache.dir.name == "file_abc"
    with pytest.raises(RamcliError, match="bad embedding-cache key"):
        cache.put(["../../etc"], torch.zeros(1, 2, 512))
    with pytest.raises(RamcliError, match="1 photos have no cached embeddings"):
        cache.get(keys_for(1))
