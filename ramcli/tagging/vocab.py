"""The user's vocabulary: custom (open-vocabulary) tags, disabled tags, thresholds, synonyms.

Stored under `home().vocab` as a JSON manifest plus one safetensors file of CLIP embeddings.
The manifest is the commit point: embeddings are written to a new content-named file first and
the manifest is replaced atomically afterwards, so a crash never leaves the two out of step.

`version` is a content hash of everything that changes tagging output (custom tags and their
embeddings, thresholds, disabled tags; not synonyms, which only affect search), so the index
can tell which photos were tagged with an older vocabulary.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save

from ramcli.errors import RamcliError
from ramcli.fileio import atomic_write
from ramcli.models.clip_text import ClipTextEncoder
from ramcli.models.labels import OPEN_SET_THRESHOLD, LabelSet
from ramcli.tagging.decision import is_threshold
from ramcli.tagging.tag_names import clean_name, name_key

if TYPE_CHECKING:
    from ramcli.tagging.vocab_files import ImportPlan

MANIFEST = "manifest.json"
FORMAT = 1

EncoderLoader = Callable[[], ClipTextEncoder]


def parse_threshold(value: float | str, name: str) -> float:
    """A threshold the user gave for tag `name` (the command line, an import file, where CSV
    holds text), held to the one rule of every threshold (`decision.is_threshold`)."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise RamcliError(f"threshold for '{name}' is not a number: {value!r}") from None
    if not is_threshold(value):
        raise RamcliError(f"threshold for '{name}' must be between 0 and 1, got {value!r}")
    return float(value)


@dataclass
class CustomTag:
    name: str
    threshold: float = OPEN_SET_THRESHOLD
    #: User descriptions (RAM++); empty means the official prompt ensemble is used.
    descriptions: list[str] = field(default_factory=list)
    #: Which CLIP weights made the embeddings (first 16 hex digits of the file's SHA-256).
    clip_weights: str = ""
    #: Chinese name for `--lang zh|both` output; empty means the English name is shown.
    name_zh: str = ""


@dataclass(frozen=True)
class VocabEntry:
    """One line of `vocab list`: a tag, its effective threshold, whether it is emitted, its synonyms."""

    name: str
    kind: str  # "built-in" or "custom"
    threshold: float
    enabled: bool
    synonyms: tuple[str, ...]



