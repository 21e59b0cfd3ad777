"""Proof that training learns: RAM with the `cpu` preset (a small CNN from timm under RAM's
decoder, tagging + caption losses), trained on the CPU on synthetic captioned scenes, reaches a
held-out mAP of at least 0.9 on the tags it saw within 10 minutes.

    .venv/bin/python bench/train_learns.py [--samples 3000] [--epochs 8] [--family ram] [--preset cpu_swin]

Writes shards with `ramcli_train.synth` (a held-out split drawn from the same generator with
other seeds), trains with the real loop (`ramcli_train.loop.train`, the same as
`ramcli train --preset cpu`: tagging + caption losses for RAM), evaluates the tagger on the
held-out split with the official mAP (ramcli.eval.metrics), and prints the numbers next to the
untrained model's mAP (the baseline, same run), the wall time, the process's CPU time (what the
run costs on an idle machine: the machine this was written on is shared) and the load average.
The exported tagger file is then run through `ramcli tag` on the held-out images, so the number
covers the whole pipeline.

A control row trains a small CNN (four conv-BN-ReLU blocks, average pool, linear head; BCE) on
the same data for the same number of steps, outside the loop: it says whether the data can be
learned in that budget at all, so a low mAP of RAM points at the model rather than the data.
`--no-control` skips it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from _common import load_average
from ramcli_train.config import resolve
from ramcli_train.export import export_tagger, tagger_from_checkpoint
from ramcli_train.build import build_model, build_tokenizer
from ramcli_train.loop import held_out_map, train
from ramcli_train.runtime import Runtime
from ramcli_train.sources import build_loader, resolve_training_labels
from ramcli_train.synth import write_shards


def held_out(tagger, labels, cfg, val_dir: Path) -> tuple[float, dict[str, float]]:
    """mAP over the classes with positives in the held-out split, and the AP of each."""
    result = held_out_map(tagger, labels, cfg, [str(val_dir)])
    per_tag = {n: float(ap) for n, ap, pos in zip(labels.names, result.per_class, result.positives) if pos}
    return result.mean_with_positives, per_tag


def control_cnn(cfg, labels, data: Path, steps: int) -> tuple[float, float]:
    """(held-out mAP, minutes) of the CNN control after `steps` steps on the training shards."""
    from torch import nn

    def block(i: int, o: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(),
                             nn.Conv2d(o, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(), nn.MaxPool2d(2))

    torch.manual_seed(cfg.seed)
    net = nn.Sequential(block(3, 32), block(32, 64), block(64, 128), block(128, 128),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, len(labels)))
    opt = torch.optim.AdamW(net.parameters(), cfg.lr, weight_decay=cfg.weight_decay)
    loader = build_loader(cfg, [str(data / "train")], labels, Runtime(), train=True)
    start, step, epoch = time.perf_counter(), 0, 0
    while step < steps:
        loader.set_epoch(epoch)
        for batch in loader:
            loss = torch.nn.functional.binary_cross_entropy_with_logits(net(batch.images), batch.tags)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step == steps:
                break
        epoch += 1
    minutes = (time.perf_counter() - start) / 60
    return held_out(net.eval(), labels, cfg, data / "val")[0], minutes


def tag_agreement(weights: Path, data: Path, root: Path) -> dict:
    """`ramcli tag` (a subprocess, as a user runs it) on the held-out images: F1 of its tag sets
    against the generator's true tags."""
    import tarfile

    photos = root / "val_photos"
    photos.mkdir(exist_ok=True)
    truth: dict[str, set[str]] = {}
    for shard in sorted((data / "val").glob("*.tar")):
        with tarfile.open(shard) as tar:
            members = {m.name: m for m in tar if m.isfile()}
            for name, member in members.items():
                if name.endswith(".jpg"):
                    key = Path(name).stem
                    (photos / f"{key}.jpg").write_bytes(tar.extractfile(member).read())
                    meta = json.loads(tar.extractfile(members[f"{key}.json"]).read())
                    truth[str(photos / f"{key}.jpg")] = set(meta["tags"])
    env = {**os.environ, "RAMCLI_HOME": str(root / "home"), "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-m", "ramcli", "tag", str(photos), "--weights", str(weights), "--format",
                          "jsonl", "--no-write", "--no-index", "--workers", "0"], capture_output=True, text=True, env=env,
                         check=True).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    common = total = 0
    for row in rows:
        got, want = {t["name"] for t in row.get("tags", [])}, truth[row["path"]]
        common, total = common + len(got & want), total + len(got) + len(want)
    return {"photos": len(rows), "f1": 2 * common / total if total else 1.0}


def publish(src: Path, dest: Path) -> None:
    """Copy `src` to `dest` atomically (`fileio.atomic_output`), so a reader never sees a
    half-written file, also when a later run overwrites it."""
    import shutil

    from ramcli.fileio import atomic_output

    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(dest) as tmp:
        shutil.copyfile(src, tmp)


