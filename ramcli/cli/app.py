"""The `ramcli` command: registers every sub-command and turns errors into one-line messages."""

from __future__ import annotations

import os
import sys

import typer

from ramcli import __version__
from ramcli.cli import distill, doctor, engine, evaluate, labelsys, models, parse, search, tag, train, vocab, write
from ramcli.cli.common import fail
from ramcli.errors import RamcliError

app = typer.Typer(
    name="ramcli",
    help="Tag a photo library with the Recognize Anything Model family (RAM, RAM++, Tag2Text).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ramcli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """ramcli: tags for your photos, written where your other tools see them, and searchable."""


for module in (tag, search, write, vocab, labelsys, models, train, distill, parse, evaluate, engine, doctor):
    module.register(app)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point; every failure becomes one line on stderr.

    Typer handles usage errors (exit 2) and `typer.Exit` itself in standalone mode; what reaches
    here is ours. Set RAMCLI_DEBUG=1 to get the traceback of an unexpected error instead.
    """
    try:
        app(args=argv, prog_name="ramcli")
    except RamcliError as exc:
        fail(str(exc))
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        fail("interrupted")
        sys.exit(130)
    except Exception as exc:
        if os.environ.get("RAMCLI_DEBUG"):
            raise
        fail(f"internal error: {type(exc).__name__}: {exc} (RAMCLI_DEBUG=1 shows the traceback)")
        sys.exit(1)


if __name__ == "__main__":
    main()
