"""Architecture configurations of the RAM family.

An `ArchConfig` fixes the structure of a model (backbone, decoder sizes, family) and how images
are prepared for it (`data_config`, in the shape of timm's pretrained configs). The backbone is
the official Swin of `swin`, or any timm model that gives a feature map, named by `backbone`
(then `swin` is None). The number of
classes comes from the weights (a checkpoint's `label_embed`), so one config serves the official
4,585 tags, a benchmark subset or a vocabulary with custom tags. Everything here can also be
inferred from an official checkpoint (`infer_arch`): the family from everything the file says
(`infer_family`), the sizes from tensor shapes, which is how `--arch` is optional.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, fields, replace

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from ramcli.errors import CheckpointError

FAMILIES = ("ram", "ram_plus", "tag2text")
CLIP_DIM = 512  # label queries of RAM/RAM++ live in CLIP ViT-B/16's text space
#: RAM++'s CLIP descriptions per tag in the published model (label rows = classes x this)
RAM_PLUS_DESCRIPTIONS = 51
#: The class count of the published RAM and RAM++ models (their tag list)
OFFICIAL_RAM_CLASSES = 4585


@dataclass(frozen=True)
class SwinConfig:
    embed_dim: int
    depths: tuple[int, ...]
    num_heads: tuple[int, ...]
    window_size: int
    patch_size: int = 4

    @property
    def width(self) -> int:
        """Channels of the last stage: the width of the image tokens."""
        return self.embed_dim * 2 ** (len(self.depths) - 1)


@dataclass(frozen=True)
class ArchConfig:
    name: str
    family: str
    image_size: int
    swin: SwinConfig | None  # the official Swin; None when `backbone` names a timm model
    num_classes: int
    hidden: int = 768
    heads: int = 4
    intermediate: int = 3072
    layers: int = 2
    descriptions_per_class: int = 1  # RAM++: 51 CLIP description embeddings per tag
    layer_norm_eps: float = 1e-12
    # Preprocessing (the official `get_transform`): squash-resize to image_size, ImageNet mean/std.
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN
    std: tuple[float, float, float] = IMAGENET_DEFAULT_STD
    backbone: str = ""  # a timm model name (resnet18, convnext_tiny, ...); empty: the Swin of `swin`
    depths: tuple[int, ...] = ()  # blocks per stage of the timm backbone; empty: the model's own

    @property
    def encoder(self) -> str:
        """The image encoder in a few words, for logs and reports."""
        if self.backbone:
            return f"{self.backbone} {_blocks(self.depths)}" if self.depths else self.backbone
        return f"Swin {self.swin.embed_dim} {_blocks(self.swin.depths)}"

    @property
    def data_config(self) -> dict:
        """How an image becomes this model's input, with the keys of timm's `resolve_data_config`
        (`crop_mode="squash"`: resized to the input size whatever its aspect ratio, no crop)."""
        return {"input_size": (3, self.image_size, self.image_size), "interpolation": self.interpolation,
                "mean": tuple(self.mean), "std": tuple(self.std), "crop_pct": 1.0, "crop_mode": "squash"}

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ArchConfig:
        """The architecture a file's header records, each field checked (type and range): a
        ValueError names the first one that is wrong."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("the architecture is not a JSON object")
        data.pop("extra", None)  # an always-empty field that files converted by ramcli 0.1 carry
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        missing = [k for k in ("name", "family", "image_size", "swin", "num_classes") if k not in data]
        if unknown or missing:
            raise ValueError(f"unknown field {unknown[0][:40]!r}" if unknown else f"no {missing[0]}")
        for key, (low, high) in WHOLE_NUMBERS.items():
            if key in data:
                whole(key, data[key], low, high)
        if not isinstance(data["name"], str) or not 0 < len(data["name"]) <= 200 or not data["name"].isprintable():
            raise ValueError(f"name must be 1 to 200 printable characters, not {repr(data['name'])[:40]}")
        if data["family"] not in FAMILIES:
            raise ValueError(f"family must be one of {', '.join(FAMILIES)}, not {repr(data['family'])[:40]}")
        if data.get("interpolation", "bilinear") not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be {' or '.join(INTERPOLATIONS)}, not {repr(data['interpolation'])[:40]}")
        if not isinstance(data.get("backbone", ""), str) or not TIMM_NAME.match(data.get("backbone", "")):
            raise ValueError(f"backbone is not a timm model name: {repr(data['backbone'])[:40]}")
        eps = data.get("layer_norm_eps", 1e-12)
        if type(eps) not in (int, float) or not 0 < eps <= 0.1:
            raise ValueError(f"layer_norm_eps must be a number above 0 and at most 0.1, not {repr(eps)[:40]}")
        for key, low in (("mean", -1000.0), ("std", 1e-6)):  # files written before these keep the defaults
            if key in data:
                data[key] = three_numbers(key, data[key], low)
        if data.get("hidden", 768) % data.get("heads", 4):
            raise ValueError("hidden must be a multiple of heads")
        swin = data.pop("swin")
        if swin is not None:
            swin = checked_swin(swin)
        if "depths" in data:
            data["depths"] = checked_depths(data["depths"]) if data["depths"] else ()
        return cls(swin=swin, **data)


