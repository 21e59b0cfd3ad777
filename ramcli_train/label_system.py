"""Building a label system from data (`ramcli vocab build`): the step the RAM paper describes
(parse captions, keep the most frequent tags, merge synonyms, add the classes of common
datasets) and the official release left out (it ships only the resulting 4,585-tag list and
no script for the frozen CLIP embeddings).

Candidates are tag names, not free text: the base label list (the official 4,585 tags by
default), the names of dataset label lists (COCO, ImageNet, OpenImages ... one name a line),
and the tag names that shards already carry in their JSON (`tags`). The caption parser of
`ramcli_train.parse` counts, for every caption, which candidates it mentions (outside
negations); aliases of a synonym group count for their canonical name. The label system is
the `top` most frequent candidates plus every dataset-list name, whatever its count.

Output folder (readable by everything that takes `--labels DIR`):

    ram_tag_list.txt, ram_tag_list_chinese.txt, ram_tag_list_threshold.txt   official layout
    synonyms.json          {"alias": "tag name"}
    label_embed.safetensors {"label_embed": (C, 512)} frozen CLIP prompt-ensemble queries
    label_system.json       counts, sources, the CLIP weights id

`ramcli train --labels DIR --set label_embed=DIR/label_embed.safetensors` trains on it, and
`ramcli finetune --tags DIR` extends a model to it.
"""

from __future__ import annotations

import contextlib
import json
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ramcli.models.clip_text import ClipTextEncoder, ensemble
from ramcli.errors import RamcliError, UsageError
from ramcli.models.labels import RAM_DEFAULT_THRESHOLD, LabelSet, read_label_dir
from ramcli.tagging.tag_names import clean_name, name_key

MANIFEST = "label_system.json"
SYNONYMS = "synonyms.json"
EMBEDDINGS = "label_embed.safetensors"
FORMAT = 1


