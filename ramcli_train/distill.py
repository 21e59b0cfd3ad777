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
import tarfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from ramcli.errors import RamcliError, UsageError
from ramcli.fileio import atomic_output
from ramcli.media.decode import ImageError, content_hash, normalize
from ramcli.media.loader import PhotoDataset, collate, make_loader
from ramcli.models.configs import CLIP_DIM, ArchConfig
from ramcli.models.ram import RecognitionModel
from ramcli_train.losses import pooled_tag_loss

TEACHER_DIR = "teacher"
SHARD_DIR = "shards"
CHECKPOINT = "checkpoint_last.pt"
SHARD_IMAGES = (".jpg", ".jpeg", ".png", ".webp")


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


@dataclass
class TeacherTargets:
    """The teacher's outputs per photo (content hash): logits of every class, pooled embedding."""

    logits: dict[str, torch.Tensor] = field(default_factory=dict)
    embeds: dict[str, torch.Tensor] = field(default_factory=dict)


# ----------------------------------------------------------------------------- photos


def is_shard_source(item: str) -> bool:
    path = Path(item)
    return item.endswith(".tar") or "{" in item or (path.is_dir() and any(path.glob("*.tar"))) or (
        path.is_dir() and any(path.glob("*/*.tar")) and not _has_photos(path))


def _has_photos(folder: Path) -> bool:
    return any(p.suffix.lower() in SHARD_IMAGES for p in folder.iterdir() if p.is_file())


def unpack_shards(sources: Sequence[str], dest: Path) -> list[Path]:
    """The image members of shards as files under `dest`, named by shard and member index (never
    by the names inside the archive); each shard is unpacked once (a marker says it is complete)."""
    from ramcli_train.data import resolve_shards

    shards: list[str] = []
    for source in sources:
        path = Path(source)
        nested = sorted(str(p) for p in path.glob("*/*.tar")) if path.is_dir() and not any(path.glob("*.tar")) else []
        shards += nested or resolve_shards(source)
    out: list[Path] = []
    for i, shard in enumerate(shards):
        folder = dest / f"{i:05d}"
        done = folder / ".complete"
        if not done.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            try:
                with tarfile.open(shard) as tar:
                    n = 0
                    for member in tar:
                        suffix = Path(member.name).suffix.lower()
                        if not member.isfile() or suffix not in SHARD_IMAGES:
                            continue
                        data = tar.extractfile(member).read()
                        target = folder / f"{n:07d}{suffix}"
                        target.write_bytes(data)
                        n += 1
            except (tarfile.TarError, OSError) as exc:
                raise RamcliError(f"cannot read shard {Path(shard).name}: {str(exc).splitlines()[0][:160]}") from None
            done.write_text(shard + "\n", encoding="utf-8")
        out += sorted(p for p in folder.iterdir() if p.suffix in SHARD_IMAGES)
    return out


def collect_photos(data: Sequence[str], work: Path) -> tuple[list[Path], dict[str, str]]:
    """(photos, skipped path -> reason) from photo folders/files and shards."""
    from ramcli.media.discover import discover

    if not data:
        raise UsageError("no data: pass --data PHOTOS_OR_SHARDS")
    shards = [d for d in data if is_shard_source(d)]
    photos = unpack_shards(shards, work / SHARD_DIR) if shards else []
    skipped: dict[str, str] = {}
    roots = [Path(d) for d in data if d not in shards]
    for found in discover(roots):
        if found.kind in ("image", "raw"):
            photos.append(found.path)
        elif found.kind in ("error", "link"):  # links are not followed, as in `tag` without --follow-links
            skipped[str(found.path)] = found.reason or "unreadable"
    if not photos:
        raise RamcliError("no photos found in --data")
    return photos, skipped


# ----------------------------------------------------------------------------- the teacher's pass


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


