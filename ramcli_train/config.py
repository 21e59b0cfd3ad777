"""Training configuration: one dataclass, presets, YAML/TOML files and `key=value` overrides.

Resolution order (later wins): dataclass defaults (the official pretraining recipe) -> preset
(`tiny`, `cpu`, `cpu_swin`, `swin_b`, `swin_l`) -> config file -> CLI overrides. A preset fixes the
decoder's size and an image encoder; `backbone` swaps the encoder for any timm model. The same config drives pretraining
and finetuning (`schedule: cosine`, `init_from: checkpoint`), so `ramcli finetune` reuses it.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from ramcli.models.caption import CaptionConfig
from ramcli.errors import UsageError
from ramcli.models.configs import ARCHS, SWIN_B_224, SWIN_B_384, SWIN_L_224, SWIN_L_384, ArchConfig, SwinConfig

FAMILIES = ("ram", "ram_plus", "tag2text")

#: The `cpu_swin` preset's image encoder: wide enough in its first stage to tell shapes and
#: textures apart (the test Swin of `tiny` starts at 16 channels and never gets there on a CPU
#: budget), three stages of 8x8 windows over 4x4 patches.
CPU_SWIN = SwinConfig(32, (2, 2, 2), (2, 4, 8), 8)
#: The `cpu` preset's image encoder (a timm model): a small CNN learns shapes and textures from
#: scratch in CPU minutes, where a randomly initialised Swin does not (docs/training.md)
CPU_BACKBONE = "resnet10t"
#: the `cpu_swin` preset's recognition decoder (and caption stack) width, heads, feed-forward width
CPU_DECODER = dict(hidden=128, heads=4, intermediate=256)
#: the `cpu` preset's: twice as wide. With a few image tokens the label queries cannot pick out
#: the cells that hold their tag, so the decoder's layers must read each tag out of the same
#: pooled features; 256 wide it learns the scenes about 40% further per step (docs/training.md)
CPU_CNN_DECODER = dict(hidden=256, heads=4, intermediate=512)


@dataclass
class TrainConfig:
    # data
    data: list[str] = field(default_factory=list)
    val_data: list[str] = field(default_factory=list)
    labels: str | None = None  # label folder; default: the tag list next to the data, else the family's
    shuffle: bool = True
    augment: bool = True  # the official RandomResizedCrop + flip + RandAugment(2, 5)
    # model
    family: str = "ram"
    preset: str = "swin_l"
    image_size: int = 224
    caption_layers: int = 12
    caption_heads: int = 12
    tokenizer: str = "bert-base-uncased"  # bert-base-uncased | path to vocab.txt/tokenizer.json | train
    tokenizer_vocab: int = 1000  # size of a vocabulary trained on the captions (tokenizer=train)
    prompt: str = "a picture of "
    prepend_prompt: bool = True  # BLIP's recipe; the official RAM dataset omits it (see docs)
    label_embed: str = "clip"  # clip | random | FILE with (C[*D], 512) CLIP text embeddings
    clip_weights: str | None = None
    clip_model: str = "ViT-B-16-quickgelu"
    distill: str = "online"  # online | precomputed (KEY.clip.npy in the shards) | off
    alignment: bool | None = None  # RAM++ image-text alignment loss; default on for ram_plus
    backbone: str = ""  # a timm model as image encoder (resnet18, convnext_tiny, vit_small_patch16_224, ...)
    pretrained_backbone: bool = True  # timm's pretrained weights (Swin: ImageNet-22k) when available
    drop_path: float = 0.1  # Swin stochastic depth (the official rate); the CPU presets use 0
    caption_dropout: float = 0.1  # the caption stack's dropout (BERT's rate); the CPU presets use 0
    caption_samples: int = 0  # samples of each batch the caption loss reads (the first N); 0: all (official)
    pooled_tag_weight: float = 0.0  # weight of the pooled-embedding tag loss (losses.pooled_tag_loss); 0: off (official)
    init_from: str | None = None  # a training checkpoint or official .pth to start from (finetune)
    # optimisation
    batch_size: int = 52  # per process
    epochs: int = 5
    max_steps: int | None = None  # optimizer steps; stops early (tests, benchmarks)
    lr: float = 1e-4
    min_lr: float = 5e-7
    warmup_lr: float = 5e-7
    warmup_steps: int = 3000
    lr_decay_rate: float = 0.9
    schedule: str = "step"  # step (pretrain: x0.9 per epoch) | cosine (finetune: per epoch to min_lr)
    weight_decay: float = 0.05
    tag_rescale: bool = True  # RAM/Tag2Text: scale the tag loss to the LM loss's size (official)
    grad_clip: float = 0.0  # 0: off (official)
    accum_steps: int = 1
    amp: str = "auto"  # auto (bf16 on CUDA) | bf16 | off
    grad_ckpt: bool = False
    seed: int = 42
    num_workers: int = 2
    device: str = "auto"
    threads: int = 0  # torch CPU threads; 0: torch's default (all cores)
    # outputs
    out: str = "runs/train"
    save_every: int = 1000  # optimizer steps between checkpoints (and one per epoch)
    log_every: int = 10
    tensorboard: bool = False
    progress: bool = True

    # ------------------------------------------------------------------ derived
    @property
    def use_alignment(self) -> bool:
        return self.family == "ram_plus" if self.alignment is None else self.alignment and self.family == "ram_plus"

    def arch(self, num_classes: int) -> ArchConfig:
        """The ArchConfig of this preset, family, class count and backbone."""
        per_class = 3 if self.preset in ("tiny", "cpu", "cpu_swin") else 51
        per_class = per_class if self.family == "ram_plus" else 1
        if self.preset == "tiny":
            tiny = replace(ARCHS[f"{self.family}_tiny"], num_classes=num_classes)
            if not self.backbone:
                return tiny
            decoder = dict(hidden=tiny.hidden, heads=tiny.heads, intermediate=tiny.intermediate)
        else:
            decoder = {"cpu": CPU_CNN_DECODER, "cpu_swin": CPU_DECODER}.get(self.preset, {})
        backbone = self.backbone or (CPU_BACKBONE if self.preset == "cpu" else "")
        if backbone:
            from ramcli.models.ram import backbone_data_config

            return ArchConfig(f"{self.family}_{backbone}_{self.image_size}", self.family, self.image_size, None,
                              num_classes, descriptions_per_class=per_class, backbone=backbone, **decoder,
                              **backbone_data_config(backbone))
        if self.preset == "cpu_swin":
            return ArchConfig(f"{self.family}_cpu_swin_{self.image_size}", self.family, self.image_size, CPU_SWIN,
                              num_classes, descriptions_per_class=per_class, **decoder)
        swins = {("swin_b", 224): SWIN_B_224, ("swin_b", 384): SWIN_B_384,
                 ("swin_l", 224): SWIN_L_224, ("swin_l", 384): SWIN_L_384}
        swin = swins.get((self.preset, self.image_size))
        if swin is None:
            raise UsageError(f"preset {self.preset} supports image_size 224 or 384, not {self.image_size}")
        return ArchConfig(f"{self.family}_{self.preset}_{self.image_size}", self.family, self.image_size, swin,
                          num_classes, descriptions_per_class=per_class)

    def caption_config(self, arch: ArchConfig, vocab_size: int) -> CaptionConfig | None:
        if arch.family == "ram_plus":
            return None
        from ramcli.models.ram import backbone_width

        width = 512 if arch.family == "ram" else backbone_width(arch)
        return CaptionConfig(arch.hidden, self.caption_heads, arch.intermediate, self.caption_layers,
                             vocab_size, 512, width, dropout=self.caption_dropout)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PRESETS: dict[str, dict[str, Any]] = {
    # CPU-sized: 64 px, tiny Swin and heads, a caption vocabulary trained on the data, no teacher
    "tiny": dict(preset="tiny", image_size=64, caption_layers=2, caption_heads=4, tokenizer="train",
                 label_embed="random", distill="off", pretrained_backbone=False, drop_path=0.0, caption_dropout=0.0,
                 batch_size=32, epochs=10, lr=1e-3, warmup_lr=1e-5, warmup_steps=20, lr_decay_rate=0.9, amp="off",
                 num_workers=0, save_every=200, log_every=5),
    # CPU training that learns in minutes (bench/train_learns.py): a small CNN from scratch under
    # RAM's decoder, the tag loss unscaled, no augmentation (synthetic scenes are sparse: crops
    # cut the shapes out), no dropout (a tenth of a step's time, and nothing to regularise in
    # a few hundred steps), the pooled-embedding tag loss (the encoder learns as fast as under a
    # linear probe), the caption loss on a quarter of each batch (almost half of a step's time),
    # and the steps that saves spent on an eleventh epoch at a higher learning rate
    "cpu": dict(preset="cpu", image_size=64, caption_layers=2, caption_heads=4, tokenizer="train",
                tokenizer_vocab=300, label_embed="random", distill="off", pretrained_backbone=False,
                drop_path=0.0, caption_dropout=0.0, caption_samples=8, pooled_tag_weight=2.0,
                batch_size=32, epochs=11, lr=1.5e-3, warmup_lr=1e-5,
                warmup_steps=50, lr_decay_rate=0.8, grad_clip=1.0, tag_rescale=False, augment=False, amp="off",
                num_workers=0, save_every=0, log_every=10),
    # the earlier `cpu` recipe (as its figures were measured) on a small Swin from scratch (the
    # paper's encoder family): it does not learn shapes in CPU minutes (docs/training.md)
    "cpu_swin": dict(preset="cpu_swin", image_size=64, caption_layers=2, caption_heads=4, tokenizer="train",
                     tokenizer_vocab=300, label_embed="random", distill="off", pretrained_backbone=False,
                     drop_path=0.0, caption_dropout=0.0, batch_size=32, epochs=10, lr=1e-3, warmup_lr=1e-5,
                     warmup_steps=50, lr_decay_rate=0.8, grad_clip=1.0, tag_rescale=False, augment=False, amp="off",
                     num_workers=0, threads=1, save_every=0, log_every=10),
    # Tag2Text's pretraining setting (Swin-B 224, 80 per GPU)
    "swin_b": dict(preset="swin_b", image_size=224, batch_size=80),
    # RAM's pretraining setting (Swin-L 224, 52 per GPU)
    "swin_l": dict(preset="swin_l", image_size=224, batch_size=52),
}


def _coerce(name: str, value: Any) -> Any:
    """A CLI string or file value -> the field's type (YAML scalars: 1e-4, true, null, [a, b])."""
    kinds = {f.name: f.type for f in fields(TrainConfig)}
    if name not in kinds:
        raise UsageError(f"unknown config key {name!r}; known: {', '.join(sorted(kinds))}")
    kind = str(kinds[name])
    if isinstance(value, str) and "None" in kind and value.strip().lower() in ("null", "none", ""):
        return None
    if isinstance(value, str) and not kind.startswith("str"):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            raise UsageError(f"cannot parse {name}={value!r}") from None
    if kind.startswith("list") and isinstance(value, str):
        value = [value]
    if value is None:
        if "None" not in kind:
            raise UsageError(f"{name} cannot be empty")
        return None
    base = kind.split(" | ")[0]
    try:
        if base == "int":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if base == "float":
            return float(value)
        if base == "bool":
            if not isinstance(value, bool):
                raise ValueError
            return value
        if base == "str":
            return str(value)
        if base.startswith("list"):
            return [str(v) for v in value]
    except (TypeError, ValueError):
        raise UsageError(f"{name} must be {base}, got {value!r}") from None
    return value