@dataclass
class LabelSystem:
    """Tag names in output order, with thresholds, synonyms, counts and (optionally) embeddings."""

    names: list[str]
    thresholds: list[float]
    names_zh: list[str]
    synonyms: dict[str, str] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    embeddings: torch.Tensor | None = None  # (C, 512) RAM queries, rows in `names` order
    info: dict = field(default_factory=dict)

    def label_set(self) -> LabelSet:
        return LabelSet(tuple(self.names), tuple(self.names_zh), tuple(self.thresholds))

    def save(self, folder: Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        write_label_files(folder, self.label_set())
        (folder / SYNONYMS).write_text(json.dumps(self.synonyms, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        if self.embeddings is not None:
            save_file({"label_embed": self.embeddings.float().contiguous()}, str(folder / EMBEDDINGS))
        manifest = {"format": FORMAT, "classes": len(self.names), "counts": self.counts, **self.info}
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        return folder

    @classmethod
    def load(cls, folder: Path) -> LabelSystem:
        """A folder `vocab build` wrote, or any folder with the official RAM label files."""
        folder = Path(folder)
        labels = read_label_dir(folder, "ram")
        synonyms: dict[str, str] = {}
        if (folder / SYNONYMS).is_file():
            synonyms = _read_json(folder / SYNONYMS)
        info = _read_json(folder / MANIFEST) if (folder / MANIFEST).is_file() else {}
        embeddings = None
        if (folder / EMBEDDINGS).is_file():
            embeddings = load_file(str(folder / EMBEDDINGS)).get("label_embed")
            if embeddings is None or embeddings.shape != (len(labels), 512):
                raise RamcliError(f"{folder / EMBEDDINGS} must hold label_embed of shape ({len(labels)}, 512)")
        return cls(list(labels.names), list(labels.thresholds), list(labels.names_zh), synonyms,
                   info.pop("counts", {}), embeddings, info)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise RamcliError(f"not valid UTF-8 JSON: {path}") from None


def write_label_files(folder: Path, labels: LabelSet) -> None:
    """The official three-file layout, so `read_label_dir` (and every `--labels DIR`) reads it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ram_tag_list.txt").write_text("\n".join(labels.names) + "\n", encoding="utf-8")
    (folder / "ram_tag_list_chinese.txt").write_text("\n".join(labels.names_zh) + "\n", encoding="utf-8")
    (folder / "ram_tag_list_threshold.txt").write_text("\n".join(f"{t:g}" for t in labels.thresholds) + "\n",
                                                      encoding="utf-8")


# ----------------------------------------------------------------------------- inputs


def read_name_list(path: Path) -> list[str]:
    """A dataset label list: one name a line; `id,name` / `id<TAB>name` lines keep the name;
    blank lines and '#' comments are skipped; names with "/" (synonyms) keep the first."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UsageError(f"label list not found: {path}") from None
    except UnicodeDecodeError:
        raise UsageError(f"label list is not UTF-8: {path}") from None
    names = []
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        for sep in ("\t", ","):
            head, _, tail = line.partition(sep)
            if tail and head.strip().isdigit():
                line = tail.strip()
                break
        names.append(clean_name(line.split("/")[0], f"a name in {Path(path).name}"))
    if not names:
        raise UsageError(f"label list {path} holds no names")
    return names


def read_synonym_groups(path: Path) -> dict[str, str]:
    """Synonym groups -> {alias: canonical}. JSON {"alias": "name"} or {"name": ["alias", ...]},
    or text lines `name, alias, alias` (the first name of a line is the canonical one)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"synonym file not found: {path}")
    text = path.read_text(encoding="utf-8")
    out: dict[str, str] = {}
    if path.suffix == ".json":
        data = _read_json(path)
        if not isinstance(data, dict):
            raise UsageError(f"{path}: expected a JSON object")
        for key, value in data.items():
            if isinstance(value, str):
                out[key] = value
            elif isinstance(value, list) and all(isinstance(v, str) for v in value):
                out.update({alias: key for alias in value})
            else:
                raise UsageError(f"{path}: {key!r} must map to a name or a list of aliases")
        return out
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",") if p.strip()]
        if len(parts) > 1 and not parts[0].startswith("#"):
            out.update({alias: parts[0] for alias in parts[1:]})
    return out


def read_corpus(paths: Sequence[str]) -> Iterator[tuple[list[str], list[str]]]:
    """(captions, given tag names) per sample of shards (KEY.txt / KEY.json) or official JSON
    annotation files (`caption` lists)."""
    from ramcli_train.data import resolve_shards

    if paths and all(str(p).endswith(".json") for p in paths):
        for p in paths:
            items = _read_json(Path(p))
            if not isinstance(items, list):
                raise RamcliError(f"{p}: expected a list of annotation items")
            for item in items:
                caps = item.get("caption", []) if isinstance(item, dict) else []
                yield ([caps] if isinstance(caps, str) else [c for c in caps if isinstance(c, str)]), []
        return
    for shard in resolve_shards(list(paths)):
        samples: dict[str, tuple[list[str], list[str]]] = {}
        with contextlib.suppress(tarfile.TarError, OSError), tarfile.open(shard) as tar:
            for member in tar:
                key, _, ext = member.name.rpartition(".")
                if ext not in ("txt", "json") or not member.isfile():
                    continue
                caps, tags = samples.setdefault(key, ([], []))
                raw = tar.extractfile(member).read().decode("utf-8", "replace")
                if ext == "txt":
                    caps.append(raw)
                    continue
                with contextlib.suppress(ValueError):
                    meta = json.loads(raw)
                    if isinstance(meta, dict):
                        c = meta.get("caption")
                        caps.extend([c] if isinstance(c, str) else [x for x in c or [] if isinstance(x, str)])
                        tags.extend(str(t) for t in meta.get("tags") or [])
        for caps, tags in samples.values():
            yield list(dict.fromkeys(c.strip() for c in caps if c.strip())), tags


# ----------------------------------------------------------------------------- building


def count_tags(samples: Iterable[tuple[list[str], list[str]]], candidates: Sequence[str],
               synonyms: dict[str, str]) -> Counter:
    """Per candidate: the number of samples whose captions mention it (outside negations) or
    whose given tags name it. Aliases count for their canonical name; once per sample."""
    from ramcli_train.parse import TagParser

    parser = TagParser(list(candidates), synonyms=synonyms)
    counts: Counter = Counter()
    for captions, given in samples:
        ids: set[int] = set()
        for caption in captions:
            ids.update(parser.tag_ids(caption))
        ids.update(parser.ids_for_names(given)[0])
        counts.update(parser.names[i] for i in ids)
    return counts


def clip_queries(names: Sequence[str], encoder: ClipTextEncoder) -> torch.Tensor:
    """RAM's frozen label queries: the ensemble of the 63 official prompts per name (N, 512)."""
    return torch.stack([ensemble(encoder.template_embeddings(n)) for n in names]) if names else torch.zeros(0, 512)


def build_label_system(
    data: Sequence[str],
    base: LabelSet | None,
    dataset_lists: Sequence[Path] = (),
    synonym_files: Sequence[Path] = (),
    top: int = 10000,
    min_count: int = 1,
    encoder_loader: Callable[[], ClipTextEncoder] | None = None,
) -> LabelSystem:
    """Count candidate tags in `data`, merge synonyms and dataset lists, keep the top ones."""
    if top < 1:
        raise UsageError("--top must be at least 1")
    forced: list[str] = []
    for path in dataset_lists:
        forced += read_name_list(path)
    synonyms: dict[str, str] = {}
    for path in synonym_files:
        synonyms.update(read_synonym_groups(path))
    samples = list(read_corpus(data))
    if not samples:
        raise RamcliError("no captions or tags found in the data")
    given = [t for _, tags in samples for t in tags]

    # candidates, one per name key, base list first; a synonym's alias is never its own tag
    by_key: dict[str, str] = {}
    for name in [*(base.names if base else ()), *forced, *given]:
        by_key.setdefault(name_key(name), name)
    alias_keys = {name_key(a): name_key(c) for a, c in synonyms.items() if name_key(a) != name_key(c)}
    for alias, canonical in alias_keys.items():
        if canonical not in by_key:  # a group whose canonical name is new: it becomes a candidate
            by_key[canonical] = next(c for a, c in synonyms.items() if name_key(c) == canonical)
    candidates = [n for k, n in by_key.items() if k not in alias_keys]
    usable_synonyms = {a: by_key[c] for a, c in synonyms.items() if name_key(a) != name_key(c)}

    counts = count_tags(samples, candidates, usable_synonyms)
    forced_keys = {name_key(n) for n in forced}
    ranked = sorted((n for n in candidates if counts[n] >= min_count), key=lambda n: (-counts[n], n))
    chosen = ranked[:top]
    chosen_keys = {name_key(n) for n in chosen}
    chosen += [by_key[k] for k in dict.fromkeys(name_key(n) for n in forced) if k not in chosen_keys
               and k not in alias_keys]
    base_index = {name_key(n): i for i, n in enumerate(base.names)} if base else {}
    thresholds = [base.thresholds[base_index[name_key(n)]] if name_key(n) in base_index else RAM_DEFAULT_THRESHOLD
                  for n in chosen]
    names_zh = [base.names_zh[base_index[name_key(n)]] if name_key(n) in base_index else n for n in chosen]
    chosen_set = {name_key(n) for n in chosen}
    kept_synonyms = {a: c for a, c in usable_synonyms.items() if name_key(c) in chosen_set}
    info = {"samples": len(samples), "candidates": len(candidates), "top": top, "min_count": min_count,
            "from_dataset_lists": sorted(n for n in chosen if name_key(n) in forced_keys),
            "dataset_lists": [str(p) for p in dataset_lists]}
    embeddings = None
    if encoder_loader is not None:
        encoder = encoder_loader()
        embeddings = clip_queries(chosen, encoder)
        info["clip_weights_id"] = encoder.weights_id
    return LabelSystem(chosen, thresholds, names_zh, kept_synonyms, {n: int(counts[n]) for n in chosen},
                       embeddings, info)
