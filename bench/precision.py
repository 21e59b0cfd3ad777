"""Tag agreement of reduced-precision converted models with fp32, on the official sample photos.

`ramcli models convert --dtype bf16|fp16` halves the file; this measures what it costs in tags.
The weights are random (the published ones cannot be downloaded here) but in the official
layout and full size, so numerics are representative even though the tags are meaningless.
Agreement = tags emitted by both / tags emitted by either, over all photos.

    .venv/bin/python bench/precision.py [--arch ram_swin_large_384] [--photos DIR]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from _common import CACHE, checkpoint, jpegs
from ramcli.models import convert, load_any
from ramcli.tagging.pipeline import tag_files
from ramcli.tagging.tagger import Tagger


def tags_of(model, photos: list[Path], precision: str = "fp32") -> list[set[str]]:
    got: dict[str, set[str]] = {}

    def sink(results):
        got.update({r.path: {t.name for t in r.tags} for r in results})

    tag_files(photos, Tagger(model, torch.device("cpu"), precision), [sink], batch_size=len(photos), workers=0)
    return [got[str(p)] for p in photos]


def agreement(a: list[set[str]], b: list[set[str]]) -> float:
    union = sum(len(x | y) for x, y in zip(a, b))
    return sum(len(x & y) for x, y in zip(a, b)) / union if union else 1.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="ram_swin_large_384")
    ap.add_argument("--photos", type=Path, default=None, help="A folder of JPEGs (default: 8 generated 12 MP ones).")
    args = ap.parse_args()
    pth, labels = checkpoint(args.arch)
    photos = sorted(args.photos.glob("*.jpg")) if args.photos else jpegs(CACHE / "jpeg12mp", 8)
    reference = tags_of(load_any(pth, labels_dir=labels), photos)
    print(f"{args.arch} (random weights), {len(photos)} photos, fp32: "
          f"{sum(map(len, reference)) / len(photos):.0f} tags/photo")
    for dtype in ("bf16", "fp16"):
        dst = convert(pth, CACHE / f"{args.arch}-{dtype}.safetensors", dtype=dtype, labels_dir=labels)
        got = tags_of(load_any(dst, dtype=torch.float32), photos)
        print(f"converted {dtype} weights, fp32 compute: {dst.stat().st_size / 1e9:.2f} GB, "
              f"tag agreement {100 * agreement(reference, got):.2f}%")
    got = tags_of(load_any(pth, labels_dir=labels), photos, "bf16")
    print(f"fp32 weights, CPU bf16 autocast: tag agreement {100 * agreement(reference, got):.2f}%")


if __name__ == "__main__":
    main()
