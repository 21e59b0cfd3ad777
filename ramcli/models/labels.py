"""The label system: tag names, Chinese names and per-class thresholds.

The official files of the Recognize Anything release ship inside the package (`ramcli/data/
official/`, Apache-2.0, with their LICENSE and NOTICE; SHA-256 pinned below), so the label
system works offline. A model's labels are resolved in this order, first hit wins:

1. an explicit `--labels DIR` (a folder holding the official file names),
2. the labels a model file carries itself (every converted or exported file),
3. the `RAMCLI_LABELS` environment variable (same layout): for files that carry none,
4. the official files shipped with ramcli.
"""

from __future__ import annotations

import hashlib
import json
import os
import unicodedata
from dataclasses import dataclass, field, replace
from importlib.resources import files
from pathlib import Path

from ramcli.errors import CheckpointError, RamcliError

#: The official release the shipped files come from (xinyu1205/recognize-anything, ram/data/).
OFFICIAL_COMMIT = "7cb804a8609e9f4b1a50b7f31436d2df40bb9481"

#: file name -> SHA-256 of the official file at OFFICIAL_COMMIT (the shipped copies are tested against it)
OFFICIAL_FILES = {
    "ram_tag_list.txt": "5d96d2f7225527480ad773aaac76b6e5c08a18adf6eae9ca7d2ab923d5e7bd8b",
    "ram_tag_list_chinese.txt": "c912657a0f30be7b2f5df6ccffa17e1d84561d0bea508528e38b6d0d711bcfbe",
    "ram_tag_list_threshold.txt": "b6f81d0de1bc7f9c251af512c413eae976c77dbfbadf700d4e3d90510f4c6447",
    "tag_list.txt": "7d05c7cb88ed46a2aee1434776964f6bdbda0c0f4233c8633e109084382d3a45",
}

#: Tag2Text's decision rule (official `tag2text.py`): 0.68 everywhere, 0.7 for person/man/woman.
TAG2TEXT_THRESHOLD = 0.68
TAG2TEXT_THRESHOLD_EXCEPTIONS = {2701: 0.7, 2828: 0.7, 1167: 0.7}
#: Tags Tag2Text drops before captioning: quarter, back, two, three, four, five, one.
TAG2TEXT_DELETE_INDEX = (127, 2961, 3351, 3265, 3338, 3355, 3359)
#: The constructor default of RAM/RAM++, used only where the per-class file says nothing.
RAM_DEFAULT_THRESHOLD = 0.68
#: Threshold of open-set (custom) tags in the official code.
OPEN_SET_THRESHOLD = 0.5
#: The longest tag name accepted (the official ones have at most 28 characters).
MAX_NAME = 256
#: Unicode categories a tag name must not hold: control characters (terminal escape sequences
#: start with one), format characters (bidirectional overrides), lone surrogates (not UTF-8) and
#: line or paragraph separators. Tag names reach terminals, XMP/IPTC keywords and the index.
_REFUSED_CATEGORIES = {"Cc", "Cf", "Cs", "Zl", "Zp"}
#: Format characters that real tag names use: the zero-width (non-)joiners of Persian, Indic
#: scripts and emoji sequences.
_ALLOWED_FORMAT = {"\u200c", "\u200d"}


class LabelError(RamcliError):
    """A label system that cannot be used: mismatched lengths, a name that is not plain text, a
    threshold that is not a number from 0 to 1."""