def read_config_file(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"config file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise UsageError(f"cannot parse {path.name}: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path.name} must hold a mapping of config keys")
    return data


def resolve(preset: str | None = None, file: Path | None = None, overrides: dict[str, Any] | None = None,
            sets: list[str] | None = None) -> TrainConfig:
    """Defaults -> preset -> file -> overrides (typed values) -> sets ('key=value' strings)."""
    layers: list[dict[str, Any]] = []
    from_file = read_config_file(file) if file else {}
    name = (overrides or {}).get("preset") or from_file.get("preset") or preset
    if name:
        if name not in PRESETS:
            raise UsageError(f"unknown preset {name!r}; choose {', '.join(PRESETS)}")
        layers.append(PRESETS[name])
    layers += [from_file, {k: v for k, v in (overrides or {}).items() if v is not None}]
    for item in sets or []:
        if "=" not in item:
            raise UsageError(f"--set takes key=value, got {item!r}")
        k, v = item.split("=", 1)
        layers.append({k.strip().replace("-", "_"): v})
    cfg = TrainConfig()
    for layer in layers:
        cfg = replace(cfg, **{k: _coerce(k, v) for k, v in layer.items()})
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    checks = [
        (cfg.family in FAMILIES, f"family must be one of {', '.join(FAMILIES)}"),
        (cfg.distill in ("online", "precomputed", "off"),
         "distill must be online, precomputed (shards from `ramcli train clip-features`) or off"),
        (cfg.schedule in ("step", "cosine"), "schedule must be step or cosine"),
        (cfg.amp in ("auto", "bf16", "off"), "amp must be auto, bf16 or off"),
        (cfg.batch_size > 0 and cfg.accum_steps > 0 and cfg.epochs > 0, "batch_size, accum_steps, epochs must be > 0"),
        (cfg.lr > 0, "lr must be > 0"),
        (0 <= cfg.drop_path < 1, "drop_path must be in [0, 1)"),
        (0 <= cfg.caption_dropout < 1, "caption_dropout must be in [0, 1)"),
        (cfg.caption_samples >= 0, "caption_samples must be >= 0 (0: the whole batch)"),
        (cfg.pooled_tag_weight >= 0, "pooled_tag_weight must be >= 0"),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)


def dump(cfg: TrainConfig) -> str:
    return json.dumps(cfg.to_dict(), indent=2, sort_keys=True)
