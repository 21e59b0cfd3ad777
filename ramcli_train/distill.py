"""`ramcli distill`: a small student learns what a big tagger says about your own photos.

    photos (or shards, unpacked once) -> a held-out split by content hash -> the student: by
    default a shallower copy of the teacher's own encoder (half the blocks of each stage) started
    from its weights, or any timm backbone, under the teacher's label side (and its decoder when
    the widths match), refused unless it needs fewer FLOPs than the teacher -> the teacher's
    pass over the photos this run will train and evaluate on, and no others: logits of every
    class and the pooled image embedding in CLIP space, stored per photo and resumable -> soft
    targets + embedding distillation -> held-out tag agreement and both models' speed -> a
    tagger file for `ramcli tag --weights`.

The student keeps the teacher's frozen CLIP label queries, and learns the teacher's pooled
image embedding (RAM, RAM++), so the embedding lands in the same CLIP space and `ramcli vocab
add` tags keep working on it. The teacher's scores are the targets for every class, not only
those above a threshold (soft targets), so the student learns the teacher's confidence too.

Everything lives in a work folder beside the output (`OUT.distill/`): the teacher's outputs
(`teacher/`, one safetensors file per batch, written atomically), the unpacked shards, the
training checkpoint (`checkpoint_last.pt`) and `metrics.jsonl`. A killed run keeps what the
teacher has done; `--resume` continues the student's training exactly where it stopped.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from ramcli.errors import RamcliError, UsageError
from ramcli.media.decode import normalize
from ramcli.media.loader import PhotoDataset, collate
from ramcli.models.configs import CLIP_DIM
from ramcli.models.ram import RecognitionModel
from ramcli_train.distill_eval import agreement, speed, student_scores, tag_sets
from ramcli_train.distill_photos import collect_photos, key_photos, split
from ramcli_train.losses import pooled_tag_loss
from ramcli_train.student import INHERITED_LR, LR, build_student, check_faster, inherits, student_arch
from ramcli_train.teacher import TEACHER_DIR, TeacherStore, TeacherTargets, pooled_embedding, teacher_pass
from ramcli_train.trainer import CHECKPOINT_LAST, Throughput, Trainer, load_checkpoint


@dataclass
class DistillConfig:
    teacher: str  # a weights file or a published name, as `ramcli tag --weights`
    data: list[str]  # photo folders/files, or .tar shards / folders of them
    out: Path
    backbone: str = "teacher"  # "teacher": the teacher's own encoder, or a timm name
    depths: tuple[int, ...] | None = None  # blocks per stage; None: `default_depths` for the teacher's, else its own
    image_size: int | None = None  # default: the teacher's
    hidden: int | None = None  # decoder width; default: the teacher's (its decoder is copied)
    epochs: int = 10
    max_steps: int | None = None
    batch_size: int = 32
    lr: float | None = None  # default: LR, or INHERITED_LR for a student that starts from the teacher
    weight_decay: float = 0.05
    warmup_steps: int = 50
    embed_weight: float = 1.0
    pooled_weight: float = 0.0  # the pooled-embedding tag loss to the teacher's probabilities; 0: off
    val_fraction: float = 0.1
    pretrained: bool = True
    device: str = "auto"
    workers: int = 0
    threads: int = 0
    seed: int = 0
    save_every: int = 200
    speed_images: int = 16
    labels_dir: Path | None = None
    work: Path | None = None  # default: OUT.distill beside the output
    force: bool = False  # train a student that needs about as many FLOPs as the teacher, or more

    @property
    def work_dir(self) -> Path:
        return Path(self.work) if self.work else Path(self.out).with_suffix(".distill")



def total_steps(cfg: DistillConfig, train: int) -> int:
    """Optimizer steps of the run: --max-steps, at most --epochs passes over `train` photos."""
    per_epoch = math.ceil(train / cfg.batch_size)
    return min(cfg.max_steps or per_epoch * cfg.epochs, per_epoch * cfg.epochs)


def planned(train: Sequence[str], cfg: DistillConfig, unusable: set[str] = frozenset()) -> list[str]:
    """The training samples the run will take, in `train_student`'s order: its batches until
    `total_steps` of them hold a usable sample (a batch of `unusable` photos takes no step)."""
    if set(train) <= set(unusable):
        raise RamcliError("the teacher could read none of the training photos")
    total, keys, steps, epoch = total_steps(cfg, len(train)), [], 0, 0
    while steps < total:
        order = epoch_order(len(train), cfg.seed, epoch)
        for i in range(0, len(order), cfg.batch_size):
            batch = [train[j] for j in order[i:i + cfg.batch_size]]
            keys += batch
            steps += any(k not in unusable for k in batch)
            if steps >= total:
                break
        epoch += 1
    return list(dict.fromkeys(keys))



def student_loss(student: RecognitionModel, images: torch.Tensor, teacher_logits: torch.Tensor,
                 teacher_embeds: torch.Tensor, embed_weight: float, pooled_weight: float = 0.0) -> dict[str, torch.Tensor]:
    """soft: BCE to the teacher's probabilities, summed over every class (averaged over images);
    embed (RAM, RAM++): L1 to the teacher's pooled image embedding, as RAM's own distillation;
    pooled (RAM, RAM++, when weighted): the same probabilities from the pooled embedding through
    the label embeddings, training's `pooled_tag_loss`. It hands an encoder that starts from
    random weights a direct gradient instead of one through the decoder's cross-attention; it
    is off by default because it also pulls on the pooled embedding that the embed loss keeps in
    the teacher's CLIP space, which a teacher trained without it (the published ones) never had to
    satisfy."""
    embeds = student.encode_image(images)
    logits = student.decode(embeds)
    probs = torch.sigmoid(teacher_logits.float())
    batch = images.shape[0]
    parts = {"soft": F.binary_cross_entropy_with_logits(logits.float(), probs, reduction="sum") / batch}
    if student.arch.family != "tag2text" and embed_weight > 0:
        parts["embed"] = embed_weight * F.l1_loss(pooled_embedding(embeds).float(), teacher_embeds.float())
    if student.arch.family != "tag2text" and pooled_weight > 0:
        classes = student.label_embed.view(student.arch.num_classes, -1, CLIP_DIM).mean(dim=1)
        parts["pooled"] = pooled_weight * pooled_tag_loss(pooled_embedding(embeds), classes, probs) / batch
    return parts


def student_lr(cfg: DistillConfig, step: int, total: int) -> float:
    """Linear warmup, then cosine to zero over the run."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The order of the training photos in `epoch`: the same in `planned` and in training."""
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    return torch.randperm(n, generator=g).tolist()


