"""`ramcli distill`: a thin layer over ramcli_train.distill (teacher pass, student training,
held-out agreement and speed, export)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from ramcli.cli.common import console, err_console


def _depths(value: str | None) -> tuple[int, ...] | None:
    """`--depths 2,2,6,2` as a tuple of block counts."""
    if value is None:
        return None
    from ramcli.models.configs import MAX_BLOCKS, checked_depths

    try:
        return checked_depths([int(part) for part in value.split(",")])
    except ValueError:
        raise typer.BadParameter(f"give blocks per stage as whole numbers from 1 to {MAX_BLOCKS}, "
                                 "e.g. 2,2,6,2") from None


class ProgressLines:
    """Which progress events become a line: the first and last of a stage, every `every` steps
    and whenever a minute has passed, so that a log (stderr piped to a file, where no bar is
    drawn) shows the run advancing."""

    def __init__(self, every: int, seconds: float = 60.0):
        self.every, self.seconds, self.last = every, seconds, {}

    def line(self, stage: str, done: int, total: int, record: dict | None) -> str | None:
        now = time.monotonic()
        seen = self.last.get(stage)
        every = self.every if stage == "student" else max(1, total // 10)  # the teacher: tenths of its photos
        if seen is not None and done != total and done // every == seen[0] // every and now - seen[1] < self.seconds:
            return None
        self.last[stage] = (done, now)
        if stage == "teacher":
            return f"teacher {done}/{total} photos"
        from ramcli_train.trainer import progress_line

        parts = {k: v for k, v in record.items() if k not in ("step", "epoch", "lr", "img_per_s")}
        return progress_line(done, total, parts, record["lr"], record.get("img_per_s"))


def register(app: typer.Typer) -> None:
    @app.command()
    def distill(
        teacher: str = typer.Option(..., "--teacher", help="The teacher: a weights file or a published name, as `tag --weights`."),
        data: list[str] = typer.Option(..., "--data", help="Photo folders/files, or .tar shards (a folder of them, a brace pattern); repeatable."),
        backbone: str = typer.Option("teacher", "--backbone", help="The student's image encoder: `teacher`, the teacher's own, started from its weights; or a timm name (resnet18, convnext_tiny, efficientnet_b0, mobilenetv4_conv_small, ...)."),
        depths: str | None = typer.Option(None, "--depths", callback=_depths, help="Blocks per stage of the student's encoder, e.g. 1,1,9,1 (default: half the teacher's in each stage, at least 1, with `--backbone teacher`; a timm encoder's own otherwise)."),
        out: Path = typer.Option(..., "--out", help="The student: a tagger .safetensors for `ramcli tag --weights`."),
        image_size: int | None = typer.Option(None, "--image-size", min=32, help="The student's input size (default: the teacher's)."),
        hidden: int | None = typer.Option(None, "--hidden", min=4, help="The student's decoder width (default: the teacher's, whose decoder is copied). Smaller is faster with many tags."),
        epochs: int = typer.Option(10, "--epochs", min=1, help="Passes over the training photos."),
        max_steps: int | None = typer.Option(None, "--max-steps", min=1, help="Stop after this many optimizer steps."),
        batch_size: int = typer.Option(32, "--batch-size", min=1, help="Photos per optimizer step."),
        lr: float | None = typer.Option(None, "--lr", min=0.0, help="Peak learning rate (default 1e-3; 3e-4 for a student that starts from the teacher)."),
        embed_weight: float = typer.Option(1.0, "--embed-weight", min=0.0, help="Weight of the L1 loss to the teacher's pooled image embedding (RAM, RAM++); 0: off."),
        pooled_weight: float = typer.Option(0.0, "--pooled-weight", min=0.0, help="Weight of the pooled-embedding tag loss (RAM, RAM++), for teachers trained with it (`train --preset cpu`); 0: off."),
        val_fraction: float = typer.Option(0.1, "--val-fraction", help="Share of photos held out for the agreement figure."),
        pretrained: bool = typer.Option(True, "--pretrained/--no-pretrained", help="Start the backbone from timm's pretrained weights when they can be had."),
        resume: bool = typer.Option(False, "--resume", help="Continue the student's training from the work folder's checkpoint."),
        device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
        workers: int = typer.Option(0, "--workers", min=0, help="Decode worker processes."),
        labels: Path | None = typer.Option(None, "--labels", help="Label folder of the teacher (as `tag --labels`)."),
        work: Path | None = typer.Option(None, "--work", help="Work folder: teacher outputs, checkpoint, metrics (default: OUT.distill)."),
        report: Path | None = typer.Option(None, "--report", help="Also write the report as JSON here."),
        force: bool = typer.Option(False, "--force", help="Train the student even if it needs about as many FLOPs as the teacher, or more (it would not be faster)."),
        log_every: int = typer.Option(50, "--log-every", min=1, help="A progress line every this many steps (and at least once a minute), also when stderr is a file or a pipe."),
    ) -> None:
        """Distil a tagger into a smaller one on your photos: soft targets + CLIP-space image embedding."""
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        from ramcli_train.distill import DistillConfig
        from ramcli_train.distill import distill as run

        cfg = DistillConfig(teacher=teacher, data=list(data), out=out, backbone=backbone, depths=depths,
                            image_size=image_size,
                            hidden=hidden, epochs=epochs, max_steps=max_steps, batch_size=batch_size, lr=lr,
                            embed_weight=embed_weight, pooled_weight=pooled_weight,
                            val_fraction=val_fraction, pretrained=pretrained, device=device, workers=workers,
                            labels_dir=labels, work=work, force=force)
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TimeElapsedColumn(), console=err_console, transient=True) as bar:
            tasks: dict[str, int] = {}
            lines = ProgressLines(log_every)

            def progress(stage: str, done: int, total: int, record: dict | None) -> None:
                if stage not in tasks:
                    tasks[stage] = bar.add_task(stage, total=total)
                bar.update(tasks[stage], completed=done, total=total)
                line = lines.line(stage, done, total, record)
                if line:  # above the bar on a terminal, a plain line in a log
                    err_console.print(line, highlight=False, markup=False)

            result = run(cfg, resume=resume, progress=progress)
        err_console.print(escape(result.backbone_init), highlight=False, soft_wrap=True)
        if result.skipped:
            err_console.print(f"skipped {len(result.skipped)} photo(s) the teacher could not read:", highlight=False)
            for path, reason in list(result.skipped.items())[:20]:
                err_console.print(f"  {escape(path)}: {escape(reason)}", highlight=False, soft_wrap=True)
            if len(result.skipped) > 20:
                err_console.print(f"  and {len(result.skipped) - 20} more", highlight=False)
        table = Table(title=f"held-out agreement (F1 of tag sets at the teacher's thresholds, "
                            f"{result.agreement['photos']} photos): {result.agreement['f1']:.3f}")
        for column in ("model", "backbone", "input px", "params (M)", "img/s", "ms / img"):
            table.add_column(column, justify="left" if column in ("model", "backbone") else "right")
        for name in ("teacher", "student"):
            s = result.speed[name]
            table.add_row(name, escape(s["backbone"]), str(s["input"]), f"{s['params_millions']:.1f}",
                          f"{s['img_per_s']:.2f}", f"{1000 / s['img_per_s']:.1f}")
        console.print(table)
        console.print(f"student {result.speed['speedup']:.2f}x the teacher's speed ({result.speed['student']['images']} "
                      f"photos, fp32, forward pass only); {result.photos} photos ({result.train} train, "
                      f"{result.held_out} held out), {result.teacher_new} new teacher outputs, {result.steps} steps",
                      highlight=False)
        console.print(f"wrote {escape(str(result.out))}", highlight=False)
        if report is not None:
            report.write_text(json.dumps(result.as_dict(), indent=1) + "\n", encoding="utf-8")
        if result.skipped:  # as `tag`: 1 when some photos could not be read
            raise typer.Exit(1)
