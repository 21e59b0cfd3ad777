"""`ramcli train` (pretrain RAM / RAM++ / Tag2Text on captioned shards), `ramcli train export`,
and `ramcli finetune`. Thin wrappers over ramcli_train.loop / export / finetune."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from ramcli.cli.common import console
from ramcli.errors import UsageError

train_app = typer.Typer(invoke_without_command=True, no_args_is_help=False,
                        help="Pretrain RAM on image-caption shards (the paper's full pipeline).")


@train_app.callback()
def train(
    ctx: typer.Context,
    data: list[str] = typer.Option(None, "--data", help="Shard folder/.tar/brace pattern, or official JSON files; repeatable."),
    config: Path | None = typer.Option(None, "--config", help="YAML or TOML file of config keys."),
    preset: str | None = typer.Option(None, "--preset", help="cpu (learns on a CPU), cpu_swin, tiny (tests), swin_b or swin_l (default swin_l)."),
    backbone: str | None = typer.Option(None, "--backbone", help="Any timm model as image encoder (resnet50, convnext_tiny, vit_small_patch16_224, ...)."),
    model: str | None = typer.Option(None, "--model", help="Family: ram, ram_plus or tag2text."),
    out: str | None = typer.Option(None, "--out", help="Run folder: checkpoints, metrics.jsonl, config.json."),
    labels: str | None = typer.Option(None, "--labels", help="Label folder (official files) or a tags.txt."),
    epochs: int | None = typer.Option(None, "--epochs", help="Passes over the data (default: the preset's; 5 for swin_l)."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Per process."),
    lr: float | None = typer.Option(None, "--lr", help="Peak learning rate (default: the preset's; 1e-4 for swin_l)."),
    max_steps: int | None = typer.Option(None, "--max-steps", help="Stop after this many optimizer steps."),
    sets: list[str] = typer.Option(None, "--set", help="Any config key: --set warmup_steps=100 (repeatable)."),
    resume: bool = typer.Option(False, "--resume", help="Continue exactly from OUT/checkpoint_last.pt."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved config, sample counts, memory; train nothing."),
    tensorboard: bool = typer.Option(False, "--tensorboard", help="Also write TensorBoard scalars."),
) -> None:
    """Pretrain RAM on image-caption shards (the paper's full pipeline)."""
    if ctx.invoked_subcommand is not None:
        return
    from ramcli_train.config import resolve
    from ramcli_train.loop import plan, train as run

    overrides = dict(data=data or None, preset=preset, family=model, backbone=backbone, out=out, labels=labels, epochs=epochs,
                     batch_size=batch_size, lr=lr, max_steps=max_steps, tensorboard=tensorboard or None)
    cfg = resolve(None, config, overrides, sets)
    if not cfg.data:
        raise UsageError("no training data: pass --data SHARDS (e.g. the folder `ramcli synth` wrote)")
    if dry_run:
        console.print_json(json.dumps(plan(cfg)))
        return
    summary = run(cfg, resume=resume)
    console.print(f"trained {summary['step']} steps; {summary['data']}; checkpoint {summary['checkpoint']}")


@train_app.command("export")
def export(
    checkpoint: Path = typer.Argument(..., help="A training checkpoint (OUT/checkpoint_last.pt)."),
    dst: Path = typer.Argument(..., help="Output file."),
    to: str = typer.Option("tagger", "--to", help="tagger: tag-only .safetensors for `ramcli tag`; official: the official .pth layout."),
    dtype: str = typer.Option("fp32", "--dtype", help="tagger files: fp32, bf16 or fp16."),
) -> None:
    """Export a training checkpoint for `ramcli tag` or the official code."""
    from ramcli_train.export import export_official, export_tagger

    if to == "tagger":
        path = export_tagger(checkpoint, dst, dtype)
    elif to == "official":
        path = export_official(checkpoint, dst)
    else:
        raise UsageError("--to must be tagger or official")
    console.print(f"wrote {path}")


@train_app.command("clip-features")
def clip_features(
    data: list[str] = typer.Option(..., "--data", help="Shard folder/.tar/brace pattern; repeatable."),
    out: Path = typer.Option(..., "--out", help="Folder for the copies of the shards with KEY.clip.npy added.", file_okay=False),
    clip_weights: str | None = typer.Option(None, "--clip-weights", help="CLIP ViT-B/16 weights (default: found like `ramcli vocab` finds them)."),
    clip_model: str = typer.Option("ViT-B-16-quickgelu", "--clip-model", help="open_clip model name (the official teacher: ViT-B-16-quickgelu)."),
    batch_size: int = typer.Option(64, "--batch-size", help="Images per CLIP forward pass."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
) -> None:
    """Precompute the CLIP distillation targets into copies of the shards, for `--set distill=precomputed`."""
    from ramcli.tagging.pipeline import resolve_device
    from ramcli_train.clip_features import precompute
    from ramcli_train.model import ClipTeacher

    teacher = ClipTeacher.load(clip_weights, clip_model, resolve_device(device), require_weights=True)

    def report(r) -> None:
        done = "already written" if r.skipped else f"{r.features} of {r.samples} samples with a feature"
        console.print(f"{Path(r.shard).name}: {done}", highlight=False)

    reports = precompute(data, out, teacher, batch_size, on_shard=report)
    console.print(f"wrote {sum(not r.skipped for r in reports)} shard(s) to {out}; train with "
                  f"--data {out} --set distill=precomputed", highlight=False)


def register(app: typer.Typer) -> None:
    app.add_typer(train_app, name="train")

    @app.command()
    def finetune(
        start: Path = typer.Option(..., "--from", help="Start: a published .pth (training parts included), a tagger .safetensors or a `ramcli train` checkpoint."),
        data: list[str] = typer.Option(..., "--data", help="Shard folder/.tar/brace pattern, or official JSON files; repeatable."),
        out: str = typer.Option("runs/finetune", "--out", help="Run folder."),
        tags: Path | None = typer.Option(None, "--tags", help="New tag list: a `vocab build` folder or a name-a-line file (known tags keep their weights)."),
        add_tag: list[str] = typer.Option(None, "--add-tag", help="Append a tag (repeatable); new tags get CLIP-initialised embeddings."),
        labels: Path | None = typer.Option(None, "--labels", help="Label folder of a published start checkpoint."),
        clip_weights: Path | None = typer.Option(None, "--clip-weights", help="CLIP ViT-B/16 weights for new tags' embeddings."),
        config: Path | None = typer.Option(None, "--config", help="YAML or TOML file of config keys."),
        epochs: int | None = typer.Option(None, "--epochs", help="Default 2."),
        batch_size: int | None = typer.Option(None, "--batch-size", help="Per process; default 26 (Tag2Text 36)."),
        lr: float | None = typer.Option(None, "--lr", help="Default 5e-6, cosine to 0."),
        image_size: int | None = typer.Option(None, "--image-size", help="Default 384 (a timm backbone: its start size)."),
        backbone: str | None = typer.Option(None, "--backbone", help="Move the start model's decoder onto this timm image encoder (pretrained when downloadable)."),
        max_steps: int | None = typer.Option(None, "--max-steps", help="Stop after this many optimizer steps."),
        sets: list[str] = typer.Option(None, "--set", help="Any config key: --set distill=off (repeatable)."),
        resume: bool = typer.Option(False, "--resume", help="Continue from OUT/checkpoint_last.pt."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Prepare the run folder, print the plan, train nothing."),
    ) -> None:
        """Finetune a checkpoint (official recipe: 384 px, lr 5e-6 cosine, 2 epochs), optionally on new tags."""
        from ramcli_train.finetune import finetune as run

        def encoder():
            from ramcli.models.clip_text import load_text_encoder

            return load_text_encoder(clip_weights)

        overrides = dict(epochs=epochs, batch_size=batch_size, lr=lr, image_size=image_size, max_steps=max_steps,
                         backbone=backbone)
        summary = run(start, data, Path(out), tags, add_tag or [], labels, config, overrides, sets or [], encoder,
                      resume=resume, dry_run=dry_run)
        if dry_run:
            console.print_json(json.dumps(summary))
            return
        console.print(f"finetuned {summary['step']} steps; {len(summary['new_tags'])} new tags; {summary['data']}; "
                      f"checkpoint {summary['checkpoint']}", highlight=False)