#: The whole-number fields of an architecture and their ranges: wide enough for every published
#: and trainable model, narrow enough that a hostile header cannot ask for a skeleton that takes
#: forever or all memory to build.
WHOLE_NUMBERS = {"image_size": (16, 4096), "num_classes": (1, 200_000), "hidden": (8, 8192), "heads": (1, 128),
                 "intermediate": (8, 32768), "layers": (1, 48), "descriptions_per_class": (1, 256)}
SWIN_WHOLE_NUMBERS = {"embed_dim": (8, 1024), "window_size": (1, 64), "patch_size": (1, 64)}
INTERPOLATIONS = ("bilinear", "bicubic")
TIMM_NAME = re.compile(r"^[A-Za-z0-9_.-]{0,120}$")


def whole(key: str, value, low: int, high: int) -> int:
    if type(value) is not int or not low <= value <= high:
        raise ValueError(f"{key} must be a whole number from {low} to {high}, not {repr(value)[:40]}")
    return value


def three_numbers(key: str, value, low: float) -> tuple[float, float, float]:
    """An RGB mean or std: three finite numbers from `low` to 1000."""
    if not isinstance(value, list) or len(value) != 3 or not all(
            type(v) in (int, float) and low <= v <= 1000 for v in value):
        raise ValueError(f"{key} must be three numbers from {low:g} to 1000, not {repr(value)[:60]}")
    return tuple(float(v) for v in value)


def checked_swin(value) -> SwinConfig:
    """A Swin backbone from a file's header, checked like the architecture around it."""
    if not isinstance(value, dict) or set(value) - {f.name for f in fields(SwinConfig)} or not {
            "embed_dim", "depths", "num_heads", "window_size"} <= set(value):
        raise ValueError("swin must hold embed_dim, depths, num_heads, window_size (and patch_size)")
    for key, (low, high) in SWIN_WHOLE_NUMBERS.items():
        if key in value:
            whole(f"swin.{key}", value[key], low, high)
    depths = checked_depths(value["depths"])
    heads = value["num_heads"]
    if not isinstance(heads, list) or len(heads) != len(depths) or not all(
            type(h) is int and 1 <= h <= 128 and value["embed_dim"] * 2 ** i % h == 0 for i, h in enumerate(heads)):
        raise ValueError("swin.num_heads must be one whole number per stage that divides the stage's width")
    return SwinConfig(**{**value, "depths": depths, "num_heads": tuple(heads)})


#: The most blocks per stage a file may ask for (the largest published Swin has 18): a hostile
#: header cannot make building the model skeleton take forever.
MAX_BLOCKS = 64


def checked_depths(value) -> tuple[int, ...]:
    """Blocks per stage from a file's header or the command line, checked: 1 to 8 stages of 1 to
    MAX_BLOCKS blocks."""
    if not isinstance(value, list) or not 1 <= len(value) <= 8 or not all(
            type(d) is int and 1 <= d <= MAX_BLOCKS for d in value):
        raise ValueError("depths must be 1 to 8 whole numbers of blocks")
    return tuple(value)


def _blocks(depths: tuple[int, ...]) -> str:
    return "[" + ",".join(map(str, depths)) + "]"


