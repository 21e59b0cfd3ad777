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

Normalisation: the main image uses the model's data config (`TransformConfig.from_data_config`:
the mean/std and resize interpolation that `ArchConfig.data_config` gives `ramcli tag`; ImageNet's
for the Swin, the timm backbone's own for others), so training and inference see the same
input (official training used CLIP mean/std, a train/test mismatch we do not copy; pass
normalization="clip" to reproduce it). The optional 224-px distillation view is
always CLIP-normalised because it feeds the frozen CLIP image encoder.
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ramcli.errors import RamcliError, UsageError
from ramcli_train.parse import TagParser, clean_caption

# the two normalisations, as timm defines them (its OpenAI CLIP values are open_clip's
# OPENAI_DATASET_MEAN/STD; importing open_clip for two tuples would cost seconds)
IMAGENET_MEAN, IMAGENET_STD = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
CLIP_MEAN, CLIP_STD = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
CLIP_SIZE = 224
#: the shard member with a sample's precomputed CLIP image feature (float16 .npy, shape (512,))
CLIP_FEATURES_MEMBER = "clip.npy"
CLIP_FEATURES_DIM = 512
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


@dataclass
class DataStats:
    """Counts of what the data pipeline saw, used and skipped (and why)."""

    seen: int = 0
    used: int = 0
    bad_shard: int = 0  # a shard that could not be opened or read to its end
    no_image: int = 0  # a sample without an image file
    undecodable_image: int = 0
    missing_image: int = 0  # JSON annotations: the image file is not there
    bad_metadata: int = 0  # unreadable KEY.json, or an annotation item of the wrong shape
    no_caption: int = 0  # neither a caption nor tags
    no_tags: int = 0  # captions without any known tag, and no given tags
    bad_tag_ids: int = 0  # tag ids outside the label system
    unknown_tag_names: int = 0  # given tag names not in the label system (dropped, sample kept)
    no_clip_features: int = 0  # distill=precomputed: KEY.clip.npy missing or malformed

    _SKIPS = ("bad_shard", "no_image", "undecodable_image", "missing_image", "bad_metadata", "no_caption", "no_tags",
              "bad_tag_ids", "no_clip_features")

    def add(self, other: DataStats) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    @property
    def skipped(self) -> int:
        return sum(getattr(self, name) for name in self._SKIPS)

    def any(self) -> bool:
        return any(getattr(self, f.name) for f in fields(self))

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def summary(self) -> str:
        """One line, e.g. 'used 980 of 1000 samples; skipped 20 (undecodable_image 12, no_tags 8)'."""
        parts = [f"used {self.used} of {self.seen} samples"]
        sample_skips = [name for name in self._SKIPS if name != "bad_shard" and getattr(self, name)]
        if sample_skips:
            reasons = ", ".join(f"{name} {getattr(self, name)}" for name in sample_skips)
            parts.append(f"skipped {self.skipped - self.bad_shard} ({reasons})")
        if self.bad_shard:
            parts.append(f"{self.bad_shard} unreadable shard(s)")
        if self.unknown_tag_names:
            parts.append(f"dropped {self.unknown_tag_names} unknown tag name(s)")
        return "; ".join(parts)


@dataclass
class TrainSample:
    """One training example. `tags` and `parse_tags` are float multi-hot vectors of num_classes."""

    image: torch.Tensor
    tags: torch.Tensor
    parse_tags: torch.Tensor
    caption: str
    key: str
    image_clip: torch.Tensor | None = None
    clip_features: torch.Tensor | None = None  # precomputed distillation target (512,)
    stats: DataStats = field(default_factory=DataStats)


@dataclass
class TrainBatch:
    images: torch.Tensor
    tags: torch.Tensor
    parse_tags: torch.Tensor
    captions: list[str]
    keys: list[str]
    images_clip: torch.Tensor | None
    stats: DataStats
    clip_features: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.keys)


