"""The webdataset shards the data engine reads and writes, and what `generate` and `clean`
share: a sample's metadata, captions and image, the model's tag names and caption parser, its
scores of encoded images through the tagging pipeline, and the `report.json` both write.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ramcli.errors import RamcliError
from ramcli.fileio import atomic_output
from ramcli.models import RecognitionModel
from ramcli_train.data import resolve_shards
from ramcli_train.samples import IMAGE_EXTENSIONS

REPORT = "report.json"


def read_samples(shard: str) -> Iterator[dict]:
    """The samples of one shard as webdataset groups them ({"__key__", ext: bytes, ...})."""
    import webdataset as wds

    def fail(exc: Exception) -> bool:
        raise RamcliError(f"cannot read shard {shard}: {exc}")

    for raw in wds.tarfile_samples(iter([{"url": shard}]), handler=fail):
        yield {k: v for k, v in raw.items() if k != "__url__" and k != "__local_path__"}


def sample_meta(sample: dict) -> dict:
    try:
        meta = json.loads(sample["json"]) if "json" in sample else {}
    except (ValueError, UnicodeDecodeError):
        meta = {}
    return meta if isinstance(meta, dict) else {}


def sample_captions(sample: dict, meta: dict) -> list[str]:
    caps = meta.get("caption")
    caps = [caps] if isinstance(caps, str) else [c for c in caps or [] if isinstance(c, str)]
    if "txt" in sample:
        caps.append(sample["txt"].decode("utf-8", "replace"))
    return list(dict.fromkeys(c.strip() for c in caps if c.strip()))


def image_bytes(sample: dict) -> bytes | None:
    return next((sample[e] for e in IMAGE_EXTENSIONS if e in sample), None)


def write_shard(out: Path, samples: list[dict]) -> None:
    import webdataset as wds

    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(out) as tmp, wds.TarWriter(tmp, mtime=0) as sink:
        for s in samples:
            sink.write(s)


def _output_path(shard: str, out_dir: Path, index: int, used: set[str]) -> Path:
    name = Path(shard).name
    if name in used:  # shards of different folders with the same name
        name = f"{index:05d}_{name}"
    used.add(name)
    return out_dir / name



def output_paths(data: Sequence[str], out_dir: Path) -> list[tuple[str, Path]]:
    """(input shard, its output shard) for every shard of `data`, in order."""
    used: set[str] = set()
    return [(shard, _output_path(shard, Path(out_dir), index, used))
            for index, shard in enumerate(resolve_shards(list(data)))]


class TagNames:
    """Tag names of the model's label system, and the caption parser for it."""

    def __init__(self, model: RecognitionModel):
        from ramcli_train.parse import TagParser

        self.names = model.labels.names
        self.parser = TagParser(model.labels)

    def of(self, captions: Sequence[str], given: Sequence[str]) -> set[str]:
        ids = set(self.parser.ids_for_names([str(g) for g in given])[0])
        for c in captions:
            ids.update(self.parser.tag_ids(c))
        return {self.names[i] for i in ids}


@dataclass
class EngineReport:
    samples: int = 0
    images_scored: int = 0
    undecodable: int = 0
    before: Counter = field(default_factory=Counter)
    after: Counter = field(default_factory=Counter)
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        tags = sorted(set(self.before) | set(self.after), key=lambda t: (-self.after[t], t))
        return {"samples": self.samples, "images_scored": self.images_scored, "undecodable": self.undecodable,
                "tag_count_before": sum(self.before.values()), "tag_count_after": sum(self.after.values()),
                "per_tag": {t: {"before": self.before[t], "after": self.after[t]} for t in tags}, **self.extra}

    def counts(self) -> dict:
        """What `merge` adds up: the counts of the shards this report saw."""
        return {"samples": self.samples, "images_scored": self.images_scored, "undecodable": self.undecodable,
                "before": dict(self.before), "after": dict(self.after), "generated": self.extra.get("generated", 0)}

    def merge(self, counts: dict) -> None:
        """Add another report's `counts` (from the shards a Ray actor generated)."""
        self.samples += counts["samples"]
        self.images_scored += counts["images_scored"]
        self.undecodable += counts["undecodable"]
        self.before.update(counts["before"])
        self.after.update(counts["after"])
        self.extra["generated"] = self.extra.get("generated", 0) + counts["generated"]

    def save(self, out_dir: Path) -> Path:
        path = Path(out_dir) / REPORT
        path.write_text(json.dumps(self.as_dict(), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        return path


def score_images(model: RecognitionModel, images: list[tuple[int, bytes]], device: str, batch_size: int,
           workers: int) -> dict[int, np.ndarray]:
    """Scores (all classes) of encoded images through the tagging pipeline, by position."""
    from ramcli.tagging.pipeline import score_files

    with tempfile.TemporaryDirectory(prefix="ramcli-engine-") as tmp:
        paths = []
        for i, data in images:
            p = Path(tmp) / f"{i:08d}.img"
            p.write_bytes(data)
            paths.append(p)
        result = score_files(model, paths, batch_size=batch_size, device=device, workers=workers)
        return {int(p.stem): row for p, row in zip(result.paths, result.scores)}

