"""Training data: WebDataset shards and the official JSON annotations, as batches of targets.

Two sources, one sample shape (`TrainSample`):

- **WebDataset shards** as img2dataset writes them: `KEY.jpg|jpeg|png|webp` with `KEY.txt`
  (caption) and/or `KEY.json` ({"caption": str or [str], "tags": [names], "tag_ids": [ids]}).
  A source is a folder of `.tar` files, one `.tar`, a brace pattern
  (`shards/{00000..00099}.tar`) or a list of any of these. Tags = given tags ∪ tags parsed
  from every caption (the official `union_label_id`); the parsed tags of the caption drawn for
  this step are the `parse_tags` (the official `parse_label_id`). Tags listed in the JSON's
  `removed_tags` (written by `ramcli engine clean`) are taken out of both.
  With `distill=precomputed` each sample must also hold `KEY.clip.npy`, its CLIP image
  feature (written by `ramcli train clip-features`, see ramcli_train/clip_features.py).
- **Official JSON annotations** (COCO/VG/SBU/CC3M files of the release): a list of
  {image_path, caption: [..], parse_label_id: [[..]], union_label_id: [..]} plus an image root.

Both are streaming `IterableDataset`s split across ranks, then across DataLoader workers
(shards: whole shards per rank/worker; JSON: index striding), reshuffled per `set_epoch`.

Bad samples never stop an epoch: they are skipped and counted in `DataStats`. The counts
travel with the samples (each sample carries the skips since the previous one; a worker's
trailing skips come as a stats-only item), so they add up correctly across worker processes;
`TrainLoader` sums them and raises one `RamcliError` only if a whole epoch had no usable sample.

Samples, transforms and batching: `ramcli_train.samples`; the JSON annotations' dataset:
`ramcli_train.annotations`.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch.utils.data import IterableDataset, get_worker_info

from ramcli.errors import RamcliError, UsageError
from ramcli_train.parse import TagParser, clean_caption
from ramcli_train.samples import (CLIP_FEATURES_MEMBER, IMAGE_EXTENSIONS, DataStats, SampleTransform, TrainSample,
                                  TransformConfig, decode_clip_features, decode_image)


def valid_ids(ids: object, num_classes: int) -> list[int] | None:
    """The ids as ints, or None if any is not an integer in [0, num_classes)."""
    if not isinstance(ids, list):
        return None
    if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < num_classes for i in ids):
        return None
    return ids


def multi_hot(ids: Sequence[int], num_classes: int) -> torch.Tensor:
    out = torch.zeros(num_classes, dtype=torch.float32)
    if ids:
        out[list(ids)] = 1.0
    return out


def worker_slice() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is None or world_size is None:
        import webdataset as wds

        detected_rank, detected_world, _, _ = wds.utils.pytorch_worker_info()
        rank = detected_rank if rank is None else rank
        world_size = detected_world if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise UsageError(f"rank {rank} is not in a world of {world_size}")
    return rank, world_size


def _is_remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


def resolve_shards(source: str | Path | Sequence[str | Path]) -> list[str]:
    """Shard paths from a folder, a .tar file, a brace pattern or a list of these.

    Local shards must exist; remote URLs (with '://') are passed to webdataset unchecked.
    """
    import webdataset as wds

    if isinstance(source, (list, tuple)):
        if not source:
            raise RamcliError("no training data given: the shard list is empty")
        return [url for item in source for url in resolve_shards(item)]
    text = str(source)
    if not text.strip():
        raise RamcliError("no training data given: the data path is empty")
    if _is_remote(text):
        return wds.shardlists.expand_urls(text)
    path = Path(text).expanduser()
    if path.is_dir():
        shards = sorted(str(p) for p in path.glob("*.tar"))
        if not shards:
            nested = sorted({p.parent.name for p in path.glob("*/*.tar")})
            hint = f" (sub-folders with shards: {', '.join(nested)}; pass one of them)" if nested else ""
            raise RamcliError(f"no .tar shards in {path}{hint}")
        return shards
    if "{" in text:
        expanded = wds.shardlists.expand_urls(text)
        missing = [p for p in expanded if not Path(p).is_file()]
        if missing:
            raise RamcliError(f"{len(missing)} of {len(expanded)} shards of {text} are missing, first: {missing[0]}")
        return expanded
    if path.is_file():
        return [str(path)]
    raise RamcliError(f"training data not found: {path}")


class SampleTargets:
    """Turns captions, given names and given ids into the two multi-hot targets."""

    def __init__(self, parser: TagParser | None, num_classes: int):
        self.parser = parser
        self.num_classes = num_classes

    def parse(self, caption: str) -> list[int]:
        return self.parser.tag_ids(caption) if self.parser is not None else []

    def known(self, names: list[str]) -> list[int]:
        """Ids of the names the label system has; the others are ignored (not counted)."""
        return self.parser.ids_for_names(names)[0] if self.parser is not None and names else []

    def names(self, names: list[str], pending: DataStats) -> list[int]:
        if self.parser is None:
            pending.unknown_tag_names += len(names)
            return []
        ids, unknown = self.parser.ids_for_names(names)
        pending.unknown_tag_names += len(unknown)
        return ids


class StreamDataset(IterableDataset):
    """Epoch, seeds and rank/worker bookkeeping shared by both sources."""

    def __init__(self, transform: TransformConfig, seed: int, shuffle: bool, keep_untagged: bool):
        super().__init__()
        self.transform_config = transform
        self.seed = seed
        self.shuffle = shuffle
        self.keep_untagged = keep_untagged
        self.epoch = 0
        self._transform: SampleTransform | None = None

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for a new epoch (call before iterating, as with DistributedSampler)."""
        self.epoch = epoch

    def _rng(self, rank: int) -> random.Random:
        worker, _ = worker_slice()
        return random.Random(hash((self.seed, self.epoch, rank, worker)))

    def _finish(
        self,
        key: str,
        image_bytes: bytes,
        captions: list[str],
        union: list[int],
        parsed: list[list[int]],
        rng: random.Random,
        num_classes: int,
        pending: DataStats,
    ) -> TrainSample | None:
        """The sample of a decodable image, its targets and one of its captions drawn by `rng`."""
        image = decode_image(image_bytes)
        if image is None:
            pending.undecodable_image += 1
            return None
        if not union and not self.keep_untagged:
            pending.no_tags += 1
            return None
        index = rng.randrange(len(captions)) if captions else -1
        if self._transform is None:
            self._transform = SampleTransform(self.transform_config)
        tensor, clip = self._transform(image)
        pending.used += 1
        out = TrainSample(
            image=tensor,
            tags=multi_hot(union, num_classes),
            parse_tags=multi_hot(parsed[index] if index >= 0 else [], num_classes),
            caption=clean_caption(captions[index]) if index >= 0 else "",
            key=key,
            image_clip=clip,
            stats=pending,
        )
        return out


