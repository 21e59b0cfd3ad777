"""`ramcli train` (and `ramcli finetune`, which prepares a run folder and calls it): the run
from config to checkpoints, nanoGPT-style.

    setup (DDP from torchrun's env, device, seeds) -> data -> labels, tokenizer, model
    -> `ramcli_train.trainer.Trainer` (AdamW + the official schedule) -> for each batch: forward
    under autocast, backward (accumulating, DDP-synchronised only on the last micro-batch), clip,
    step -> log (JSONL, progress, TensorBoard) -> atomic checkpoints.

Exact resume: a checkpoint holds the model, optimizer, step, epoch, the number of batches
consumed in the epoch and every RNG. On `--resume` the epoch's data stream is rebuilt with
the same seeds and the consumed batches are read and dropped (streaming shards cannot seek),
then the RNGs are restored, so the continued run computes what the uninterrupted one would.

Works as a plain single process, or under `torchrun --nproc-per-node N` (NCCL on GPU, gloo on
CPU); rank 0 writes checkpoints and logs.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ramcli.errors import RamcliError
from ramcli.models.labels import LabelSet
from ramcli_train import losses
from ramcli_train.build import build_model, build_tokenizer, memory_estimate, no_downloads
from ramcli_train.config import TrainConfig, dump
from ramcli_train.model import ClipTeacher
from ramcli_train.runtime import Runtime, autocast, rng_state, seed_everything, set_rng_state, setup_runtime
from ramcli_train.sources import build_loader, count_samples, resolve_training_labels, split_data_paths
from ramcli_train.trainer import CHECKPOINT_LAST, Throughput, Trainer, load_checkpoint, progress_line


@torch.no_grad()
def held_out_map(tagger: torch.nn.Module, labels: LabelSet, cfg: TrainConfig, paths: list[str]):
    """The official mAP (`ramcli.eval.metrics.MeanAP`) of `tagger`'s logits, in `labels` order, on
    labelled data in training's own formats, prepared as for validation: how the benchmarks and
    tests judge a training run."""
    from ramcli.eval.metrics import mean_average_precision

    was_training = tagger.training
    tagger.eval()
    scores, targets = [], []
    for batch in build_loader(cfg, paths, labels, Runtime(), train=False):
        scores.append(torch.sigmoid(tagger(batch.images)).numpy())
        targets.append(batch.tags.numpy())
    tagger.train(was_training)
    return mean_average_precision(np.concatenate(scores), np.concatenate(targets))


def lr_at(cfg: TrainConfig, epoch: int, step_in_epoch: int) -> float:
    """The official schedules: warmup (epoch 0 only, by step: the step count *is* the step in
    epoch 0) then x decay per epoch; or cosine per epoch (finetune)."""
    if cfg.schedule == "cosine":
        return (cfg.lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * epoch / cfg.epochs)) + cfg.min_lr
    if epoch == 0 and step_in_epoch < cfg.warmup_steps:
        return min(cfg.lr, cfg.warmup_lr + (cfg.lr - cfg.warmup_lr) * step_in_epoch / cfg.warmup_steps)
    return max(cfg.min_lr, cfg.lr * cfg.lr_decay_rate**epoch)


# ----------------------------------------------------------------------------- logging


class MetricsLog:
    """JSONL metrics (always), TensorBoard scalars (optional); rank 0 only."""

    def __init__(self, out: Path, tensorboard: bool):
        self.file = open(out / "metrics.jsonl", "a", encoding="utf-8")
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise RamcliError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
            self.tb = SummaryWriter(str(out / "tensorboard"))

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def _progress(enabled: bool):
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                    TimeElapsedColumn(), TimeRemainingColumn(), disable=not enabled, transient=False)


# ----------------------------------------------------------------------------- the loop


def plan(cfg: TrainConfig) -> dict:
    """What a run would do (`--dry-run`): resolved config, sample counts, memory estimate."""
    train_paths, val_paths = split_data_paths(cfg)
    labels = resolve_training_labels(cfg)
    out = Path(cfg.out)
    tokenizer = build_tokenizer(cfg, train_paths, out) if cfg.family != "ram_plus" else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_model(no_downloads(cfg), labels, tokenizer)
    samples = count_samples(train_paths)
    steps = math.ceil(samples / (cfg.batch_size * cfg.accum_steps))
    return {"config": cfg.to_dict(), "classes": len(labels), "train_samples": samples,
            "val_samples": count_samples(val_paths) if val_paths else 0, "steps_per_epoch": steps,
            "total_steps": min(cfg.max_steps or steps * cfg.epochs, steps * cfg.epochs),
            "memory": memory_estimate(model, cfg)}



def train(cfg: TrainConfig, resume: bool = False) -> dict:
    """Run training; returns a summary (steps, last losses, data stats, checkpoint path)."""
    rt = setup_runtime(cfg)
    out = Path(cfg.out)
    if rt.main:
        out.mkdir(parents=True, exist_ok=True)
    train_paths, _ = split_data_paths(cfg)
    labels = resolve_training_labels(cfg)
    state = load_checkpoint(out / CHECKPOINT_LAST) if resume else None
    seed_everything(cfg.seed + rt.rank)  # the official seeding: 42 + rank

    if rt.main:  # rank 0 builds the vocabulary once; the others read the same file
        tokenizer = build_tokenizer(cfg, train_paths, out)
        if tokenizer is not None and not (out / "tokenizer.json").is_file():
            tokenizer.save(out / "tokenizer.json")
    if rt.world > 1:
        dist.barrier()
    if not rt.main:
        tokenizer = build_tokenizer(cfg, train_paths, out)
    model = build_model(cfg if state is None else no_downloads(cfg), labels, tokenizer).to(rt.device)
    trainer = Trainer(model, out, cfg.lr, cfg.weight_decay, lambda epoch, step: lr_at(cfg, epoch, step),
                      epochs=cfg.epochs, max_steps=cfg.max_steps, accum_steps=cfg.accum_steps,
                      grad_clip=cfg.grad_clip, save_every=cfg.save_every, epoch_checkpoints=True,
                      extra_state=lambda: {"rng": rng_state(), "config": cfg.to_dict(), "arch": model.arch.to_json(),
                                           "labels": labels.to_metadata(), "data_stats": loader.stats.as_dict()},
                      main=rt.main)
    if state is not None:
        trainer.restore(state)
    teacher = None
    if cfg.distill == "online" and cfg.family != "tag2text":
        teacher = ClipTeacher.load(cfg.clip_weights, cfg.clip_model, rt.device)
    text_encoder = None
    if cfg.use_alignment:
        from ramcli.models.clip_text import load_text_encoder
        from ramcli_train.model import TINY_CLIP

        text_encoder = load_text_encoder(Path(cfg.clip_weights) if cfg.clip_weights else None,
                                         model_config=TINY_CLIP if cfg.clip_model == "tiny" else None)
    ddp = model
    if rt.world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    loader = build_loader(cfg, train_paths, labels, rt, train=True)
    log = MetricsLog(out, cfg.tensorboard) if rt.main else None
    if rt.main:
        (out / "config.json").write_text(dump(cfg) + "\n", encoding="utf-8")
        if state is None:  # where the encoder's weights came from, in the log and on stderr
            log.write({"step": trainer.step, "event": "backbone", "message": model.backbone_init})
            print(model.backbone_init, file=sys.stderr)
    samples = count_samples(train_paths)
    per_epoch = max(1, math.ceil(samples / (cfg.batch_size * rt.world * cfg.accum_steps)))
    total = min(cfg.max_steps or per_epoch * cfg.epochs, per_epoch * cfg.epochs)  # for the progress bar

    def batches(epoch: int, skip: int):
        """The epoch's batches, drawn and augmented as in an uninterrupted run: the first `skip`
        are read and dropped, then the RNGs are those the checkpoint saved."""
        loader.set_epoch(epoch)
        seed_everything(cfg.seed * 1000 + epoch * 10 + rt.rank)  # the epoch's augmentations
        for i, batch in enumerate(loader, 1):
            if i < skip:
                continue
            if i == skip:
                set_rng_state(state["rng"])  # before the next batch is drawn and augmented
                continue
            yield batch

    throughput = Throughput()

    def loss(batch, sync: bool):
        images = batch.images.to(rt.device, non_blocking=True)
        captions = [cfg.prompt + c if cfg.prepend_prompt else c for c in batch.captions]
        extra = {}
        if teacher is not None:
            extra["clip_features"] = teacher(images, batch.images_clip)
        elif batch.clip_features is not None:  # distill=precomputed
            extra["clip_features"] = batch.clip_features.to(rt.device, non_blocking=True)
        if text_encoder is not None:
            extra["text_embeds"] = text_encoder.encode(batch.captions).to(rt.device)
        ctx = ddp.no_sync() if (rt.world > 1 and not sync) else contextlib.nullcontext()
        with ctx, autocast(cfg, rt.device):
            parts = ddp(images, batch.tags.to(rt.device), batch.parse_tags.to(rt.device), captions, **extra)
            value = losses.combine(parts, cfg.tag_rescale)
        throughput.add(len(batch) * rt.world)
        return value, parts

    last: dict[str, float] = {}
    with _progress(cfg.progress and rt.main) as progress:
        task = progress.add_task("training", total=total, completed=trainer.step)

        def on_step(step: int, epoch: int, lr: float, parts: dict[str, float]) -> None:
            nonlocal last
            last = {**parts, "loss": sum(parts.values())}
            if rt.main and (step % cfg.log_every == 0 or step == total):
                rate = throughput.read()
                log.write({"step": step, "epoch": epoch, "lr": lr, **{k: round(v, 5) for k, v in last.items()},
                           "img_per_s": round(rate, 2), "skipped": loader.stats.skipped})
                line = progress_line(step, total, parts, lr, rate)
                progress.update(task, description=line)
                if not sys.stderr.isatty():  # a log file or a pipe gets a line, where a terminal gets the bar
                    print(line, file=sys.stderr, flush=True)
            progress.update(task, completed=step)

        trainer.fit(batches, loss, on_step)
    if rt.main:
        log.write({"step": trainer.step, "event": "end", "data": loader.stats.as_dict()})
        log.close()
    if rt.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return {"step": trainer.step, "epoch": trainer.epoch, "last": last,
            "checkpoint": str(trainer.last_checkpoint) if trainer.last_checkpoint else None, "data": loader.summary()}
