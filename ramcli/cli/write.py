"""`ramcli write` and `ramcli untag`: tags (and captions) into the photos' metadata, and out again.
Thin wrappers over `ramcli.library.writeback`. Photos that a folder reaches only through a symlink
leading out of it are written or untagged only with `--follow-links` (as `ramcli tag` does), and
otherwise listed with the reason.

The writer flags are defined once, here, by the `writer_options` decorator; `ramcli tag` reuses
it so both commands accept the same flags:

    @app.command()
    @writer_options
    def tag(paths: list[Path], ..., writer_options: WriterOptions) -> None: ...
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from ramcli.cli.common import console, err_console
from ramcli.errors import RamcliError
from ramcli.metadata.options import Lang, Policy, SidecarName, WriterOptions
from ramcli.pathnames import display

if TYPE_CHECKING:
    from ramcli.metadata import FilePlan, WriteOutcome

_PANEL = "Metadata writing"


def _option(name: str, default, annotation, flag: str, help: str) -> inspect.Parameter:
    info = typer.Option(flag, help=help, rich_help_panel=_PANEL)
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[annotation, info])


_WRITER_PARAMS = [
    _option("tag_root", "auto", str, "--tag-root",
            "Root of the hierarchical keywords (auto|dog); '' for none."),
    _option("iptc", "auto", Policy, "--iptc", "IPTC Keywords: auto = only where the file has IPTC."),
    _option("digikam", "auto", Policy, "--digikam", "digiKam TagsList: auto = only where present."),
    _option("windows", "auto", Policy, "--windows", "Microsoft LastKeywordXMP: auto = only where present."),
    _option("lang", "en", Lang, "--lang", "Keyword language: English, Chinese or both."),
    _option("sidecar", False, bool, "--sidecar", "Write XMP sidecars for every format, not only RAW."),
    _option("sidecar_name", "adobe", SidecarName, "--sidecar-name",
            "New sidecar name: adobe = IMG.xmp (IMG.EXT.xmp if the base name is shared), ext = IMG.EXT.xmp."),
    _option("keep_backups", False, bool, "--keep-backups", "Keep ExifTool's FILE_original backups."),
    _option("preserve_mtime", False, bool, "--preserve-mtime",
            "Keep file modification times (Immich/PhotoPrism then may not re-read the files)."),
]


def writer_options(func: Callable) -> Callable:
    """Add the writer flags to a Typer command; it receives them as `writer_options: WriterOptions`."""
    signature = inspect.signature(func, eval_str=True)
    own = [p for p in signature.parameters.values() if p.name != "writer_options"]
    names = [p.name for p in _WRITER_PARAMS]

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        values = {name: kwargs.pop(name) for name in names}
        return func(*args, writer_options=WriterOptions(**values), **kwargs)

    wrapper.__signature__ = signature.replace(parameters=own + _WRITER_PARAMS)
    wrapper.__annotations__ = {p.name: p.annotation for p in wrapper.__signature__.parameters.values()}
    return wrapper


IndexOption = Annotated[
    Optional[Path], typer.Option("--index", help="Index database (default: the one in RAMCLI_HOME).")
]
DryRunOption = Annotated[bool, typer.Option("--dry-run", help="Show what would change per file; write nothing.")]
FollowLinksOption = Annotated[bool, typer.Option(
    "--follow-links",
    help="Also walk symlinked folders and write through symlinked files that lead outside the given folders "
         "(default: they are left alone and listed).")]
#: Why a photo reached through a symlink out of the given folders was left alone.
OUTSIDE_LINK = "symlink to a file outside the given folders: left alone (--follow-links writes through it)"


def print_plans(plans: list[FilePlan]) -> None:
    """The dry run: one block per photo that would change."""
    changed = 0
    for plan in plans:
        if plan.error:
            err_console.print(f"{display(plan.path)}: cannot write: {plan.error}", markup=False, highlight=False, soft_wrap=True)
        elif plan.changes:
            changed += 1
            console.print(display(plan.path), markup=False, highlight=False, soft_wrap=True)
            for line in plan.changes:
                console.print(f"  {display(line)}", markup=False, highlight=False, soft_wrap=True)
    console.print(f"dry run: {changed} of {len(plans)} photos would change", markup=False, highlight=False, soft_wrap=True)


def report(outcomes: list[WriteOutcome]) -> int:
    """One line per failure, a summary; returns the number of failures."""
    counts = {"written": 0, "unchanged": 0, "failed": 0}
    for o in outcomes:
        counts[o.status] += 1
        if o.status == "failed":
            err_console.print(f"{display(o.path)}: {o.error}", markup=False, highlight=False, soft_wrap=True)
        for w in o.warnings:
            err_console.print(f"{display(o.path)}: warning: {w}", markup=False, highlight=False, soft_wrap=True)
    console.print(
        f"{counts['written']} written, {counts['unchanged']} unchanged, {counts['failed']} failed",
        markup=False, highlight=False, soft_wrap=True,
    )
    return counts["failed"]


def _scope(found: list[str], linked: dict[str, str], follow_links: bool) -> list[str]:
    """The photos to act on: with `follow_links` also the linked ones, else those are listed."""
    if follow_links:
        return found + list(linked)
    for path, link in linked.items():
        err_console.print(f"{display(link)} -> {display(path)}: {OUTSIDE_LINK}",
                          markup=False, highlight=False, soft_wrap=True)
    return found


def register(app: typer.Typer) -> None:
    @app.command()
    @writer_options
    def write(
        paths: Annotated[Optional[list[Path]], typer.Argument(help="Photos or folders (default: the whole index).")] = None,
        index_path: IndexOption = None,
        dry_run: DryRunOption = False,
        follow_links: FollowLinksOption = False,
        *,
        writer_options: WriterOptions,
    ) -> None:
        """Write the indexed tags (and captions) into the photos' XMP/IPTC metadata (no model run).

        Exit code 0 when every photo's metadata matches the index, 1 when a write failed (listed).
        """
        from ramcli.library.index import Index
        from ramcli.library.ledger import Ledger
        from ramcli.metadata import MetadataWriter
        from ramcli.library.writeback import indexed_photos, write_indexed

        with Index.open(index_path) as index:
            photos = _scope(*indexed_photos(index, list(paths or [])), follow_links)
            items = [(p, index.photo_tags(p)) for p in photos]
            captions = [index.lookup(p).caption for p in photos]  # Tag2Text captions, where indexed
            with MetadataWriter(writer_options, Ledger(index.db)) as writer:
                if dry_run:
                    print_plans(writer.plan_batch(items, captions=captions))
                    return
                outcomes = write_indexed(index, writer, items, captions)
        _fail_if_any(report(outcomes))

    @app.command()
    @writer_options
    def untag(
        paths: Annotated[list[Path], typer.Argument(help="Photos or folders.")],
        index_path: IndexOption = None,
        dry_run: DryRunOption = False,
        follow_links: FollowLinksOption = False,
        *,
        writer_options: WriterOptions,
    ) -> None:
        """Remove exactly the keywords and captions ramcli added to these photos, and nothing else.

        Give the flags `ramcli tag` had (--follow-links) to undo all it did. Exit code 0 when
        everything was removed, 1 when a file could not be written (listed).
        """
        from ramcli.library.index import Index
        from ramcli.library.ledger import Ledger
        from ramcli.metadata import MetadataWriter
        from ramcli.library.writeback import ledger_photos, update_stats

        with Index.open(index_path) as index:
            ledger = Ledger(index.db)
            with MetadataWriter(writer_options, ledger) as writer:  # first settles a killed run's writes
                photos = _scope(*ledger_photos(index, ledger, paths), follow_links)
                if dry_run:
                    print_plans(writer.plan_untag(photos))
                    return
                outcomes = writer.untag_batch(photos)
                update_stats(index, outcomes)
        _fail_if_any(report(outcomes))


def _fail_if_any(failed: int) -> None:
    if failed:
        raise RamcliError(f"{failed} photo(s) could not be written (see above); the others were")
