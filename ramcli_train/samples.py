"""One training sample and how samples become batches: the transforms (the model's data config,
plus CLIP's view for distillation), the skip counts that travel with the samples, and the
loader that sums them. The sources that make samples are in `ramcli_train.data` (shards) and
`ramcli_train.annotations` (the official JSON files).

Normalisation: the main image uses the model's data config (`TransformConfig.from_data_config`:
the mean/std and resize interpolation that `ArchConfig.data_config` gives `ramcli tag`; ImageNet's
for the Swin, the timm backbone's own for others), so training and inference see the same
input (official training used CLIP mean/std, a train/test mismatch we do not copy; pass
normalization="clip" to reproduce it). The optional 224-px distillation view is
always CLIP-normalised because it feeds the frozen CLIP image encoder.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass, field, fields

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from torch.utils.data import DataLoader, IterableDataset

from ramcli.errors import RamcliError, UsageError

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

    def __init__(self, dataset: IterableDataset, batch_size: int, num_workers: int = 0, **loader_kwargs):
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
