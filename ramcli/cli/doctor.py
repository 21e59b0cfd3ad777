"""`ramcli doctor`: what is installed, where state lives, what is missing and how to fix it."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from ramcli.cli.common import console


#: What a failed check is called (else "missing").
_PROBLEM = {"index": "broken", "home": "not writable"}


def _exiftool() -> tuple[bool, str]:
    exe = shutil.which("exiftool")
    if exe is None:
        return False, "not found: apt install libimage-exiftool-perl (Debian/Ubuntu), brew install exiftool (macOS), exiftool.org (Windows)"
    try:
        version = subprocess.run([exe, "-ver"], capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"{exe} does not run ({exc})"
    ok = tuple(int(x) for x in version.split(".")[:2]) >= (12, 15)
    return ok, f"{version} at {exe}" + ("" if ok else " (12.15 or newer needed)")


def _index(path) -> tuple[bool, str]:
    """Whether the index opens and SQLite's quick check passes (read-only: doctor changes nothing)."""
    import sqlite3

    from ramcli.errors import RamcliError
    from ramcli.library.index import Index

    if not path.exists():
        return True, f"{path} (not created yet)"
    try:
        with Index.open(path, readonly=True) as index:
            problems = [row[0] for row in index.db.execute("PRAGMA quick_check") if row[0] != "ok"]
    except RamcliError as exc:
        if "needs an upgrade" in str(exc):
            return True, f"{path} (its schema is upgraded by the next `ramcli tag`)"
        return False, f"{exc}"
    except sqlite3.DatabaseError as exc:
        return False, f"the index {path} is damaged ({exc}); move it aside and run `ramcli tag` again to rebuild it"
    if problems:
        return False, (f"the index {path} is damaged ({problems[0]}); `ramcli index check` lists the problems, "
                       "or move it aside and run `ramcli tag` again to rebuild it")
    return True, str(path)


def _writable(root: Path) -> tuple[bool, str]:
    """Whether ramcli can create its state under `root`: the nearest folder that exists takes a
    file (created and removed at once; permission bits alone say nothing to root or on a
    read-only mount)."""
    import tempfile

    existing = root
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return False, f"{root} cannot be created: {existing} is not a folder (set RAMCLI_HOME to a folder you own)"
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        return False, f"{root} is not writable ({exc.strerror or exc}); set RAMCLI_HOME to a folder you own"
    return True, str(root)


def register(app: typer.Typer) -> None:
    @app.command()
    def doctor() -> None:
        """Check torch/CUDA, ExifTool, models, vocabulary and index; say how to fix what is missing.

        Exit code 0 when `ramcli tag` can run as it is; 1 when something is missing (each row says how to fix it).
        """
        import torch

        from ramcli import __version__
        from ramcli.config import home
        from ramcli.models import DEFAULT_MODEL
        from ramcli.models.registry import converted_path, hub_status

        h = home()
        rows: list[tuple[str, bool, str]] = [("ramcli", True, __version__)]
        rows.append(("torch", True, f"{torch.__version__}, {torch.get_num_threads()} CPU threads"))
        if torch.cuda.is_available():
            names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
            rows.append(("CUDA", True, names))
        else:
            rows.append(("CUDA", True, "no GPU: tagging runs on the CPU"))
        exif_ok, exif_detail = _exiftool()
        rows.append(("ExifTool", exif_ok, exif_detail))
        home_ok, home_detail = _writable(h.root)
        rows.append(("home", home_ok, home_detail + (" (RAMCLI_HOME)" if os.environ.get("RAMCLI_HOME") and home_ok else "")))
        default = converted_path(h.models, DEFAULT_MODEL)
        models = sorted(p.name for p in h.models.iterdir() if p.suffix in (".safetensors", ".onnx")) if h.models.is_dir() else []
        if models:
            rows.append(("models", True, ", ".join(models)))
        else:
            hub_ok, hub_detail = hub_status()
            fetch = (f"`ramcli models pull` fetches {DEFAULT_MODEL} (3 GB) to {default}; or" if hub_ok else
                     f"the hub cannot be reached ({hub_detail}):")
            rows.append(("models", False, f"none yet; {fetch} tag with a weights file you have: "
                                          "`ramcli tag --weights FILE.pth PHOTOS`"))
        labels = os.environ.get("RAMCLI_LABELS")
        rows.append(("labels", True, f"the model file's own, else RAMCLI_LABELS={labels}" if labels else "the model file's own, else the official files shipped with ramcli"))
        rows.append(("vocabulary", True, str(h.vocab) + ("" if h.vocab.exists() else " (empty)")))
        index_ok, index_detail = _index(h.index)
        rows.append(("index", index_ok, index_detail))
        table = Table("check", "", "details", show_header=False)
        table.columns[2].overflow = "fold"  # paths are copied into commands: never elide them
        for name, ok, detail in rows:
            table.add_row(name, "[green]ok[/]" if ok else f"[red]{_PROBLEM.get(name, 'missing')}[/]", escape(detail))
        console.print(table)
        if not all(ok for _, ok, _ in rows):
            raise typer.Exit(1)
