"""`ramcli search`, `show`, `stats`, `index prune|check|merge`: thin wrappers over ramcli.library."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import sys
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import typer
from rich.markup import escape
from rich.table import Column

from ramcli import config
from ramcli.cli.common import console, err_console
from ramcli.errors import RamcliError, UsageError
from ramcli.output import FORMATS, Layout, cell_columns, default_format, make_table, photo_cells, write_json, write_records
from ramcli.pathnames import display
from ramcli.tagging.records import HIT_FIELDS, SHOWN, iso_time, photo_json

if TYPE_CHECKING:
    from ramcli.library.index import Index
    from ramcli.library.search import Hit

index_app = typer.Typer(help="Maintain the index: forget missing files, check integrity, merge indexes.", no_args_is_help=True)

IndexOption = typer.Option(None, "--index", help="Index file (default: the one in RAMCLI_HOME).", show_default=False)


Format = Enum("Format", {f: f for f in FORMATS}, type=str)


@contextlib.contextmanager
def _opened(path: Path | None, readonly: bool) -> Iterator[Index]:
    """Open the index; any SQLite failure on the way becomes a one-line error."""
    from ramcli.library.database import database_error
    from ramcli.library.index import Index

    resolved = path or config.home().index
    try:
        with Index.open(resolved, readonly=readonly) as index:
            yield index
    except sqlite3.DatabaseError as exc:
        raise database_error(resolved, exc) from exc


def _iso_date(value: str | None, option: str) -> str | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise UsageError(f"{option} wants a date like 2024-05-31 or 2024-05-31T18:00, not '{value}'") from None
    return value if len(value) == 10 else parsed.isoformat()


def _query_text(words: list[str]) -> str:
    """One argument is a whole query; several are shell words, where a word with spaces was quoted."""
    if len(words) == 1:
        return words[0]
    return " ".join(f'"{w}"' if len(w.split()) > 1 and '"' not in w else w for w in words)


def _firsts(items) -> list[bool]:
    """For each item, whether it differs from the one before (a group's first row)."""
    items = list(items)
    return [i == 0 or items[i] != items[i - 1] for i in range(len(items))]


def _written_file(target: str, photo: str, first: bool) -> str:
    """A file cell of `show`'s table: the photo itself, or a sidecar by its name beside it;
    named on its first row only."""
    if not first:
        return ""
    if target == photo:
        return "(the photo)"
    return display(os.path.basename(target)) if os.path.dirname(target) == os.path.dirname(photo) else display(target)


def _score(score: float | None) -> str:
    return "" if score is None else f"{score:.3f}"


PATHS = Layout(columns=("path",), row=lambda p: [p], json=lambda p: {"path": p}, path=lambda p: p)

HITS = Layout(
    columns=cell_columns(HIT_FIELDS),
    row=lambda h: photo_cells(h, HIT_FIELDS),
    json=lambda h: photo_json(h, HIT_FIELDS),
    path=lambda h: h.path,  # the real bytes
)


def _table_layout(hits: list[Hit]) -> Layout:
    """The table: the first 8 tags, and a caption column only when some hit has a caption."""
    captions = any(h.caption for h in hits)
    columns = (Column("score", justify="right"), Column("photo", overflow="fold"), "taken", "tags",
               *([Column("caption", overflow="fold")] if captions else []))
    return replace(HITS, table_columns=columns, table_row=lambda h: [
        _score(h.score), display(h.path), (iso_time(h.taken_at) or "")[:10], ", ".join(t.name for t in h.tags[:8]),
        *([h.caption] if captions else [])])


def _print_hits(hits: list[Hit], fmt: Format, null: bool, truncated: bool) -> None:
    layout = _table_layout(hits) if fmt is Format.table else HITS
    write_records(hits, fmt.value, layout, null=null)
    if fmt is Format.table:
        more = " (more with --limit 0)" if truncated else ""
        err_console.print(f"{len(hits)} photo{'s' if len(hits) != 1 else ''}{more}", highlight=False)


ShowFormat = Literal["table", "json", "jsonl"]
Lang = Literal["en", "zh", "both"]


def _name_columns(lang: str) -> tuple[str, ...]:
    return {"en": ("tag",), "zh": ("标签",), "both": ("tag", "中文")}[lang]


def _names(name: str, name_zh: str | None, lang: str) -> tuple[str, ...]:
    zh = name_zh or name
    return {"en": (name,), "zh": (zh,), "both": (name, zh)}[lang]


def _find(index: Index, photo: Path):
    """The photo's record: by its path, else (a bare file name) by that name anywhere in the index."""
    record = index.lookup(str(photo))
    if record is None and os.sep not in str(photo) and not photo.exists():
        matches = index.find_by_name(str(photo))
        if len(matches) > 1:
            raise UsageError(f"{len(matches)} photos in the index are called {display(str(photo))}: give the path of "
                             f"one, e.g. {display(matches[0])}")
        record = index.lookup(matches[0]) if matches else None
    if record is None:
        raise RamcliError(f"{display(str(photo))} is not in the index: tag it with `ramcli tag {display(str(photo))}`")
    return record


def register(app: typer.Typer) -> None:
    @app.command()
    def search(
        query: list[str] = typer.Argument(None, metavar="QUERY", help='Tags: `dog beach`, `dog OR cat`, `dog not night` (or NOT, or -night after --), `"christmas tree"`; where a tag is named "not", `not` is that tag. Optional with --caption.', show_default=False),
        caption: str = typer.Option(None, "--caption", help='Words that must all be in the caption (Tag2Text, `tag --caption`); "quoted phrases" kept in order.'),
        min_score: float = typer.Option(0.0, "--min-score", help="Count a tag only at this score or above (0-1)."),
        limit: int = typer.Option(None, "--limit", help="At most this many hits, best first; 0 = all. [default: 50 for table, all otherwise]", show_default=False),
        since: str = typer.Option(None, "--since", help="Taken on or after this date (YYYY-MM-DD)."),
        until: str = typer.Option(None, "--until", help="Taken on or before this date (YYYY-MM-DD)."),
        folder: Path = typer.Option(None, "--in", help="Only photos under this folder.", file_okay=False),
        fmt: Format = typer.Option(None, "--format", "-f", help="(default: table on a terminal, else jsonl)", show_default=False),
        null: bool = typer.Option(False, "-0", "--null", help="With --format paths: end each path with NUL (for xargs -0)."),
        gallery: Path = typer.Option(None, "--gallery", help="Also write a static HTML page with thumbnails of the hits.", dir_okay=False),
        index_path: Path = IndexOption,
    ) -> None:
        """Find photos by tag or caption. Exit 0 with hits, 1 without, 2 on a bad query."""
        fmt = Format(fmt.value if fmt else default_format())
        if not query and caption is None:
            raise UsageError('give tags, --caption TEXT or both, e.g. `ramcli search dog` or `ramcli search --caption "on a beach"`')
        query_text = _query_text(query) if query else ""
        if limit is not None and limit < 0:
            raise UsageError("--limit must be 0 (all) or more")
        wanted = (50 if fmt is Format.table else None) if limit is None else (limit or None)
        from ramcli.library.index import normalize_path
        from ramcli.library.search import Filters, search as run_search

        filters = Filters(min_score=min_score, since=_iso_date(since, "--since"), until=_iso_date(until, "--until"),
                          under=Path(normalize_path(folder)) if folder else None, caption=caption)
        with _opened(index_path, readonly=True) as index:
            hits = run_search(index, query_text, limit=None if wanted is None else wanted + 1,
                              filters=filters, with_tags=fmt is not Format.paths or gallery is not None)
            truncated = wanted is not None and len(hits) > wanted
            hits = hits[:wanted]
        _print_hits(hits, fmt, null, truncated)
        if gallery is not None:
            from ramcli.library.gallery import write_gallery

            title = " ".join([query_text, *([f"--caption {caption}"] if caption is not None else [])])
            write_gallery(hits, gallery, title=f"ramcli search {title}".strip())
            err_console.print(f"gallery: {gallery} ({len(hits)} photos)", highlight=False)
        if not hits:
            sys.exit(1)  # like grep; SystemExit because the entry point drops a returned exit code

    @app.command()
    def show(photo: Path = typer.Argument(..., help="A photo in the index: its path, or its file name alone."),
             fmt: ShowFormat = typer.Option(None, "--format", "-f", help="(default: table on a terminal, else jsonl)", show_default=False),
             lang: Lang = typer.Option("en", "--lang", help="Tag names in English, Chinese or both."),
             index_path: Path = IndexOption) -> None:
        """Show one photo's tags, scores and what was written where."""
        from ramcli.library.ledger import Ledger

        with _opened(index_path, readonly=True) as index:
            record = _find(index, photo)
            record.tags = index.photo_tags(record.path)
            ledger = Ledger(index.db).entries(record.path)
        written: dict[tuple[str, str], list] = {}
        for e in ledger:
            written.setdefault((e.target, e.field), []).append(e)
        shown = {f: v for f, v in photo_json(record, SHOWN).items() if v is not None}
        if (fmt or default_format()) != "table":
            data = {**photo_json(record, ("path",)), **shown, **photo_json(record, ("tags",)),
                    "written": [{"file": display(target), "field": field, "values": [e.value for e in entries],
                                 "ours": [not e.preexisting for e in entries]}
                                for (target, field), entries in written.items()]}
            if fmt == "json":
                write_json(data, sys.stdout)
            else:
                sys.stdout.write(json.dumps(data, ensure_ascii=False) + "\n")
            return
        console.print(display(record.path), style="bold", highlight=False, markup=False, soft_wrap=True)
        for field, value in shown.items():
            console.print(f"  {field:<13} {value}", highlight=False, markup=False, soft_wrap=True)
        console.print(make_table((*_name_columns(lang), Column("score", justify="right")),
                                 ((*_names(t.name, t.name_zh, lang), f"{t.score:.3f}") for t in record.tags), title="tags"))
        if written:
            console.print(make_table(
                [Column("file", overflow="fold"), "field", Column("values", overflow="fold")],
                ((_written_file(target, record.path, first), field,
                  ", ".join(e.value + ("" if not e.preexisting else " (was there)") for e in entries))
                 for first, ((target, field), entries) in zip(_firsts(t for t, _ in written), written.items())),
                title="written to metadata"))
        else:
            console.print("  nothing written to the file's metadata yet", style="dim")

    @app.command()
    def stats(top: int = typer.Option(15, "--top", help="How many top tags to list."),
              fmt: str = typer.Option("table", "--format", "-f", help="table or json."),
              lang: Lang = typer.Option("en", "--lang", help="Tag names in English, Chinese or both."),
              index_path: Path = IndexOption) -> None:
        """Photos, tags, top tags and failures in the index."""
        if fmt not in ("table", "json"):
            raise UsageError(f"unknown format {fmt!r}; use table or json")
        from ramcli.library.stats import index_stats

        with _opened(index_path, readonly=True) as index:
            s = index_stats(index, top)
        if fmt == "json":
            write_json(s.to_json(), sys.stdout)
            return
        console.print(f"[bold]index[/] {escape(str(s.path))} ({s.size / 2**20:.1f} MiB)", highlight=False)
        total = sum(s.photos.values())
        by_status = ", ".join(f"{v:,} {k}" for k, v in sorted(s.photos.items())) or "none"
        console.print(f"photos: {total:,} ({by_status})", highlight=False, markup=False)
        console.print(f"tags: {s.tags_known:,} known, {s.tags_in_use:,} in use, {s.photo_tags:,} photo tags", highlight=False)
        if s.top_tags:
            console.print(make_table((*_name_columns(lang), Column("photos", justify="right")),
                                     ((*_names(n, zh, lang), f"{c:,}") for n, zh, c in s.top_tags), title="top tags"))
        if s.failures:
            console.print(make_table((Column("photo", overflow="fold"), Column("error", overflow="fold")),
                                     ((display(p), e) for p, e in s.failures), title=f"failures (first {len(s.failures)})"))

    @index_app.command()
    def prune(dry_run: bool = typer.Option(False, "--dry-run", help="Only list what would be forgotten."),
              index_path: Path = IndexOption) -> None:
        """Forget photos whose files no longer exist."""
        with _opened(index_path, readonly=dry_run) as index:
            gone = index.prune(dry_run=dry_run)
        write_records(gone, "paths", PATHS)
        verb = "would forget" if dry_run else "forgot"
        err_console.print(f"{verb} {len(gone)} missing photo{'s' if len(gone) != 1 else ''}", highlight=False)

    @index_app.command()
    def check(index_path: Path = IndexOption) -> None:
        """Check the index's integrity (SQLite, foreign keys, tag counts, search index)."""
        resolved = index_path or config.home().index
        if not resolved.exists():
            raise RamcliError(f"no index at {resolved}: run `ramcli tag` first")
        from ramcli.library.merge import check as check_index

        with _opened(resolved, readonly=False) as index:
            problems = check_index(index)
        if problems:
            for p in problems[:20]:
                err_console.print(f"problem: {p}", highlight=False, markup=False)
            raise RamcliError(f"the index {resolved} has {len(problems)} problem(s); move it aside and re-run `ramcli tag` to rebuild it")
        console.print(f"ok: {resolved}", highlight=False)

    @index_app.command()
    def merge(sources: list[Path] = typer.Argument(..., help="Index files to merge in (each node's index.db).", show_default=False),
              index_path: Path = IndexOption) -> None:
        """Merge other indexes (e.g. one per node of a multi-node run) into this one; a photo in both keeps its newer tagging."""
        from ramcli.library.merge import check_merge_source, merge as merge_index

        destination = index_path or config.home().index
        for source in sources:  # refuse a bad source before merging any
            check_merge_source(source, destination)
        with _opened(destination, readonly=False) as index:
            for source in sources:
                counts = merge_index(index, source)
                dropped = f"; {counts.ledger_dropped} write-ledger rows dropped (not ramcli's)" if counts.ledger_dropped else ""
                console.print(f"{display(source)}: {counts.added} added, {counts.updated} updated, "
                              f"{counts.unchanged} unchanged{dropped}", highlight=False, markup=False, soft_wrap=True)
        err_console.print(f"merged {len(sources)} index{'es' if len(sources) != 1 else ''} into {destination}", highlight=False)

    app.add_typer(index_app, name="index")
