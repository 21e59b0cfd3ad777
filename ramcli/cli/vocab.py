"""`ramcli vocab`: the open vocabulary (issue 6). Thin wrappers over `ramcli.vocab`."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from ramcli.cli.common import console, stdout_is_terminal
from ramcli.errors import RamcliError, UsageError
from ramcli.labels import OPEN_SET_THRESHOLD, resolve_labels
from ramcli.vocab import Vocabulary, name_key

vocab_app = typer.Typer(
    help="Manage the tag vocabulary: add open-vocabulary tags, disable, thresholds, synonyms.",
    no_args_is_help=True,
)

LABELS_OPTION = typer.Option(None, "--labels", help="Folder with the official label files (default: RAMCLI_LABELS, else the official files shipped with ramcli).")
CLIP_OPTION = typer.Option(None, "--clip-weights", help="CLIP ViT-B/16 weights file (default: RAMCLI_CLIP_WEIGHTS, then the Hugging Face cache).")


def _open(labels: Path | None, need_builtin: bool = True) -> Vocabulary:
    builtin = resolve_labels("ram", labels_dir=labels).names if need_builtin else ()
    return Vocabulary.open(builtin=builtin)


def _encoder_loader(clip_weights: Path | None):
    def load():
        from ramcli.clip_text import load_text_encoder

        console.print("loading the CLIP text encoder…", style="dim", highlight=False, soft_wrap=True)
        return load_text_encoder(clip_weights)

    return load


def _index():
    from ramcli.index import Index

    return Index.open()


def _done(vocab: Vocabulary, message: str) -> None:
    vocab.save()
    console.print(f"{message} (vocabulary version {vocab.version})", highlight=False, markup=False, soft_wrap=True)


def _descriptions_from_file(path: Path, name: str) -> list[str]:
    """Descriptions of `name` from a JSON file: the official [{tag: [...]}] list or a list of strings."""
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise RamcliError(f"descriptions file not found: {path}") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise RamcliError(f"descriptions file is not UTF-8 JSON: {path}") from None
    if isinstance(data, list) and all(isinstance(d, str) for d in data):
        return data
    if isinstance(data, list) and all(isinstance(d, dict) for d in data):
        for entry in data:
            for tag, descriptions in entry.items():
                if name_key(tag) == name_key(name) and isinstance(descriptions, list):
                    return [str(d) for d in descriptions]
        raise RamcliError(f"{path} has no descriptions for '{name}'")
    raise RamcliError(f"{path}: expected a list of strings or the official [{{tag: [descriptions]}}] list")


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
        texts = _descriptions_from_file(descriptions, name)
    tag = vocab.add(name, _encoder_loader(clip_weights), texts, threshold, name_zh)
    with _index() as index:
        index.upsert_tags([tag.name], [tag.name_zh or None], "custom")
    kind = f"{len(tag.descriptions)} descriptions" if tag.descriptions else "63 prompts"
    _done(vocab, f"added custom tag '{tag.name}' (threshold {tag.threshold}, {kind})")


@vocab_app.command("list")
def list_(
    builtin: bool = typer.Option(False, "--builtin", help="Only the model's built-in tags."),
    custom: bool = typer.Option(False, "--custom", help="Only custom tags."),
    search: str = typer.Option(None, "--search", help="Only tags whose name or synonym contains WORD."),
    labels: Path = LABELS_OPTION,
) -> None:
    """List tags with their threshold, state and synonyms."""
    if builtin and custom:
        raise UsageError("use --builtin or --custom, not both")
    vocab = _open(labels, need_builtin=not custom)
    aliases: dict[str, list[str]] = {}
    for alias, target in vocab.synonyms.items():
        aliases.setdefault(target, []).append(alias)
    rows = []
    if not custom:
        label_set = resolve_labels("ram", labels_dir=labels)
        for n, t in zip(label_set.names, label_set.thresholds):
            rows.append((n, "built-in", vocab.thresholds.get(n, t)))
    if not builtin:
        rows += [(t.name, "custom", t.threshold) for t in vocab.custom]
    needle = search.lower() if search else None
    lines = []
    for n, kind, t in rows:
        syn = sorted(aliases.get(n, []))
        if needle and not any(needle in s.lower() for s in [n, *syn]):
            continue
        lines.append((n, kind, f"{t:g}", "disabled" if n in vocab.disabled else "enabled", ", ".join(syn)))
    if stdout_is_terminal():
        from rich.table import Table

        table = Table("tag", "kind", "threshold", "state", "synonyms")
        for line in lines:
            table.add_row(*line)
        console.print(table)
    else:
        for line in lines:
            typer.echo("\t".join(line))


@vocab_app.command()
def remove(name: str, labels: Path = LABELS_OPTION) -> None:
    """Remove a custom tag."""
    vocab = _open(labels)
    _done(vocab, f"removed custom tag '{vocab.remove(name)}'")


@vocab_app.command()
def disable(name: str, labels: Path = LABELS_OPTION) -> None:
    """Never emit this tag (built-in or custom); it is dropped from the label queries."""
    vocab = _open(labels)
    _done(vocab, f"disabled '{vocab.disable(name)}'")


@vocab_app.command()
def enable(name: str, labels: Path = LABELS_OPTION) -> None:
    """Emit a disabled tag again."""
    vocab = _open(labels)
    _done(vocab, f"enabled '{vocab.enable(name)}'")


@vocab_app.command()
def threshold(name: str, value: float, labels: Path = LABELS_OPTION) -> None:
    """Set a tag's threshold (0-1; a tag is emitted when its score is above it)."""
    vocab = _open(labels)
    _done(vocab, f"threshold of '{vocab.set_threshold(name, value)}' is now {value:g}")