SWIN_L_384 = SwinConfig(192, (2, 2, 18, 2), (6, 12, 24, 48), 12)
SWIN_L_224 = SwinConfig(192, (2, 2, 18, 2), (6, 12, 24, 48), 7)
SWIN_B_384 = SwinConfig(128, (2, 2, 18, 2), (4, 8, 16, 32), 12)
SWIN_B_224 = SwinConfig(128, (2, 2, 18, 2), (4, 8, 16, 32), 7)
SWIN_TINY_TEST = SwinConfig(16, (2, 2, 2, 2), (1, 2, 4, 8), 4)

_TINY = dict(hidden=64, heads=4, intermediate=128)

ARCHS: dict[str, ArchConfig] = {
    a.name: a
    for a in [
        ArchConfig("ram_swin_large_384", "ram", 384, SWIN_L_384, 4585),
        ArchConfig("ram_swin_large_224", "ram", 224, SWIN_L_224, 4585),
        ArchConfig("ram_swin_base_384", "ram", 384, SWIN_B_384, 4585),
        ArchConfig("ram_swin_base_224", "ram", 224, SWIN_B_224, 4585),
        ArchConfig("ram_plus_swin_large_384", "ram_plus", 384, SWIN_L_384, 4585, descriptions_per_class=51),
        ArchConfig("ram_plus_swin_large_224", "ram_plus", 224, SWIN_L_224, 4585, descriptions_per_class=51),
        ArchConfig("ram_plus_swin_base_384", "ram_plus", 384, SWIN_B_384, 4585, descriptions_per_class=51),
        ArchConfig("tag2text_swin_base_384", "tag2text", 384, SWIN_B_384, 3429),
        ArchConfig("tag2text_swin_base_224", "tag2text", 224, SWIN_B_224, 3429),
        # Tiny configurations with the official structure, for tests and CPU training runs.
        ArchConfig("ram_tiny", "ram", 64, SWIN_TINY_TEST, 50, **_TINY),
        ArchConfig("ram_plus_tiny", "ram_plus", 64, SWIN_TINY_TEST, 50, descriptions_per_class=3, **_TINY),
        ArchConfig("tag2text_tiny", "tag2text", 64, SWIN_TINY_TEST, 50, **_TINY),
    ]
}

#: The official convention: 384-px models use window 12, 224-px models window 7.
_IMAGE_SIZE_BY_WINDOW = {12: 384, 7: 224}


def get_arch(name: str) -> ArchConfig:
    try:
        return ARCHS[name]
    except KeyError:
        raise CheckpointError(f"unknown architecture {name!r}; known: {', '.join(ARCHS)}") from None


def head_prefix(sd: dict, prefix: str = "") -> str:
    """Where the recognition decoder's layers are: `tagging_head` (current files), `vision_multi`
    (early files), or the RAM/Tag2Text tag encoder whose lowest layers are tied to it."""
    for name in ("tagging_head", "vision_multi", "tag_encoder"):
        head = f"{prefix}{name}.encoder.layer."
        if any(k.startswith(head) for k in sd):
            return head
    raise CheckpointError("missing the recognition decoder (tagging_head.encoder.layer.*)")


def infer_family(sd: dict, prefix: str = "", num_classes: int | None = None, known: str | None = None) -> str:
    """The family of an official-layout state dict, from everything the file says.

    In order: a group-wise classifier `fc.W` is Tag2Text; a `reweight_scale` is RAM++; `known`
    (the family of a published file whose checksum was verified) decides; a caption branch
    (`text_decoder.*`) is RAM (RAM++ has none); then the label table: RAM has one row per class,
    RAM++ one per class and description, so rows = k x classes (k > 1) is RAM++, the classes
    being the label list's `num_classes`, else the published 4,585 (RAM++: 4,585 x 51 rows), else
    any multiple of RAM++'s 51 descriptions. A RAM++ file may lack `reweight_scale`: the
    official model loads with `strict=False` and keeps its initial value, so a missing one says
    nothing.
    """
    if f"{prefix}fc.W" in sd:
        return "tag2text"
    if f"{prefix}reweight_scale" in sd:
        return "ram_plus"
    if known in FAMILIES:
        return known
    table = sd.get(f"{prefix}label_embed")
    if table is None:
        raise CheckpointError("not a RAM-family checkpoint: no label_embed / fc.W / reweight_scale tensor")
    rows = table.shape[0]
    has_caption_branch = any(k.startswith(f"{prefix}text_decoder.") for k in sd)
    if has_caption_branch:
        return "ram"
    per_class = num_classes or OFFICIAL_RAM_CLASSES
    if rows != per_class and rows % per_class == 0:
        return "ram_plus"
    if not num_classes and rows != OFFICIAL_RAM_CLASSES and rows % RAM_PLUS_DESCRIPTIONS == 0:
        return "ram_plus"
    return "ram"  # a table that fits no class count is named by infer_arch


