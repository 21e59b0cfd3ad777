"""`ramcli search`, `show`, `stats`, `index`: the SQLite index (issue 5)."""

import typer

from ramcli.cli.common import not_built


def register(app: typer.Typer) -> None:
    @app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def search(ctx: typer.Context) -> None:
        """Find photos by tag: `ramcli search dog`, `dog OR cat`, `dog -night`."""
        not_built("search", "SQLite index issue")

    @app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def show(ctx: typer.Context) -> None:
        """Show one photo's tags, scores and what was written where."""
        not_built("show", "SQLite index issue")
