"""Helpers shared by the CLI modules: the consoles and one-line error output."""

from __future__ import annotations

import os

import typer
from rich.console import Console
from rich.markup import escape

#: NO_COLOR (https://no-color.org): no colour, and none of the bold and dim either.
PLAIN = bool(os.environ.get("NO_COLOR"))

console = Console(color_system=None) if PLAIN else Console()
err_console = Console(stderr=True, color_system=None) if PLAIN else Console(stderr=True)

#: `--format` of the listing commands that print through a `ramcli.output.Layout`.
LAYOUT_FORMAT_OPTION = typer.Option(None, "--format", "-f", help="table, json, jsonl, csv or tsv (default: table on a terminal, else jsonl).")


def fail(message: str) -> None:
    """Print a one-line error to stderr. The message is escaped: paths like `IMG[1].jpg` or a
    `[tag]` in a file name must not be read as rich markup."""
    err_console.print(f"[bold red]error:[/] {escape(message)}", markup=True, highlight=False, soft_wrap=True)