def train_student(cfg: DistillConfig, student: RecognitionModel, train_paths: list[Path], keys: list[str],
                  targets: TeacherTargets, device: torch.device, log, resume: bool,
                  on_step: Callable[[int, int, dict], None] | None = None) -> int:
    """Train the student on the teacher's targets with the shared `Trainer`; returns the number
    of optimizer steps done. A batch of photos the teacher could not read takes no step."""
    work = cfg.work_dir
    total = total_steps(cfg, len(train_paths))
    student.to(device)
    trainer = Trainer(student, work, cfg.lr, cfg.weight_decay, lambda epoch, step: student_lr(cfg, step, total),
                      max_steps=total, grad_clip=1.0, save_every=cfg.save_every)
    if resume:
        try:
            trainer.restore(load_checkpoint(work / CHECKPOINT_LAST))
        except (RuntimeError, ValueError, KeyError):
            raise RamcliError(f"{work / CHECKPOINT_LAST} is not a checkpoint of this student (another --backbone, "
                              "--hidden or teacher?); start without --resume") from None
    by_path = dict(zip(train_paths, keys))
    dataset = PhotoDataset(train_paths, student.arch.image_size, interpolation=student.arch.interpolation)

    def batches(epoch: int, skip: int):
        order = epoch_order(len(train_paths), cfg.seed, epoch)
        sampler = [order[i:i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
        return torch.utils.data.DataLoader(dataset, batch_sampler=sampler[skip:], num_workers=cfg.workers,
                                           collate_fn=functools.partial(collate, size=student.arch.image_size))

    throughput = Throughput()

    def loss(batch, sync: bool):
        usable = [i for i, item in enumerate(batch.items) if by_path[item.path] in targets.logits]
        if not usable:  # photos the teacher could not read either
            return None
        throughput.add(len(usable))
        batch_keys = [by_path[batch.items[i].path] for i in usable]
        parts = student_loss(student, normalize(batch.pixels[usable].to(device), student.arch.data_config),
                             torch.stack([targets.logits[k] for k in batch_keys]).to(device),
                             torch.stack([targets.embeds[k] for k in batch_keys]).to(device), cfg.embed_weight,
                             cfg.pooled_weight)
        return sum(parts.values()), parts

    def logged(step: int, epoch: int, lr: float, parts: dict[str, float]) -> None:
        record = {"step": step, "epoch": epoch, "lr": lr, **{k: round(v, 5) for k, v in parts.items()},
                  "img_per_s": round(throughput.read(), 2)}
        log(record)
        if on_step:
            on_step(step, total, record)

    trainer.fit(batches, loss, logged)
    student.eval()
    return trainer.step


# ----------------------------------------------------------------------------- the whole run


@dataclass
class Report:
    photos: int
    skipped: dict[str, str]
    train: int
    held_out: int
    steps: int
    teacher_new: int
    backbone_init: str
    agreement: dict
    speed: dict
    out: Path

    def as_dict(self) -> dict:
        return {**{k: v for k, v in self.__dict__.items() if k != "out"}, "out": str(self.out)}


def distill(cfg: DistillConfig, resume: bool = False,
            progress: Callable[[str, int, int, dict | None], None] | None = None) -> Report:
    """The whole run; `progress(stage, done, total, record)` is called as the teacher pass
    ("teacher", photos) and training ("student", steps, with the step's losses) advance."""
    from ramcli.tagging.embed_cache import EmbeddingCache
    from ramcli.models import load_model
    from ramcli.tagging.pipeline import resolve_device

    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    if cfg.epochs <= 0 or cfg.batch_size <= 0 or (cfg.lr is not None and cfg.lr <= 0):
        raise UsageError("--epochs, --batch-size and --lr must be positive")
    device = resolve_device(cfg.device)
    work = cfg.work_dir
    work.mkdir(parents=True, exist_ok=True)
    if resume and not (work / CHECKPOINT_LAST).is_file():
        raise UsageError(f"nothing to resume: {work / CHECKPOINT_LAST} does not exist")
    teacher = load_model(cfg.teacher, labels_dir=cfg.labels_dir)
    if cfg.lr is None:
        cfg = replace(cfg, lr=INHERITED_LR if inherits(cfg.backbone, teacher) else LR)
    size = cfg.image_size or teacher.arch.image_size
    planned_arch = student_arch(teacher, cfg.backbone, size, cfg.hidden, cfg.depths)
    if not cfg.force:
        check_faster(teacher.arch, planned_arch)
    photos, skipped = collect_photos(cfg.data, work)
    keyed, failures = key_photos(photos)
    skipped.update(failures)
    if not keyed:
        raise RamcliError("none of the photos in --data could be read")
    train_keys, held_keys = split(list(keyed), cfg.val_fraction)
    store = TeacherStore(work / TEACHER_DIR, teacher.model_id)
    before = len(store.load().logits)
    cache = EmbeddingCache(teacher.model_id)
    unusable: set[str] = set()
    taken = planned(train_keys, cfg)
    needed = held_keys + taken
    while True:  # photos the teacher cannot read leave their batches short: plan past them
        todo = {k: keyed[k] for k in needed if k not in unusable}
        targets, failures = teacher_pass(teacher, todo, store, device, cfg.batch_size, cfg.workers,
                                         cache if cache.dir.is_dir() else None,
                                         (lambda d, t: progress("teacher", d, t, None)) if progress else None)
        skipped.update(failures)
        unusable |= {k for k in todo if k not in targets.logits}
        taken = planned(train_keys, cfg, unusable)
        if set(taken) <= set(needed):
            break
        needed = held_keys + taken
    held_keys = [k for k in held_keys if k in targets.logits]
    taken = [k for k in taken if k in targets.logits]
    if not held_keys:
        raise RamcliError("the teacher could read none of the held-out photos")
    torch.manual_seed(cfg.seed)
    student, note = build_student(teacher, cfg.backbone, size, cfg.hidden, cfg.pretrained and not resume, cfg.depths)
    student.model_id = f"{Path(cfg.out).stem}"
    with open(work / "metrics.jsonl", "a", encoding="utf-8") as log_file:
        def log(record: dict) -> None:
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()

        log({"event": "start", "teacher": teacher.model_id, "backbone": note, "photos": len(keyed),
             "skipped": len(skipped), "train": len(taken), "held_out": len(held_keys)})
        steps = train_student(cfg, student, [keyed[k] for k in train_keys], train_keys, targets, device, log, resume,
                              (lambda s, t, r: progress("student", s, t, r)) if progress else None)
        student.model_id = f"{Path(cfg.out).stem}@step{steps}"
        held_paths = [keyed[k] for k in held_keys]
        teacher_probs = torch.sigmoid(torch.stack([targets.logits[k] for k in held_keys]))
        student_probs = student_scores(student, held_paths, device, cfg.batch_size, cfg.workers)
        agree = agreement(tag_sets(teacher, teacher_probs, device), tag_sets(student, student_probs, device))
        timed = held_paths[: cfg.speed_images]
        batch = min(8, len(timed))
        speeds = {"teacher": speed(teacher, timed, device, batch), "student": speed(student, timed, device, batch)}
        speeds["speedup"] = speeds["student"]["img_per_s"] / speeds["teacher"]["img_per_s"]
        log({"event": "end", "steps": steps, "agreement": agree, "speed": speeds})
    from ramcli.models.converted import save_converted

    out = save_converted(student.float(), Path(cfg.out), source=f"ramcli distill from {teacher.model_id}")
    return Report(len(keyed) - len(unusable), skipped, len(taken), len(held_keys), steps, len(targets.logits) - before, note,
                  agree, speeds, out)
