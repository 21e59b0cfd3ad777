"""`ramcli distill` benchmarks, both on the CPU.

    .venv/bin/python bench/distill.py agreement --teacher cpu.safetensors [--student test_resnet]
    .venv/bin/python bench/distill.py agreement --teacher deep.safetensors --student teacher --depths 1,1,1,1
    .venv/bin/python bench/distill.py speed [--photos 16] [--student resnet18] [--hidden 256]
    .venv/bin/python bench/distill.py speed --student teacher --depths 2,2,6,2 --hidden 768

agreement: a *trained* teacher (the `--preset cpu` model: `bench/train_learns.py --save
cpu.safetensors` writes it) is distilled into a smaller backbone on fresh synthetic scenes (other
seeds than the teacher's training data); prints the held-out tag agreement (F1 of tag sets at
the teacher's thresholds) beside both models' speed. Goal: F1 >= 0.95. Synthetic scenes know
their true tags, so it also prints, on scenes neither model saw, how well each model tags
against the truth next to their agreement: a student that learned the task but not the
teacher's mistakes agrees with the teacher only about as well as the teacher is right.

speed: a full-size RAM Swin-L 384 with random weights (4,585 tags; built once, cached under
.bench_cache/) is the teacher; the student is distilled from it on photo-like JPEGs for a few
steps (its tags mean nothing: the point is the cost), then both tag the same photos in fp32.
Prints img/s of each and how the teacher's time splits between its backbone and its decoder,
which bounds what a smaller backbone alone can gain. Goal: the student >= 5x the teacher.

Both print the load average and CPU time: the machine this was written on is shared.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from _common import CACHE, jpegs, load_average, make_labels_dir
from ramcli.models.labels import read_label_dir
from ramcli.models import load_model
from ramcli.models.converted import save_converted
from ramcli.models.configs import ARCHS
from ramcli.models.ram import RecognitionModel
from ramcli_train.distill import DistillConfig, distill


def run(cfg: DistillConfig) -> tuple[object, float, float]:
    start, cpu = time.perf_counter(), time.process_time()
    report = distill(cfg)
    return report, (time.perf_counter() - start) / 60, (time.process_time() - cpu) / 60


def print_report(report, wall: float, cpu: float, goal: str) -> None:
    a, s = report.agreement, report.speed
    print(f"photos {report.photos} ({report.train} train, {report.held_out} held out), {report.steps} steps, "
          f"{wall:.1f} min wall, {cpu:.1f} CPU min; {report.backbone_init}")
    print(f"held-out agreement with the teacher: F1 {a['f1']:.3f}, same tag set {a['same_set']:.1%} of {a['photos']} photos")
    print(f"{'model':<9}{'backbone':<32}{'input':>6}{'params M':>10}{'img/s':>9}{'ms/img':>9}")
    for name in ("teacher", "student"):
        r = s[name]
        print(f"{name:<9}{r['backbone']:<32}{r['input']:>6}{r['params_millions']:>10.1f}{r['img_per_s']:>9.2f}"
              f"{1000 / r['img_per_s']:>9.1f}")
    print(f"student / teacher speed: {s['speedup']:.2f}x (fp32, forward pass, {s['student']['images']} photos)")
    print(f"load average: {load_average()} ({os.cpu_count()} cores); goal: {goal}")


def agreement(args) -> None:
    from ramcli_train.student import inherits
    from ramcli_train.synth import write_shards

    own = inherits(args.student, load_model(args.teacher))  # a student that starts from the teacher
    lr = args.lr if args.lr is not None else (None if own else 2e-3)
    pooled = args.pooled_weight if args.pooled_weight is not None else (0.0 if own else 2.0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_shards(root / "data", samples=args.samples, shards=4, seed=7, val_samples=8, size=64)
        cfg = DistillConfig(teacher=str(args.teacher), data=[str(root / "data" / "train")], out=root / "student.safetensors",
                            backbone=args.student, depths=args.depths, epochs=args.epochs, batch_size=32, lr=lr,
                            val_fraction=0.2, pretrained=False, device="cpu", threads=1, speed_images=128,
                            save_every=0, pooled_weight=pooled)
        report, wall, cpu = run(cfg)
        print_report(report, wall, cpu, "agreement F1 >= 0.95")
        models = {"teacher": args.teacher, "student": cfg.out}
        if args.reference:
            models["reference"] = args.reference
        against_truth(models, args.truth_scenes)


def against_truth(models: dict[str, Path], scenes: int) -> None:
    """F1 of each model's tag sets against the scenes' true tags and against the teacher's, on
    fresh scenes (seed 11), each model at its thresholds with `tag`'s rule."""
    import torchvision.transforms.functional as TF

    from ramcli.media.decode import normalize
    from ramcli_train.distill_eval import agreement as f1
    from ramcli_train.distill_eval import tag_sets
    from ramcli_train.synth import sample

    drawn = [sample(11, "val", i, 64) for i in range(scenes)]
    pixels = torch.stack([TF.pil_to_tensor(image) for _, image in drawn])
    truth = [set(scene.tags) for scene, _ in drawn]
    sets = {}
    for name, path in models.items():
        model = load_model(path).eval()
        with torch.inference_mode():
            scores = torch.sigmoid(model(normalize(pixels, model.arch.data_config)).float())
        sets[name] = tag_sets(model, scores, torch.device("cpu"))
    print(f"on {scenes} fresh scenes, F1 of tag sets:")
    for name in models:
        print(f"  {name:<10} against the true tags {f1(truth, sets[name])['f1']:.3f}"
              + ("" if name == "teacher" else f", against the teacher's {f1(sets['teacher'], sets[name])['f1']:.3f}"))


