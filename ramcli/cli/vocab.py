"""`ramcli vocab`: the open vocabulary. Thin wrappers over `ramcli.tagging.vocab` (and
`ramcli.tagging.vocab_files` for the files it imports)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from ramcli.cli.common import LAYOUT_FORMAT_OPTION, console
from ramcli.errors import UsageError
from ramcli.models.labels import OPEN_SET_THRESHOLD, resolve_labels
from ramcli.output import Layout, check_format, default_format, write_records

if TYPE_CHECKING:
    from ramcli.tagging.vocab import Vocabulary

vocab_app = typer.Typer(
    help="Manage the tag vocabulary: add open-vocabulary tags, disable, thresholds, synonyms.",
    no_args_is_help=True,
)

LABELS_OPTION = typer.Option(None, "--labels", help="Folder with the official label files (default: RAMCLI_LABELS, else the official files shipped with ramcli).")
CLIP_OPTION = typer.Option(None, "--clip-weights", help="CLIP ViT-B/16 weights file (default: RAMCLI_CLIP_WEIGHTS, then the Hugging Face cache).")


def _open(labels: Path | None, need_builtin: bool = True) -> Vocabulary:
    from ramcli.tagging.vocab import Vocabulary

    builtin = resolve_labels("ram", labels_dir=labels).names if need_builtin else ()
    return Vocabulary.open(builtin=builtin)


def _encoder_loader(clip_weights: Path | None):
    def load():
        from ramcli.models.clip_text import load_text_encoder

        console.print("loading the CLIP text encoder…", style="dim", highlight=False, soft_wrap=True)
        return load_text_encoder(clip_weights)

    return load


def _done(vocab: Vocabulary, message: str) -> None:
    vocab.commit()
    console.print(f"{message} (vocabulary version {vocab.version})", highlight=False, markup=False, soft_wrap=True)


@vocab_app.command()
def add(
    name: str = typer.Argument(..., help="The new tag, e.g. \"tram\"."),
    description: list[str] = typer.Option(None, "--description", "-d", help="A description (RAM++); repeat for more."),
    descriptions: Path = typer.Option(None, "--descriptions", help="JSON file of descriptions (official RAM++ format)."),
    threshold: float = typer.Option(OPEN_SET_THRESHOLD, "--threshold", help="Score above which the tag is emitted."),
    name_zh: str = typer.Option("", "--zh", help="Chinese name, shown with --lang zh|both (default: the English name)."),
    clip_weights: Path = CLIP_OPTION,
    labels: Path = LABELS_OPTION,
) -> None:
    """Add a tag the model never trained on (CLIP text embedding of the official prompt ensemble)."""
    vocab = _open(labels)
    texts = list(description or [])
    if descriptions is not None:
        if texts:
            raise UsageError("use either --description or --descriptions, not both")
        from ramcli.tagging.vocab_files import read_descriptions

        texts = read_descriptions(descriptions, name)
    tag = vocab.add(name, _encoder_loader(clip_weights), texts, threshold, name_zh)
    kind = f"{len(tag.descriptions)} descriptions" if tag.descriptions else "63 prompts"
    _done(vocab, f"added custom tag '{tag.name}' (threshold {tag.threshold}, {kind})")


ENTRIES = Layout(
    columns=("tag", "kind", "threshold", "state", "synonyms"),
    row=lambda e: [e.name, e.kind, f"{e.threshold:g}", "enabled" if e.enabled else "disabled", list(e.synonyms)],
    json=lambda e: {"name": e.name, "kind": e.kind, "threshold": e.threshold, "enabled": e.enabled,
                    "synonyms": list(e.synonyms)},
    table_row=lambda e: [e.name, e.kind, f"{e.threshold:g}", "enabled" if e.enabled else "disabled",
                         ", ".join(e.synonyms)],
)


@vocab_app.command("list")
def list_(
    builtin: bool = typer.Option(False, "--builtin", help="Only the model's built-in tags."),
    custom: bool = typer.Option(False, "--custom", help="Only custom tags."),
    search: str = typer.Option(None, "--search", help="Only tags whose name or synonym contains WORD."),
    fmt: str = LAYOUT_FORMAT_OPTION,
    labels: Path = LABELS_OPTION,
) -> None:
    """List tags with their threshold, state and synonyms."""
    if builtin and custom:
        raise UsageError("use --builtin or --custom, not both")
    fmt = check_format(fmt or default_format(), ENTRIES)
    from ramcli.tagging.vocab import Vocabulary

    label_set = None if custom else resolve_labels("ram", labels_dir=labels)
    vocab = Vocabulary.open(builtin=label_set.names if label_set else ())
    write_records(vocab.entries(label_set, custom=not builtin, search=search), fmt, ENTRIES)


@vocab_app.command()
def remove(name: str = typer.Argument(..., help="A custom tag."), labels: Path = LABELS_OPTION) -> None:
    """Remove a custom tag."""
    vocab = _open(labels)
    _done(vocab, f"removed custom tag '{vocab.remove(name)}'")


@vocab_app.command()
def disable(name: str = typer.Argument(..., help="A built-in or custom tag."), labels: Path = LABELS_OPTION) -> None:
    """Never emit this tag (built-in or custom); it is dropped from the label queries."""
    vocab = _open(labels)
    _done(vocab, f"disabled '{vocab.disable(name)}'")


@vocab_app.command()
def enable(name: str = typer.Argument(..., help="A disabled tag."), labels: Path = LABELS_OPTION) -> None:
    """Emit a disabled tag again."""
    vocab = _open(labels)
    _done(vocab, f"enabled '{vocab.enable(name)}'")


@vocab_app.command()
def threshold(name: str = typer.Argument(..., help="A built-in or custom tag."),
              value: float = typer.Argument(..., help="The new threshold, 0-1."), labels: Path = LABELS_OPTION) -> None:
    """Set a tag's threshold (0-1; a tag is emitted when its score is above it)."""
    vocab = _open(labels)
    _done(vocab, f"threshold of '{vocab.set_threshold(name, value)}' is now {value:g}")


