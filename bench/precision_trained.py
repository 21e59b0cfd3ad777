"""Every CPU arithmetic on a *trained* tagger: tag agreement and max score change vs fp32, and what
`--precision auto` decides there.

Random weights are the worst case for reduced precision (their scores bunch at the thresholds);
a trained model's scores are spread out. This scores held-out photos with the trained tagger in
fp32, bf16 (autocast; emulated on a CPU without native bf16), PyTorch int8 (dynamic int8 Linear
layers), its ONNX export on ONNX Runtime (fp32) and that export's int8 copy, the model on OpenVINO
(fp32, bf16, static int8 calibrated on the first batch, int8 weights everywhere or in the image
encoder only), compares each tag set
with fp32's at the model's thresholds, and then runs the real `--precision auto` check (8 photos,
no cached decision) on the checkpoint, the .onnx and the OpenVINO model.

    .venv/bin/python bench/train_learns.py --save .bench_cache/cpu-teacher.safetensors \
        --keep-photos .bench_cache/cpu-val-photos        # the trained model, once
    .venv/bin/python bench/precision_trained.py [--weights .bench_cache/cpu-teacher.safetensors]
        [--photos .bench_cache/cpu-val-photos] [--images 128]
    .venv/bin/python bench/train_learns.py --preset cpu_swin --epochs 4 --save .bench_cache/cpu-swin.safetensors \
        --keep-photos .bench_cache/cpu-swin-val --no-control      # a small Swin, a few hundred steps
    .venv/bin/python bench/precision_trained.py --weights .bench_cache/cpu-swin.safetensors \
        --photos .bench_cache/cpu-swin-val

Without --photos folder, held-out scenes of `ramcli_train.synth` (the validation split, which
training never sees) are written under .bench_cache/ first.

--draft renders those scenes at camera scale instead (7.8x the model's input: 500 px for a 64 px
model, as a 4000x3000 photo is to Swin-L's 384, so JPEG draft mode decodes them at the same 1/2
scale) and adds rows decoded in draft mode (`--decode draft`), still against fp32 on the full
decode, so they count both changes.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

from _common import CACHE, load_average

PATHS = ("fp32", "bf16", "int8", "onnx", "onnx int8", "openvino", "openvino bf16", "openvino int8",
         "openvino int8-weights", "openvino int8-encoder")


def held_out_photos(folder: Path | None, count: int, size: int) -> list[Path]:
    exts = {".jpg", ".jpeg", ".png"}
    if folder is not None and folder.is_dir():
        return sorted(p for p in folder.rglob("*") if p.suffix.lower() in exts)[:count]
    from ramcli_train.synth import sample

    out = CACHE / f"synth-val-{size}"
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"val{i:05d}.jpg" for i in range(count)]
    for i, p in enumerate(paths):
        if not p.exists():
            sample(0, "val", i, size)[1].save(p, quality=90)
    return paths


#: a 12 MP photo's long side over Swin-L's input (4000 / 384, rounded down to keep draft's scale)
CAMERA_SCALE = 7.8
DRAFT_PATHS = ("fp32", "openvino bf16")


def batches(photos: list[Path], model, batch: int, draft: bool = False) -> list[torch.Tensor]:
    from ramcli.media.loader import make_loader

    cfg = model.pretrained_cfg
    return [b.pixels for b in make_loader(photos, model.arch.image_size, batch, interpolation=cfg["interpolation"],
                                          draft=draft) if b.items]


def nncf_variants(base) -> dict:
    """The NNCF options tried to keep int8's tags, each a copy of the OpenVINO fp32 model whose
    graph is built from the first batch it sees (or from every photo, recorded beforehand)."""
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters

    from ramcli.models.openvino_runtime import OpenVinoModel
    from ramcli.tagging.runtimes.openvino import decoder_ops, int8_weights, quiet

    recorded = []

    def static(graph, first, photos=None, decoder_float=False, **kwargs):
        samples = [x[None] for x in (np.concatenate(recorded)[:photos] if photos else first)]
        ignored = nncf.IgnoredScope(names=decoder_ops(graph) if decoder_float else [], validate=False)
        with quiet():
            return nncf.quantize(graph, nncf.Dataset(samples), subset_size=len(samples), ignored_scope=ignored,
                                 model_type=nncf.ModelType.TRANSFORMER, **kwargs)

    smooth = AdvancedQuantizationParameters(smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=0.95))
    builds = {
        "NNCF static, 64 calibration photos": (lambda g, x: static(g, x, photos=64), None),
        "NNCF static, mixed preset": (lambda g, x: static(g, x, preset=nncf.QuantizationPreset.MIXED), None),
        "NNCF static, decoder float": (lambda g, x: static(g, x, decoder_float=True), None),
        "NNCF static, decoder float, SmoothQuant 0.95": (
            lambda g, x: static(g, x, decoder_float=True, advanced_parameters=smooth), None),
        "int8 weights in the encoder, f32 elsewhere": (lambda g, x: int8_weights(g, keep_decoder=True), "f32"),
    }
    nets = {"(recorder)": OpenVinoModel(base.path)}
    run = nets["(recorder)"].run
    nets["(recorder)"].run = lambda x: (recorded.append(x.copy()), run(x))[1]
    for name, (build, hint) in builds.items():
        # made as the "fp32" model, which the Tagger's fp32 path runs as it is (`OpenVinoModel.at`)
        nets[name] = OpenVinoModel(base.path, precision="fp32", hint=hint,
                                   transform=lambda net, x, build=build: build(net.graph.clone(), x))
    return nets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", type=Path, default=CACHE / "cpu-teacher.safetensors",
                    help="bench/train_learns.py --save writes one")
    ap.add_argument("--photos", type=Path, default=CACHE / "cpu-val-photos")
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--nncf-options", action="store_true", help="also the NNCF options tried to keep int8's tags")
    ap.add_argument("--draft", action="store_true", help="camera-scale scenes, and rows decoded in JPEG draft mode")
    args = ap.parse_args()
    os.environ.setdefault("RAMCLI_HOME", str(CACHE / "home"))
    from ramcli.tagging.decision import emitted
    from ramcli.models import convert, load_any
    from ramcli.tagging.tagger import Tagger
    from ramcli.tagging.cpu_features import native_bf16

    cpu = torch.device("cpu")
    model = load_any(args.weights).eval()
    onnx_path = CACHE / f"{args.weights.stem}-{os.stat(args.weights).st_mtime_ns}.onnx"
    if not onnx_path.exists():
        convert(args.weights, onnx_path)
    onnx_model = load_any(onnx_path)
    from ramcli.models.openvino_runtime import to_openvino

    openvino_model = to_openvino(model, args.weights)
    if args.draft:
        photos = held_out_photos(None, args.images, round(CAMERA_SCALE * model.arch.image_size))
    else:
        photos = held_out_photos(args.photos, args.images, model.arch.image_size)
    pixels = batches(photos, model, args.batch_size)
    drafted = batches(photos, model, args.batch_size, draft=True) if args.draft else None
    n = sum(p.shape[0] for p in pixels)
    print(f"{args.weights.name} ({model.model_id}, {model.arch.name}, {len(model.labels)} classes), {n} held-out "
          f"photos from {photos[0].parent}; native bf16: {'yes' if native_bf16() else 'no (bf16 emulated)'}; "
          f"load average {load_average()}", flush=True)
    results = {}
    variants = nncf_variants(openvino_model) if args.nncf_options else {}
    runs = [(name, False) for name in (*PATHS, *variants)] + [(name, True) for name in DRAFT_PATHS if args.draft]
    for name, draft in runs:
        first, _, second = name.partition(" ")
        nets = {"onnx": onnx_model, "openvino": openvino_model}
        net, precision = (nets[first], second or "fp32") if first in nets else (variants.get(name, model), first)
        precision = "fp32" if name in variants else precision
        tagger = Tagger(net, cpu, precision)
        t0 = time.perf_counter()
        scores = torch.cat([tagger.scores(p) for p in (drafted if draft else pixels)])
        results[name + " draft" * draft] = (scores, n / (time.perf_counter() - t0), tagger._class_thresholds)
    ref, _, thresholds = results["fp32"]
    ref_tags = emitted(ref, thresholds)
    near, close = (int(((ref - thresholds).abs() < d).sum()) for d in (1e-3, 0.02))
    print(f"fp32 emits {int(ref_tags.sum()) / n:.1f} tags per photo of {ref.shape[1]} classes; {close / n:.2f} scores "
          f"per photo lie within 0.02 and {near / n:.2f} within 0.001 "
          "of their threshold\n")
    print("| path | img/s (model only) | tag agreement with fp32 | max score change | mean score change |")
    print("|---|---|---|---|---|")
    for name, (scores, rate, _) in results.items():
        if name == "(recorder)":
            continue
        if name == "fp32":
            print(f"| fp32 | {rate:.1f} | - | - | - |")
            continue
        tags = emitted(scores, thresholds)
        both, either = int((tags & ref_tags).sum()), int((tags | ref_tags).sum())
        change = (scores - ref).abs()
        print(f"| {name} | {rate:.1f} | {100 * both / either:.2f}% ({either - both} of {either} differ) "
              f"| {change.max():.4f} | {change.mean():.5f} |")
    print()
    for label, net in ((args.weights.name, model), (onnx_path.name, onnx_model),
                       (f"{args.weights.name} on OpenVINO", openvino_model)):
        decisions = []
        tagger = Tagger(net, cpu, "auto", check_photos=8, on_decision=decisions.append)  # no cache: a fresh check
        for p in pixels:
            tagger.scores(p)
            if decisions:
                break
        print(f"--precision auto on {label}:")
        print(decisions[0].describe() if decisions else "  (too few photos for the check)")
    print(f"\nload average at the end: {load_average()}")


if __name__ == "__main__":
    main()
