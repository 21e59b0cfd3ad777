"""End-to-end CPU tagging throughput: ramcli's pipeline vs an official-style baseline, same run.

Random-weight RAM Swin-L (official layout), a folder of generated 12 MP photo-like JPEGs.

  baseline : one image at a time: full PIL decode, the official torchvision transform
             (Resize((384,384)), ToTensor, Normalize), fp32 forward at batch 1.
  ramcli   : the `ramcli tag` pipeline (draft decode in worker processes, batches, strict
             thresholds), in fp32 (eager and torch.compile'd: the default for jobs of 100+
             photos) and in bf16 autocast; img/s and agreement of the emitted tags
             with the baseline's (per photo and tag: same decision).

    .venv/bin/python bench/tag_cpu.py [--images 8] [--batch-size 4] [--workers 1] [--arch ram_swin_large_384]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from PIL import Image
from torchvision import transforms

from _common import CACHE, checkpoint, jpegs
from ramcli.imaging import IMAGENET_MEAN, IMAGENET_STD
from ramcli.models import load_any
from ramcli.pipeline import Tagger, tag_files


def baseline(model, paths: list[Path]) -> tuple[float, list[set[str]]]:
    """The official inference script's way, one photo after the other."""
    size = model.arch.image_size
    tf = transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor(),
                             transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    th = torch.tensor(model.labels.thresholds)
    names = model.labels.names
    tags = []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for p in paths:
            x = tf(Image.open(p).convert("RGB")).unsqueeze(0)
            keep = (torch.sigmoid(model(x))[0] > th).nonzero().flatten().tolist()
            tags.append({names[i] for i in keep})
    return len(paths) / (time.perf_counter() - t0), tags


def ramcli_run(model, paths: list[Path], precision: torch.dtype | None, batch: int, workers: int,
               compile: bool = False):
    tagger = Tagger(model, torch.device("cpu"), precision, compile=compile)
    if compile:  # steady state of a large job: the one-off compilation is timed and reported apart
        t0 = time.perf_counter()
        tag_files(paths[:batch], tagger, [lambda r: None], batch_size=batch, workers=0)
        print(f"  (torch.compile took {time.perf_counter() - t0:.0f} s once)")
    got: dict[str, set[str]] = {}

    def sink(results):
        for r in results:
            got[r.path] = {t.name for t in r.tags}

    t0 = time.perf_counter()
    tag_files(paths, tagger, [sink], batch_size=batch, workers=workers)
    rate = len(paths) / (time.perf_counter() - t0)
    return rate, [got[str(p)] for p in paths]


def agreement(a: list[set[str]], b: list[set[str]]) -> float:
    """Tag agreement: emitted tags in common over tags emitted by either (summed over photos).

    Stricter than counting all 4,585 yes/no decisions, which would be ~99.9% for any model.
    """
    union = sum(len(x | y) for x, y in zip(a, b))
    return sum(len(x & y) for x, y in zip(a, b)) / union if union else 1.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="ram_swin_large_384")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args()
    pth, labels = checkpoint(args.arch)
    photos = jpegs(CACHE / "jpeg12mp", args.images)
    model = load_any(pth, labels_dir=labels)
    print(f"{args.arch}, {len(photos)} x 12 MP JPEGs, {torch.get_num_threads()} threads, "
          f"batch {args.batch_size}, {args.workers} decode worker(s)")
    ramcli_run(model, photos[:1], None, 1, 0)  # warm-up (allocator, oneDNN kernels)
    base_rate, base_tags = baseline(model, photos)
    fired = sum(len(t) for t in base_tags) / len(base_tags)
    print(f"{'baseline (official-style)':28} {base_rate:7.3f} img/s   ({fired:.0f} tags/photo)")
    runs = {}
    variants = (("ramcli fp32", None, False), ("ramcli fp32 compiled", None, True),
                ("ramcli bf16 autocast", torch.bfloat16, False))
    for name, dtype, compiled in variants:
        rate, tags = ramcli_run(model, photos, dtype, args.batch_size, args.workers, compiled)
        runs[name] = tags
        agree = agreement(base_tags, tags)
        exact = sum(a == b for a, b in zip(base_tags, tags)) / len(tags)
        print(f"{name:28} {rate:7.3f} img/s   {rate / base_rate:4.2f}x   tag agreement {100 * agree:.2f}%"
              f"   identical tag sets {100 * exact:.0f}%")
    print(f"bf16 vs fp32 on the same (draft-decoded) input: tag agreement "
          f"{100 * agreement(runs['ramcli fp32'], runs['ramcli bf16 autocast']):.2f}%")


if __name__ == "__main__":
    main()
