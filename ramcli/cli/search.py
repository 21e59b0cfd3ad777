"""`ramcli search`, `show`, `stats`, `index prune|check|merge`: thin wrappers over ramcli.index/search."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import sqlite3
import sys
from collections.abc import Iterator
from datetime import datetime
from enum import Enum
from pathlib import Path

import typer
from rich.table import Table

from ramcli import config
from ramcli.cli.common import console, err_console
from ramcli.errors import RamcliError, UsageError
from ramcli.index import Index, check_merge_source, database_error, normalize_path
from ramcli.ledger import Ledger
from ramcli.pathnames import display, from_text
from ramcli.search import Filters, Hit, search as run_search

index_app = typer.Typer(help="Maintain the index: forget missing files, check integrity, merge indexes.", no_args_is_help=True)

IndexOption = typer.Option(None, "--index", help="Index file (default: the one in RAMCLI_HOME).", show_default=False)


class Format(str, Enum):
    table = "table"
    paths = "paths"
    json = "json"
    jsonl = "jsonl"
    csv = "csv"


@contextlib.contextmanager
def _opened(path: Path | None, readonly: bool) -> Iterator[Index]:
    """Open the index; any SQLite failure on the way becomes a one-line error."""
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


def _print_hits(hits: list[Hit], fmt: Format, null: bool, truncated: bool) -> None:
    if fmt is Format.paths:
        out = sys.stdout.buffer
        for hit in hits:
            out.write(os.fsencode(hit.path) + (b"\0" if null else b"\n"))
        out.flush()
    elif fmt is Format.json:
        json.dump([_hit_json(h) for h in hits], sys.stdout, ensure_ascii=False, indent=1)
        sys.stdout.write("\n")
    elif fmt is Format.jsonl:
        for h in hits:
            sys.stdout.write(json.dumps(_hit_json(h), ensure_ascii=False) + "\n")
    elif fmt is Format.csv:
        writer = csv.writer(sys.stdout)
        writer.writerow(["path", "score", "taken_at", "tags"])
        for h in hits:
            writer.writerow([display(h.path), _fmt_score(h.score), h.taken_at or "", "; ".join(f"{t.name}:{t.score:.3f}" for t in h.tags)])
    else:
        table = Table(show_edge=False, header_style="bold")
        table.add_column("score", justify="right")
        table.add_column("photo", overflow="fold")
        table.add_column("taken")
        table.add_column("tags")
        with_captions = any(h.caption for h in hits)
        if with_captions:
            table.add_column("caption", overflow="fold")
        for h in hits:
            row = [_fmt_score(h.score), display(h.path), (h.taken_at or "")[:10], ", ".join(t.name for t in h.tags[:8])]
            table.add_row(*row, *([h.caption or ""] if with_captions else []))
        console.print(table)
        more = " (more with --limit 0)" if truncated else ""
        err_console.print(f"{len(hits)} photo{'s' if len(hits) != 1 else ''}{more}", highlight=False)


def _fmt_score(score: float | None) -> str:
    return "" if score is None else f"{score:.3f}"


def _hit_json(h: Hit) -> dict:
    return {
        "path": display(h.path),
        "score": None if h.score is None else round(h.score, 6),
        "taken_at": h.taken_at,
        "tags": [{"name": t.name, "name_zh": t.name_zh, "score": round(t.score, 6)} for t in h.tags],
        "caption": h.caption,
    }


def register(app: typer.Typer) -> None:
    # `-night` must reach the query, not Click: unknown options pass through, and -h is not help here.
    query_settings = {"ignore_unknown_options": True, "help_option_names": ["--help"]}

    @app.command(context_settings=query_settings)
    def search(
        query: list[str] = typer.Argument(None, help='Tags: `dog beach`, `dog OR cat`, `dog -night`, `"christmas tree"`. Optional with --caption.', show_default=False),
        caption: str = typer.Option(None, "--caption", help='Words that must all be in the caption (Tag2Text, `tag --caption`); "quoted phrases" kept in order.'),
        min_score: float = typer.Option(0.0, "--min-score", help="Count a tag only at this score or above (0-1)."),
        limit: int = typer.Option(None, "--limit", help="At most this many hits, best first; 0 = all. [default: 50 for table, all otherwise]", show_default=False),
        since: str = typer.Option(None, "--since", help="Taken on or after this date (YYYY-MM-DD)."),
        until: str = typer.Option(None, "--until", help="Taken on or before this date (YYYY-MM-DD)."),
        folder: Path = typer.Option(None, "--in", help="Only photos under this folder.", file_okay=False),
        fmt: Format = typer.Option(Format.table, "--format", help="Output format."),
        null: bool = typer.Option(False, "-0", "--null", help="With --format paths: end each path with NUL (for xargs -0)."),
        gallery: Path = typer.Option(None, "--gallery", help="Also write a static HTML page with thumbnails of the hits.", dir_okay=False),
        index_path: Path = IndexOption,
    ) -> None:
        """Find photos by tag: `ramcli search dog`, `dog OR cat`, `dog -night`; by caption: `--caption "on a beach"`. Exit 0 with hits, 1 without, 2 on a bad query."""
        if not query and caption is None:
            raise UsageError('give tags, --caption TEXT or both, e.g. `ramcli search dog` or `ramcli search --caption "on a beach"`')
        query_text = _query_text(query) if query else ""
        if null and fmt is not Format.paths:
            raise UsageError("-0 only goes with --format paths")
        if limit is not None and limit < 0:
            raise UsageError("--limit must be 0 (all) or more")
        wanted = (50 if fmt is Format.table else None) if limit is None else (limit or None)
        filters = Filters(min_score=min_score, since=_iso_date(since, "--since"), until=_iso_date(until, "--until"),
                          under=Path(normalize_path(folder)) if folder else None, caption=caption)
        with _opened(index_path, readonly=True) as index:
            hits = run_search(index, query_text, limit=None if wanted is None else wanted + 1,
                              filters=filters, with_tags=fmt is not Format.paths or gallery is not None)
            truncated = wanted is not None and len(hits) > wanted
            hits = hits[:wanted]
        _print_hits(hits, fmt, null, truncated)
        if gallery is not None:
            from ramcli.gallery import write_gallery

            title = " ".join([query_text, *([f"--caption {caption}"] if caption is not None else [])])
            write_gallery(hits, gallery, title=f"ramcli search {title}".strip())
            err_console.print(f"gallery: {gallery} ({len(hits)} photos)", highlight=False)
        if not hits:
            sys.exit(1)  # like grep; SystemExit because the entry point drops a returned exit code

    @app.command()
    def show(photo: Path = typer.Argument(..., help="A photo in the index."), index_path: Path = IndexOption) -> None:
        """Show one photo's tags, scores and what was written where."""
        with _opened(index_path, readonly=True) as index:
            record = index.lookup(str(photo))
            if record is None:
                raise RamcliError(f"{photo} is not in the index: tag it with `ramcli tag {photo}`")
            tags = index.photo_tags(record.path)
            ledger = Ledger(index.db).entries(record.path)
        console.print(display(record.path), style="bold", highlight=False, markup=False)
        for field in ("status", "error", "size", "width", "height", "taken_at", "tagged_at", "model_id", "vocab_version", "content_hash", "caption", "link"):
            value = getattr(record, field)
            if value is not None:
                console.print(f"  {field:<13} {display(value) if field == 'link' else value}", highlight=False, markup=False)
        table = Table(title="tags", show_edge=False, header_style="bold")
        for col in ("tag", "中文", "score"):
            table.add_column(col, justify="right" if col == "score" else "left")
        for t in tags:
            table.add_row(t.name, t.name_zh, f"{t.score:.3f}")
        console.print(table)
        if ledger:
            written = Table(title="written to metadata", show_edge=False, header_style="bold")
            for col in ("file", "field", "value", "ours"):
                written.add_column(col, overflow="fold")
            for e in ledger:
                written.add_row(display(e.target), e.field, e.value, "no (was there)" if e.preexisting else "yes")
            console.print(written)
        else:
            console.print("  nothing written to the file's metadata yet", style="dim")

    @app.command()
    def stats(top: int = typer.Option(15, "--top", help="How many top tags to list."), index_path: Path = IndexOption) -> None:
        """Photos, tags, top tags and failures in the index."""
        with _opened(index_path, readonly=True) as index:
            db = index.db
            by_status = dict(db.execute("SELECT status, count(*) FROM photos GROUP BY status").fetchall())
            n_tags, used = db.execute("SELECT count(*), count(*) FILTER (WHERE photo_count > 0) FROM tags").fetchone()
            n_links = db.execute("SELECT coalesce(sum(photo_count), 0) FROM tags").fetchone()[0]
            top_tags = db.execute("SELECT name, coalesce(name_zh, ''), photo_count FROM tags WHERE photo_count > 0"
                                  " ORDER BY photo_count DESC, name LIMIT ?", [top]).fetchall()
            failures = db.execute("SELECT path, error FROM photos WHERE status != 'tagged' ORDER BY path LIMIT 10").fetchall()
            path = index.path
        console.print(f"[bold]index[/] {path} ({path.stat().st_size / 2**20:.1f} MiB)", highlight=False)
        total = sum(by_status.values())
        console.print(f"photos: {total:,} ({', '.join(f'{v:,} {k}' for k, v in sorted(by_status.items())) or 'none'})", highlight=False)
        console.print(f"tags: {n_tags:,} known, {used:,} in use, {n_links:,} photo tags", highlight=False)
        if top_tags:
            table = Table(title="top tags", show_edge=False, header_style="bold")
            for col in ("tag", "中文", "photos"):
                table.add_column(col, justify="right" if col == "photos" else "left")
            for name, zh, count in top_tags:
                table.add_row(name, zh, f"{count:,}")
            console.print(table)
        if failures:
            table = Table(title="failures (first 10)", show_edge=False, header_style="bold")
            table.add_column("photo", overflow="fold")
            table.add_column("error", overflow="fold")
            for p, err in failures:
                table.add_row(display(from_text(p)), err or "")
            console.print(table)

    @index_app.command()
    def prune(dry_run: bool = typer.Option(False, "--dry-run", help="Only list what would be forgotten."),
              index_path: Path = IndexOption) -> None:
        """Forget photos whose files no longer exist."""
        with _opened(index_path, readonly=dry_run) as index:
            if dry_run:
                gone = [r.path for r in index.iter_photos() if not os.path.exists(r.path)]
            else:
                gone = index.prune()
        for p in gone:
            console.print(display(p), highlight=False, markup=False)
        verb = "would forget" if dry_run else "forgot"
        err_console.print(f"{verb} {len(gone)} missing photo{'s' if len(gone) != 1 else ''}", highlight=False)

    @index_app.command()
    def check(index_path: Path = IndexOption) -> None:
        """Check the index's integrity (SQLite, foreign keys, tag counts, search index)."""
        resolved = index_path or config.home().index
        if not resolved.exists():
            raise RamcliError(f"no index at {resolved}: run `ramcli tag` first")
        with _opened(resolved, readonly=False) as index:
            problems = index.check()
        if problems:
            for p in problems[:20]:
                err_console.print(f"problem: {p}", highlight=False, markup=False)
            raise RamcliError(f"the index {resolved} has {len(problems)} problem(s); move it aside and re-run `ramcli tag` to rebuild it")
        console.print(f"ok: {resolved}", highlight=False)

    @index_app.command()
    def merge(sources: list[Path] = typer.Argument(..., help="Index files to merge in (each node's index.db).", show_default=False),
              index_path: Path = IndexOption) -> None:
        """Merge other indexes (e.g. one per node of a multi-node run) into this one; a photo in both keeps its newer tagging."""
        destination = index_path or config.home().index
        for source in sources:  # refuse a bad source before merging any
            check_merge_source(source, destination)
        with _opened(destination, readonly=False) as index:
            for source in sources:
                counts = index.merge(source)
                dropped = f"; {counts.ledger_dropped} write-ledger rows dropped (not ramcli's)" if counts.ledger_dropped else ""
                console.print(f"{display(source)}: {counts.added} added, {counts.updated} updated, "
                              f"{counts.unchanged} unchanged{dropped}", highlight=False, markup=False, soft_wrap=True)
        err_console.print(f"merged {len(sources)} index{'es' if len(sources) != 1 else ''} into {destination}", highlight=False)

    app.add_typer(index_app, name="index")