@dataclass(frozen=True)
class TransformConfig:
    """Image preprocessing. Training: the official augmentation (RandomResizedCrop scale 0.2-1,
    bicubic; horizontal flip; RandAugment(2, 5), torchvision's). Eval: the inference squash-resize.

    clip_view: None, "same" (the augmented crop resized to 224, as in pretraining) or
    "separate" (an independently augmented 224 crop, as in finetuning).
    crop_scale: RandomResizedCrop's area range; the official 0.2 can crop a small object out of
    the picture, harmless on photos with many tags, but raise it for sparse synthetic scenes.
    mean, std, interpolation: the model's data config (`from_data_config`); `normalization="clip"`
    replaces mean and std with CLIP's.
    """

    size: int = 224
    train: bool = True
    randaugment: bool = True
    normalization: str = "imagenet"
    clip_view: str | None = None
    crop_scale: tuple[float, float] = (0.2, 1.0)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"

    @classmethod
    def from_data_config(cls, data_config: dict, **kwargs) -> TransformConfig:
        """The transform that prepares images as a model with this data config
        (`model.pretrained_cfg`, `ArchConfig.data_config`) expects them."""
        return cls(size=data_config["input_size"][-1], mean=tuple(data_config["mean"]), std=tuple(data_config["std"]),
                   interpolation=data_config["interpolation"], **kwargs)

    def __post_init__(self) -> None:
        if self.normalization not in ("imagenet", "clip"):
            raise UsageError(f"normalization must be 'imagenet' or 'clip', not {self.normalization!r}")
        if self.clip_view not in (None, "same", "separate"):
            raise UsageError(f"clip_view must be None, 'same' or 'separate', not {self.clip_view!r}")
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise UsageError(f"crop scale must be 0 < low <= high <= 1, not {self.crop_scale}")
        if self.size < 8:
            raise UsageError(f"image size {self.size} is too small")
        if self.interpolation not in ("bilinear", "bicubic"):
            raise UsageError(f"interpolation must be 'bilinear' or 'bicubic', not {self.interpolation!r}")


class SampleTransform:
    """PIL image -> (normalised tensor, optional CLIP-normalised 224-px tensor)."""

    def __init__(self, config: TransformConfig):
        from torchvision import transforms as T

        self.config = config
        mean, std = (config.mean, config.std) if config.normalization == "imagenet" else (CLIP_MEAN, CLIP_STD)
        self._augment = self._geometry(config.size)
        self._to_tensor = T.Compose([T.ToTensor(), T.Normalize(mean, std)])
        self._clip_tensor = T.Compose([T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])
        self._clip_resize = T.Resize((CLIP_SIZE, CLIP_SIZE), interpolation=T.InterpolationMode.BICUBIC)
        self._clip_augment = self._geometry(CLIP_SIZE) if config.clip_view == "separate" else None

    def _geometry(self, size: int):
        from torchvision import transforms as T

        if not self.config.train:
            return T.Resize((size, size), interpolation=T.InterpolationMode(self.config.interpolation))
        steps = [
            T.RandomResizedCrop(size, scale=self.config.crop_scale, interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(),
        ]
        if self.config.randaugment:
            steps.append(T.RandAugment(num_ops=2, magnitude=5))
        return T.Compose(steps)

    def __call__(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor | None]:
        view = self._augment(image)
        clip = None
        if self.config.clip_view == "same":
            clip = self._clip_tensor(self._clip_resize(view))
        elif self.config.clip_view == "separate":
            clip = self._clip_tensor(self._clip_augment(image))
        return self._to_tensor(view), clip


def decode_clip_features(data: bytes | None) -> torch.Tensor | None:
    """A `KEY.clip.npy` member -> float32 (512,), or None when missing or not such an array.
    Read with allow_pickle=False: a shard is data, never code."""
    if data is None:
        return None
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError):
        return None
    if arr.shape != (CLIP_FEATURES_DIM,) or arr.dtype.kind != "f" or not np.isfinite(arr).all():
        return None
    return torch.from_numpy(arr.astype(np.float32))


