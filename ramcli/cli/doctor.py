"""`ramcli doctor`: what is installed, where state lives, what is missing and how to fix it."""

from __future__ import annotations

import os
import shutil
import subprocess

import typer
from rich.table import Table

from ramcli.cli.common import console


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
    from ramcli.index import Index

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


def register(app: typer.Typer) -> None:
    @app.command()
    def doctor() -> None:
        """Check torch/CUDA, ExifTool, models, vocabulary and index; say how to fix what is missing."""
        import torch

        from ramcli import __version__
        from ramcli.config import home
        from ramcli.models import DEFAULT_MODEL
        from ramcli.models.registry import converted_path

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
        rows.append(("home", True, f"{h.root} (RAMCLI_HOME)" if os.environ.get("RAMCLI_HOME") else str(h.root)))
        default = converted_path(h.models, DEFAULT_MODEL)
        models = sorted(p.name for p in h.models.glob("*.safetensors")) if h.models.is_dir() else []
        rows.append(("models", bool(models), ", ".join(models) if models else
                     f"none yet: `ramcli models pull` (or the first `ramcli tag`) fetches {DEFAULT_MODEL} to {default}"))
        labels = os.environ.get("RAMCLI_LABELS")
        rows.append(("labels", True, f"the model file's own, else RAMCLI_LABELS={labels}" if labels else "the model file's own, else the official files shipped with ramcli"))
        rows.append(("vocabulary", True, str(h.vocab) + ("" if h.vocab.exists() else " (empty)")))
        index_ok, index_detail = _index(h.index)
        rows.append(("index", index_ok, index_detail))
        table = Table("check", "", "details", show_header=False)
        table.columns[2].overflow = "fold"  # paths are copied into commands: never elide them
        for name, ok, detail in rows:
            table.add_row(name, "[green]ok[/]" if ok else f"[red]{'broken' if name == 'index' else 'missing'}[/]", detail)
        console.print(table)
        if not (exif_ok and index_ok):  # what tagging cannot do without (models download on first use)
            raise typer.Exit(1)
