"""GPU tagging throughput, prepared to finish in under 5 minutes on one GPU.

Prints img/s for: decode alone (CPU draft decode in worker processes vs nvJPEG on the GPU),
model alone (batch 1/32/128, bf16 eager vs torch.compile), and end to end (12 MP JPEGs ->
tags) with the `ramcli tag` pipeline, decoding in the CPU workers and on the GPU (`--decode`), plus an official-style baseline (full decode, fp32,
batch 1) in the same run. Random-weight RAM Swin-L in the official layout.

    python bench/gpu_tag.py [--images 256] [--workers 16] [--quick]

`--quick` shrinks everything (and runs on the CPU when there is no GPU) to check the script.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from _common import CACHE, checkpoint, jpegs
from ramcli.media.loader import make_loader
from ramcli.models import load_any
from ramcli.tagging.pipeline import tag_files
from ramcli.tagging.tagger import Tagger


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeat: int = 3) -> float:
    fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / repeat


def decode_cpu(paths: list[Path], size: int, workers: int) -> float:
    t0 = time.perf_counter()
    n = sum(len(b.items) for b in make_loader(paths, size, 32, workers=workers))
    return n / (time.perf_counter() - t0)


def decode_nvjpeg(paths: list[Path], size: int, device: torch.device) -> float:
    from torchvision.io import decode_jpeg, read_file
    from torchvision.transforms.v2.functional import resize

    data = [read_file(str(p)) for p in paths]  # file reading is not part of decode
    sync(device)
    t0 = time.perf_counter()
    for start in range(0, len(data), 32):
        imgs = decode_jpeg(data[start:start + 32], device=device)
        torch.stack([resize(i, [size, size], antialias=True) for i in imgs])
    sync(device)
    return len(data) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    ap.add_argument("--arch", default="ram_swin_large_384")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.quick:
        args.images, args.arch = 8, "ram_tiny"
    pth, labels = checkpoint(args.arch, num_classes=50 if args.quick else None)
    size_px = (4000, 3000) if not args.quick else (640, 480)
    photos = jpegs(CACHE / ("jpeg12mp" if not args.quick else "jpeg_quick"), args.images, size=size_px)
    model = load_any(pth, labels_dir=labels)
    s = model.arch.image_size
    print(f"device {torch.cuda.get_device_name(0) if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}, "
          f"{args.arch}, {len(photos)} JPEGs {size_px[0]}x{size_px[1]}, {args.workers} workers")

    print(f"decode  CPU draft, {args.workers} workers: {decode_cpu(photos, s, args.workers):8.1f} img/s")
    if device.type == "cuda":
        print(f"decode  nvJPEG (GPU) + resize      : {decode_nvjpeg(photos, s, device):8.1f} img/s")

    batches = (1, 32, 128) if not args.quick else (1, 4)
    for compiled in (False, True):
        tagger = Tagger(model, device, "bf16" if device.type == "cuda" else "fp32", compile=compiled)
        for b in batches:
            x = torch.randint(0, 256, (b, 3, s, s), dtype=torch.uint8, device=device)
            sec = timed(lambda: tagger.scores(x), device)
            print(f"model   bf16 {'compiled' if compiled else 'eager   '} batch {b:4d}: {b / sec:8.1f} img/s")

    for compiled, decode in ((False, "workers"), (True, "workers"), (False, "device"), (True, "device")):
        tagger = Tagger(model, device, "bf16" if device.type == "cuda" else "fp32", compile=compiled)
        run = lambda paths: tag_files(paths, tagger, [lambda r: None], batch_size=batches[-1],  # noqa: E731
                                      workers=args.workers, decode=decode)
        run(photos[:batches[-1]])
        t0 = time.perf_counter()
        run(photos)
        where = "CPU draft decode" if decode == "workers" else "nvJPEG decode" if device.type == "cuda" else "torchvision decode"
        print(f"end-to-end ramcli {'compiled' if compiled else 'eager   '}, {where}: "
              f"{len(photos) / (time.perf_counter() - t0):8.1f} img/s")

    base = Tagger(model, device, "fp32")
    n = min(len(photos), 32)
    from PIL import Image
    from torchvision import transforms

    tf = transforms.Compose([transforms.Resize((s, s)), transforms.PILToTensor()])
    t0 = time.perf_counter()
    for p in photos[:n]:
        base.scores(tf(Image.open(p).convert("RGB")).unsqueeze(0))
    sync(device)
    print(f"end-to-end official-style (full decode, fp32, batch 1): {n / (time.perf_counter() - t0):8.1f} img/s")


if __name__ == "__main__":
    t = time.perf_counter()
    main()
    print(f"(bench took {time.perf_counter() - t:.0f} s)")
