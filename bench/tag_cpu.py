"""CPU tagging, every path in one table: speed vs an official-style baseline, tags and scores vs fp32.

Random-weight RAM Swin-L (official layout), a folder of generated 12 MP photo-like JPEGs.

  baseline  : one image at a time: full PIL decode, the official torchvision transform
              (Resize((384,384)), ToTensor, Normalize), fp32 forward at batch 1.
  fp32 ...  : the `ramcli tag` pipeline (CPU default decode, its decode workers, batches, strict
              thresholds) in each arithmetic: fp32, bf16 autocast, int8 (dynamic int8 Linear
              layers), each eager and torch.compile'd, and the exported ONNX graph run by ONNX
              Runtime in fp32 and int8 (`--precision int8` on the .onnx: its quantised copy), and
              the graph on OpenVINO (`--runtime openvino`) in fp32, bf16, int8 (NNCF static
              quantisation calibrated on the first batch of these photos), int8-weights (NNCF
              `compress_weights`) and int8-encoder (int8 weights in the image encoder only).
              Compilation, the ONNX export, the OpenVINO conversion and quantisation/calibration
              are done once beforehand, not timed.
  decode    : the pipeline's decode alone (same workers, same decode, no model): the ceiling
              of every row above on this machine. Each ramcli row also times its model alone,
              on pixels decoded beforehand: the other ceiling.
  ... draft : any ramcli path or decode with JPEG draft mode (`--decode draft`); its agreement is
              still against fp32 on the official full decode, so it counts both changes.

baseline and fp32 run in every invocation, so a run split by path (`--paths onnx,onnx int8`)
still prints its ratios against a baseline and agreement against an fp32 of the same run.

Each path runs in a fresh process, so "peak MB" is that path's own resident high-water mark
(model, activations, compiled code; decode workers not included). Tag agreement = tags emitted
by both / tags emitted by either, vs ramcli fp32 on the same pixels; "max change"
is the largest |score - fp32 score| over all photos and classes. Random weights put many scores
within a hair of their threshold (the header says how many), so agreement here is a worst case.

    .venv/bin/python bench/tag_cpu.py [--images 32] [--batch-size 4] [--workers 1] [--paths int8,onnx]
    .venv/bin/python bench/tag_cpu.py --paths "bf16,openvino,openvino bf16,openvino int8,openvino int8-weights"
        [--onnx .bench_cache/ram_swin_large_384.onnx]   # reuse an export (minutes) across runs
    .venv/bin/python bench/tag_cpu.py --isa avx2 --paths "openvino,openvino int8"   # as on an AVX2-only CPU

`--isa avx2` (or avx2_vnni: an AVX2 CPU with AVX-VNNI, Intel's laptops since 2021) holds every
path and the baseline to those instructions on a newer CPU: PyTorch (ATEN_CPU_CAPABILITY), MKL
(MKL_ENABLE_INSTRUCTIONS) and oneDNN, OpenVINO's kernels included (ONEDNN_MAX_CPU_ISA). Not all
of OpenVINO: its MLAS fp32 matmuls and its normalisations still use AVX-512, so its fp32 rows
are an upper bound of an AVX2 CPU's (its int8 matmuls are oneDNN's, held).
"""

from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import torch

from _common import CACHE, checkpoint, jpegs, load_average, peak_rss_mb, start_workers_as_ramcli

PATHS = ("baseline", "fp32", "fp32 compiled", "bf16", "bf16 compiled", "int8", "int8 compiled", "onnx", "onnx int8",
         "openvino", "openvino bf16", "openvino int8", "openvino int8-weights", "openvino int8-encoder", "decode")
ALWAYS = ("baseline", "fp32")
#: `--isa`: what oneDNN is held to; PyTorch and MKL are held to AVX2 for both
ISAS = {"avx2": "AVX2", "avx2_vnni": "AVX2_VNNI"}


