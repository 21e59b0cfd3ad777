"""`ramcli vocab`: the open vocabulary (issue 6)."""

import typer

from ramcli.cli.common import not_built

vocab_app = typer.Typer(help="Manage the tag vocabulary: add open-vocabulary tags, disable, thresholds, synonyms.", no_args_is_help=True)


@vocab_app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def add(ctx: typer.Context) -> None:
    """Add a tag the model never trained on (CLIP text embedding)."""
    not_built("vocab add", "open-vocabulary issue")


def register(app: typer.Typer) -> None:
    app.add_typer(vocab_app, name="vocab")
