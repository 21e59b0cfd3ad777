"""Synthetic captioned scenes: proof that the training pipeline learns, with no real data.

Each scene is a background (sky, grass, sand, snow, sea, wood) with one or two groups of
identical shapes (circle, square, triangle, star, heart, cross), each group with a colour, an
optional texture (stripes, polka dots, plaid) and a count of 1-3. Every tag is visible in the
pixels, so a model can learn it; every tag name is a tag of the official 4,585-tag list.

Captions are varied English sentences naming the scene ("two striped red circles on the
grass", "There is a blue star with polka dots in the sky, but no green heart."): they sometimes
leave the background out and sometimes add a negated absent object, so the caption parser and
the tag union are exercised. The JSON next to each image holds the caption and the true tags.

Shards follow img2dataset's layout (`KEY.jpg`, `KEY.txt`, `KEY.json`) in `OUT/train/` and a
held-out `OUT/val/`. Each sample is drawn from its own seed (seed, split, index), so the
output is the same for a seed whatever the shard count.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ramcli.errors import RamcliError, UsageError

SHAPES = ("circle", "square", "triangle", "star", "heart", "cross")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "blue": (30, 60, 220),
    "green": (30, 170, 50),
    "yellow": (245, 220, 30),
    "purple": (140, 40, 180),
    "orange": (250, 130, 20),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
TEXTURES = ("stripe", "polka dot", "plaid")
BACKGROUNDS = ("sky", "grass", "sand", "snow", "sea", "wood")
#: every tag the generator can emit, in a fixed order (written to OUT/tags.txt)
ALL_TAGS: tuple[str, ...] = SHAPES + tuple(COLOURS) + TEXTURES + BACKGROUNDS

#: colours too close to a background to be seen reliably; never drawn on it
_CLASHES = {"sky": {"blue"}, "sea": {"blue"}, "grass": {"green"}, "snow": {"white"}, "sand": {"yellow"}}
_COUNT_WORDS = {1: "a", 2: "two", 3: "three"}
_BG_PHRASES = {
    "sky": ("in the sky", "against the sky", "high in the sky"),
    "grass": ("on the grass", "in the grass", "on some grass"),
    "sand": ("on the sand", "in the sand", "on sand"),
    "snow": ("in the snow", "on snow", "on fresh snow"),
    "sea": ("over the sea", "on the sea", "above the sea"),
    "wood": ("on wood", "against wood", "on some wood"),
}
_PLURALS = {"cross": "crosses"}


@dataclass(frozen=True)
class Group:
    shape: str
    colour: str
    texture: str | None
    count: int


@dataclass(frozen=True)
class Scene:
    background: str
    groups: tuple[Group, ...]
    caption: str

    @property
    def tags(self) -> list[str]:
        """The true tags, in ALL_TAGS order."""
        present = {self.background}
        for g in self.groups:
            present.update({g.shape, g.colour} | ({g.texture} if g.texture else set()))
        return [t for t in ALL_TAGS if t in present]


def _noun(shape: str, count: int) -> str:
    return shape if count == 1 else _PLURALS.get(shape, shape + "s")


def _describe(g: Group, rng: np.random.Generator) -> str:
    text = _describe_words(g, rng)
    return "an" + text[1:] if text.startswith("a ") and text[2] in "aeiou" else text


def _describe_words(g: Group, rng: np.random.Generator) -> str:
    noun = _noun(g.shape, g.count)
    count = _COUNT_WORDS[g.count]
    if g.texture is None:
        return f"{count} {g.colour} {noun}"
    style = int(rng.integers(2))
    if g.texture == "stripe":
        return f"{count} striped {g.colour} {noun}" if style else f"{count} {g.colour} {noun} with stripes"
    if g.texture == "polka dot":
        return f"{count} {g.colour} polka dot {noun}" if style else f"{count} {g.colour} {noun} with polka dots"
    return f"{count} {g.colour} plaid {noun}" if style else f"{count} {g.colour} {noun} in plaid"


def _caption(background: str, groups: tuple[Group, ...], rng: np.random.Generator) -> str:
    parts = [_describe(g, rng) for g in groups]
    things = " and ".join(parts)
    bg = str(rng.choice(_BG_PHRASES[background]))
    template = int(rng.integers(5))
    if template == 0:
        text = f"{things} {bg}"
    elif template == 1:
        text = f"there {'is' if groups[0].count == 1 else 'are'} {things} {bg}"
    elif template == 2:
        text = things  # background left out: the tag union adds it back
    elif template == 3:
        text = f"{bg}, {things}"
    else:
        text = f"{background} with {things}"
    if rng.random() < 0.35:
        used_shapes = {g.shape for g in groups}
        used_colours = {g.colour for g in groups}
        shape = str(rng.choice([s for s in SHAPES if s not in used_shapes]))
        colour = str(rng.choice([c for c in COLOURS if c not in used_colours]))
        article = "an" if colour[0] in "aeiou" else "a"
        text += str(rng.choice([f", but no {colour} {shape}", f" and no {colour} {_noun(shape, 2)}", f", not {article} {colour} {shape}"]))
    if rng.random() < 0.5:
        text = text[0].upper() + text[1:] + "."
    return text


def make_scene(rng: np.random.Generator) -> Scene:
    background = str(rng.choice(BACKGROUNDS))
    allowed = [c for c in COLOURS if c not in _CLASHES.get(background, set())]
    n_groups = 1 + int(rng.random() < 0.5)
    shapes = rng.choice(SHAPES, size=n_groups, replace=False)
    colours = rng.choice(allowed, size=n_groups, replace=False)
    groups = []
    for shape, colour in zip(shapes, colours):
        texture = None if rng.random() < 0.5 else str(rng.choice(TEXTURES))
        groups.append(Group(str(shape), str(colour), texture, int(rng.integers(1, 4 - n_groups + 1))))
    groups_t = tuple(groups)
    return Scene(background, groups_t, _caption(background, groups_t, rng))


def _background(name: str, size: int, rng: np.random.Generator) -> Image.Image:
    noise = rng.normal(0.0, 1.0, (size, size, 1))
    y = np.linspace(0.0, 1.0, size)[:, None, None]
    x = np.linspace(0.0, 1.0, size)[None, :, None]
    if name == "sky":
        top, bottom = np.array([90, 150, 235]), np.array([180, 215, 250])
        arr = top + (bottom - top) * y + 3 * noise
    elif name == "grass":
        arr = np.array([60, 140, 45]) + 25 * noise * np.array([0.6, 1.0, 0.5])
    elif name == "sand":
        arr = np.array([215, 190, 140]) + 12 * noise
    elif name == "snow":
        arr = np.array([238, 242, 248]) + 6 * noise
    elif name == "sea":
        waves = np.sin(2 * math.pi * (6 * y + 0.3 * np.sin(2 * math.pi * 3 * x)))
        arr = np.array([20, 90, 150]) + np.array([20, 30, 30]) * waves + 5 * noise
    else:  # wood
        grain = np.sin(2 * math.pi * (9 * y + 0.15 * np.sin(2 * math.pi * 2 * x) + rng.random()))
        arr = np.array([150, 100, 55]) + np.array([25, 18, 10]) * grain + 6 * noise
    arr = np.broadcast_to(arr, (size, size, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def _shape_polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    def rot(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
        c, s = math.cos(angle), math.sin(angle)
        return [(cx + px * c - py * s, cy + px * s + py * c) for px, py in points]

    if shape == "square":
        k = r * 0.8
        return rot([(-k, -k), (k, -k), (k, k), (-k, k)])
    if shape == "triangle":
        return rot([(r * math.cos(a), r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)])
    if shape == "star":
        return rot(
            [((r if i % 2 == 0 else r * 0.42) * math.cos(-math.pi / 2 + i * math.pi / 5),
              (r if i % 2 == 0 else r * 0.42) * math.sin(-math.pi / 2 + i * math.pi / 5)) for i in range(10)]
        )
    if shape == "cross":
        a, b = r, r * 0.33
        return rot([(-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b), (b, a), (-b, a), (-b, b), (-a, b), (-a, -b), (-b, -b)])
    if shape == "heart":  # parametric heart, upright (no rotation: a turned heart stops looking like one)
        pts = []
        for i in range(40):
            t = 2 * math.pi * i / 40
            hx = 16 * math.sin(t) ** 3
            hy = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            pts.append((cx + hx * r / 17, cy - hy * r / 17))
        return pts
    raise ValueError(shape)


def _fill(colour: tuple[int, int, int], texture: str | None, size: int, rng: np.random.Generator) -> Image.Image:
    """A full-size fill image: the colour, with its texture drawn in a shade of the same colour."""
    base = np.array(colour, dtype=float)
    shade = base * 0.55 if base.mean() > 60 else base + 70  # a second tone that names no other colour
    img = Image.new("RGB", (size, size), tuple(int(v) for v in base))
    if texture is None:
        return img
    draw = ImageDraw.Draw(img)
    tone = tuple(int(v) for v in shade)
    # coarse enough to read at 64 px after JPEG: two or three periods across a shape, lines of
    # at least 2 px (a 1-px plaid line or a 1.5-px dot is noise at that size, not a texture)
    period = max(8, size // 8)
    offset = int(rng.integers(period))
    if texture in ("stripe", "plaid"):
        for k in range(-size, 2 * size, period):
            width = max(2, period // 4) if texture == "plaid" else max(3, period // 3)
            draw.line([(k + offset, 0), (k + offset + size, size)], fill=tone, width=width)
            if texture == "plaid":
                draw.line([(k + offset, size), (k + offset + size, 0)], fill=tone, width=width)
    else:  # polka dot
        rad = max(2.5, period * 0.3)
        for yy in range(offset, size, period):
            for xx in range(offset + (yy // period % 2) * period // 2, size, period):
                draw.ellipse([xx - rad, yy - rad, xx + rad, yy + rad], fill=tone)
    return img


def render(scene: Scene, size: int, rng: np.random.Generator) -> Image.Image:
    """Draw `scene` at size x size pixels with a dark outline so every colour shows on every ground."""
    img = _background(scene.background, size, rng)
    placed: list[tuple[float, float, float]] = []
    for g in scene.groups:
        fill = _fill(COLOURS[g.colour], g.texture, size, rng)
        for _ in range(g.count):
            for _attempt in range(30):
                r = float(rng.uniform(0.13, 0.2) * size)
                cx, cy = (float(v) for v in rng.uniform(r + 1, size - r - 1, 2))
                if all(math.hypot(cx - px, cy - py) > (r + pr) * 0.85 for px, py, pr in placed):
                    break
            placed.append((cx, cy, r))
            mask = Image.new("L", (size, size), 0)
            md = ImageDraw.Draw(mask)
            angle = float(rng.uniform(0, 2 * math.pi)) if g.shape != "heart" else 0.0
            outline = Image.new("L", (size, size), 0)
            od = ImageDraw.Draw(outline)
            if g.shape == "circle":
                box = [cx - r, cy - r, cx + r, cy + r]
                md.ellipse(box, fill=255)
                od.ellipse(box, outline=255, width=2)
            else:
                poly = _shape_polygon(g.shape, cx, cy, r, angle)
                md.polygon(poly, fill=255)
                od.polygon(poly, outline=255, width=2)
            img.paste(fill, (0, 0), mask)
            img.paste((40, 40, 40) if g.colour != "black" else (200, 200, 200), (0, 0), outline)
    return img


def sample(seed: int, split: str, index: int, size: int) -> tuple[Scene, Image.Image]:
    """The scene and image of sample `index` of `split`: a pure function of its arguments."""
    split_id = {"train": 0, "val": 1}[split]
    rng = np.random.default_rng([seed, split_id, index])
    scene = make_scene(rng)
    return scene, render(scene, size, rng)


def write_shards(
    out_dir: Path,
    samples: int,
    shards: int = 1,
    seed: int = 0,
    val_samples: int | None = None,
    size: int = 96,
    jpeg_quality: int = 90,
) -> dict:
    """Write OUT/train/NNNNN.tar, OUT/val/NNNNN.tar, OUT/tags.txt and OUT/manifest.json.

    `val_samples` defaults to a fifth of `samples` (at least 1). Returns the manifest.
    """
    import webdataset as wds

    if samples < 1:
        raise UsageError("--samples must be at least 1")
    if shards < 1 or shards > samples:
        raise UsageError(f"--shards must be between 1 and the number of samples ({samples})")
    if size < 32:
        raise UsageError("--size must be at least 32 pixels")
    val = max(1, samples // 5) if val_samples is None else val_samples
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RamcliError(f"cannot create {out_dir}: {exc.strerror}") from None
    counts = {"train": samples, "val": val}
    written: dict[str, list[str]] = {}
    for split, n in counts.items():
        n_shards = min(shards, n) if split == "train" else max(1, min(shards, n) // 4 or 1)
        folder = out_dir / split
        folder.mkdir(exist_ok=True)
        written[split] = []
        per_shard = math.ceil(n / n_shards)
        for s in range(n_shards):
            path = folder / f"{s:05d}.tar"
            with wds.TarWriter(str(path), mtime=0) as sink:
                for index in range(s * per_shard, min(n, (s + 1) * per_shard)):
                    scene, image = sample(seed, split, index, size)
                    buf = io.BytesIO()
                    image.save(buf, format="JPEG", quality=jpeg_quality)
                    sink.write(
                        {
                            "__key__": f"{split}{index:07d}",
                            "jpg": buf.getvalue(),
                            "txt": scene.caption.encode("utf-8"),
                            "json": json.dumps({"caption": scene.caption, "tags": scene.tags}).encode("utf-8"),
                        }
                    )
            written[split].append(str(path.relative_to(out_dir)))
    (out_dir / "tags.txt").write_text("\n".join(ALL_TAGS) + "\n", encoding="utf-8")
    manifest = {"seed": seed, "size": size, "samples": counts, "shards": written, "tags": list(ALL_TAGS)}
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest
