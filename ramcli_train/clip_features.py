"""Precompute the CLIP distillation targets into shards (`distill=precomputed`).

Online distillation runs the frozen CLIP ViT-B/16 image encoder on every training batch, epoch
after epoch; on a large run that is a sizeable share of each step. `ramcli train clip-features`
runs it once per image instead and writes copies of the shards with one more member per sample,
`KEY.clip.npy` (float16, shape (512,)), which the loader reads when `distill=precomputed`.

The target is CLIP's feature of the whole image (squash-resized to 224 px, bicubic), not of the
augmented training crop the online teacher sees. The official finetuning stage already distils
towards a separately augmented view, so the student never needed the exact same crop; the
precomputed target is that idea with the un-augmented image.

Shards are written one by one to a temporary name and renamed when complete, and a shard whose
output exists is skipped, so an interrupted run resumes where it stopped. The input shards are
only read.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ramcli.errors import RamcliError, UsageError
from ramcli.fileio import atomic_output
from ramcli_train.data import resolve_shards
from ramcli_train.samples import (CLIP_FEATURES_MEMBER as MEMBER, CLIP_MEAN, CLIP_SIZE, CLIP_STD, IMAGE_EXTENSIONS,
                                  decode_image)
from ramcli_train.model import ClipTeacher


def encode(features: torch.Tensor) -> bytes:
    """One (512,) feature -> .npy bytes (float16: half the size, far below the L1 loss's noise).
    The loader reads it back with `ramcli_train.samples.decode_clip_features`."""
    buf = io.BytesIO()
    np.save(buf, features.detach().to(torch.float16).cpu().numpy(), allow_pickle=False)
    return buf.getvalue()


def clip_view(image, size: int = CLIP_SIZE) -> torch.Tensor:
    """The teacher's input: the whole image squash-resized to its size (224), CLIP-normalised."""
    from torchvision import transforms as T

    tf = T.Compose([T.Resize((size, size), interpolation=T.InterpolationMode.BICUBIC),
                    T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])
    return tf(image)


@dataclass
class ShardReport:
    shard: str
    samples: int = 0
    features: int = 0  # samples that got a feature (the others had no decodable image)
    skipped: bool = False  # output already there from an earlier run


def _samples(shard: str) -> Iterator[dict]:
    import webdataset as wds

    errors: list[Exception] = []

    def on_error(exc: Exception) -> bool:
        errors.append(exc)
        return False  # stop: a half-read shard must not be written as if complete

    yield from wds.tarfile_samples(iter([{"url": shard}]), handler=on_error)
    if errors:
        raise RamcliError(f"cannot read shard {shard}: {errors[0]}")


def _output_names(shards: list[str], out_dir: Path) -> list[Path]:
    names = [Path(s).name for s in shards]
    if len(set(names)) != len(names):
        raise UsageError("the input shards must have distinct file names (they keep their names in --out)")
    return [out_dir / n for n in names]


def precompute(
    source: str | list[str],
    out_dir: Path,
    teacher: ClipTeacher,
    batch_size: int = 64,
    on_shard: Callable[[ShardReport], None] | None = None,
) -> list[ShardReport]:
    """Write a copy of every shard of `source` into `out_dir` with `KEY.clip.npy` added."""
    import webdataset as wds

    if batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    shards = resolve_shards(source)
    out_dir = Path(out_dir)
    if any(Path(s).resolve().parent == out_dir.resolve() for s in shards):
        raise UsageError("--out must be another folder than the input shards (they are never overwritten)")
    out_dir.mkdir(parents=True, exist_ok=True)
    reports = []
    for shard, target in zip(shards, _output_names(shards, out_dir)):
        report = ShardReport(shard)
        if target.exists():
            report.skipped = True
        else:
            with atomic_output(target) as tmp, wds.TarWriter(tmp) as sink:
                pending: list[tuple[dict, torch.Tensor | None]] = []
                for raw in _samples(shard):
                    report.samples += 1
                    pending.append((raw, _view(raw, teacher.image_size)))
                    if len(pending) == batch_size:
                        report.features += _flush(pending, teacher, sink)
                if pending:
                    report.features += _flush(pending, teacher, sink)
        reports.append(report)
        if on_shard is not None:
            on_shard(report)
    return reports


def _view(raw: dict, size: int) -> torch.Tensor | None:
    data = next((raw[ext] for ext in IMAGE_EXTENSIONS if ext in raw), None)
    image = decode_image(data) if data is not None else None
    return clip_view(image, size) if image is not None else None


def _flush(pending: list[tuple[dict, torch.Tensor | None]], teacher: ClipTeacher, sink) -> int:
    """Run the teacher on the pending samples with an image and write them all, in order."""
    views = [v for _, v in pending if v is not None]
    features = iter(teacher(torch.empty(0), torch.stack(views)).cpu()) if views else iter(())
    for raw, view in pending:
        sample = {k: v for k, v in raw.items() if k != MEMBER}  # "__url__" etc. are not written
        if view is not None:
            sample[MEMBER] = encode(next(features))
        sink.write(sample)
    done = len(views)
    pending.clear()
    return done