@vocab_app.command()
def synonym(name: str = typer.Argument(..., help="The tag."),
            alias: str = typer.Argument(..., help="Another word that finds it."), labels: Path = LABELS_OPTION) -> None:
    """Make ALIAS find NAME's photos in `ramcli search`."""
    vocab = _open(labels)
    canonical = vocab.add_synonym(name, alias)
    _done(vocab, f"'{alias.strip()}' now finds '{canonical}'")


@vocab_app.command("import")
def import_(
    file: Path = typer.Argument(..., help=".txt (a name a line), .csv (name,threshold,descriptions…) or .json."),
    clip_weights: Path = CLIP_OPTION,
    labels: Path = LABELS_OPTION,
) -> None:
    """Import tags and settings; nothing changes unless the whole file is valid."""
    from ramcli.tagging.vocab_files import parse_import_file

    vocab = _open(labels)
    plan = vocab.check_import(parse_import_file(file))
    vocab.apply_import(plan, _encoder_loader(clip_weights))
    _done(vocab, f"imported {len(plan.custom)} custom tags and {len(plan.disabled) + len(plan.thresholds) + len(plan.synonyms)} settings")


@vocab_app.command()
def export(file: Path = typer.Argument(None, help="Write here instead of stdout.")) -> None:
    """Export custom tags and settings as JSON (re-importable with `vocab import`)."""
    from ramcli.tagging.vocab import Vocabulary

    text = json.dumps(Vocabulary.open().export(), indent=1, ensure_ascii=False)
    if file is None:
        typer.echo(text)
    else:
        file.write_text(text + "\n", encoding="utf-8")


def register(app: typer.Typer) -> None:
    app.add_typer(vocab_app, name="vocab")
