"""What a training run reads: the data paths of its splits, its label set, its batches, and
counts and captions read from the data's headers."""

from __future__ import annotations

import contextlib
import json
import tarfile
from pathlib import Path

from ramcli.errors import RamcliError, UsageError
from ramcli.models.labels import LabelSet, read_label_dir, resolve_labels
from ramcli_train.config import TrainConfig
from ramcli_train.runtime import Runtime


def split_data_paths(cfg: TrainConfig) -> tuple[list[str], list[str]]:
    """A folder with train/ (and val/) inside, as `ramcli synth` writes, means both splits."""
    if not cfg.data:
        raise RamcliError("no training data given: pass --data SHARDS (a folder, .tar files or JSON annotations)")
    train, val = list(cfg.data), list(cfg.val_data)
    if len(train) == 1 and (Path(train[0]) / "train").is_dir():
        root = Path(train[0])
        train = [str(root / "train")]
        if not val and (root / "val").is_dir():
            val = [str(root / "val")]
    for paths in (train, val):  # fail before anything else is loaded when the data is not there
        if paths and not is_annotation(paths):
            from ramcli_train.data import resolve_shards

            resolve_shards(paths)
        for p in paths if paths and is_annotation(paths) else []:
            if not Path(p).is_file():
                raise RamcliError(f"annotation file not found: {p}")
    return train, val


def resolve_training_labels(cfg: TrainConfig) -> LabelSet:
    """--labels (a folder of official files, or a one-name-per-line tags.txt), else a tags.txt
    beside the data, else the family's official labels."""
    candidates = [Path(cfg.labels)] if cfg.labels else []
    if not cfg.labels:
        for d in cfg.data:
            p = Path(d)
            candidates += [p / "tags.txt", p.parent / "tags.txt"]
    for c in candidates:
        if c.is_dir():
            return read_label_dir(c, cfg.family)
        if c.is_file():
            names = [n.strip() for n in c.read_text(encoding="utf-8").splitlines() if n.strip()]
            return LabelSet(tuple(names), tuple(names), (0.68,) * len(names))
    if cfg.labels:
        raise RamcliError(f"labels not found: {cfg.labels}")
    return resolve_labels(cfg.family)


def is_annotation(paths: list[str]) -> bool:
    """Official JSON annotation files, rather than shards."""
    return all(p.endswith(".json") for p in paths)


def build_loader(cfg: TrainConfig, paths: list[str], labels: LabelSet, rt: Runtime, train: bool):
    from ramcli_train.annotations import AnnotationDataset
    from ramcli_train.data import ShardDataset
    from ramcli_train.samples import TrainLoader, TransformConfig
    from ramcli_train.parse import TagParser

    clip_view = "same" if train and cfg.distill == "online" and cfg.family != "tag2text" else None
    transform = TransformConfig.from_data_config(cfg.arch(len(labels)).data_config, train=train and cfg.augment,
                                                 randaugment=train and cfg.augment,
                                                 clip_view=clip_view if cfg.clip_model != "tiny" else None)
    parser = TagParser(labels)
    common = dict(transform=transform, rank=rt.rank, world_size=rt.world, shuffle=train and cfg.shuffle, seed=cfg.seed)
    precomputed = train and cfg.distill == "precomputed" and cfg.family != "tag2text"
    if is_annotation(paths):
        if precomputed:
            raise UsageError("distill=precomputed reads CLIP features from shards; official JSON annotations have "
                             "none (use distill=online)")
        dataset = AnnotationDataset(paths, len(labels), parser=parser, **common)
    else:
        dataset = ShardDataset(paths, parser, clip_features=precomputed, **common)
    return TrainLoader(dataset, cfg.batch_size, num_workers=cfg.num_workers)



def iter_captions(paths: list[str]):
    """Every caption of the data (to train a small vocabulary): tar members' .txt, JSON items."""
    from ramcli_train.data import resolve_shards

    if is_annotation(paths):
        for p in paths:
            for item in json.loads(Path(p).read_text(encoding="utf-8")):
                caps = item.get("caption", []) if isinstance(item, dict) else []
                yield from ([caps] if isinstance(caps, str) else caps)
        return
    for shard in resolve_shards(paths):
        with contextlib.suppress(tarfile.TarError, OSError), tarfile.open(shard) as tar:
            for member in tar:
                if member.name.endswith(".txt"):
                    yield tar.extractfile(member).read().decode("utf-8", "replace")


def count_samples(paths: list[str]) -> int:
    """Samples in the data (image members of shards, items of JSON files), read from headers."""
    from ramcli_train.data import resolve_shards
    from ramcli_train.samples import IMAGE_EXTENSIONS

    if is_annotation(paths):
        return sum(len(json.loads(Path(p).read_text(encoding="utf-8"))) for p in paths)
    total = 0
    for shard in resolve_shards(paths):
        with contextlib.suppress(tarfile.TarError, OSError), tarfile.open(shard) as tar:
            total += sum(1 for m in tar if m.name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS)
    return total

