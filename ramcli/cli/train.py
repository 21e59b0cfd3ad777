"""`ramcli train`, `finetune`, `parse`: the training pipeline (issues 7 and 8)."""

import typer

from ramcli.cli.common import not_built


def register(app: typer.Typer) -> None:
    @app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def train(ctx: typer.Context) -> None:
        """Pretrain RAM on image-caption shards (the paper's full pipeline)."""
        not_built("train", "training issue")

    @app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def finetune(ctx: typer.Context) -> None:
        """Finetune a checkpoint at 384 px on high-quality captions."""
        not_built("finetune", "finetune issue")
