"""`ramcli eval`: mAP / CP / CR / F1 on the official benchmark formats (issue 8)."""

import typer

from ramcli.cli.common import not_built


def register(app: typer.Typer) -> None:
    @app.command(name="eval", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def evaluate(ctx: typer.Context) -> None:
        """Evaluate a model on a benchmark (mAP, CP/CR/F1, per-class AP, calibration)."""
        not_built("eval", "evaluation issue")