@vocab_app.command()
def synonym(name: str, alias: str, labels: Path = LABELS_OPTION) -> None:
    """Make ALIAS find NAME's photos in `ramcli search`."""
    vocab = _open(labels)
    canonical = vocab.add_synonym(name, alias)
    kind = "custom" if vocab.find_custom(canonical) else "builtin"
    with _index() as index:
        index.upsert_tags([canonical], [None], kind)
        index.add_synonym(alias.strip(), canonical)
    _done(vocab, f"'{alias.strip()}' now finds '{canonical}'")


@vocab_app.command("import")
def import_(
    file: Path = typer.Argument(..., help=".txt (a name a line), .csv (name,threshold,descriptions…) or .json."),
    clip_weights: Path = CLIP_OPTION,
    labels: Path = LABELS_OPTION,
) -> None:
    """Import tags and settings; nothing changes unless the whole file is valid."""
    vocab = _open(labels)
    plan = vocab.plan_import(file)
    vocab.apply_import(plan, _encoder_loader(clip_weights))
    with _index() as index:
        if plan.custom:
            index.upsert_tags([t.name for t in plan.custom], [None] * len(plan.custom), "custom")
        for alias, target in plan.synonyms.items():
            canonical = vocab.synonyms[" ".join(alias.split())]
            index.upsert_tags([canonical], [None], "custom" if vocab.find_custom(canonical) else "builtin")
            index.add_synonym(alias.strip(), canonical)
    _done(vocab, f"imported {len(plan.custom)} custom tags and {len(plan.disabled) + len(plan.thresholds) + len(plan.synonyms)} settings")


@vocab_app.command()
def export(file: Path = typer.Argument(None, help="Write here instead of stdout.")) -> None:
    """Export custom tags and settings as JSON (re-importable with `vocab import`)."""
    text = json.dumps(Vocabulary.open().export(), indent=1, ensure_ascii=False)
    if file is None:
        typer.echo(text)
    else:
        file.write_text(text + "\n", encoding="utf-8")


def register(app: typer.Typer) -> None:
    app.add_typer(vocab_app, name="vocab")
