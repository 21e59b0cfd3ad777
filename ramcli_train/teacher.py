"""The teacher's pass: its outputs on the photos a distillation uses, stored per photo so that
a killed or repeated run scores each photo once."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ramcli.fileio import atomic_output
from ramcli.models.ram import RecognitionModel
from ramcli.tagging.pipeline import decoded_batches
from ramcli.tagging.tagger import Tagger

TEACHER_DIR = "teacher"


@dataclass
class TeacherTargets:
    """The teacher's outputs per photo (content hash): logits of every class, pooled embedding."""

    logits: dict[str, torch.Tensor] = field(default_factory=dict)
    embeds: dict[str, torch.Tensor] = field(default_factory=dict)



class TeacherStore:
    """The teacher's outputs, one safetensors file per batch: `logits` (N, C), `embeds` (N, 512)
    and the photos' content hashes in the metadata. Files are written under a temporary name and
    renamed, so a killed pass keeps every finished batch and never leaves half a file."""

    def __init__(self, folder: Path, teacher_id: str):
        self.folder = Path(folder)
        self.teacher_id = teacher_id

    def load(self) -> TeacherTargets:
        targets = TeacherTargets()
        for path in sorted(self.folder.glob("batch-*.safetensors")):
            try:
                with safe_open(str(path), framework="pt") as f:
                    meta = f.metadata() or {}
                    if meta.get("teacher") != self.teacher_id:
                        continue
                    keys = json.loads(meta["keys"])
                    logits, embeds = f.get_tensor("logits"), f.get_tensor("embeds")
            except Exception:  # noqa: BLE001 - a damaged file is redone, never trusted
                continue
            for i, key in enumerate(keys):
                targets.logits[key] = logits[i]
                targets.embeds[key] = embeds[i]
        return targets

    def add(self, keys: list[str], logits: torch.Tensor, embeds: torch.Tensor) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        n = len(list(self.folder.glob("batch-*.safetensors")))
        path = self.folder / f"batch-{n:06d}.safetensors"
        with atomic_output(path) as tmp:
            save_file({"logits": logits.float().contiguous().cpu(), "embeds": embeds.float().contiguous().cpu()},
                      tmp, metadata={"teacher": self.teacher_id, "keys": json.dumps(keys)})


def pooled_embedding(embeds: torch.Tensor) -> torch.Tensor:
    """The image's pooled token: CLIP space for RAM and RAM++ (what their distillation loss trains)."""
    return embeds[:, 0, :]


@torch.inference_mode()
def teacher_pass(teacher: RecognitionModel, keys: dict[str, Path], store: TeacherStore, device: torch.device,
                 batch_size: int, workers: int, cache=None,
                 on_progress: Callable[[int, int], None] | None = None) -> tuple[TeacherTargets, dict[str, str]]:
    """Run the teacher over the photos `keys` (content hash -> photo) it has not scored yet,
    through the tagging pipeline: (every stored target, photos it could not read -> reason).
    `on_progress(done, to_do)`.

    Photos whose image embeddings are in the embedding cache (`ramcli tag --cache-embeddings`
    with this teacher) only run the recognition decoder."""
    targets = store.load()
    key_of = {p: k for k, p in keys.items()}
    failures: dict[str, str] = {}
    todo = [p for k, p in keys.items() if k not in targets.logits]
    done = 0
    tagger = Tagger(teacher, device, cache=cache)
    cached = [p for p in todo if cache is not None and key_of[p] in cache]
    for start in range(0, len(cached), batch_size):
        chunk = [key_of[p] for p in cached[start:start + batch_size]]
        logits, embeds = tagger.outputs(keys=chunk)
        _record(store, targets, chunk, logits, pooled_embedding(embeds))
        done += len(chunk)
        if on_progress:
            on_progress(done, len(todo))
    in_cache = set(cached)
    for batch in decoded_batches([p for p in todo if p not in in_cache], teacher, batch_size, workers, device):
        for failure in batch.failures:
            failures[str(failure.path)] = failure.reason
        if batch.items:
            logits, embeds = tagger.outputs(batch.pixels)
            chunk = [key_of[item.path] for item in batch.items]
            _record(store, targets, chunk, logits, pooled_embedding(embeds))
        done += len(batch.items) + len(batch.failures)
        if on_progress:
            on_progress(done, len(todo))
    return targets, failures


def _record(store: TeacherStore, targets: TeacherTargets, keys: list[str], logits: torch.Tensor, embeds: torch.Tensor) -> None:
    store.add(keys, logits, embeds)
    for i, key in enumerate(keys):
        targets.logits[key] = logits[i].float().cpu()
        targets.embeds[key] = embeds[i].float().cpu()