def hold_to(isa: str) -> None:
    """Make the path processes started after this compute as on a CPU with only `isa`: they read
    these variables as they load their kernels."""
    os.environ.update(ATEN_CPU_CAPABILITY="avx2", MKL_ENABLE_INSTRUCTIONS="AVX2", ONEDNN_MAX_CPU_ISA=ISAS[isa])


def openvino_default_f32() -> None:
    """Where a path leaves OpenVINO its default precision, use f32, as the plugin does on a CPU
    without bf16: held to AVX2 it still sees bf16 in the CPU's flags and fails to compile."""
    from ramcli.models.openvino_runtime import OpenVinoModel

    at = OpenVinoModel.at
    OpenVinoModel.at = lambda self, precision, hint=None, transform=None: at(self, precision, hint or "f32", transform)


def baseline(pth: Path, labels: Path, photos: list[Path], **_) -> dict:
    """The official inference script's way, one photo after the other."""
    from PIL import Image
    from torchvision import transforms

    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    from ramcli.models import load_any

    model = load_any(pth, labels_dir=labels).eval()
    size = model.arch.image_size
    tf = transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor(),
                             transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)])
    with torch.inference_mode():
        model(tf(Image.open(photos[0]).convert("RGB")).unsqueeze(0))  # warm-up, like the other paths
        scores = []
        t0 = time.perf_counter()
        for p in photos:
            scores.append(torch.sigmoid(model(tf(Image.open(p).convert("RGB")).unsqueeze(0)))[0])
        seconds = time.perf_counter() - t0
    return {"rate": len(photos) / seconds, "scores": torch.stack(scores), "peak": peak_rss_mb()}


def ramcli_path(pth: Path, labels: Path, photos: list[Path], name: str, batch: int, workers: int,
                onnx: Path | None = None, decode: str = "workers") -> dict:
    from ramcli.models import load_any
    from ramcli.tagging.pipeline import tag_files
    from ramcli.tagging.tagger import Tagger

    start_workers_as_ramcli()
    if "ONEDNN_MAX_CPU_ISA" in os.environ:
        openvino_default_f32()
    first, _, second = name.partition(" ")
    if first == "onnx":  # "onnx" or "onnx int8": the exported graph on ONNX Runtime
        model, precision, compiled = load_any(onnx, labels_dir=labels), second or "fp32", False
    elif first == "openvino":  # the graph on OpenVINO, converted once into RAMCLI_HOME (not timed here)
        from ramcli.models.openvino_runtime import to_openvino

        model, precision, compiled = to_openvino(load_any(pth, labels_dir=labels), pth), second or "fp32", False
    else:
        model, precision, compiled = load_any(pth, labels_dir=labels), first, second == "compiled"
    tagger = Tagger(model, torch.device("cpu"), precision, compile=compiled)  # the model's own thresholds
    t0 = time.perf_counter()
    tag_files(photos[:batch], tagger, [lambda r: None], batch_size=batch, workers=0)  # warm-up / compile
    setup = time.perf_counter() - t0
    recorded, forward = [], tagger.forward_batch

    def recording(pixels, hashes):
        """Every score, as the model gave it: a run emits only the tags above their thresholds."""
        scores, embeds = forward(pixels, hashes)
        recorded.append(scores)
        return scores, embeds

    tagger.forward_batch = recording
    tagged = []
    t0 = time.perf_counter()
    tag_files(photos, tagger, [tagged.extend], batch_size=batch, workers=workers, decode=decode)
    rate = len(photos) / (time.perf_counter() - t0)
    tagger.forward_batch = forward
    assert [r.path for r in tagged] == [str(p) for p in photos], "a photo failed or came back out of order"
    scores = torch.from_numpy(tagger.full_scores(torch.cat(recorded)))
    return {"rate": rate, "scores": scores, "peak": peak_rss_mb(), "setup": setup,
            "compiled": tagger.compile, "model_rate": model_alone(model, tagger, photos, batch)}


