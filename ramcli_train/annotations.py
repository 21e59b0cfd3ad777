"""Training samples from the official JSON annotations (COCO/VG/SBU/CC3M files of the release):
a list of {image_path, caption: [..], parse_label_id: [[..]], union_label_id: [..]} plus an
image root."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from pathlib import Path

from ramcli.errors import RamcliError
from ramcli_train.data import SampleTargets, StreamDataset, rank_world, valid_ids, worker_slice
from ramcli_train.parse import TagParser
from ramcli_train.samples import DataStats, TrainSample, TransformConfig


class AnnotationDataset(StreamDataset):
    """Samples from official JSON annotation files (list of image_path/caption/…_label_id items).

    Image paths are joined to `image_root` (default: each JSON file's folder) and must stay
    inside it. `parse_label_id` is used when present, otherwise the captions are parsed with
    `parser` (if given); `union_label_id` is used when present, else the union of the parsed ids.
    """

    def __init__(
        self,
        ann_files: str | Path | Sequence[str | Path],
        num_classes: int,
        image_root: str | Path | None = None,
        parser: TagParser | None = None,
        transform: TransformConfig = TransformConfig(),
        rank: int | None = None,
        world_size: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        keep_untagged: bool = False,
    ):
        super().__init__(transform, seed, shuffle, keep_untagged)
        files = [ann_files] if isinstance(ann_files, (str, Path)) else list(ann_files)
        if not files:
            raise RamcliError("no annotation files given")
        self.items: list[tuple[Path, object]] = []
        for name in files:
            path = Path(name).expanduser()
            if not str(name).strip() or not path.is_file():
                raise RamcliError(f"annotation file not found: {path}")
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError) as exc:
                raise RamcliError(f"annotation file is not valid JSON: {path} ({exc})") from None
            if not isinstance(data, list):
                raise RamcliError(f"annotation file must hold a JSON list of items: {path}")
            root = Path(image_root).expanduser() if image_root is not None else path.parent
            self.items.extend((root, item) for item in data)
        self.rank, self.world_size = rank_world(rank, world_size)
        self.targets = SampleTargets(parser, num_classes)

    def __len__(self) -> int:
        return len(self.items)

    def rank_indices(self) -> list[int]:
        """This rank's item indices for the current epoch (all ranks permute alike, then stride)."""
        order = list(range(len(self.items)))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[TrainSample | DataStats]:
        worker, workers = worker_slice()
        rng = self._rng(self.rank)
        pending = DataStats()
        for index in self.rank_indices()[worker::workers]:
            pending.seen += 1
            root, item = self.items[index]
            sample = self._build(root, item, index, rng, pending)
            if sample is not None:
                yield sample
                pending = DataStats()
        if pending.any():
            yield pending

    def _build(self, root: Path, item: object, index: int, rng: random.Random, pending: DataStats) -> TrainSample | None:
        if not isinstance(item, dict) or not isinstance(item.get("image_path"), str):
            pending.bad_metadata += 1
            return None
        captions = item.get("caption") or []
        captions = [captions] if isinstance(captions, str) else captions
        if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
            pending.bad_metadata += 1
            return None
        num_classes = self.targets.num_classes
        parse_field = item.get("parse_label_id")
        if isinstance(parse_field, list) and len(parse_field) == len(captions):
            parsed = [valid_ids(ids, num_classes) for ids in parse_field]
            if any(ids is None for ids in parsed):
                pending.bad_tag_ids += 1
                return None
        else:
            parsed = [self.targets.parse(c) for c in captions]
        union_field = item.get("union_label_id")
        if union_field is not None:
            union = valid_ids(union_field, num_classes)
            if union is None:
                pending.bad_tag_ids += 1
                return None
        else:
            union = sorted(set().union(*parsed)) if parsed else []
        if not captions and not union:
            pending.no_caption += 1
            return None
        resolved_root = root.resolve()
        image_path = (resolved_root / item["image_path"]).resolve()
        if not image_path.is_relative_to(resolved_root):
            pending.bad_metadata += 1
            return None
        try:
            data = image_path.read_bytes()
        except OSError:
            pending.missing_image += 1
            return None
        return self._finish(item["image_path"], data, captions, sorted(set(union)), parsed, rng, num_classes, pending)

