"""`ramcli tag`: the main job (issue 3)."""

import typer

from ramcli.cli.common import not_built


def register(app: typer.Typer) -> None:
    @app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def tag(ctx: typer.Context) -> None:
        """Tag photos and folders."""
        not_built("tag", "tagging issue")