def key_photos(photos: Sequence[Path]) -> tuple[dict[str, Path], dict[str, str]]:
    """(content hash -> photo, unreadable photo -> reason): the same image twice is one sample,
    with one target and one place in the split."""
    keys: dict[str, Path] = {}
    failures: dict[str, str] = {}
    for path in photos:
        try:
            keys.setdefault(content_hash(path), path)
        except ImageError as exc:
            failures[str(path)] = str(exc)
        except OSError as exc:
            failures[str(path)] = exc.strerror or type(exc).__name__
    return keys, failures


@torch.inference_mode()
def teacher_pass(teacher: RecognitionModel, keys: dict[str, Path], store: TeacherStore, device: torch.device,
                 batch_size: int, workers: int, cache=None,
                 on_progress: Callable[[int, int], None] | None = None) -> tuple[TeacherTargets, dict[str, str]]:
    """Run the teacher over the photos `keys` (content hash -> photo) it has not scored yet:
    (every stored target, photos it could not read -> reason). `on_progress(done, to_do)`.

    Photos whose image embeddings are in the embedding cache (`ramcli tag --cache-embeddings`
    with this teacher) only run the recognition decoder."""
    targets = store.load()
    key_of = {p: k for k, p in keys.items()}
    failures: dict[str, str] = {}
    todo = [p for k, p in keys.items() if k not in targets.logits]
    done = 0
    teacher = teacher.to(device).eval()
    cached = [p for p in todo if cache is not None and key_of[p] in cache]
    for start in range(0, len(cached), batch_size):
        chunk = [key_of[p] for p in cached[start:start + batch_size]]
        embeds = cache.get(chunk).to(device, torch.float32)
        _record(store, targets, chunk, teacher.decode(embeds), pooled_embedding(embeds))
        done += len(chunk)
        if on_progress:
            on_progress(done, len(todo))
    in_cache = set(cached)
    for batch in _loader([p for p in todo if p not in in_cache], teacher, batch_size, workers):
        for failure in batch.failures:
            failures[str(failure.path)] = failure.reason
        if batch.items:
            embeds = teacher.encode_image(normalize(batch.pixels.to(device), teacher.arch.data_config))
            chunk = [key_of[item.path] for item in batch.items]
            _record(store, targets, chunk, teacher.decode(embeds), pooled_embedding(embeds))
        done += len(batch.items) + len(batch.failures)
        if on_progress:
            on_progress(done, len(todo))
    return targets, failures


def _loader(paths: list[Path], model: RecognitionModel, batch_size: int, workers: int):
    """Photos decoded as `model` takes them (its size and interpolation), as `ramcli tag` does."""
    return make_loader(paths, model.arch.image_size, batch_size, workers=workers, interpolation=model.arch.interpolation)


def _record(store: TeacherStore, targets: TeacherTargets, keys: list[str], logits: torch.Tensor, embeds: torch.Tensor) -> None:
    store.add(keys, logits, embeds)
    for i, key in enumerate(keys):
        targets.logits[key] = logits[i].float().cpu()
        targets.embeds[key] = embeds[i].float().cpu()