def model_alone(model, tagger, photos: list[Path], batch: int) -> float:
    """img/s of the model on pixels decoded beforehand: the ceiling a path's model sets."""
    from ramcli.media.loader import make_loader

    interpolation = model.pretrained_cfg["interpolation"]
    batches = [b.pixels for b in make_loader(photos, model.arch.image_size, batch, workers=0,
                                             interpolation=interpolation) if b.items]
    t0 = time.perf_counter()
    for pixels in batches:
        tagger.scores(pixels)
    return len(photos) / (time.perf_counter() - t0)


def decode_only(arch: str, photos: list[Path], batch: int, workers: int, draft: bool = False) -> dict:
    """The pipeline's CPU decode (official full decode or draft mode, resize to the model's input)
    without a model: the most any path can reach end to end with these workers."""
    from ramcli.media.loader import make_loader
    from ramcli.models.configs import get_arch

    start_workers_as_ramcli()
    config = get_arch(arch)

    def run() -> float:
        t0 = time.perf_counter()
        for _ in make_loader(photos, config.image_size, batch, workers=workers, draft=draft,
                             interpolation=config.data_config["interpolation"]):
            pass
        return time.perf_counter() - t0

    run()  # warm-up: page cache, worker start
    return {"rate": len(photos) / run(), "scores": None, "peak": peak_rss_mb()}


def export(pth: Path, labels: Path, dst: Path) -> tuple[Path, float]:
    from ramcli.models import convert

    t0 = time.perf_counter()
    if not dst.exists():
        convert(pth, dst, labels_dir=labels)
    return dst, time.perf_counter() - t0


def convert_openvino(pth: Path, labels: Path) -> None:
    from ramcli.models import load_any
    from ramcli.models.openvino_runtime import cached_ir

    cached_ir(load_any(pth, labels_dir=labels), pth)