def full_size_teacher() -> Path:
    """A RAM Swin-L 384 tagger file with random weights and 4,585 placeholder tags (cached)."""
    path = CACHE / "ram_swin_large_384_random.safetensors"
    if not path.is_file():
        labels = read_label_dir(make_labels_dir(CACHE, 4585, "ram"), "ram")
        torch.manual_seed(0)
        model = RecognitionModel(ARCHS["ram_swin_large_384"], labels, model_id="ram_swin_large_384_random")
        torch.nn.init.normal_(model.label_embed)
        save_converted(model, path)
    return path


@torch.inference_mode()
def teacher_split(path: Path) -> tuple[float, float]:
    """Seconds per image of the full-size teacher's backbone and of its decoder (fp32, batch 4)."""
    model = load_model(path).eval()
    x = torch.randn(4, 3, 384, 384)
    model.encode_image(x[:1])
    start = time.perf_counter()
    embeds = model.encode_image(x)
    backbone = time.perf_counter() - start
    start = time.perf_counter()
    model.decode(embeds)
    decoder = time.perf_counter() - start
    return backbone / 4, decoder / 4


def speed(args) -> None:
    teacher = full_size_teacher()
    backbone_s, decoder_s = teacher_split(teacher)
    print(f"teacher RAM Swin-L 384, fp32, per image: backbone {backbone_s:.2f} s, decoder {decoder_s:.2f} s "
          f"(4,585 tags x 2 layers at width 768)")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folder = root / "photos"
        folder.mkdir()
        for p in jpegs(CACHE / "jpeg_1024", args.photos * 2, size=(1024, 768)):
            shutil.copy(p, folder / p.name)
        cfg = DistillConfig(teacher=str(teacher), data=[str(folder)], out=root / "student.safetensors",
                            backbone=args.student, depths=args.depths, hidden=args.hidden, max_steps=2, batch_size=4,
                            val_fraction=0.5,
                            pretrained=False, device="cpu", speed_images=args.photos, save_every=0)
        report, wall, cpu = run(cfg)
    print_report(report, wall, cpu, "student >= 5x the teacher's speed (the agreement of random weights means nothing)")


def depths_arg(value: str) -> tuple[int, ...]:
    return tuple(int(d) for d in value.split(","))


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="bench", required=True)
    a = sub.add_parser("agreement")
    a.add_argument("--teacher", type=Path, required=True, help="a trained tagger (bench/train_learns.py --save FILE)")
    a.add_argument("--student", default="test_resnet", help="timm backbone of the student, or `teacher` (its own)")
    a.add_argument("--depths", type=depths_arg, default=(),
                   help="the student backbone's blocks per stage, e.g. 1,1,1,1")
    a.add_argument("--samples", type=int, default=2000)
    a.add_argument("--epochs", type=int, default=8)
    a.add_argument("--lr", type=float, default=None, help="default: 2e-3, or `ramcli distill`'s for `--student teacher`")
    a.add_argument("--pooled-weight", type=float, default=None,
                   help="the pooled-embedding tag loss (the cpu preset's teacher is trained with one); default: 2, "
                        "or 0 for `--student teacher`, whose encoder starts from the teacher's and needs no help")
    a.add_argument("--reference", type=Path, help="another model trained on the true tags (the same preset, "
                   "another run): how well two models that learned the task, not each other, agree")
    a.add_argument("--truth-scenes", type=int, default=800, help="fresh scenes for the against-the-truth line")
    s = sub.add_parser("speed")
    s.add_argument("--photos", type=int, default=16)
    s.add_argument("--student", default="resnet18", help="timm backbone of the student, or `teacher` (its own Swin-L)")
    s.add_argument("--depths", type=depths_arg, default=(),
                   help="the student backbone's blocks per stage, e.g. 2,2,6,2 with --student teacher")
    s.add_argument("--hidden", type=int, default=256, help="the student's decoder width (the teacher's: 768)")
    args = ap.parse_args()
    agreement(args) if args.bench == "agreement" else speed(args)


if __name__ == "__main__":
    main()
