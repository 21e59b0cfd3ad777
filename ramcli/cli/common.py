"""Helpers shared by the CLI modules: the console, error output, option types."""

from __future__ import annotations

import sys

from rich.console import Console

from ramcli.errors import NotBuiltError

console = Console()
err_console = Console(stderr=True)


def fail(message: str) -> None:
    """Print a one-line error to stderr (no traceback, no markup surprises)."""
    err_console.print(f"[bold red]error:[/] {message}", markup=True, highlight=False, soft_wrap=True)


def not_built(command: str, issue: str) -> None:
    raise NotBuiltError(f"`ramcli {command}` is not built yet ({issue}).")


def stdout_is_terminal() -> bool:
    return sys.stdout.isatty()
