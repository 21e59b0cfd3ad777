"""`ramcli finetune`: the training loop with the official finetune recipe, started from a
published checkpoint or a `ramcli train` checkpoint, optionally on a new or extended tag list.

There is no second loop: finetuning prepares three files in the run folder and hands a
`TrainConfig` to `ramcli_train.loop.train`:

- `init.pt`: the start weights in the trainable layout (tagger + caption branch). From a
  published `.pth` the tagger is mapped by `ramcli.models.checkpoint.map_official` and the
  caption branch by `official_to_ours` beside it; a `ramcli train` checkpoint is used as is. Swin's
  relative-position tables are resized when the window changes (224 px pretraining, window 7
  -> 384 px finetuning, window 12), as the official finetune does.
- `labels/` (official layout) and `label_embed.safetensors`: the tag list of the run.

Tag lists: every tag the start model knows keeps its rows (label query, Tag2Text classifier);
a tag it does not know gets its CLIP text embedding (RAM: the ensemble of the 63 official
prompts; RAM++: the first D prompt embeddings, as `ramcli train` does) or, from a label system
that `ramcli vocab build` wrote, the embedding stored there. The official finetune starts new
tags at zero: frozen zero queries are all the same vector, so those tags cannot be told apart
and never learn. Tag2Text's queries are learned: new ones start
random, as its training does.

Defaults (official `finetune.yaml`): 384 px, lr 5e-6 with per-epoch cosine to 0, 2 epochs,
batch 26 per GPU (Tag2Text 36), no warmup. Everything can be overridden like `ramcli train`.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from ramcli.models.clip_text import ClipTextEncoder, ensemble
from ramcli.errors import CheckpointError, UsageError
from ramcli.models.labels import RAM_DEFAULT_THRESHOLD, LabelSet, resolve_labels
from ramcli.models.configs import CLIP_DIM, SWIN_B_224, SWIN_B_384, SWIN_L_224, SWIN_L_384, SWIN_TINY_TEST, ArchConfig
from ramcli.models.safeload import load_weights
from ramcli.tagging.tag_names import name_key
from ramcli_train.config import CPU_SWIN, PRESETS, TrainConfig, read_config_file, resolve

INIT_FILE = "init.pt"
LABEL_DIR = "labels"
LABEL_EMBED_FILE = "label_embed.safetensors"

#: the official finetune recipe (ram/configs/finetune.yaml); batch is per process
FINETUNE_DEFAULTS = dict(image_size=384, lr=5e-6, min_lr=0.0, schedule="cosine", epochs=2, batch_size=26,
                         pretrained_backbone=False)
TAG2TEXT_BATCH = 36
#: structural and run-style keys a `ramcli train` checkpoint passes on to its finetune
INHERITED_KEYS = ("family", "preset", "caption_layers", "caption_heads", "tokenizer_vocab", "prompt",
                  "prepend_prompt", "clip_model", "clip_weights", "distill", "alignment", "amp", "num_workers",
                  "log_every", "save_every", "seed")
_PRESET_OF_SWIN = {SWIN_L_224: "swin_l", SWIN_L_384: "swin_l", SWIN_B_224: "swin_b", SWIN_B_384: "swin_b",
                   SWIN_TINY_TEST: "tiny", CPU_SWIN: "cpu_swin"}


# ----------------------------------------------------------------------------- the start point


@dataclass
class StartPoint:
    """What a start checkpoint provides, in the trainable layout (keys of `TrainableRAM`)."""

    arch: ArchConfig
    labels: LabelSet
    tagger: dict[str, torch.Tensor]  # RecognitionModel state (no "tagger." prefix)
    caption: dict[str, torch.Tensor]  # CaptionGenerator state (no "caption." prefix); empty if none
    config: dict = field(default_factory=dict)  # TrainConfig keys to inherit
    tokenizer: Path | None = None  # the run's tokenizer.json of a `ramcli train` checkpoint
    source: str = ""


def read_start_point(path: Path, labels_dir: Path | None = None) -> StartPoint:
    """A `ramcli train` checkpoint, a published/official `.pth` (training parts included) or a
    converted tagger `.safetensors` (tag-only: the caption branch then starts fresh)."""
    from ramcli.models.checkpoint import load_official, read_official
    from ramcli.models.converted import is_converted, load_converted, read_converted_metadata
    from ramcli.models.configs import infer_family

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--from: no such file: {path} (a published .pth, a tagger .safetensors or a `ramcli train` checkpoint)")
    if is_converted(path):
        meta = read_converted_metadata(path)
        labels = resolve_labels(ArchConfig.from_json(meta["arch"]).family, labels_dir=labels_dir,
                                embedded=LabelSet.from_metadata(meta))
        model = load_converted(path, labels=labels)
        return StartPoint(model.arch, model.labels, model.state_dict(), {}, {"family": model.arch.family},
                          source=path.name)
    obj = load_weights(path, mmap=True)
    if isinstance(obj, dict) and {"model", "arch", "labels", "config"} <= set(obj):
        return _from_training_checkpoint(path, obj)
    sd = read_official(path)
    family = infer_family(sd)
    labels = resolve_labels(family, labels_dir=labels_dir)
    tagger = load_official(path, labels=labels, sd=sd)
    caption = _official_caption_state(sd)
    config: dict = {"family": family}
    if caption:
        from ramcli.models.checkpoint import infer_caption_config

        config["caption_layers"] = infer_caption_config(sd).layers
    return StartPoint(tagger.arch, tagger.labels, tagger.state_dict(), caption, config, source=path.name)


def _from_training_checkpoint(path: Path, ckpt: dict) -> StartPoint:
    arch = ArchConfig.from_json(ckpt["arch"])
    labels = LabelSet.from_metadata(ckpt["labels"])
    model = ckpt["model"]
    tagger = {k[len("tagger."):]: v for k, v in model.items() if k.startswith("tagger.")}
    caption = {k[len("caption."):]: v for k, v in model.items() if k.startswith("caption.")}
    config = {k: v for k, v in ckpt["config"].items() if k in INHERITED_KEYS}
    tokenizer = path.parent / "tokenizer.json"
    return StartPoint(arch, labels, tagger, caption, config, tokenizer if tokenizer.is_file() else None,
                      source=f"{path.parent.name}/{path.name}")


def _official_caption_state(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from ramcli.models.checkpoint import official_to_ours

    return {ours: v for k, v in sd.items() if (ours := official_to_ours(k)) is not None}


def preset_of(arch: ArchConfig) -> str:
    """The `ramcli train` preset that rebuilds `arch` (with `backbone` set for a timm encoder)."""
    if arch.backbone:
        for preset in PRESETS:
            cfg = TrainConfig(family=arch.family, preset=preset, image_size=arch.image_size, backbone=arch.backbone)
            if replace(cfg.arch(arch.num_classes), name=arch.name) == arch:
                return preset
        raise CheckpointError(f"the start model's decoder (width {arch.hidden}) is not one `ramcli train` can build")
    preset = _PRESET_OF_SWIN.get(arch.swin)
    if preset is None:
        raise CheckpointError(f"the start model's backbone (Swin width {arch.swin.embed_dim}, window "
                              f"{arch.swin.window_size}) is not one `ramcli train` can build")
    return preset


# ----------------------------------------------------------------------------- the tag list


@dataclass
class TagPlan:
    """The run's label set; for each class the start model's index, or None for a new tag."""

    labels: LabelSet
    source_index: list[int | None]
    provided: dict[int, torch.Tensor]  # new class -> a stored RAM query (from a label system)

    @property
    def new_names(self) -> list[str]:
        return [n for n, s in zip(self.labels.names, self.source_index) if s is None]


def plan_tags(start: LabelSet, tags: Path | None = None, add_tags: Sequence[str] = ()) -> TagPlan:
    """`tags`: the full new list (a label-system folder or a one-name-a-line file); `add_tags`:
    names appended. Known tags keep the start model's thresholds and rows."""
    names: list[str] = list(start.names)
    thresholds: dict[str, float] = {}
    stored: dict[str, torch.Tensor] = {}
    if tags is not None:
        tags = Path(tags)
        if tags.is_dir():
            from ramcli_train.label_system import LabelSystem

            system = LabelSystem.load(tags)
            names = list(system.names)
            thresholds = dict(zip(map(name_key, system.names), system.thresholds))
            if system.embeddings is not None:
                stored = {name_key(n): system.embeddings[i] for i, n in enumerate(system.names)}
        elif tags.is_file():
            from ramcli_train.label_system import read_name_list

            names = read_name_list(tags)
        else:
            raise UsageError(f"--tags: no such file or folder: {tags}")
    names += list(add_tags)
    index = {name_key(n): i for i, n in enumerate(start.names)}
    seen: set[str] = set()
    out_names, out_zh, out_thr, source = [], [], [], []
    provided: dict[int, torch.Tensor] = {}
    for name in names:
        key = name_key(name)
        if not key or key in seen:
            continue
        seen.add(key)
        i = index.get(key)
        out_names.append(start.names[i] if i is not None else " ".join(name.split()))
        out_zh.append(start.names_zh[i] if i is not None else out_names[-1])
        default = start.thresholds[i] if i is not None else RAM_DEFAULT_THRESHOLD
        out_thr.append(thresholds.get(key, default))
        source.append(i)
        if i is None and key in stored:
            provided[len(out_names) - 1] = stored[key]
    if not out_names:
        raise UsageError("the tag list is empty")
    deleted = frozenset(j for j, s in enumerate(source) if s is not None and s in start.deleted)
    return TagPlan(LabelSet(tuple(out_names), tuple(out_zh), tuple(out_thr), deleted), source, provided)