def _short(value) -> str:
    """`value` for an error line: repr escapes control characters; long values are cut."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_name(name, what: str) -> str:
    """A tag name: non-empty text of at most MAX_NAME characters without control characters."""
    if not isinstance(name, str):
        raise LabelError(f"{what} {_short(name)} is not text")
    if not name.strip() or len(name) > MAX_NAME:
        raise LabelError(f"{what} {_short(name)} must have 1 to {MAX_NAME} characters")
    if any(unicodedata.category(c) in _REFUSED_CATEGORIES and c not in _ALLOWED_FORMAT for c in name):
        raise LabelError(f"{what} {_short(name)} holds control characters")
    return name


@dataclass(frozen=True)
class LabelSet:
    """Names, Chinese names and thresholds of a model's output classes, in output order.

    `deleted` holds the indices that are never emitted (Tag2Text's caption-disturbing tags).
    """

    names: tuple[str, ...]
    names_zh: tuple[str, ...]
    thresholds: tuple[float, ...]
    deleted: frozenset[int] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        """Every label system is checked here, whatever its source (label files, a model's
        metadata, a training checkpoint, custom tags): the one place that decides what a tag
        name and a threshold may be. Thresholds are stored as floats."""
        from ramcli.tagging.decision import is_threshold  # with numpy and torch: not when the CLI starts

        n = len(self.names)
        if len(self.names_zh) != n or len(self.thresholds) != n:
            raise LabelError(
                f"label files disagree: {n} names, {len(self.names_zh)} Chinese names, "
                f"{len(self.thresholds)} thresholds"
            )
        for i, (name, name_zh, threshold) in enumerate(zip(self.names, self.names_zh, self.thresholds)):
            check_name(name, f"label {i}: name")
            check_name(name_zh, f"label {i}: Chinese name")
            if not is_threshold(threshold):
                raise LabelError(f"label {i} ({name!r}): threshold {_short(threshold)} is not a number from 0 to 1")
        for index in self.deleted:
            if type(index) is not int or not 0 <= index < n:
                raise LabelError(f"never-emitted label {_short(index)} is not a label number (0 to {n - 1})")
        object.__setattr__(self, "thresholds", tuple(float(t) for t in self.thresholds))

    def __len__(self) -> int:
        return len(self.names)

    def checksum(self) -> str:
        """A short, stable digest of the label system (goes into converted models and the index)."""
        payload = json.dumps([self.names, self.names_zh, self.thresholds, sorted(self.deleted)])
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]

    def extend(self, names: list[str], names_zh: list[str], thresholds: list[float]) -> LabelSet:
        """A new label set with custom (open-vocabulary) classes appended."""
        return replace(
            self,
            names=self.names + tuple(names),
            names_zh=self.names_zh + tuple(names_zh),
            thresholds=self.thresholds + tuple(float(t) for t in thresholds),
        )

    def to_metadata(self) -> dict[str, str]:
        """String metadata for a safetensors header."""
        return {
            "labels.names": json.dumps(self.names, ensure_ascii=False),
            "labels.names_zh": json.dumps(self.names_zh, ensure_ascii=False),
            "labels.thresholds": json.dumps(self.thresholds),
            "labels.deleted": json.dumps(sorted(self.deleted)),
        }

    @classmethod
    def from_metadata(cls, meta: dict[str, str], source: str = "the model file") -> LabelSet | None:
        """The label system a model file (or checkpoint) carries, None if it carries none.
        Whatever it holds is checked; anything unusable is a `CheckpointError` naming `source`."""
        if "labels.names" not in meta:
            return None
        try:
            fields = [json.loads(meta[key]) for key in ("labels.names", "labels.names_zh", "labels.thresholds")]
            fields.append(json.loads(meta.get("labels.deleted", "[]")))
            if not all(isinstance(f, list) for f in fields):
                raise LabelError("a field is not a list")
            names, names_zh, thresholds, deleted = fields
            return cls(tuple(names), tuple(names_zh), tuple(thresholds), frozenset(deleted))
        except KeyError as exc:
            reason = f"{exc.args[0]} is missing"
        except (TypeError, ValueError) as exc:  # not JSON text, or a list of lists where numbers belong
            reason = f"not JSON lists of names and numbers ({type(exc).__name__})"
        except LabelError as exc:
            reason = str(exc)
        raise CheckpointError(f"{source}: damaged label system in its metadata: {reason}")


def _read_lines(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RamcliError(f"label file not found: {path}") from None
    except UnicodeDecodeError:
        raise RamcliError(f"label file is not UTF-8: {path}") from None
    return text.splitlines()


def read_label_dir(folder: Path, family: str) -> LabelSet:
    """Read the official label files for `family` ('ram', 'ram_plus' or 'tag2text') from a folder."""
    folder = Path(folder)
    try:
        return _read_label_dir(folder, family)
    except LabelError as exc:
        raise LabelError(f"label files in {folder}: {exc}") from None


def _read_label_dir(folder: Path, family: str) -> LabelSet:
    if family == "tag2text":
        names = _read_lines(folder / "tag_list.txt")
        thresholds = [TAG2TEXT_THRESHOLD] * len(names)
        for index, value in TAG2TEXT_THRESHOLD_EXCEPTIONS.items():
            if index < len(thresholds):
                thresholds[index] = value
        deleted = frozenset(i for i in TAG2TEXT_DELETE_INDEX if i < len(names))
        # Tag2Text has no Chinese list; the English name stands in.
        return LabelSet(tuple(names), tuple(names), tuple(thresholds), deleted)
    names = _read_lines(folder / "ram_tag_list.txt")
    names_zh = [line.strip() for line in _read_lines(folder / "ram_tag_list_chinese.txt")]
    threshold_lines = _read_lines(folder / "ram_tag_list_threshold.txt")
    try:
        thresholds = [float(s.strip()) for s in threshold_lines]
    except ValueError:
        raise RamcliError(f"threshold file has a non-number line: {folder / 'ram_tag_list_threshold.txt'}") from None
    return LabelSet(tuple(names), tuple(names_zh), tuple(thresholds))


def official_dir() -> Path:
    """The folder of the official label files shipped with ramcli."""
    return Path(str(files("ramcli") / "data" / "official"))


def resolve_labels(family: str, labels_dir: Path | None = None, embedded: LabelSet | None = None) -> LabelSet:
    """The label set for a model, by the documented resolution order."""
    if labels_dir is not None:
        return read_label_dir(Path(labels_dir), family)
    if embedded is not None:
        return embedded
    env = os.environ.get("RAMCLI_LABELS")
    return read_label_dir(Path(env) if env else official_dir(), family)
