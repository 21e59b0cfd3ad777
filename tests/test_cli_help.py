"""Every command's help: examples, a help text for every option, choices listed, no Python type
names, and docs/cli.md generated from it and current."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from ramcli.cli.app import app, main

REPO = Path(__file__).resolve().parents[1]


def _commands(cmd, path=()):
    yield path, cmd
    for name, sub in getattr(cmd, "commands", {}).items():
        yield from _commands(sub, (*path, name))


COMMANDS = list(_commands(typer.main.get_command(app)))
LEAVES = [(path, cmd) for path, cmd in COMMANDS if not getattr(cmd, "commands", None) or path == ("train",)]


def _help(capsys, *path: str) -> str:
    with pytest.raises(SystemExit) as exc:
        main([*path, "--help"])
    assert exc.value.code in (0, None)
    return capsys.readouterr().out


@pytest.mark.parametrize("path", [p for p, _ in LEAVES] + [()], ids=lambda p: " ".join(p) or "ramcli")
def test_every_command_has_examples_and_plain_metavars(path, capsys):
    text = _help(capsys, *path)
    assert "Examples" in text and re.search(r"^\s*ramcli \w", text.split("Examples", 1)[1], re.M)
    assert not re.search(r"<(str|bool|int|float|path|list\[[^>]*\])>", text), text


@pytest.mark.parametrize(("path", "cmd"), LEAVES, ids=lambda v: " ".join(v) if isinstance(v, tuple) else "")
def test_every_option_and_argument_has_help(path, cmd):
    missing = [p.name for p in cmd.params if not getattr(p, "help", None)]
    assert missing == [], f"ramcli {' '.join(path)}: no help for {missing}"


def test_choices_are_listed():
    env = {"PATH": "/usr/bin:/bin", "COLUMNS": "200", "TERMINAL_WIDTH": "200", "PYTHONPATH": str(REPO)}
    text = subprocess.run([sys.executable, "-m", "ramcli", "tag", "--help"], capture_output=True, text=True,
                          env=env, timeout=120).stdout
    for choices in ("[auto|cpu|cuda[:N]|mps]", "[auto|fp32|bf16|fp16|int8|int8-weights|int8-encoder]", "[table|json|jsonl|csv|tsv|paths]",
                    "[auto|workers|draft|device]"):
        assert choices in text


def test_cli_reference_is_current():
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "cli_docs.py")], capture_output=True, text=True,
                          cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout == (REPO / "docs" / "cli.md").read_text(encoding="utf-8"), \
        "docs/cli.md is out of date: run `make docs` (python scripts/cli_docs.py > docs/cli.md)"
