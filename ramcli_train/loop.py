"""The training loop, nanoGPT-style: one readable file from config to checkpoints.

    setup (DDP from torchrun's env, device, seeds) -> data -> labels, tokenizer, model
    -> AdamW + the official schedule -> for each epoch, for each batch: forward under
    autocast, backward (accumulating, DDP-synchronised only on the last micro-batch),
    clip, step -> log (JSONL, progress, TensorBoard) -> atomic checkpoints.

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
import os
import random
import sys
import tarfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ramcli.models.caption import CaptionTokenizer
from ramcli.errors import RamcliError, UsageError
from ramcli.fileio import atomic_output
from ramcli.models.labels import LabelSet, read_label_dir, resolve_labels
from ramcli.models.safeload import load_weights
from ramcli_train import losses
from ramcli_train.config import TrainConfig, dump
from ramcli_train.model import ClipTeacher, TrainableRAM, label_embeddings
from ramcli_train.pretrained import load_pretrained_backbone
from ramcli_train.tokenizer import train_tokenizer

CHECKPOINT_LAST = "checkpoint_last.pt"


# ----------------------------------------------------------------------------- setup


@dataclass
class Runtime:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_runtime(cfg: TrainConfig) -> Runtime:
    """DDP from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK), else one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if cfg.device == "auto":
        device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if cfg.threads > 0:  # small models: one thread beats two that wait on each other on a busy CPU
        torch.set_num_threads(cfg.threads)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Runtime(rank, world, local, device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": _np_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _np_state() -> list:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return [kind, keys.tolist(), pos, has_gauss, gauss]


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- data


def split_data_paths(cfg: TrainConfig) -> tuple[list[str], list[str]]:
    """A folder with train/ (and val/) inside, as `ramcli synth` writes, means both splits."""
    if not cfg.data:
        raise RamcliError("no training data given: pass --data SHARDS (a folder, .tar files or JSON annotations)")
    train, val = list(cfg.data), list(cfg.val_data)
    if len(train) == 1 and (Path(train[0]) / "train").is_dir():
        root = Path(train[0])
        train = [str(root / "train")]
        if not val and (root / "val").is_dir():
            val = [str(root / "val")]
    for paths in (train, val):  # fail before anything else is loaded when the data is not there
        if paths and not _is_annotation(paths):
            from ramcli_train.data import resolve_shards

            resolve_shards(paths)
        for p in paths if paths and _is_annotation(paths) else []:
            if not Path(p).is_file():
                raise RamcliError(f"annotation file not found: {p}")
    return train, val


def resolve_training_labels(cfg: TrainConfig) -> LabelSet:
    """--labels (a folder of official files, or a one-name-per-line tags.txt), else a tags.txt
    beside the data, else the family's official labels."""
    candidates = [Path(cfg.labels)] if cfg.labels else []
    if not cfg.labels:
        for d in cfg.data:
            p = Path(d)
            candidates += [p / "tags.txt", p.parent / "tags.txt"]
    for c in candidates:
        if c.is_dir():
            return read_label_dir(c, cfg.family)
        if c.is_file():
            names = [n.strip() for n in c.read_text(encoding="utf-8").splitlines() if n.strip()]
            return LabelSet(tuple(names), tuple(names), (0.68,) * len(names))
    if cfg.labels:
        raise RamcliError(f"labels not found: {cfg.labels}")
    return resolve_labels(cfg.family)


def _is_annotation(paths: list[str]) -> bool:
    return all(p.endswith(".json") for p in paths)


def build_loader(cfg: TrainConfig, paths: list[str], labels: LabelSet, rt: Runtime, train: bool):
    from ramcli_train.data import AnnotationDataset, ShardDataset, TrainLoader, TransformConfig
    from ramcli_train.parse import TagParser

    clip_view = "same" if train and cfg.distill == "online" and cfg.family != "tag2text" else None
    transform = TransformConfig.from_data_config(cfg.arch(len(labels)).data_config, train=train and cfg.augment,
                                                 randaugment=train and cfg.augment,
                                                 clip_view=clip_view if cfg.clip_model != "tiny" else None)
    parser = TagParser(labels)
    common = dict(transform=transform, rank=rt.rank, world_size=rt.world, shuffle=train and cfg.shuffle, seed=cfg.seed)
    precomputed = train and cfg.distill == "precomputed" and cfg.family != "tag2text"
    if _is_annotation(paths):
        if precomputed:
            raise UsageError("distill=precomputed reads CLIP features from shards; official JSON annotations have "
                             "none (use distill=online)")
        dataset = AnnotationDataset(paths, len(labels), parser=parser, **common)
    else:
        dataset = ShardDataset(paths, parser, clip_features=precomputed, **common)
    return TrainLoader(dataset, cfg.batch_size, num_workers=cfg.num_workers)


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


def iter_captions(paths: list[str]):
    """Every caption of the data (to train a small vocabulary): tar members' .txt, JSON items."""
    from ramcli_train.data import resolve_shards

    if _is_annotation(paths):
        for p in paths:
            for item in json.loads(Path(p).read_text(encoding="utf-8")):
                caps = item.get("caption", []) if isinstance(item, dict) else []
                yield from ([caps] if isinstance(caps, str) else caps)
        return
    for shard in resolve_shards(paths):
        with contextlib.suppress(tarfile.TarError, OSError), tarfile.open(shard) as tar:
            for member in tar:
                if member.name.endswith(".txt"):
                    yield tar.extractfile(member).read().decode("utf-8", "replace")


def count_samples(paths: list[str]) -> int:
    """Samples in the data (image members of shards, items of JSON files), read from headers."""
    from ramcli_train.data import IMAGE_EXTENSIONS, resolve_shards

    if _is_annotation(paths):
        return sum(len(json.loads(Path(p).read_text(encoding="utf-8"))) for p in paths)
    total = 0
    for shard in resolve_shards(paths):
        with contextlib.suppress(tarfile.TarError, OSError), tarfile.open(shard) as tar:
            total += sum(1 for m in tar if m.name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS)
    return total


# ----------------------------------------------------------------------------- model


def build_tokenizer(cfg: TrainConfig, paths: list[str], out: Path) -> CaptionTokenizer | None:
    """The caption vocabulary; a trained one is saved in the run folder and reused on resume."""
    if cfg.family == "ram_plus":
        return None
    saved = out / "tokenizer.json"
    if cfg.tokenizer == "train":
        if saved.is_file():
            return CaptionTokenizer.from_vocab(saved)
        texts = [cfg.prompt + c for c in iter_captions(paths)]
        if not texts:
            raise RamcliError("tokenizer=train needs captions in the data; none found")
        return train_tokenizer(texts, cfg.tokenizer_vocab)
    return CaptionTokenizer.from_vocab(None if cfg.tokenizer == "bert-base-uncased" else cfg.tokenizer)


def build_model(cfg: TrainConfig, labels: LabelSet, tokenizer: CaptionTokenizer | None) -> TrainableRAM:
    """The model of `cfg`; `model.backbone_init` says where the backbone's weights came from."""
    arch = cfg.arch(len(labels))
    embed = label_embeddings(labels, arch, cfg.label_embed, cfg.clip_weights, cfg.seed)
    vocab = max(len(tokenizer), 30524 if cfg.tokenizer == "bert-base-uncased" else 0) if tokenizer else 0
    model = TrainableRAM(arch, labels, embed, cfg.caption_config(arch, vocab) if tokenizer else None, tokenizer,
                         cfg.prompt, drop_path_rate=cfg.drop_path, caption_samples=cfg.caption_samples,
                         pooled_tag_weight=cfg.pooled_tag_weight)
    model.backbone_init = f"backbone {arch.backbone or 'Swin'}: random initialisation"
    if cfg.pretrained_backbone and cfg.init_from is None:
        model.backbone_init = load_pretrained_backbone(model.tagger).message
    if cfg.init_from:
        state = load_weights(cfg.init_from)
        model.load_state_dict(state.get("model", state), strict=True)
        model.backbone_init = f"backbone {arch.backbone or 'Swin'}: from {Path(cfg.init_from).name}"
    if cfg.grad_ckpt:
        model.set_grad_checkpointing(True)
    return model


def lr_at(cfg: TrainConfig, epoch: int, step_in_epoch: int) -> float:
    """The official schedules: warmup (epoch 0 only, by step: the step count *is* the step in
    epoch 0) then x decay per epoch; or cosine per epoch (finetune)."""
    if cfg.schedule == "cosine":
        return (cfg.lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * epoch / cfg.epochs)) + cfg.min_lr
    if epoch == 0 and step_in_epoch < cfg.warmup_steps:
        return min(cfg.lr, cfg.warmup_lr + (cfg.lr - cfg.warmup_lr) * step_in_epoch / cfg.warmup_steps)
    return max(cfg.min_lr, cfg.lr * cfg.lr_decay_rate**epoch)