def tags(scores: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    from ramcli.tagging.decision import emitted

    return emitted(scores, thresholds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="ram_swin_large_384")
    ap.add_argument("--images", type=int, default=32,
                    help="photos per path: enough that filling the pipeline weighs as little as in a library")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--workers", type=int, default=None,
                    help="decode workers (default: what `ramcli tag` starts on this machine: none below 4 cores)")
    ap.add_argument("--paths", default=",".join(PATHS),
                    help=f"comma-separated subset of: {', '.join(PATHS)}, any but baseline with ' draft' "
                         "(baseline and fp32 always run)")
    ap.add_argument("--onnx", type=Path, help="the exported .onnx to use (exported there first if missing)")
    ap.add_argument("--isa", choices=sorted(ISAS), help="compute as on a CPU with only these instructions (how, and what it does not hold: the module docstring)")
    args = ap.parse_args()
    if args.isa:
        hold_to(args.isa)
    if args.workers is None:
        from ramcli.tagging.pipeline import default_workers

        args.workers = default_workers()
    chosen = [p.strip() for p in args.paths.split(",") if p.strip()]
    unknown = {p.removesuffix(" draft") for p in chosen} - set(PATHS) | ({"baseline draft"} & set(chosen))
    if unknown:
        raise SystemExit(f"unknown path(s): {', '.join(sorted(unknown))}")
    chosen = [*ALWAYS, *(p for p in chosen if p not in ALWAYS)]
    os.environ.setdefault("RAMCLI_HOME", str(CACHE / "home"))  # the int8 copy of the .onnx is cached there
    pth, labels = checkpoint(args.arch)
    photos = jpegs(CACHE / "jpeg12mp", args.images)
    from ramcli.models.labels import read_label_dir
    from ramcli.tagging.cpu_features import cpu_name, native_bf16

    thresholds = torch.tensor(read_label_dir(labels, "ram").thresholds)
    kernels = (f"paths held to {args.isa}" if args.isa else f"PyTorch kernels {torch.backends.cpu.get_cpu_capability()}"
               f", native bf16: {'yes' if native_bf16() else 'no'}")
    print(f"{args.arch}, {len(photos)} x 12 MP JPEGs, {torch.get_num_threads()} threads, batch {args.batch_size}, "
          f"{args.workers} decode worker(s); CPU {cpu_name()}, {kernels}; load average {load_average()}", flush=True)
    if any(name.startswith("openvino") for name in chosen):
        t0 = time.perf_counter()
        with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:  # its memory is freed after
            pool.submit(convert_openvino, pth, labels).result()
        print(f"  (OpenVINO conversion, or its cached copy: {time.perf_counter() - t0:.0f} s)", flush=True)
    onnx = None
    if any(name.startswith("onnx") for name in chosen):
        onnx, seconds = export(pth, labels, args.onnx or CACHE / (pth.stem + ".onnx"))
        print(f"  (ONNX export: {seconds:.0f} s, {onnx.stat().st_size / 1e6:.0f} MB)", flush=True)
    results: dict[str, dict] = {}
    spawn = get_context("spawn")
    for name in chosen:
        with ProcessPoolExecutor(1, mp_context=spawn) as pool:
            if name == "baseline":
                job = pool.submit(baseline, pth, labels, photos)
            elif name.removesuffix(" draft") == "decode":
                job = pool.submit(decode_only, args.arch, photos, args.batch_size, args.workers, name.endswith(" draft"))
            else:
                path, draft = name.removesuffix(" draft"), name.endswith(" draft")
                job = pool.submit(ramcli_path, pth, labels, photos, path, args.batch_size, args.workers, onnx,
                                  "draft" if draft else "workers")
            try:
                results[name] = r = job.result()
            except Exception as exc:  # a crashed runtime (a segfault) is a result too
                print(f"  {name:14} failed: {type(exc).__name__}: {exc}; load {load_average()}", flush=True)
                continue
        r["load"] = load_average()
        note = f" (compiled once in {r['setup']:.0f} s)" if "compiled" in name else ""
        if "compiled" in name and not r["compiled"]:
            note = " (torch.compile failed: ran eager)"
        print(f"  {name:14} {r['rate']:.3f} img/s, peak {r['peak']:.0f} MB{note}; load {load_average()}", flush=True)
        if name != chosen[-1]:
            table(results, thresholds, len(photos))  # so far: a long run cut short still leaves its numbers
    table(results, thresholds, len(photos))
    print(f"load average at the end: {load_average()}")


def table(results: dict[str, dict], thresholds: torch.Tensor, photos: int) -> None:
    base = results.get("baseline")
    ref = results.get("fp32")
    print()
    print("| path | img/s | vs baseline | model alone img/s (vs baseline) | tag agreement with fp32 | max score change "
          "| peak MB | load after |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        ratio = f"{r['rate'] / base['rate']:.2f}x" if base else "-"
        if ref is not None and r is not ref and r["scores"] is not None:
            a, b = tags(ref["scores"], thresholds), tags(r["scores"], thresholds)
            union, both = int((a | b).sum()), int((a & b).sum())
            agree = f"{100 * both / union:.2f}% ({union - both} of {union} differ)" if union else "-"
            change = f"{(r['scores'] - ref['scores']).abs().max():.4f}"
        else:
            agree, change = "-", "-"
        alone = r.get("model_rate")
        alone = "-" if alone is None else f"{alone:.3f}" + (f" ({alone / base['rate']:.2f}x)" if base else "")
        print(f"| {name} | {r['rate']:.3f} | {ratio} | {alone} | {agree} | {change} | {r['peak']:.0f} | {r['load']} |")
    if base is not None:
        near = ((base["scores"] - thresholds).abs() < 1e-3).sum().item()
        print(f"\nbaseline scores within 0.001 of their threshold: {near / photos:.1f} per photo\n", flush=True)


if __name__ == "__main__":
    main()
