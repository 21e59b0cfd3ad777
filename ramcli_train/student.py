"""The student a distillation trains: its architecture (by default a shallower copy of the
teacher's encoder under the teacher's label side), the weights it starts from, and the check
that it will be faster than its teacher."""

from __future__ import annotations

from dataclasses import replace

import torch

from ramcli.errors import UsageError
from ramcli.models.configs import ArchConfig
from ramcli.models.ram import RecognitionModel


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

