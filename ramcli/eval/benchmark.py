"""A benchmark's files: a taglist and an annotation file in any of the official formats.

`load_benchmark` reads them into a `Benchmark` (targets as a bool matrix), `select_classes`
maps the benchmark's classes to the model's label indices (closed set), and `resolve_image`
finds an annotation's image under the images folder without ever leaving it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from ramcli.errors import RamcliError
from ramcli.models.labels import LabelSet

#: Tried in order when an annotation names an image without its extension (OpenImages ids).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".JPG", ".JPEG", ".png", ".PNG", ".webp", ".heic", ".HEIC")

# Label formats of the annotation files (see docs/eval.md):
NAMES = "names"      # `image,tag,tag` with tag names from the taglist (RAM OpenImages files)
TAG_IDS = "tag_ids"  # `image,id,id` where the taglist itself is model label ids (Tag2Text files)
INDICES = "indices"  # `image,i j k`: 0-based positions in the taglist (ImageNet-multi, HICO)


@dataclass(frozen=True)
class Benchmark:
    """A benchmark: class keys in taglist order, image ids in file order, (N, K) bool targets."""

    taglist: tuple[str, ...]
    image_ids: tuple[str, ...]
    targets: np.ndarray
    label_format: str

    def key(self) -> str:
        """Digest of the taglist and image list: a score cache is valid only for the same pair."""
        payload = json.dumps([self.taglist, self.image_ids, self.label_format])
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def _read_text_lines(path: Path, what: str) -> list[str]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RamcliError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise RamcliError(f"{what} is a folder, expected a file: {path}") from None
    except UnicodeDecodeError:
        raise RamcliError(f"{what} is not UTF-8 text: {path}") from None
    return text.splitlines()


def read_taglist(path: Path) -> list[str]:
    """One class per line; trailing blank lines are ignored, blank lines inside are an error."""
    lines = [line.strip() for line in _read_text_lines(path, "taglist")]
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise RamcliError(f"taglist is empty: {path}")
    if "" in lines:
        raise RamcliError(f"taglist has a blank line at line {lines.index('') + 1}: {path}")
    return lines


def _is_index_field(text: str) -> bool:
    return all(token.isdigit() for token in text.split())


def _detect_format(taglist: list[str], rows: list[list[str]]) -> str:
    if all(tag.isdigit() for tag in taglist):
        return TAG_IDS
    known = set(taglist)
    fields = [f for row in rows for f in row[1:] if f]
    if fields and all(len(row) <= 2 for row in rows) and all(
        _is_index_field(f) and f not in known for f in fields
    ):
        return INDICES
    return NAMES


def load_benchmark(annotations: Path, taglist_path: Path) -> Benchmark:
    """Read a benchmark in any official format; every label must name a taglist class.

    Duplicate names in a taglist are kept as separate classes and a label with that name marks
    all of them, as the official metric does. Lines with only an image id have no positives.
    """
    taglist = read_taglist(taglist_path)
    rows: list[list[str]] = []
    for line in _read_text_lines(annotations, "annotation file"):
        if line.strip():
            rows.append([part.strip() for part in line.split(",")])
    if not rows:
        raise RamcliError(f"annotation file has no images: {annotations}")
    label_format = _detect_format(taglist, rows)

    positions: dict[str, list[int]] = {}
    for index, tag in enumerate(taglist):
        key = str(int(tag)) if label_format == TAG_IDS else tag
        positions.setdefault(key, []).append(index)

    targets = np.zeros((len(rows), len(taglist)), dtype=bool)
    for i, row in enumerate(rows):
        if not row[0]:
            raise RamcliError(f"{annotations}: image {i + 1} has an empty image id")
        labels = row[1].split() if label_format == INDICES and len(row) > 1 else row[1:]
        for label in labels:
            if not label:
                continue
            if label_format == INDICES:
                column = int(label)
                if column >= len(taglist):
                    raise RamcliError(
                        f"{annotations}: image {row[0]} has class index {column}, "
                        f"but the taglist has {len(taglist)} classes"
                    )
                targets[i, column] = True
                continue
            key = str(int(label)) if label_format == TAG_IDS and label.isdigit() else label
            if key not in positions:
                raise RamcliError(
                    f"{annotations}: image {row[0]} has the label {label!r}, which is not in the "
                    f"taglist {taglist_path}"
                )
            targets[i, positions[key]] = True
    return Benchmark(tuple(taglist), tuple(row[0] for row in rows), targets, label_format)


@dataclass(frozen=True)
class ClassSelection:
    """Benchmark classes the model can score: their taglist columns and model label indices."""

    columns: np.ndarray
    model_indices: np.ndarray
    names: tuple[str, ...]
    missing: tuple[str, ...]


def select_classes(benchmark: Benchmark, labels: LabelSet) -> ClassSelection:
    """Map benchmark classes to model label indices (exact names, first match, like the official code).

    Classes the model does not know are left out and listed in `missing`; if none is known the
    benchmark is open-set for this model and needs its classes added to the vocabulary first.
    """
    index_of: dict[str, int] = {}
    for index, name in enumerate(labels.names):
        index_of.setdefault(name, index)
    columns, model_indices, names, missing = [], [], [], []
    for column, tag in enumerate(benchmark.taglist):
        if benchmark.label_format == TAG_IDS:
            model_index = int(tag) if int(tag) < len(labels) else None
            name = f"{labels.names[int(tag)]} ({tag})" if model_index is not None else tag
        else:
            model_index, name = index_of.get(tag), tag
        if model_index is None:
            missing.append(tag)
            continue
        columns.append(column)
        model_indices.append(model_index)
        names.append(name)
    if not columns:
        examples = ", ".join(repr(t) for t in benchmark.taglist[:3])
        raise RamcliError(
            f"none of the {len(benchmark.taglist)} benchmark classes (e.g. {examples}) is in the "
            f"model's vocabulary of {len(labels)} tags: this is an open-set benchmark for this model; "
            f"add its classes with `ramcli vocab add` and evaluate again"
        )
    return ClassSelection(np.array(columns), np.array(model_indices), tuple(names), tuple(missing))


def resolve_image(images_dir: Path, image_id: str) -> Path | None:
    """The file of an annotation's image id under `images_dir` (None if absent).

    Ids are relative paths (`test/0000c64e1253d68f`, `ILSVRC2012_val_00000001.JPEG`); an id without
    an extension gets the usual image suffixes tried. Ids that would leave `images_dir` are refused.
    """
    relative = PurePosixPath(image_id.replace("\\", "/"))
    if relative.is_absolute() or ".." in relative.parts or ":" in image_id:
        raise RamcliError(f"image id {image_id!r} points outside the images folder")
    base = Path(images_dir) / Path(*relative.parts)
    if base.is_file():
        return base
    for suffix in IMAGE_SUFFIXES:
        candidate = base.with_name(base.name + suffix)
        if candidate.is_file():
            return candidate
    return None