def split(keys: Sequence[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """(train, held-out) by content hash: the same photo always lands on the same side."""
    if not 0 < val_fraction < 1:
        raise UsageError("--val-fraction must be between 0 and 1")
    ordered = sorted(keys)
    held = [k for k in ordered if int(k[:8], 16) / 16**8 < val_fraction]
    if not held and len(ordered) > 1:
        held = [ordered[0]]
    if len(held) == len(ordered):
        held = held[:-1]
    train = [k for k in ordered if k not in set(held)]
    if not train:
        raise RamcliError("too few photos to distil on: at least two are needed (one is held out)")
    return train, held


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
        order = _epoch_order(len(train), cfg.seed, epoch)
        for i in range(0, len(order), cfg.batch_size):
            batch = [train[j] for j in order[i:i + cfg.batch_size]]
            keys += batch
            steps += any(k not in unusable for k in batch)
            if steps >= total:
                break
        epoch += 1
    return list(dict.fromkeys(keys))


# ----------------------------------------------------------------------------- the student


TEACHER_BACKBONE = "teacher"  # `--backbone teacher`: the teacher's own image encoder
#: Peak learning rates: a fresh or pretrained encoder's, and a lower one for an encoder that
#: starts from the teacher's weights, which a higher rate first undoes (docs/distill.md)
LR, INHERITED_LR = 1e-3, 3e-4


def inherits(backbone: str, teacher: RecognitionModel) -> bool:
    """Whether a student on `backbone` is of the teacher's kind, so starts from its encoder."""
    return backbone in (TEACHER_BACKBONE, teacher.arch.backbone)


def teacher_depths(teacher: RecognitionModel) -> tuple[int, ...]:
    """Blocks per stage of the teacher's image encoder: its config's, or, for a timm encoder built
    with its own, counted in the stages timm reports (`feature_info`)."""
    t = teacher.arch
    if not t.backbone:
        return t.swin.depths
    if t.depths:
        return t.depths
    modules = dict(teacher.backbone.named_modules())
    depths = []
    for stage in getattr(teacher.backbone, "feature_info", []):
        module = modules.get(stage["module"])
        blocks = getattr(module, "blocks", module)
        if isinstance(blocks, torch.nn.Sequential):
            depths.append(len(blocks))
    return tuple(depths)


def default_depths(teacher: RecognitionModel) -> tuple[int, ...]:
    """The default student's blocks per stage: half the teacher's in each stage, at least one.
    Stages keep their widths, so every block of the student starts from one of the teacher's."""
    return tuple(max(1, d // 2) for d in teacher_depths(teacher))


def student_arch(teacher: RecognitionModel, backbone: str, image_size: int, hidden: int | None = None,
                 depths: tuple[int, ...] | None = ()) -> ArchConfig:
    """The student's architecture: the image encoder `backbone` (a timm name, or `teacher` for
    the teacher's own, the official Swin included) with `depths` blocks per stage (empty: the
    encoder's own; None: `default_depths` for the teacher's encoder) under the teacher's label
    side, with a decoder `hidden` wide (None: the teacher's)."""
    t = teacher.arch
    decoder = {}
    if hidden is not None and hidden != t.hidden:
        if hidden <= 0 or hidden % t.heads:
            raise UsageError(f"--hidden must be a positive multiple of the teacher's {t.heads} attention heads")
        decoder = dict(hidden=hidden, intermediate=4 * hidden)
    own = inherits(backbone, teacher)
    if depths is None:
        depths = default_depths(teacher) if own else ()
    if own and not t.backbone:  # the official Swin: its depths live in its config
        if depths and len(depths) != len(t.swin.depths):
            raise UsageError(f"--depths needs {len(t.swin.depths)} stages for the teacher's Swin")
        encoder = dict(swin=replace(t.swin, depths=tuple(depths) or t.swin.depths), backbone="", depths=())
    else:
        encoder = dict(swin=None, backbone=t.backbone if own else backbone,
                       depths=tuple(depths) or (t.depths if own else ()))
    name = f"{t.family}_{encoder['backbone'] or 'swin'}_{image_size}"
    return replace(t, name=name, image_size=image_size, **encoder, **decoder)


def flops(arch: ArchConfig) -> int:
    """Floating-point operations of one photo through the model (PyTorch's FLOP counter on a
    skeleton with no weights: exact, instant, and not moved by a busy machine)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = RecognitionModel(arch).eval()
        x = torch.zeros(1, 3, arch.image_size, arch.image_size)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops()


#: A student must need at most this share of the teacher's FLOPs; closer, it is not measurably faster.
MAX_FLOPS_SHARE = 0.9


def check_faster(teacher: ArchConfig, student: ArchConfig) -> float:
    """The student's FLOPs as a share of the teacher's; a `UsageError` when the student would not
    be faster."""
    share = flops(student) / flops(teacher)
    if share > MAX_FLOPS_SHARE:
        raise UsageError(f"the student ({student.encoder}, {student.image_size} px) needs {share:.2f}x the "
                         f"teacher's FLOPs ({teacher.encoder}, {teacher.image_size} px), so it would not be faster: "
                         "choose a smaller one (--depths, --image-size, --hidden or --backbone), or pass --force")
    return share


def build_student(teacher: RecognitionModel, backbone: str, image_size: int, hidden: int | None = None,
                  pretrained: bool = True, depths: tuple[int, ...] | None = ()) -> tuple[RecognitionModel, str]:
    """(student, where its backbone's weights came from), of `student_arch`. Every teacher tensor
    outside the image encoder whose shape fits is copied (the whole decoder when `hidden` is the
    teacher's). An encoder of the teacher's kind starts from the teacher's trained one, block
    by block (`inherit`), which fits the task better than any pretrained weights; another
    starts from timm's pretrained weights when `pretrained` and they can be had."""
    from ramcli_train.model import _init_tagger
    from ramcli_train.pretrained import load_pretrained_backbone

    t = teacher.arch
    arch = student_arch(teacher, backbone, image_size, hidden, depths)
    own = inherits(backbone, teacher)
    student = RecognitionModel(arch, teacher.labels, model_id="student")
    _init_tagger(student, None if t.family == "tag2text" else teacher.label_embed.detach().float())
    copied = inherit(student, teacher, skip=() if own else ("backbone.", "image_proj."))
    if own:
        encoder_tensors = [k for k in student.state_dict() if k.startswith("backbone.")]
        note = (f"backbone {arch.encoder}: {sum(k.startswith('backbone.') for k in copied)} of "
                f"{len(encoder_tensors)} tensors from the teacher's {t.encoder}"
                + (", and its projection" if any(k.startswith("image_proj.") for k in copied) else ""))
    elif pretrained:
        note = load_pretrained_backbone(student).message
    else:
        note = f"backbone {arch.encoder}: random initialisation"
    return student, note


def inherit(student: torch.nn.Module, teacher: torch.nn.Module, skip: tuple[str, ...] = ()) -> list[str]:
    """Copy the teacher's tensors into the student where they sit at the same place with the same
    shape, except those whose names start with `skip`; returns the names copied. Where a stage of
    the student has fewer blocks, its block i starts from the teacher's block
    i * n_teacher // n_student: spread over the stage as DistilBERT takes every other layer of
    BERT, and the first from the first, which is the block that changes the width in most
    encoders."""
    theirs = teacher.state_dict()
    copied = {}
    for name, value in student.state_dict().items():
        source = None if name.startswith(skip) else _counterpart(name, student, teacher)
        if source in theirs and tuple(theirs[source].shape) == tuple(value.shape):
            copied[name] = theirs[source]
    student.load_state_dict(copied, strict=False)
    return list(copied)


def _counterpart(name: str, student: torch.nn.Module, teacher: torch.nn.Module) -> str | None:
    """The teacher's name for the student's tensor `name`, block indices spread as `inherit` says."""
    *path, leaf = name.split(".")
    s, t, out = student, teacher, []
    for part in path:
        mine, theirs = s._modules, t._modules
        if part not in mine:
            return None
        mapped = part
        if part.isdigit() and len(theirs) > len(mine) and all(k.isdigit() for k in theirs):
            mapped = str(int(part) * len(theirs) // len(mine))
        if mapped not in theirs:
            return None
        s, t = mine[part], theirs[mapped]
        out.append(mapped)
    return ".".join([*out, leaf])


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


def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    return torch.randperm(n, generator=g).tolist()


def train_student(cfg: DistillConfig, student: RecognitionModel, train_paths: list[Path], keys: list[str],
                  targets: TeacherTargets, device: torch.device, log, resume: bool,
                  on_step: Callable[[int, int, dict], None] | None = None) -> int:
    """The training loop; returns the number of optimizer steps done. Checkpoints hold the
    student, optimizer, step and position in the epoch, so `resume` continues exactly."""
    from ramcli_train.loop import load_checkpoint, save_checkpoint

    work = cfg.work_dir
    total = total_steps(cfg, len(train_paths))
    student.to(device).train()
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    step, epoch, skip = 0, 0, 0
    if resume:
        state = load_checkpoint(work / CHECKPOINT)
        try:
            student.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError):
            raise RamcliError(f"{work / CHECKPOINT} is not a checkpoint of this student (another --backbone, "
                              "--hidden or teacher?); start without --resume") from None
        step, epoch, skip = state["step"], state["epoch"], state["batch_in_epoch"]
    by_path = dict(zip(train_paths, keys))
    dataset = PhotoDataset(train_paths, student.arch.image_size, interpolation=student.arch.interpolation)

    def checkpoint(batch_in_epoch: int, ep: int) -> None:
        save_checkpoint(work / CHECKPOINT, {"model": student.state_dict(), "optimizer": optimizer.state_dict(),
                                            "step": step, "epoch": ep, "batch_in_epoch": batch_in_epoch})

    while step < total:
        order = _epoch_order(len(train_paths), cfg.seed, epoch)
        batches = [order[i:i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches[skip:], num_workers=cfg.workers,
                                             collate_fn=functools.partial(collate, size=student.arch.image_size))
        done_in_epoch = skip
        for batch in loader:
            done_in_epoch += 1
            usable = [i for i, item in enumerate(batch.items) if by_path[item.path] in targets.logits]
            if not usable:  # photos the teacher could not read either
                continue
            batch_keys = [by_path[batch.items[i].path] for i in usable]
            lr = student_lr(cfg, step, total)
            for group in optimizer.param_groups:
                group["lr"] = lr
            parts = student_loss(student, normalize(batch.pixels[usable].to(device), student.arch.data_config),
                                 torch.stack([targets.logits[k] for k in batch_keys]).to(device),
                                 torch.stack([targets.embeds[k] for k in batch_keys]).to(device), cfg.embed_weight,
                                 cfg.pooled_weight)
            loss = sum(parts.values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            step += 1
            record = {"step": step, "epoch": epoch, "lr": lr, **{k: round(v.item(), 5) for k, v in parts.items()}}
            log(record)
            if on_step:
                on_step(step, total, record)
            if cfg.save_every and step % cfg.save_every == 0:
                checkpoint(done_in_epoch, epoch)
            if step >= total:
                break
        else:
            epoch, skip = epoch + 1, 0
            checkpoint(0, epoch)
            continue
        checkpoint(done_in_epoch, epoch)
    student.eval()
    return step


# ----------------------------------------------------------------------------- evaluation


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
    from ramcli.tagging.pipeline import Tagger

    tagger = Tagger(model, device)
    return [{t.name for t in row} for row in tagger.decide(scores[:, tagger.active])]


@torch.inference_mode()
def student_scores(student: RecognitionModel, paths: list[Path], device: torch.device, batch_size: int,
                   workers: int) -> torch.Tensor:
    rows = []
    for batch in _loader(paths, student, batch_size, workers):
        rows.append(torch.sigmoid(student(normalize(batch.pixels.to(device), student.arch.data_config)).float()).cpu())
    return torch.cat(rows)


@torch.inference_mode()
def speed(model: RecognitionModel, paths: list[Path], device: torch.device, batch_size: int) -> dict:
    """img/s of the model's forward pass (decode excluded) in fp32 on `device`, after one warm-up batch."""
    pixels = torch.cat([b.pixels for b in _loader(paths, model, batch_size, 0)])
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
    if resume and not (work / CHECKPOINT).is_file():
        raise UsageError(f"nothing to resume: {work / CHECKPOINT} does not exist")
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
    from ramcli.models.checkpoint import save_converted

    out = save_converted(student.float(), Path(cfg.out), source=f"ramcli distill from {teacher.model_id}")
    return Report(len(keyed) - len(unusable), skipped, len(taken), len(held_keys), steps, len(targets.logits) - before, note,
                  agree, speeds, out)