class Vocabulary:
    """The vocabulary store. `builtin` names (the model's 4,585 tags) are needed to validate
    names; commands that only read custom data may leave it empty."""

    def __init__(self, path: Path, builtin: Sequence[str] = ()):
        self.path = Path(path)
        self.builtin = {name_key(n): n for n in builtin}
        self.custom: list[CustomTag] = []
        self.embeddings: dict[str, dict[str, torch.Tensor]] = {}
        self.disabled: set[str] = set()
        self.thresholds: dict[str, float] = {}
        self.synonyms: dict[str, str] = {}

    # ------------------------------------------------------------------ persistence
    @classmethod
    def open(cls, path: Path | None = None, builtin: Sequence[str] = ()) -> Vocabulary:
        """Load the vocabulary at `path` (default: the home's); a missing one is empty."""
        if path is None:
            from ramcli.config import home

            path = home().vocab
        vocab = cls(path, builtin)
        manifest_path = vocab.path / MANIFEST
        if not manifest_path.exists():
            return vocab
        try:
            data = json.loads(manifest_path.read_text(encoding="utf-8"))
            vocab.custom = [CustomTag(**entry) for entry in data["custom"]]
            vocab.disabled = set(data["disabled"])
            vocab.thresholds = {k: float(v) for k, v in data["thresholds"].items()}
            vocab.synonyms = dict(data["synonyms"])
            tensors = load_file(str(vocab.path / data["embeddings"])) if vocab.custom else {}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise RamcliError(f"the vocabulary at {vocab.path} is damaged ({type(exc).__name__}); "
                              f"restore it from `ramcli vocab export` output or delete the folder") from None
        for tag in vocab.custom:
            parts = {kind: tensors[f"{kind}:{tag.name}"] for kind in ("template", "descriptions")
                     if f"{kind}:{tag.name}" in tensors}
            if "template" not in parts:
                raise RamcliError(f"the vocabulary at {vocab.path} lacks embeddings for '{tag.name}'")
            vocab.embeddings[tag.name] = parts
        return vocab

    def save(self) -> None:
        """Write embeddings (new content-named file), then the manifest (atomic replace)."""
        self.path.mkdir(parents=True, exist_ok=True)
        tensors = {f"{kind}:{name}": t.contiguous() for name, parts in self.embeddings.items()
                   for kind, t in parts.items()}
        embeddings_name = ""
        if tensors:
            embeddings_name = f"embeddings-{_tensor_digest(tensors)[:16]}.safetensors"
            if not (self.path / embeddings_name).exists():
                atomic_write(self.path / embeddings_name, save(tensors))
        manifest = {
            "format": FORMAT,
            "version": self.version,
            "embeddings": embeddings_name,
            "custom": [vars(tag) for tag in self.custom],
            "disabled": sorted(self.disabled),
            "thresholds": dict(sorted(self.thresholds.items())),
            "synonyms": dict(sorted(self.synonyms.items())),
        }
        atomic_write(self.path / MANIFEST, json.dumps(manifest, indent=1, ensure_ascii=False).encode("utf-8"))
        for stale in self.path.glob("embeddings-*.safetensors"):
            if stale.name != embeddings_name:
                stale.unlink(missing_ok=True)

    def commit(self, index_path: Path | None = None) -> None:
        """Save, then bring the index's copy up to date (`publish`): the one way a change lands."""
        from ramcli.library.index import Index

        self.save()
        with Index.open(index_path) as index:
            self.publish(index)

    def publish(self, index) -> None:
        """Give the index what search needs from the vocabulary, which owns it: custom tags (known
        to search before any photo has them) and every synonym. Idempotent; a removed synonym
        stays searchable until the index is rebuilt."""
        if self.custom:
            index.upsert_tags([t.name for t in self.custom], [t.name_zh or None for t in self.custom], "custom")
        for alias, target in sorted(self.synonyms.items()):
            index.upsert_tags([target], [None], "custom" if self.find_custom(target) else "builtin")
            index.add_synonym(alias, target)

    @property
    def version(self) -> str:
        """Content hash of everything that changes tagging output."""
        payload = {
            "custom": [
                [tag.name, tag.threshold, tag.descriptions, _tensor_digest(self.embeddings[tag.name])]
                for tag in self.custom
            ],
            "disabled": sorted(self.disabled),
            "thresholds": sorted(self.thresholds.items()),
        }
        return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode()).hexdigest()[:16]

    # ------------------------------------------------------------------ lookups
    def find_custom(self, name: str) -> CustomTag | None:
        key = name_key(name)
        return next((t for t in self.custom if name_key(t.name) == key), None)

    def resolve(self, name: str) -> tuple[str, str]:
        """(canonical name, 'builtin' | 'custom') of a known tag, or a one-line error."""
        name = clean_name(name)
        tag = self.find_custom(name)
        if tag is not None:
            return tag.name, "custom"
        builtin = self.builtin.get(name_key(name))
        if builtin is not None:
            return builtin, "builtin"
        raise RamcliError(f"unknown tag '{name}': see `ramcli vocab list --search {name.split()[0]}`")

    def entries(self, builtin: LabelSet | None = None, custom: bool = True, search: str | None = None) -> list[VocabEntry]:
        """The built-in tags of `builtin` (if given) and the custom tags, as the user set them;
        `search` keeps tags whose name or a synonym contains it (case-insensitive)."""
        aliases: dict[str, list[str]] = {}
        for alias, target in self.synonyms.items():
            aliases.setdefault(target, []).append(alias)
        rows: list[tuple[str, str, float]] = []
        if builtin is not None:
            rows += [(n, "built-in", self.thresholds.get(n, t)) for n, t in zip(builtin.names, builtin.thresholds)]
        if custom:
            rows += [(t.name, "custom", t.threshold) for t in self.custom]
        needle = search.lower() if search else None
        out = []
        for name, kind, threshold in rows:
            synonyms = tuple(sorted(aliases.get(name, [])))
            if needle and not any(needle in s.lower() for s in (name, *synonyms)):
                continue
            out.append(VocabEntry(name, kind, threshold, name not in self.disabled, synonyms))
        return out

    # ------------------------------------------------------------------ custom tags
    def check_new(self, name: str, descriptions: Sequence[str] = (), pending: Iterable[str] = ()) -> str:
        """Validate a new custom tag before any CLIP work; returns its cleaned name."""
        name = clean_name(name)
        key = name_key(name)
        if not key:
            raise RamcliError(f"tag name has no letters after normalisation: {name!r}")
        if key in self.builtin:
            builtin = self.builtin[key]
            raise RamcliError(
                f"'{name}' is already a built-in tag ('{builtin}'): use `ramcli vocab enable \"{builtin}\"` "
                f"if you disabled it, or `ramcli vocab synonym \"{builtin}\" ALIAS` to give it another name"
            )
        existing = self.find_custom(name)
        if existing is not None or key in {name_key(p) for p in pending}:
            shown = existing.name if existing else name
            raise RamcliError(f"custom tag '{shown}' already exists: `ramcli vocab remove \"{shown}\"` first to redo it")
        for description in descriptions:
            clean_name(description, what=f"a description of '{name}'")
        return name

    def add(self, name: str, load_encoder: EncoderLoader, descriptions: Sequence[str] = (),
            threshold: float = OPEN_SET_THRESHOLD, name_zh: str = "") -> CustomTag:
        """Embed and add one custom tag (not saved until `save`)."""
        name = self.check_new(name, descriptions)
        threshold = parse_threshold(threshold, name)
        zh = clean_name(name_zh, what=f"the Chinese name of '{name}'") if name_zh else ""
        tag = CustomTag(name, threshold, [d.strip() for d in descriptions], name_zh=zh)
        return self._add_all([tag], load_encoder)[0]

    def _add_all(self, tags: list[CustomTag], load_encoder: EncoderLoader) -> list[CustomTag]:
        """Embed every tag first, then add them all: a failure leaves the vocabulary untouched."""
        if not tags:
            return []
        encoder = load_encoder()
        computed = {}
        for tag in tags:
            parts = {"template": encoder.template_embeddings(tag.name)}
            if tag.descriptions:
                parts["descriptions"] = encoder.description_embeddings(tag.descriptions)
            tag.clip_weights = encoder.weights_id
            computed[tag.name] = parts
        self.custom.extend(tags)
        self.embeddings.update(computed)
        return tags

    def remove(self, name: str) -> str:
        canonical, kind = self.resolve(name)
        if kind != "custom":
            raise RamcliError(f"'{canonical}' is a built-in tag and cannot be removed: "
                              f"`ramcli vocab disable \"{canonical}\"` stops it being emitted")
        self.custom = [t for t in self.custom if t.name != canonical]
        del self.embeddings[canonical]
        self.disabled.discard(canonical)
        self.synonyms = {a: n for a, n in self.synonyms.items() if n != canonical}
        return canonical

    # ------------------------------------------------------------------ settings
    def disable(self, name: str) -> str:
        canonical, _ = self.resolve(name)
        self.disabled.add(canonical)
        return canonical

    def enable(self, name: str) -> str:
        canonical, _ = self.resolve(name)
        if canonical not in self.disabled:
            raise RamcliError(f"'{canonical}' is not disabled")
        self.disabled.discard(canonical)
        return canonical

    def set_threshold(self, name: str, value: float) -> str:
        canonical, kind = self.resolve(name)
        value = parse_threshold(value, canonical)
        if kind == "custom":
            self.find_custom(canonical).threshold = value
        else:
            self.thresholds[canonical] = value
        return canonical

    def add_synonym(self, name: str, alias: str) -> str:
        canonical, _ = self.resolve(name)
        alias = clean_name(alias, what="synonym")
        if name_key(alias) == name_key(canonical):
            raise RamcliError(f"'{alias}' is the tag's own name")
        self.synonyms[alias] = canonical
        return canonical

    # ------------------------------------------------------------------ import / export
    def export(self) -> dict:
        """Everything a user set, as portable JSON (embeddings are recomputed on import)."""
        return {
            "format": FORMAT,
            "custom": [{"name": t.name, "threshold": t.threshold, "descriptions": t.descriptions}
                       | ({"name_zh": t.name_zh} if t.name_zh else {}) for t in self.custom],
            "disabled": sorted(self.disabled),
            "thresholds": dict(sorted(self.thresholds.items())),
            "synonyms": dict(sorted(self.synonyms.items())),
        }

    def check_import(self, plan: ImportPlan) -> ImportPlan:
        """Validate a parsed import file (`vocab_files.parse_import_file`) completely before
        anything changes."""
        pending: list[str] = []
        for tag in plan.custom:
            tag.name = self.check_new(tag.name, tag.descriptions, pending)
            tag.threshold = parse_threshold(tag.threshold, tag.name)
            pending.append(tag.name)
        known = {name_key(n) for n in pending}

        def check_known(name: str) -> None:
            if name_key(name) not in known:
                self.resolve(name)

        for name in plan.disabled:
            check_known(name)
        for name, value in plan.thresholds.items():
            check_known(name)
            parse_threshold(value, name)
        for alias, name in plan.synonyms.items():
            check_known(name)
            clean_name(alias, what="synonym")
        return plan

    def apply_import(self, plan: ImportPlan, load_encoder: EncoderLoader) -> None:
        self._add_all(plan.custom, load_encoder)
        for name in plan.disabled:
            self.disable(name)
        for name, value in plan.thresholds.items():
            self.set_threshold(name, value)
        for alias, name in plan.synonyms.items():
            self.add_synonym(name, alias)


# ---------------------------------------------------------------------- helpers
def _tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(tensors):
        digest.update(key.encode())
        digest.update(tensors[key].contiguous().numpy().tobytes())
    return digest.hexdigest()
