"""Helpers shared by the CLI modules: the consoles and one-line error output."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape

console = Console()
err_console = Console(stderr=True)


def fail(message: str) -> None:
    """Print a one-line error to stderr. The message is escaped: paths like `IMG[1].jpg` or a
    `[tag]` in a file name must not be read as rich markup."""
    err_console.print(f"[bold red]error:[/] {escape(message)}", markup=True, highlight=False, soft_wrap=True)
