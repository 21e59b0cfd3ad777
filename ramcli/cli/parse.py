"""`ramcli parse`: caption -> tags, the paper's text semantic parsing (issue 7)."""

import typer

from ramcli.cli.common import not_built


def register(app: typer.Typer) -> None:
    @app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def parse(ctx: typer.Context) -> None:
        """Parse a caption into tags of the label system."""
        not_built("parse", "training issue")