def infer_arch(sd: dict, prefix: str = "", num_classes: int | None = None, family: str | None = None) -> ArchConfig:
    """Read an architecture off an official-layout state dict's tensor shapes.

    Swin: embed dim from the patch embedding, depths from block keys, heads per stage from the
    relative-position tables, window from their size, image size from the shifted-window mask.
    RAM++ stores C x D description rows; D is 51 unless `num_classes` (the label list's length)
    says otherwise, as the official code divides by the tag list's length. `family`, when the
    caller knows it, skips `infer_family`.
    """
    p = prefix
    family = family or infer_family(sd, prefix, num_classes)

    try:
        embed_dim = sd[f"{p}visual_encoder.patch_embed.proj.weight"].shape[0]
    except KeyError:
        raise CheckpointError("missing tensor visual_encoder.patch_embed.proj.weight") from None
    block_re = re.compile(re.escape(p) + r"visual_encoder\.layers\.(\d+)\.blocks\.(\d+)\.attn\.relative_position_bias_table$")
    depth: dict[int, int] = {}
    heads: dict[int, int] = {}
    window = None
    for key, value in sd.items():
        m = block_re.match(key)
        if m:
            stage, block = int(m.group(1)), int(m.group(2))
            depth[stage] = max(depth.get(stage, 0), block + 1)
            heads[stage] = value.shape[1]
            if stage == 0:
                window = int(round(value.shape[0] ** 0.5 + 1) // 2)
    if not depth or window is None:
        raise CheckpointError("missing Swin relative_position_bias_table tensors")
    stages = sorted(depth)
    swin = SwinConfig(embed_dim, tuple(depth[s] for s in stages), tuple(heads[s] for s in stages), window)

    mask = sd.get(f"{p}visual_encoder.layers.0.blocks.1.attn_mask")
    if mask is not None:
        windows_per_side = int(round(mask.shape[0] ** 0.5))
        image_size = windows_per_side * window * swin.patch_size
    else:
        image_size = _IMAGE_SIZE_BY_WINDOW.get(window, window * 32)

    head = head_prefix(sd, p)
    layer_re = re.compile(re.escape(head) + r"(\d+)\.intermediate\.dense\.weight$")
    layer_ids = [int(m.group(1)) for k in sd if (m := layer_re.match(k))]
    inter = sd.get(f"{head}0.intermediate.dense.weight")
    if inter is None:
        raise CheckpointError("missing tensor tagging_head.encoder.layer.0.intermediate.dense.weight")
    hidden, intermediate = inter.shape[1], inter.shape[0]
    # The 12-layer tag encoder shares only its lowest two layers with the tagging head.
    layers = 2 if head.endswith("tag_encoder.encoder.layer.") else max(layer_ids) + 1

    if family == "tag2text":
        num_classes = sd[f"{p}fc.W"].shape[1]
        per_class = 1
    else:
        rows = sd[f"{p}label_embed"].shape[0]
        if family == "ram":
            per_class = 1
        elif num_classes:
            per_class = max(1, rows // num_classes)
        else:
            per_class = RAM_PLUS_DESCRIPTIONS
        if rows % per_class or (num_classes and rows != num_classes * per_class):
            raise CheckpointError(
                f"the weights have {rows} label rows, which does not fit the "
                f"{num_classes or '?'} classes the label files list"
                + (f" ({per_class} descriptions each)" if family == "ram_plus" else "")
            )
        num_classes = rows // per_class

    candidate = ArchConfig(
        "custom", family, image_size, swin, num_classes,
        hidden=hidden, intermediate=intermediate, layers=layers,
        descriptions_per_class=per_class,
    )
    for arch in ARCHS.values():
        if replace(arch, name="custom", num_classes=num_classes, heads=candidate.heads,
                   descriptions_per_class=arch.descriptions_per_class) == candidate:
            return replace(arch, num_classes=num_classes)
    return candidate