class ShardDataset(StreamDataset):
    """Samples from WebDataset shards (img2dataset layout); see the module docstring."""

    def __init__(
        self,
        source: str | Path | Sequence[str | Path],
        parser: TagParser,
        transform: TransformConfig = TransformConfig(),
        rank: int | None = None,
        world_size: int | None = None,
        shuffle: bool = True,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        keep_untagged: bool = False,
        clip_features: bool = False,
    ):
        super().__init__(transform, seed, shuffle, keep_untagged)
        self.clip_features = clip_features  # read (and require) each sample's KEY.clip.npy
        self.shards = resolve_shards(source)
        self.rank, self.world_size = rank_world(rank, world_size)
        if len(self.shards) < self.world_size:
            raise RamcliError(
                f"{len(self.shards)} shard(s) cannot be split across {self.world_size} ranks; write more shards"
            )
        self.targets = SampleTargets(parser, len(parser.names))
        self.shuffle_buffer = shuffle_buffer

    def rank_shards(self) -> list[str]:
        """The shards of this rank for the current epoch (same order on every rank, then strided)."""
        shards = list(self.shards)
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(shards)
        return shards[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[TrainSample | DataStats]:
        import webdataset as wds

        pending = DataStats()

        def on_error(exc: Exception) -> bool:
            pending.bad_shard += 1
            return True

        urls = wds.split_by_worker(iter([{"url": u} for u in self.rank_shards()]))
        samples: Iterator[dict] = wds.tarfile_samples(urls, handler=on_error)
        rng = self._rng(self.rank)
        if self.shuffle and self.shuffle_buffer > 1:
            samples = wds.shuffle(self.shuffle_buffer, min(100, self.shuffle_buffer), rng=rng)(samples)
        for raw in samples:
            pending.seen += 1
            sample = self._build(raw, rng, pending)
            if sample is not None:
                yield sample
                pending = DataStats()
        if pending.any():
            yield pending

    def _build(self, raw: dict, rng: random.Random, pending: DataStats) -> TrainSample | None:
        key = str(raw.get("__key__", ""))
        image_bytes = next((raw[ext] for ext in IMAGE_EXTENSIONS if ext in raw), None)
        if image_bytes is None:
            pending.no_image += 1
            return None
        meta: dict = {}
        if "json" in raw:
            try:
                meta = json.loads(raw["json"])
            except (ValueError, UnicodeDecodeError):
                meta = None
            if not isinstance(meta, dict):
                pending.bad_metadata += 1
                return None
        captions = meta.get("caption")
        captions = [captions] if isinstance(captions, str) else list(captions) if isinstance(captions, list) else []
        if "txt" in raw:
            captions.append(raw["txt"].decode("utf-8", errors="replace"))
        captions = list(dict.fromkeys(c.strip() for c in captions if isinstance(c, str) and c.strip()))
        names = meta.get("tags") or []
        given_ids = meta.get("tag_ids") or []
        if not captions and not names and not given_ids:
            pending.no_caption += 1
            return None
        num_classes = self.targets.num_classes
        given_ids = valid_ids(given_ids, num_classes)
        if given_ids is None:
            pending.bad_tag_ids += 1
            return None
        removed = meta.get("removed_tags") or []
        if not isinstance(names, list) or not isinstance(removed, list):
            pending.bad_metadata += 1
            return None
        # `ramcli engine clean` lists the tags it judged wrong; the captions still name them, so
        # they are taken out after parsing, from the union and from each caption's parsed tags
        dropped = set(self.targets.known([str(n) for n in removed]))
        parsed = [sorted(set(self.targets.parse(c)) - dropped) for c in captions]
        union = sorted((set(given_ids) | set(self.targets.names([str(n) for n in names], pending)).union(*parsed))
                       - dropped)
        features = None
        if self.clip_features:
            features = decode_clip_features(raw.get(CLIP_FEATURES_MEMBER))
            if features is None:
                pending.no_clip_features += 1
                return None
        sample = self._finish(key, image_bytes, captions, union, parsed, rng, num_classes, pending)
        if sample is not None:
            sample.clip_features = features
        return sample


