"""End-to-end CPU tagging throughput: ramcli's pipeline vs an official-style baseline, same run.

Random-weight RAM Swin-L (official layout), a folder of generated 12 MP photo-like JPEGs.

  baseline : one image at a time: full PIL decode, the official torchvision transform
             (Resize((384,384)), ToTensor, Normalize), fp32 forward at batch 1.
  ramcli   : the `ramcli tag` pipeline (full decode in worker processes, batches, strict
             thresholds) in fp32 (eager, and torch.compile'd: the default for jobs of 100+
             photos) and in bf16 autocast (eager and compiled).

Agreement of the emitted tags with the baseline's = tags emitted by both / tags emitted by
either, with the count of tags that differ. Two reference rows say how much of a disagreement
is arithmetic noise rather than a worse pipeline: the fp32 model on the baseline's own pixels
(full decode) at batch 4, and the count of baseline scores within 0.001 of their threshold
(random weights put many there; any change of pixels or arithmetic flips some of them).

    .venv/bin/python bench/tag_cpu.py [--images 24] [--batch-size 4] [--workers 1] [--arch ram_swin_large_384]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN, IMAGENET_DEFAULT_STD as IMAGENET_STD
from torchvision import transforms

from _common import CACHE, checkpoint, jpegs, load_average

from ramcli.imaging import load_for_model
from ramcli.models import load_any
from ramcli.pipeline import Tagger, tag_files

Tags = list[set[str]]


def baseline(model, paths: list[Path]) -> tuple[float, Tags, torch.Tensor]:
    """The official inference script's way, one photo after the other."""
    size = model.arch.image_size
    tf = transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor(),
                             transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    th = torch.tensor(model.labels.thresholds)
    names = model.labels.names
    tags, scores = [], []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for p in paths:
            x = tf(Image.open(p).convert("RGB")).unsqueeze(0)
            s = torch.sigmoid(model(x))[0]
            tags.append({names[i] for i in (s > th).nonzero().flatten().tolist()})
            scores.append(s)
    return len(paths) / (time.perf_counter() - t0), tags, torch.stack(scores)


def ramcli_run(model, paths: list[Path], precision: torch.dtype | None, batch: int, workers: int,
               compile: bool = False) -> tuple[float, Tags]:
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


def full_decode_fp32(model, paths: list[Path], batch: int) -> Tags:
    """The fp32 model on the baseline's exact pixels, in batches: the arithmetic noise floor."""
    tagger = Tagger(model, torch.device("cpu"), None)
    out = []
    for i in range(0, len(paths), batch):
        pixels = torch.stack([load_for_model(p, tagger.image_size, draft=False).pixels for p in paths[i:i + batch]])
        for row in tagger.decide(tagger.scores(pixels)):
            out.append({t.name for t in row})
    return out


def agreement(a: Tags, b: Tags) -> tuple[float, int]:
    """(tags emitted by both / tags emitted by either, number of tags emitted by only one).

    Stricter than counting all 4,585 yes/no decisions, which would be ~99.9% for any model.
    """
    union = sum(len(x | y) for x, y in zip(a, b))
    both = sum(len(x & y) for x, y in zip(a, b))
    return (both / union if union else 1.0), union - both


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="ram_swin_large_384")
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args()
    pth, labels = checkpoint(args.arch)
    photos = jpegs(CACHE / "jpeg12mp", args.images)
    model = load_any(pth, labels_dir=labels)
    print(f"{args.arch}, {len(photos)} x 12 MP JPEGs, {torch.get_num_threads()} threads, "
          f"batch {args.batch_size}, {args.workers} decode worker(s); load average {load_average()}")
    ramcli_run(model, photos[:1], None, 1, 0)  # warm-up (allocator, oneDNN kernels)
    base_rate, base_tags, base_scores = baseline(model, photos)
    fired = sum(len(t) for t in base_tags)
    near = ((base_scores - torch.tensor(model.labels.thresholds)).abs() < 1e-3).sum().item()
    print(f"{'baseline (official-style)':28} {base_rate:7.3f} img/s   {fired} tags emitted; "
          f"{near / len(photos):.1f} scores per photo within 0.001 of their threshold")
    floor, floor_n = agreement(base_tags, full_decode_fp32(model, photos, args.batch_size))
    print(f"{'  fp32, same pixels, batch':28} {'':7}         {'':5}   tag agreement {100 * floor:.2f}% "
          f"({floor_n} differ): the arithmetic noise floor")
    runs = {}
    variants = (("ramcli fp32", None, False), ("ramcli fp32 compiled", None, True),
                ("ramcli bf16 autocast", torch.bfloat16, False), ("ramcli bf16 compiled", torch.bfloat16, True))
    for name, dtype, compiled in variants:
        rate, tags = ramcli_run(model, photos, dtype, args.batch_size, args.workers, compiled)
        runs[name] = tags
        agree, differ = agreement(base_tags, tags)
        print(f"{name:28} {rate:7.3f} img/s   {rate / base_rate:4.2f}x   tag agreement {100 * agree:.2f}% "
              f"({differ} differ)")
    agree, differ = agreement(runs["ramcli fp32"], runs["ramcli bf16 autocast"])
    print(f"bf16 vs fp32 on the same input: tag agreement {100 * agree:.2f}% ({differ} differ)")
    print(f"load average at the end: {load_average()}")


if __name__ == "__main__":
    main()
