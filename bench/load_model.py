"""Model load time and peak memory: the official way vs ramcli (.pth) vs ramcli (converted).

A random-weight RAM Swin-L checkpoint in the official layout, with a fake AdamW state of
realistic size (~5.6 GB file, like the published ram_swin_large_14m.pth), is loaded three ways,
each in a fresh process so peak RSS is its own:

  official : torch.load of the whole file (as the official code does), build the model, load_state_dict
  ramcli   : ramcli.models.load_any(file.pth)      (weights_only, memory-mapped, tag-only)
  converted: ramcli.models.load_any(file.safetensors)

Each also runs one forward pass on a 384x384 image afterwards ("ready" = load + first image),
so memory-mapping cannot hide work that is merely postponed.

    .venv/bin/python bench/load_model.py [--arch ram_swin_large_384] [--no-forward]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from _common import CACHE, checkpoint

CHILD = r"""
import json, sys, time, torch
from ramcli.models.labels import read_label_dir
from ramcli.models import load_any
from ramcli.models.checkpoint import map_official
from ramcli.models.configs import infer_arch
from ramcli.models.ram import RecognitionModel

def hwm_mb():  # this process's own high-water mark (ru_maxrss would include the parent's, via fork)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

mode, path, labels, forward = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
base = hwm_mb()
t0 = time.perf_counter()
if mode == "official":
    ckpt = torch.load(path, map_location="cpu", weights_only=False)   # the whole file, as official
    sd = ckpt["model"]
    labels = read_label_dir(labels, "ram")
    model = RecognitionModel(infer_arch(sd, num_classes=len(labels)), labels)   # initialised, then overwritten
    model.load_state_dict(map_official(sd, model), strict=True)
    model.eval()
else:
    model = load_any(path, labels_dir=labels if mode == "ramcli" else None)
load_s = time.perf_counter() - t0
load_rss = hwm_mb() - base
ready_s = None
if forward:
    with torch.inference_mode():
        model(torch.randn(1, 3, model.arch.image_size, model.arch.image_size))
    ready_s = time.perf_counter() - t0
print(json.dumps(dict(load_s=load_s, load_rss_mb=load_rss, ready_s=ready_s, peak_rss_mb=hwm_mb() - base)))
"""


def run(mode: str, path: Path, labels: Path, forward: bool) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, mode, str(path), str(labels), "1" if forward else "0"],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="ram_swin_large_384")
    ap.add_argument("--no-forward", action="store_true")
    args = ap.parse_args()
    pth, labels = checkpoint(args.arch, optimizer_state=True)
    converted = CACHE / f"{args.arch}.safetensors"
    if not converted.exists():
        from ramcli.models import convert

        convert(pth, converted, labels_dir=labels)
    subprocess.run(["cat", str(pth)], stdout=subprocess.DEVNULL, check=True)  # same page-cache state for all
    forward = not args.no_forward
    rows = {m: run(m, p, labels, forward) for m, p in
            (("official", pth), ("ramcli", pth), ("converted", converted))}
    print(f"{args.arch}: .pth {pth.stat().st_size / 1e9:.2f} GB, converted {converted.stat().st_size / 1e9:.2f} GB")
    print("memory: growth of the process's resident high-water mark over its state after imports")
    print(f"{'mode':10} {'load s':>8} {'RSS after load MB':>18} {'load+1st image s':>17} {'peak RSS MB':>12}")
    for mode, r in rows.items():
        ready = f"{r['ready_s']:.2f}" if r["ready_s"] is not None else "-"
        print(f"{mode:10} {r['load_s']:8.2f} {r['load_rss_mb']:18.0f} {ready:>17} {r['peak_rss_mb']:12.0f}")
    base = rows["official"]
    for mode in ("ramcli", "converted"):
        r = rows[mode]
        print(f"{mode}: load {base['load_s'] / r['load_s']:.1f}x faster, "
              f"peak memory {100 * r['peak_rss_mb'] / base['peak_rss_mb']:.0f}% of official")


if __name__ == "__main__":
    t = time.perf_counter()
    main()
    print(f"(bench took {time.perf_counter() - t:.0f} s)")
