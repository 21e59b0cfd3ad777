"""The `ramcli` command: registers every sub-command and turns errors into one-line messages.

Every sub-command module imports only Typer, rich and ramcli's light modules at the top; torch,
NumPy, SQLite helpers and the rest are imported inside the commands, so `--help` and a usage
error answer at once.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import threading

import typer

try:  # Typer vendors Click since 0.26
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover - older Typer
    from click import exceptions as click_errors

from ramcli import __version__
from ramcli.cli import distill, doctor, engine, evaluate, labelsys, models, parse, search, tag, train, vocab, watch, write
from ramcli.cli.common import PLAIN, fail
from ramcli.cli.examples import epilog
from ramcli.errors import RamcliError

app = typer.Typer(
    name="ramcli",
    help="Tag a photo library with the Recognize Anything Model family (RAM, RAM++, Tag2Text).",
    no_args_is_help=True,
    add_completion=True,
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
        False, "--version", "-V", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """ramcli: tags for your photos, written where your other tools see them, and searchable."""


for module in (tag, watch, search, write, vocab, labelsys, models, train, distill, parse, evaluate, engine, doctor):
    module.register(app)

#: The panels of `ramcli --help`, in this order.
_PANELS = {
    "Tag and find": ("tag", "watch", "search", "show", "stats", "write", "untag", "index"),
    "Vocabulary, models, set-up": ("vocab", "models", "doctor"),
    "Training and evaluation": ("eval", "train", "finetune", "distill", "engine", "parse", "synth"),
}


def _name(info) -> str | None:
    return info.name or (info.callback.__name__.replace("_", "-") if info.callback else None)


def _decorate(typer_app: typer.Typer, path: str) -> None:
    """Each command's examples (`ramcli.cli.examples`) as its help's epilog."""
    for info in typer_app.registered_commands:
        info.epilog = info.epilog or epilog(f"{path} {_name(info)}".strip())
    for group in typer_app.registered_groups:
        sub = f"{path} {group.name}".strip()
        group.typer_instance.info.epilog = group.typer_instance.info.epilog or epilog(sub)
        _decorate(group.typer_instance, sub)


for info in [*app.registered_commands, *app.registered_groups]:
    info.rich_help_panel = next((panel for panel, names in _PANELS.items() if _name(info) in names), None)
_decorate(app, "")
app.info.epilog = epilog("")


#: How a value is shown in the help: INTEGER, PATH, TEXT as Click always did, nothing for a
#: flag, not the Python type names Typer 0.26+ prints (`<str>`, `<bool>`, `<list[Path]>`).
_PLAIN = {"str": "TEXT", "int": "INTEGER", "float": "NUMBER", "bool": "", "path": "PATH", "file": "FILE",
          "directory": "FOLDER", "Path": "PATH", "int range": "INTEGER", "float range": "NUMBER",
          "integer range": "INTEGER"}
_TYPE_LABEL = re.compile(r"<(?:list\[)?([^<>\[\]]*)\]?>(\.\.\.)?")


def _plain_type(label: str | None) -> str | None:
    match = _TYPE_LABEL.fullmatch(label or "")
    if match is None:
        return label
    inner, more = match.groups()
    if "|" in inner:  # choices
        return f"[{inner}]"
    plain = _PLAIN.get(inner, inner.upper())
    return plain + (more or "") if plain else ""


def _plain_help_types() -> None:
    from typer import core

    for cls in (core.TyperArgument, core.TyperOption):
        original = cls.__dict__.get("display_type_rich") or getattr(cls, "display_type_rich", None)
        if original is None or getattr(original, "plain", False):
            continue

        def display_type_rich(self, ctx, _original=original):
            return _plain_type(_original(self, ctx))

        display_type_rich.plain = True
        cls.display_type_rich = display_type_rich


_plain_help_types()


#: What an unknown option most likely meant, per command.
_HINTS = {"ramcli search": "; to exclude a tag write `not night`, or put the query after `--`: `ramcli search -- dog -night`"}


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point; every failure becomes one line on stderr.

    Exit codes: 0 success, 1 a failure (`error: ...`), 2 a usage error (`error: ...` and where
    to read the usage), 130 interrupted. Set RAMCLI_DEBUG=1 to get the traceback of an
    unexpected error instead.
    """
    if PLAIN:  # the help too
        from typer import rich_utils

        rich_utils.COLOR_SYSTEM = None
    with _noting_ctrl_c() as ctrl_c:
        _run(argv, ctrl_c)


@contextlib.contextmanager
def _noting_ctrl_c():
    """Ctrl-C as Python handles it (a KeyboardInterrupt), remembered while a command runs.

    Ctrl-C reaches ramcli's helper processes too (ExifTool, decode workers), and what their
    death breaks in a background thread or a cleanup can surface before, or instead of, the
    KeyboardInterrupt. Once Ctrl-C was pressed, any failure is the interrupt."""
    pressed = threading.Event()

    def handler(signum, frame):
        pressed.set()
        signal.default_int_handler(signum, frame)

    own = threading.current_thread() is threading.main_thread() and \
        signal.getsignal(signal.SIGINT) is signal.default_int_handler  # not ignored, not a caller's
    if own:
        signal.signal(signal.SIGINT, handler)
    try:
        yield pressed
    finally:
        if own:
            signal.signal(signal.SIGINT, signal.default_int_handler)


def _run(argv: list[str] | None, ctrl_c: threading.Event) -> None:
    try:
        code = app(args=argv, prog_name="ramcli", standalone_mode=False)
    except click_errors.NoArgsIsHelpError as exc:  # `ramcli` or `ramcli vocab` alone: the help
        if exc.format_message().strip():  # rich help is printed already; plain help comes here
            typer.echo(exc.format_message())
        sys.exit(2)
    except click_errors.UsageError as exc:
        where = exc.ctx.command_path if exc.ctx else "ramcli"
        hint = _HINTS.get(where, "") if isinstance(exc, click_errors.NoSuchOption) else ""
        fail(f"{exc.format_message()}{hint} (see `{where} --help`)")
        sys.exit(2)
    except click_errors.ClickException as exc:  # e.g. a file Click was asked to open
        fail(exc.format_message())
        sys.exit(exc.exit_code)
    except typer.Abort:
        _interrupted()
    except RamcliError as exc:
        if ctrl_c.is_set():
            _interrupted()
        fail(str(exc))
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        _interrupted()
    except Exception as exc:
        if ctrl_c.is_set():
            _interrupted()
        if os.environ.get("RAMCLI_DEBUG"):
            raise
        fail(f"internal error: {type(exc).__name__}: {exc} (RAMCLI_DEBUG=1 shows the traceback)")
        sys.exit(1)
    if code == 130:  # Typer turns Ctrl-C inside a command into exit code 130
        _interrupted()
    sys.exit(code if isinstance(code, int) else 0)


def _interrupted() -> None:
    fail("interrupted: re-run to continue (what was done is kept)")
    sys.exit(130)


if __name__ == "__main__":
    main()