def decode_image(data: bytes) -> Image.Image | None:
    """RGB image from bytes, or None if Pillow cannot decode it fully."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return img.convert("RGB")
    except Exception:  # Pillow raises many types (OSError, ValueError, SyntaxError, DecompressionBombError...) on bad data
        return None


def _valid_ids(ids: object, num_classes: int) -> list[int] | None:
    """The ids as ints, or None if any is not an integer in [0, num_classes)."""
    if not isinstance(ids, list):
        return None
    if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < num_classes for i in ids):
        return None
    return ids


def _multi_hot(ids: Sequence[int], num_classes: int) -> torch.Tensor:
    out = torch.zeros(num_classes, dtype=torch.float32)
    if ids:
        out[list(ids)] = 1.0
    return out


def _worker_slice() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def _rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
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


class _Targets:
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


class _StreamBase(IterableDataset):
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
        worker, _ = _worker_slice()
        return random.Random(hash((self.seed, self.epoch, rank, worker)))

    def _finish(
        self,
        key: str,
        image: Image.Image,
        captions: list[str],
        union: list[int],
        parsed: list[list[int]],
        rng: random.Random,
        num_classes: int,
        pending: DataStats,
    ) -> TrainSample | None:
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
            tags=_multi_hot(union, num_classes),
            parse_tags=_multi_hot(parsed[index] if index >= 0 else [], num_classes),
            caption=clean_caption(captions[index]) if index >= 0 else "",
            key=key,
            image_clip=clip,
            stats=pending,
        )
        return out


class ShardDataset(_StreamBase):
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
        self.rank, self.world_size = _rank_world(rank, world_size)
        if len(self.shards) < self.world_size:
            raise RamcliError(
                f"{len(self.shards)} shard(s) cannot be split across {self.world_size} ranks; write more shards"
            )
        self.targets = _Targets(parser, len(parser.names))
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
        given_ids = _valid_ids(given_ids, num_classes)
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
        image = decode_image(image_bytes)
        if image is None:
            pending.undecodable_image += 1
            return None
        sample = self._finish(key, image, captions, union, parsed, rng, num_classes, pending)
        if sample is not None:
            sample.clip_features = features
        return sample


class AnnotationDataset(_StreamBase):
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
        self.rank, self.world_size = _rank_world(rank, world_size)
        self.targets = _Targets(parser, num_classes)

    def __len__(self) -> int:
        return len(self.items)

    def rank_indices(self) -> list[int]:
        """This rank's item indices for the current epoch (all ranks permute alike, then stride)."""
        order = list(range(len(self.items)))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[TrainSample | DataStats]:
        worker, workers = _worker_slice()
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
            parsed = [_valid_ids(ids, num_classes) for ids in parse_field]
            if any(ids is None for ids in parsed):
                pending.bad_tag_ids += 1
                return None
        else:
            parsed = [self.targets.parse(c) for c in captions]
        union_field = item.get("union_label_id")
        if union_field is not None:
            union = _valid_ids(union_field, num_classes)
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
        image = decode_image(data)
        if image is None:
            pending.undecodable_image += 1
            return None
        return self._finish(item["image_path"], image, captions, sorted(set(union)), parsed, rng, num_classes, pending)


def collate_samples(items: list[TrainSample | DataStats]) -> TrainBatch:
    """Stack samples; fold every item's skip counts into the batch's `stats`."""
    stats = DataStats()
    samples = []
    for item in items:
        if isinstance(item, DataStats):
            stats.add(item)
        else:
            stats.add(item.stats)
            samples.append(item)
    if not samples:
        return TrainBatch(torch.empty(0), torch.empty(0), torch.empty(0), [], [], None, stats)
    clips = [s.image_clip for s in samples]
    features = [s.clip_features for s in samples]
    return TrainBatch(
        images=torch.stack([s.image for s in samples]),
        tags=torch.stack([s.tags for s in samples]),
        parse_tags=torch.stack([s.parse_tags for s in samples]),
        captions=[s.caption for s in samples],
        keys=[s.key for s in samples],
        images_clip=torch.stack(clips) if all(c is not None for c in clips) else None,
        stats=stats,
        clip_features=torch.stack(features) if all(f is not None for f in features) else None,
    )


class TrainLoader:
    """Batches of a streaming dataset with the skip counts summed in `stats` (cumulative).

    Yields only non-empty batches. An epoch with no usable sample at all raises RamcliError
    with the counts, after the epoch, never in the middle of one.
    """

    def __init__(self, dataset: ShardDataset | AnnotationDataset, batch_size: int, num_workers: int = 0, **loader_kwargs):
        if batch_size < 1:
            raise UsageError("batch size must be at least 1")
        self.dataset = dataset
        self.stats = DataStats()
        self.epoch_stats = DataStats()
        self.full_epoch: DataStats | None = None  # the first epoch read to its end: the data set's counts
        self.loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_samples, **loader_kwargs)

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def __iter__(self) -> Iterator[TrainBatch]:
        self.epoch_stats = DataStats()
        for batch in self.loader:
            self.epoch_stats.add(batch.stats)
            self.stats.add(batch.stats)
            if len(batch):
                yield batch
        if self.epoch_stats.used == 0:
            raise RamcliError(f"no usable training sample: {self.epoch_stats.summary()}")
        if self.full_epoch is None:
            self.full_epoch = self.epoch_stats

    def summary(self) -> str:
        """The data set's counts, as one epoch reads them (the cumulative `stats` count every
        epoch's reads again)."""
        if self.full_epoch is not None:
            return f"{self.full_epoch.summary()} per epoch"
        return f"{self.stats.summary()} (training stopped within the first epoch)"