def new_tag_queries(plan: TagPlan, arch: ArchConfig, encoder_loader: Callable[[], ClipTextEncoder] | None
                    ) -> dict[int, torch.Tensor]:
    """CLIP-space rows of every new class: (D, 512) each (D = descriptions per class)."""
    family, d = arch.family, arch.descriptions_per_class
    todo = [j for j, s in enumerate(plan.source_index) if s is None]
    if family == "tag2text" or not todo:
        return {}
    out: dict[int, torch.Tensor] = {j: plan.provided[j].expand(d, CLIP_DIM).clone() for j in todo if j in plan.provided}
    missing = [j for j in todo if j not in out]
    if missing:
        if encoder_loader is None:
            raise UsageError(f"{len(missing)} new tag(s) need CLIP text embeddings ({plan.labels.names[missing[0]]!r} "
                             "...): pass --clip-weights, or a label system from `ramcli vocab build` as --tags")
        encoder = encoder_loader()
        for j in missing:
            t = encoder.template_embeddings(plan.labels.names[j])
            out[j] = ensemble(t)[None] if family == "ram" else t[:d]
    return out


def remap_tagger(state: dict[str, torch.Tensor], arch: ArchConfig, plan: TagPlan,
                 queries: dict[int, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """The tagger state on the new tag list: known classes copy their rows, new ones get
    `queries` (RAM/RAM++) or a fresh learned query and classifier row (Tag2Text)."""
    out = dict(state)
    c = len(plan.labels)
    g = torch.Generator().manual_seed(seed)
    if arch.family == "tag2text":
        hidden = arch.hidden
        bound = 1 / math.sqrt(hidden)
        embed = torch.randn(c, hidden, generator=g)
        weight = (torch.rand(c, hidden, generator=g) * 2 - 1) * bound
        bias = (torch.rand(c, generator=g) * 2 - 1) * bound
        for j, s in enumerate(plan.source_index):
            if s is not None:
                embed[j], weight[j], bias[j] = state["label_embed"][s], state["fc_weight"][s], state["fc_bias"][s]
        out.update(label_embed=embed, fc_weight=weight, fc_bias=bias)
        return out
    d = arch.descriptions_per_class
    table = state["label_embed"].view(-1, d, CLIP_DIM)
    rows = torch.empty(c, d, CLIP_DIM)
    for j, s in enumerate(plan.source_index):
        rows[j] = table[s] if s is not None else queries[j].to(rows.dtype)
    out["label_embed"] = rows.reshape(c * d, CLIP_DIM)
    return out


# ----------------------------------------------------------------------------- config


def finetune_config(start: StartPoint, data: Sequence[str], out: Path, config_file: Path | None = None,
                    overrides: dict | None = None, sets: Sequence[str] = ()) -> TrainConfig:
    """Layers, later wins: the start run's config -> the official finetune defaults -> the config
    file -> command-line options -> --set key=value."""
    preset = preset_of(start.arch)
    defaults = dict(FINETUNE_DEFAULTS)
    if start.arch.family == "tag2text":
        defaults["batch_size"] = TAG2TEXT_BATCH
    if preset == "tiny" or start.arch.backbone:  # the tiny Swin has one size; a timm encoder keeps its own
        defaults["image_size"] = start.arch.image_size
    layers = {**start.config, "family": start.arch.family, "preset": preset, "backbone": start.arch.backbone,
              **defaults,
              **(read_config_file(config_file) if config_file else {}),
              **{k: v for k, v in (overrides or {}).items() if v is not None},
              "data": list(data), "out": str(out)}
    cfg = resolve(None, None, layers, list(sets))
    if cfg.family != start.arch.family:
        raise UsageError(f"the start model is {start.arch.family}; finetuning cannot change the family to {cfg.family}")
    return cfg


# ----------------------------------------------------------------------------- preparing and running


@dataclass
class Prepared:
    config: TrainConfig
    plan: TagPlan
    start: StartPoint


def prepare(start: StartPoint, cfg: TrainConfig, plan: TagPlan,
            encoder_loader: Callable[[], ClipTextEncoder] | None = None) -> Prepared:
    """Write init.pt, labels/ and label_embed.safetensors into the run folder; return the
    config that points the training loop at them."""
    from ramcli_train.label_system import write_label_files
    from ramcli_train.build import build_model, build_tokenizer
    from ramcli_train.sources import split_data_paths

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    queries = new_tag_queries(plan, start.arch, encoder_loader)
    tagger = remap_tagger(start.tagger, start.arch, plan, queries, cfg.seed)
    labels_path = out / LABEL_DIR
    if start.arch.family == "tag2text":
        labels_path = out / "tags.txt"  # the official tag2text file layout implies the official deleted ids
        labels_path.write_text("\n".join(plan.labels.names) + "\n", encoding="utf-8")
    else:
        write_label_files(labels_path, plan.labels)
    # a new backbone (`--backbone`) starts from its pretrained weights; the start model's decoder stays
    new_backbone = cfg.backbone != start.arch.backbone
    cfg = replace(cfg, labels=str(labels_path), init_from=None, pretrained_backbone=new_backbone)
    if start.arch.family != "tag2text":
        save_file({"label_embed": tagger["label_embed"].float().contiguous()}, str(out / LABEL_EMBED_FILE))
        cfg = replace(cfg, label_embed=str(out / LABEL_EMBED_FILE))
    if start.tokenizer is not None:
        cfg = replace(cfg, tokenizer=str(start.tokenizer))
    train_paths, _ = split_data_paths(cfg)
    tokenizer = build_tokenizer(cfg, train_paths, out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_model(cfg, plan.labels, tokenizer)
    if new_backbone:  # what does not fit the new encoder's width (its projection) starts fresh
        own = model.tagger.state_dict()
        tagger = {k: v for k, v in tagger.items() if not k.startswith("backbone.") and k in own
                  and tuple(v.shape) == tuple(own[k].shape)}
        tagger.update({k: v for k, v in own.items() if k not in tagger})
    state = _assemble(model, tagger, start)
    torch.save(state, out / INIT_FILE)
    (out / "finetune.json").write_text(json.dumps({
        "from": start.source, "classes": len(plan.labels), "new_tags": plan.new_names,
        "new_tag_init": "learned (random)" if start.arch.family == "tag2text" else "CLIP text embeddings",
        "caption_branch": "from the start model" if start.caption else ("fresh" if model.caption else "none"),
        "backbone": model.backbone_init,
    }, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return Prepared(replace(cfg, init_from=str(out / INIT_FILE)), plan, start)


def _assemble(model, tagger: dict[str, torch.Tensor], start: StartPoint) -> dict[str, torch.Tensor]:
    """The start weights on the target model's keys and shapes; a clear error where they differ."""
    from timm.models.swin_transformer import checkpoint_filter_fn

    backbone = {k[len("backbone."):]: v for k, v in tagger.items() if k.startswith("backbone.")}
    if not model.arch.backbone:  # the official Swin: window change, relative-position tables resized
        backbone = checkpoint_filter_fn(backbone, model.tagger.backbone)
    weights = {**{f"tagger.{k}": v for k, v in tagger.items() if not k.startswith("backbone.")},
               **{f"tagger.backbone.{k}": v for k, v in backbone.items()}}
    expected = model.state_dict()
    caption_keys = [k for k in expected if k.startswith("caption.")]
    if start.caption:
        weights.update({f"caption.{k}": v for k, v in start.caption.items()})
    elif caption_keys:
        warnings.warn(f"{start.source} has no caption branch: it starts from random weights", stacklevel=3)
        weights.update({k: expected[k] for k in caption_keys})
    # tied tensors (tag encoder layers = recognition decoder layers) come under both names
    for k in caption_keys:
        if k not in weights and k in expected:
            weights[k] = expected[k]
    missing = [k for k in expected if k not in weights]
    if missing:
        raise CheckpointError(f"{start.source} lacks {len(missing)} tensor(s) the model needs, e.g. {missing[0]}")
    for k, v in expected.items():
        if tuple(weights[k].shape) != tuple(v.shape):
            hint = " (the caption branch: pass --set tokenizer=... / caption_heads=... to match it)" if k.startswith("caption.") else ""
            raise CheckpointError(f"{start.source}: {k} has shape {tuple(weights[k].shape)}, the model needs "
                                  f"{tuple(v.shape)}{hint}")
    return {k: weights[k].to(v.dtype).contiguous() for k, v in expected.items()}


def finetune(start_path: Path, data: Sequence[str], out: Path, tags: Path | None = None, add_tags: Sequence[str] = (),
             labels_dir: Path | None = None, config_file: Path | None = None, overrides: dict | None = None,
             sets: Sequence[str] = (), encoder_loader: Callable[[], ClipTextEncoder] | None = None,
             resume: bool = False, dry_run: bool = False) -> dict:
    """Prepare the run folder and train with `ramcli_train.loop.train`; returns its summary
    plus `new_tags` (or, with `dry_run`, the plan)."""
    from ramcli_train.loop import plan as loop_plan
    from ramcli_train.loop import train

    if not data:
        raise UsageError("no finetuning data: pass --data SHARDS")
    start = read_start_point(Path(start_path), labels_dir)
    cfg = finetune_config(start, data, Path(out), config_file, overrides, sets)
    tag_plan = plan_tags(start.labels, tags, add_tags)
    prepared = prepare(start, cfg, tag_plan, encoder_loader)
    if dry_run:
        return {**loop_plan(prepared.config), "new_tags": tag_plan.new_names}
    summary = train(prepared.config, resume=resume)
    return {**summary, "new_tags": tag_plan.new_names}
