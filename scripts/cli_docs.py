"""Print docs/cli.md: every command's own --help, as a user sees it at a 100-column terminal.

    python scripts/cli_docs.py > docs/cli.md      (`make docs`; tests/test_cli_docs.py checks it)
"""

from __future__ import annotations

import contextlib
import io
import os
import sys

# Before Typer and rich look at the terminal: a fixed width, no colour.
os.environ.update(COLUMNS="100", TERMINAL_WIDTH="100", NO_COLOR="1")
os.environ.pop("FORCE_COLOR", None)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import typer  # noqa: E402

from ramcli.cli.app import app, main  # noqa: E402

HEADER = """# Command-line reference

Generated from the commands' own `--help` by `scripts/cli_docs.py` (`make docs`); a test fails
when it is out of date. Exit codes for every command: 0 success, 1 a failure, 2 a usage error,
130 interrupted.
"""


def commands(cmd, path: tuple[str, ...] = ()):
    yield path
    for name in sorted(getattr(cmd, "commands", {})):
        yield from commands(cmd.commands[name], (*path, name))


def help_text(path: tuple[str, ...]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        main([*path, "--help"])
    return "\n".join(line.rstrip() for line in out.getvalue().splitlines()).strip("\n")


def render() -> str:
    parts = [HEADER]
    for path in commands(typer.main.get_command(app)):
        title = " ".join(("ramcli", *path))
        parts.append(f"## `{title}`\n\n```text\n{help_text(path)}\n```\n")
    return "\n".join(parts)


if __name__ == "__main__":
    sys.stdout.write(render())
