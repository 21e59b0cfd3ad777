"""`ramcli engine`: the data engine, generate and clean (issue 8)."""

import typer

from ramcli.cli.common import not_built

engine_app = typer.Typer(help="The data engine: generate missing tags, clean wrong ones.", no_args_is_help=True)


@engine_app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def generate(ctx: typer.Context) -> None:
    """Run a baseline model over shards and add generated tags."""
    not_built("engine generate", "data-engine issue")


def register(app: typer.Typer) -> None:
    app.add_typer(engine_app, name="engine")
