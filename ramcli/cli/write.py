"""`ramcli write` and `ramcli untag`: tags into the photos' metadata (issue 4)."""

import typer

from ramcli.cli.common import not_built


def register(app: typer.Typer) -> None:
    @app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def write(ctx: typer.Context) -> None:
        """Write the indexed tags into the photos' XMP/IPTC metadata (no model run)."""
        not_built("write", "metadata issue")

    @app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def untag(ctx: typer.Context) -> None:
        """Remove exactly the keywords ramcli added to these photos."""
        not_built("untag", "metadata issue")
