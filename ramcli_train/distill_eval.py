"""How a student is judged: its tags' agreement with the teacher's on held-out photos, and both
models' speed."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ramcli.media.decode import normalize
from ramcli.models.ram import RecognitionModel
from ramcli.tagging.pipeline import decoded_batches
from ramcli.tagging.tagger import Tagger


def agreement(teacher_tags: list[set[str]], student_tags: list[set[str]]) -> dict[str, float]:
    """Micro F1 of the student's tag sets against the teacher's (1.0 when both are empty), and
    the share of photos with exactly the teacher's set."""
    common = sum(len(t & s) for t, s in zip(teacher_tags, student_tags))
    total = sum(len(t) + len(s) for t, s in zip(teacher_tags, student_tags))
    same = sum(t == s for t, s in zip(teacher_tags, student_tags))
    return {"f1": 2 * common / total if total else 1.0, "same_set": same / max(1, len(teacher_tags)),
            "photos": len(teacher_tags)}


def tag_sets(model: RecognitionModel, scores: torch.Tensor, device: torch.device) -> list[set[str]]:
    """Tags emitted for full-class `scores` under `ramcli tag`'s decision rule (the model's thresholds)."""
    tagger = Tagger(model, device)
    return [{t.name for t in row} for row in tagger.decide(scores[:, tagger.active])]


@torch.inference_mode()
def student_scores(student: RecognitionModel, paths: list[Path], device: torch.device, batch_size: int,
                   workers: int) -> torch.Tensor:
    """The student's scores of every class on `paths`, decoded as `ramcli tag` decodes them."""
    tagger = Tagger(student, device)
    return torch.cat([torch.sigmoid(tagger.outputs(batch.pixels)[0].float()).cpu()
                      for batch in decoded_batches(paths, student, batch_size, workers, device) if batch.items])


@torch.inference_mode()
def speed(model: RecognitionModel, paths: list[Path], device: torch.device, batch_size: int) -> dict:
    """img/s of the model's forward pass (decode excluded) in fp32 on `device`, after one warm-up batch."""
    pixels = torch.cat([b.pixels for b in decoded_batches(paths, model, batch_size, 0, device)])
    x = normalize(pixels.to(device), model.arch.data_config)
    model = model.to(device).eval()
    model(x[:batch_size])
    start, cpu = time.perf_counter(), time.process_time()
    for i in range(0, len(x), batch_size):
        model(x[i:i + batch_size])
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    return {"images": len(x), "seconds": wall, "img_per_s": len(x) / wall, "cpu_seconds": time.process_time() - cpu,
            "params_millions": sum(p.numel() for p in model.parameters()) / 1e6,
            "input": model.arch.image_size, "backbone": model.arch.encoder}

