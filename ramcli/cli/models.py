"""`ramcli models`: list, info, pull, import, convert."""

import typer

models_app = typer.Typer(help="The published models: list, pull, import, convert.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(models_app, name="models")
