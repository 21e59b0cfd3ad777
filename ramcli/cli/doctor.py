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
        rows.append(("index", True, str(h.index) + ("" if h.index.exists() else " (not created yet)")))
        table = Table("check", "", "details", show_header=False)
        table.columns[2].overflow = "fold"  # paths are copied into commands: never elide them
        for name, ok, detail in rows:
            table.add_row(name, "[green]ok[/]" if ok else "[red]missing[/]", detail)
        console.print(table)
        if not exif_ok:  # the one thing tagging cannot do without (models download on first use)
            raise typer.Exit(1)