def keep_photos(photos: Path, dest: Path, count: int) -> None:
    """The first `count` held-out JPEGs into folder `dest`, replacing it atomically (the folder
    is built under a temporary name next to it, then renamed; the old one is removed after)."""
    import shutil

    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    staging.chmod(0o755)
    for path in sorted(photos.glob("*.jpg"))[:count]:
        shutil.copyfile(path, staging / path.name)
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old.{os.getpid()}")
        os.replace(dest, old)
    os.replace(staging, dest)
    if old is not None:
        shutil.rmtree(old)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=3000, help="training scenes (held-out: 500)")
    ap.add_argument("--epochs", type=int, default=None, help="default: the cpu preset's")
    ap.add_argument("--family", default="ram", choices=("ram", "ram_plus", "tag2text"))
    ap.add_argument("--preset", default="cpu", choices=("cpu", "cpu_swin"), help="cpu_swin: the Swin from scratch")
    ap.add_argument("--save", type=Path, default=None, help="keep the exported tagger here (bench/distill.py's teacher)")
    ap.add_argument("--keep-photos", type=Path, default=None, help="copy held-out JPEGs into this folder")
    ap.add_argument("--keep-count", type=int, default=200, help="how many held-out JPEGs --keep-photos copies")
    ap.add_argument("--set", action="append", default=[], help="extra config key=value")
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--goal", type=float, default=0.9)
    ap.add_argument("--no-control", action="store_true", help="skip the CNN control row")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = root / "data"
        overrides = dict(data=[str(data)], out=str(root / "run"), family=args.family, epochs=args.epochs,
                         progress=False)
        cfg = resolve(args.preset, overrides=overrides, sets=args.set)
        write_shards(data, samples=args.samples, shards=4, seed=0, val_samples=500, size=cfg.image_size)
        labels = resolve_training_labels(cfg)
        torch.manual_seed(cfg.seed)
        untrained = build_model(cfg, labels, build_tokenizer(cfg, [str(data / "train")], root)).tagger.eval()
        base, _ = held_out(untrained, labels, cfg, data / "val")

        load_before = load_average()
        start, cpu_start = time.perf_counter(), time.process_time()
        summary = train(cfg)
        minutes = (time.perf_counter() - start) / 60
        cpu_minutes = (time.process_time() - cpu_start) / 60
        load_after = load_average()
        ckpt = root / "run" / "checkpoint_last.pt"
        trained, per_tag = held_out(tagger_from_checkpoint(ckpt), labels, cfg, data / "val")
        tagged = tag_agreement(export_tagger(ckpt, root / "tagger.safetensors"), data, root)
        if args.save:
            publish(root / "tagger.safetensors", args.save)
        if args.keep_photos:
            keep_photos(root / "val_photos", args.keep_photos, args.keep_count)
        control = None if args.no_control else control_cnn(cfg, labels, data, summary["step"])
    encoder = cfg.backbone or ("resnet10t (timm)" if args.preset == "cpu" else "Swin from scratch")
    print(f"config: preset {args.preset} ({encoder}), family {cfg.family}, {cfg.image_size} px, batch {cfg.batch_size}, "
          f"lr {cfg.lr}, {cfg.epochs} epochs of {args.samples} scenes, {cfg.threads or torch.get_num_threads()} thread(s)")
    print(f"load average before/after training: {load_before} / {load_after} ({os.cpu_count()} cores)")
    print(f"{'model':<30}{'held-out mAP':>14}{'steps':>8}{'wall min':>10}{'CPU min':>9}")
    print(f"{'untrained (baseline)':<30}{base:>14.3f}{0:>8}{0:>10.1f}{0:>9.1f}")
    print(f"{'trained, preset ' + args.preset:<30}{trained:>14.3f}{summary['step']:>8}{minutes:>10.1f}{cpu_minutes:>9.1f}")
    if control is not None:
        print(f"{'control: small CNN, BCE':<30}{control[0]:>14.3f}{summary['step']:>8}{control[1]:>10.1f}{'':>9}")
    worst = sorted(per_tag.items(), key=lambda kv: kv[1])[:5]
    print("lowest AP: " + ", ".join(f"{n} {v:.2f}" for n, v in worst))
    print(f"`ramcli tag` with the exported file on the held-out images: {tagged['photos']} photos, "
          f"tag-set F1 against the true tags {tagged['f1']:.3f}")
    met = trained >= args.goal and minutes <= args.minutes
    print(f"goal: mAP >= {args.goal} within {args.minutes} min -> {'MET' if met else 'NOT MET'}"
          + ("" if met or trained < args.goal or cpu_minutes > args.minutes else
             f" on the wall clock; {cpu_minutes:.1f} CPU minutes, within the budget on an unloaded machine"))


if __name__ == "__main__":
    main()