def autocast(cfg: TrainConfig, device: torch.device):
    use = cfg.amp == "bf16" or (cfg.amp == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use)


def memory_estimate(model: TrainableRAM, cfg: TrainConfig) -> dict[str, float]:
    """GiB of parameters + gradients + AdamW moments (fp32), and a rough activation figure."""
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    static = (params + 3 * trainable) * 4 / 2**30
    element = 2 if cfg.amp != "off" else 4
    swin = model.arch.swin
    if swin is not None:
        tokens = (cfg.image_size // 4) ** 2
        act = cfg.batch_size * tokens * swin.embed_dim * 34 * sum(swin.depths) / 4 * element / 2**30
    else:
        act = cfg.batch_size * _backbone_activations(model.arch) * element / 2**30
    if cfg.grad_ckpt:
        act /= 4
    return {"parameters_millions": params / 1e6, "static_gib": round(static, 2), "activations_gib": round(act, 2)}


def _backbone_activations(arch) -> int:
    """Elements a timm backbone keeps for backward per image: its modules' outputs, counted on a
    weightless (meta-device) forward pass."""
    from ramcli.models.ram import build_backbone

    total = 0

    def count(_module, _inputs, output) -> None:
        nonlocal total
        if isinstance(output, torch.Tensor):
            total += output.numel()

    with torch.device("meta"):
        backbone = build_backbone(arch)
        hooks = [m.register_forward_hook(count) for m in backbone.modules() if not list(m.children())]
        backbone.forward_features(torch.empty(1, 3, arch.image_size, arch.image_size))
    for h in hooks:
        h.remove()
    return total


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: Path, payload: dict) -> Path:
    """Whole or not at all: a kill while saving leaves the previous checkpoint."""
    with atomic_output(path) as tmp:
        torch.save(payload, tmp)
    return path


