"""Result output of `ramcli tag`: table, json, jsonl or csv, to stdout or a file.

Streaming formats (jsonl, csv) are written and flushed batch by batch, so a killed run keeps
every line it printed; json and table need the whole run and are written at the end.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import IO

from rich.console import Console
from rich.table import Table

from ramcli.errors import UsageError
from ramcli.records import PhotoResult

FORMATS = ("table", "json", "jsonl", "csv")
LANGS = ("en", "zh", "both")


def tag_label(name: str, name_zh: str, lang: str) -> str:
    if lang == "zh":
        return name_zh or name
    if lang == "both":
        return f"{name} ({name_zh})" if name_zh and name_zh != name else name
    return name


class ResultWriter:
    """A sink for PhotoResults in one of FORMATS."""

    def __init__(self, fmt: str, output: Path | None = None, lang: str = "en"):
        if fmt not in FORMATS:
            raise UsageError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
        if lang not in LANGS:
            raise UsageError(f"unknown language {lang!r}; use one of {', '.join(LANGS)}")
        self.fmt, self.lang = fmt, lang
        try:
            self._stream: IO[str] = open(output, "a" if fmt == "jsonl" else "w", encoding="utf-8", newline="") if output else sys.stdout
        except OSError as exc:
            raise UsageError(f"cannot write {output}: {exc.strerror}") from None
        self._owned = output is not None
        self._rows: list[PhotoResult] = []
        self._csv = None
        if fmt == "csv":
            self._csv = csv.writer(self._stream)
            self._csv.writerow(["path", "status", "tags", "scores", "error"])

    def __call__(self, results: list[PhotoResult]) -> None:
        if self.fmt == "jsonl":
            for r in results:
                self._stream.write(json.dumps(r.to_json(), ensure_ascii=False) + "\n")
        elif self.fmt == "csv":
            for r in results:
                self._csv.writerow([
                    r.path, r.status,
                    "|".join(tag_label(t.name, t.name_zh, self.lang) for t in r.tags),
                    "|".join(f"{t.score:.4f}" for t in r.tags), r.error or "",
                ])
        else:
            self._rows.extend(results)
            return
        self._stream.flush()

    def close(self) -> None:
        if self.fmt == "json":
            json.dump([r.to_json() for r in self._rows], self._stream, ensure_ascii=False, indent=2)
            self._stream.write("\n")
        elif self.fmt == "table" and self._rows:
            table = Table("photo", "tags", show_lines=False)
            for r in self._rows:
                tags = ", ".join(f"{tag_label(t.name, t.name_zh, self.lang)} {t.score:.2f}" for t in r.tags)
                table.add_row(r.path, tags if r.status == "tagged" else f"[red]{r.error}[/]")
            Console(file=self._stream, soft_wrap=False).print(table)
        self._stream.flush()
        if self._owned:
            self._stream.close()
