"""The data engine's `generate` (RAM paper §3.2): missing tags added by a baseline model.

Every image of the input shards is scored by the baseline model through
`ramcli.tagging.pipeline.score_files` (the pipeline `ramcli tag` uses). Tags above their threshold that
the sample does not already have (given in its JSON or parsed from its captions) are added; an
optional `Captioner` adds a generated caption, and the tags parsed from it. Output shards keep
every member of a sample; only KEY.json changes:

    tags               given ∪ generated ∪ parsed-from-generated-caption tag names
    generated_tags     what the model added
    caption            the captions, plus the generated one (when captioning)

It writes `report.json` with per-tag counts before and after.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from ramcli.errors import UsageError
from ramcli.models import RecognitionModel
from ramcli.tagging.decision import ClassPolicy, class_policy, emitted
from ramcli_train.engine_shards import (EngineReport, TagNames, image_bytes, output_paths, read_samples,
                                        sample_captions, sample_meta, score_images, write_shard)
from ramcli_train.samples import IMAGE_EXTENSIONS, decode_image

#: a caption model: (images, their tag names) -> one caption per image
Captioner = Callable[[Sequence[Image.Image], Sequence[Sequence[str]]], list[str]]


def _decide(model: RecognitionModel, policy: ClassPolicy, scores: np.ndarray) -> list[str]:
    """The tags `ramcli tag` emits for one row of every class's scores, in label order."""
    keep = emitted(scores[policy.active], policy.thresholds)
    return [model.labels.names[policy.active[j]] for j in np.flatnonzero(keep)]


def generate(model: RecognitionModel, data: Sequence[str], out_dir: Path, threshold: float | None = None,
             captioner: Captioner | None = None, device: str = "auto", batch_size: int = 8,
             workers: int | None = 0) -> dict:
    """Add the baseline model's tags (and generated captions' tags) to every sample; write new
    shards and `report.json` (per-tag counts before and after)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = TagNames(model)
    report = generate_report(model, threshold, captioner is not None)
    for shard, out in output_paths(data, out_dir):
        generate_shard(model, names, shard, out, report, threshold, captioner, device, batch_size, workers)
    report.save(out_dir)
    return report.as_dict()


def generate_report(model: RecognitionModel, threshold: float | None, captioned: bool) -> EngineReport:
    return EngineReport(extra={"model": model.model_id, "threshold": threshold if threshold is not None else "per-class",
                               "captioned": captioned, "generated": 0})



def generate_shard(model: RecognitionModel, names: TagNames, shard: str, out: Path, report: EngineReport,
                   threshold: float | None = None, captioner: Captioner | None = None, device: str = "auto",
                   batch_size: int = 8, workers: int | None = 0) -> None:
    """`generate` for one shard: its new shard written at `out` (atomically), counts into `report`."""
    samples = list(read_samples(shard))
    images = [(i, b) for i, s in enumerate(samples) if (b := image_bytes(s)) is not None]
    scores = score_images(model, images, device, batch_size, workers) if images else {}
    report.images_scored += len(scores)
    report.undecodable += len(images) - len(scores)
    policy = class_policy(model.labels, threshold)
    predicted = {i: _decide(model, policy, row) for i, row in scores.items()}
    captions_new: dict[int, str] = {}
    if captioner is not None and predicted:
        order = sorted(predicted)
        pil = [decode_image(samples[i][next(e for e in IMAGE_EXTENSIONS if e in samples[i])]) for i in order]
        for i, text in zip(order, captioner(pil, [predicted[i] for i in order])):
            captions_new[i] = text
    written = []
    for i, sample in enumerate(samples):
        report.samples += 1
        meta = sample_meta(sample)
        captions = sample_captions(sample, meta)
        given = [str(t) for t in meta.get("tags") or []]
        before = names.of(captions, given)
        report.before.update(before)
        if i not in predicted:
            report.after.update(before)
            written.append(sample)
            continue
        added = sorted(set(predicted[i]) - before)
        caption_tags: set[str] = set()
        if i in captions_new:
            caption_tags = names.of([captions_new[i]], []) - before - set(added)
            meta["caption"] = [*captions_new_list(meta), captions_new[i]]
            meta["generated_caption"] = captions_new[i]
            meta["generated_caption_tags"] = sorted(caption_tags)
        after = before | set(added) | caption_tags
        report.after.update(after)
        report.extra["generated"] += len(added) + len(caption_tags)
        meta["tags"] = sorted(set(given) | set(added) | caption_tags)
        meta["generated_tags"] = added
        written.append({**sample, "json": json.dumps(meta, ensure_ascii=False).encode("utf-8")})
    write_shard(out, written)


def captions_new_list(meta: dict) -> list[str]:
    caps = meta.get("caption")
    return [caps] if isinstance(caps, str) else [c for c in caps or [] if isinstance(c, str)]


def checkpoint_captioner(checkpoint: Path, device: str = "cpu", num_beams: int = 3) -> Captioner:
    """Captions from the caption branch of a `ramcli train` / `ramcli finetune` checkpoint (RAM,
    Tag2Text), guided by the tags the engine found, as RAM's captioner is."""
    import torch

    from ramcli.media.decode import model_input, normalize
    from ramcli.models.caption import CaptionTokenizer
    from ramcli.models.labels import LabelSet
    from ramcli_train.build import build_model
    from ramcli_train.config import TrainConfig
    from ramcli_train.trainer import load_checkpoint

    ckpt = load_checkpoint(Path(checkpoint))
    if not isinstance(ckpt, dict) or not any(k.startswith("caption.") for k in ckpt.get("model", {})):
        raise UsageError(f"{Path(checkpoint).name} has no caption branch (train RAM or Tag2Text, not RAM++)")
    tok = Path(checkpoint).parent / "tokenizer.json"
    cfg = TrainConfig(**{k: v for k, v in ckpt["config"].items() if k in TrainConfig.__dataclass_fields__})
    cfg.tokenizer, cfg.label_embed, cfg.pretrained_backbone, cfg.init_from = str(tok), "random", False, None
    labels = LabelSet.from_metadata(ckpt["labels"])
    model = build_model(cfg, labels, CaptionTokenizer.from_vocab(tok))
    model.load_state_dict(ckpt["model"])
    model.to(device).eval()
    data_config = model.tagger.pretrained_cfg

    @torch.inference_mode()
    def caption(images: Sequence[Image.Image], tags: Sequence[Sequence[str]]) -> list[str]:
        pixels = torch.stack([model_input(im, data_config) for im in images]).to(device)
        embeds = model.tagger.encode_image(normalize(pixels, data_config))
        return model.caption.generate(embeds, [" | ".join(t) for t in tags], num_beams=num_beams)

    return caption