def load_checkpoint(path: Path) -> dict:
    if not path.is_file():
        raise RamcliError(f"no checkpoint to resume from: {path}")
    return load_weights(path)


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
        model = build_model(_no_downloads(cfg), labels, tokenizer)
    samples = count_samples(train_paths)
    steps = math.ceil(samples / (cfg.batch_size * cfg.accum_steps))
    return {"config": cfg.to_dict(), "classes": len(labels), "train_samples": samples,
            "val_samples": count_samples(val_paths) if val_paths else 0, "steps_per_epoch": steps,
            "total_steps": min(cfg.max_steps or steps * cfg.epochs, steps * cfg.epochs),
            "memory": memory_estimate(model, cfg)}


def _no_downloads(cfg: TrainConfig) -> TrainConfig:
    from dataclasses import replace

    return replace(cfg, pretrained_backbone=False, init_from=None)


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
    model = build_model(cfg if state is None else _no_downloads(cfg), labels, tokenizer).to(rt.device)
    if state is not None:
        model.load_state_dict(state["model"])
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
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    step, epoch, skip = 0, 0, 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        step, epoch, skip = state["step"], state["epoch"], state["batch_in_epoch"]

    loader = build_loader(cfg, train_paths, labels, rt, train=True)
    log = MetricsLog(out, cfg.tensorboard) if rt.main else None
    if rt.main:
        (out / "config.json").write_text(dump(cfg) + "\n", encoding="utf-8")
        if state is None:  # where the encoder's weights came from, in the log and on stderr
            log.write({"step": step, "event": "backbone", "message": model.backbone_init})
            print(model.backbone_init, file=sys.stderr)
    samples = count_samples(train_paths)
    per_epoch = max(1, math.ceil(samples / (cfg.batch_size * rt.world * cfg.accum_steps)))
    total = min(cfg.max_steps or per_epoch * cfg.epochs, per_epoch * cfg.epochs)  # for the progress bar

    def checkpoint(name: str, batch_in_epoch: int, ep: int) -> Path | None:
        if not rt.main:
            return None
        payload = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "epoch": ep,
                   "batch_in_epoch": batch_in_epoch, "rng": rng_state(), "config": cfg.to_dict(),
                   "arch": model.arch.to_json(), "labels": labels.to_metadata(),
                   "data_stats": loader.stats.as_dict()}
        path = save_checkpoint(out / name, payload)
        if name != CHECKPOINT_LAST:
            save_checkpoint(out / CHECKPOINT_LAST, payload)
        return path

    last: dict[str, float] = {}
    last_path = None
    window_start, window_images = time.perf_counter(), 0
    model.train()
    with _progress(cfg.progress and rt.main) as progress:
        task = progress.add_task("training", total=total, completed=step)
        while epoch < cfg.epochs and not (cfg.max_steps and step >= cfg.max_steps):
            loader.set_epoch(epoch)
            seed_everything(cfg.seed * 1000 + epoch * 10 + rt.rank)  # the epoch's augmentations
            batches, micro, accum_parts = 0, 0, {}
            for batch in loader:
                batches += 1
                if batches <= skip:
                    if batches == skip:
                        set_rng_state(state["rng"])  # before the next batch is drawn and augmented
                    continue
                lr = lr_at(cfg, epoch, step)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                images = batch.images.to(rt.device, non_blocking=True)
                captions = [cfg.prompt + c if cfg.prepend_prompt else c for c in batch.captions]
                extra = {}
                if teacher is not None:
                    extra["clip_features"] = teacher(images, batch.images_clip)
                elif batch.clip_features is not None:  # distill=precomputed
                    extra["clip_features"] = batch.clip_features.to(rt.device, non_blocking=True)
                if text_encoder is not None:
                    extra["text_embeds"] = text_encoder.encode(batch.captions).to(rt.device)
                micro += 1
                sync = micro % cfg.accum_steps == 0
                ctx = ddp.no_sync() if (rt.world > 1 and not sync) else contextlib.nullcontext()
                with ctx, autocast(cfg, rt.device):
                    parts = ddp(images, batch.tags.to(rt.device), batch.parse_tags.to(rt.device), captions, **extra)
                    loss = losses.combine(parts, cfg.tag_rescale) / cfg.accum_steps
                loss.backward()
                for k, v in parts.items():
                    accum_parts[k] = accum_parts.get(k, 0.0) + v.item() / cfg.accum_steps
                window_images += len(batch) * rt.world
                if not sync:
                    continue
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                last = {**accum_parts, "loss": sum(accum_parts.values())}
                accum_parts = {}
                if rt.main and (step % cfg.log_every == 0 or step == total):
                    elapsed = time.perf_counter() - window_start
                    rate = window_images / max(elapsed, 1e-9)
                    record = {"step": step, "epoch": epoch, "lr": lr, **{k: round(v, 5) for k, v in last.items()},
                              "img_per_s": round(rate, 2), "skipped": loader.stats.skipped}
                    log.write(record)
                    parts_text = " ".join(f"{k} {v:.3f}" for k, v in last.items())
                    line = f"step {step} {parts_text} lr {lr:.2e} {rate:.1f} img/s"
                    progress.update(task, description=line)
                    if not sys.stderr.isatty():  # a log file or a pipe gets a line, where a terminal gets the bar
                        print(line, file=sys.stderr, flush=True)
                    window_start, window_images = time.perf_counter(), 0
                progress.update(task, completed=step)
                if cfg.save_every and step % cfg.save_every == 0:
                    last_path = checkpoint(CHECKPOINT_LAST, batches, epoch) or last_path
                if cfg.max_steps and step >= cfg.max_steps:
                    break
            else:
                skip, state = 0, None
                epoch += 1
                last_path = checkpoint(f"checkpoint_{epoch - 1:02d}.pt", 0, epoch) or last_path
                continue
            last_path = checkpoint(CHECKPOINT_LAST, batches, epoch) or last_path  # stopped mid-epoch
            break
    if rt.main:
        log.write({"step": step, "event": "end", "data": loader.stats.as_dict()})
        log.close()
    if rt.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return {"step": step, "epoch": epoch, "last": last, "checkpoint": str(last_path) if last_path else None,
            "data": loader.summary()}
