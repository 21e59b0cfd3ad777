"""Adding one tag to already-tagged photos: decoder-only re-scoring vs a full re-tag.

Full re-tag: `model(images)` for every class (backbone + decoder), what a re-run of `ramcli tag`
costs without the cache. Decoder-only: the photos' fp16 embeddings are read from an
`EmbeddingCache` and only the recognition decoder runs, for the one new tag (`rescore`).
Random weights (timing only), same model and photos for both; each side is timed as its best
pass after a warm-up. Goal: decoder-only >= 20x cheaper.

    .venv/bin/python bench/vocab_decoder.py [--arch ram_tiny] [--images 8] [--passes 3]
    .venv/bin/python bench/vocab_decoder.py --arch ram_swin_large_384 --images 2 --passes 1
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from ramcli.tagging.embed_cache import EmbeddingCache, rescore
from ramcli.models import get_arch
from ramcli.models.ram import RecognitionModel


def build(arch_name: str) -> RecognitionModel:
    torch.manual_seed(0)
    model = RecognitionModel(get_arch(arch_name)).eval()
    with torch.no_grad():
        table = torch.randn_like(model.label_embed)
        model.label_embed.copy_(table / table.norm(dim=-1, keepdim=True))
    return model


def best_of(passes: int, fn) -> float:
    fn()  # warm-up
    times = []
    for _ in range(passes):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="ram_tiny", help="an architecture from ramcli.models.ARCHS")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = build(args.arch)
    size = model.arch.image_size
    x = torch.randn(args.images, 3, size, size, generator=torch.Generator().manual_seed(1))
    keys = [f"{i:064x}" for i in range(args.images)]
    new = torch.randn(1, 512)
    counts = [1] if model.arch.family == "ram" else None
    model.add_label_queries(new / new.norm(), ["tram"], ["tram"], [0.5], counts)
    new_class = torch.tensor([model.num_classes - 1])

    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        cache = EmbeddingCache(model.model_id, Path(tmp))
        cache.put(keys, model.encode_image(x))
        full = best_of(args.passes, lambda: model(x))
        decoder = best_of(args.passes, lambda: rescore(model, cache, keys, new_class))
        per_photo_kb = cache.size_bytes() / args.images / 1024

    print(f"arch {args.arch}  classes {model.num_classes}  images {args.images}  threads {args.threads}")
    print(f"{'full re-tag (all classes)':34s} {full:9.4f} s   {full / args.images * 1000:9.2f} ms/photo")
    print(f"{'decoder-only, 1 new tag (cache)':34s} {decoder:9.4f} s   {decoder / args.images * 1000:9.2f} ms/photo")
    print(f"speed-up {full / decoder:.1f}x (goal >= 20x); cache {per_photo_kb:.1f} KB/photo on disk (fp16)")


if __name__ == "__main__":
    main()
