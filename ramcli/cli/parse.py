"""`ramcli parse` (caption -> tags, the paper's text semantic parsing) and `ramcli synth`
(synthetic captioned shards for training checks). Thin wrappers over ramcli_train."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from ramcli.cli.common import console
from ramcli.errors import RamcliError


def _read_synonyms(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RamcliError(f"synonym file not found: {path}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise RamcliError(f"synonym file is not valid JSON: {path} ({exc})") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        raise RamcliError(f'synonym file must be a JSON object {{"alias": "tag name"}}: {path}')
    return data


def register(app: typer.Typer) -> None:
    @app.command()
    def parse(
        caption: str = typer.Argument(..., help="The caption to parse, in quotes."),
        labels: Path | None = typer.Option(None, "--labels", help="Folder with the official ram_tag_list*.txt files."),
        synonyms: Path | None = typer.Option(None, "--synonyms", help='JSON file {"alias": "tag name"} of extra synonyms.'),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
    ) -> None:
        """Parse a caption into tags of the label system (ids, and the words that matched)."""
        from ramcli.models.labels import resolve_labels
        from ramcli_train.parse import TagParser, clean_caption

        label_set = resolve_labels("ram", labels)
        parser = TagParser(label_set, synonyms=_read_synonyms(synonyms) if synonyms else None)
        result = parser.parse(caption)

        def row(m) -> dict:
            return {"name": m.name, "ids": list(m.ids), "words": m.words, "synonym": m.synonym_of}

        if as_json:
            typer.echo(
                json.dumps(
                    {
                        "caption": caption,
                        "clean_caption": clean_caption(caption),
                        "tag_ids": result.tag_ids,
                        "tags": [row(m) for m in result.tags],
                        "negated": [row(m) for m in result.negated],
                    },
                    ensure_ascii=False,
                )
            )
            return
        from rich.table import Table

        table = Table(show_header=True, header_style="bold")
        for column in ("tag", "id", "words", "note"):
            table.add_column(column)
        for m in result.tags:
            table.add_row(m.name, ",".join(map(str, m.ids)), m.words, f"synonym '{m.synonym_of}'" if m.synonym_of else "")
        for m in result.negated:
            table.add_row(f"[dim]{m.name}[/]", ",".join(map(str, m.ids)), m.words, "negated: not a tag")
        if not result.matches:
            console.print("no known tags in this caption")
            return
        console.print(table)

    @app.command()
    def synth(
        out_dir: Path = typer.Argument(..., help="Folder to write train/, val/, tags.txt and manifest.json into."),
        samples: int = typer.Option(1000, "--samples", help="Training samples."),
        shards: int = typer.Option(4, "--shards", help="Training shards (the held-out split gets a quarter)."),
        seed: int = typer.Option(0, "--seed", help="Same seed, same data."),
        val_samples: int | None = typer.Option(None, "--val-samples", help="Held-out samples [default: samples/5]."),
        size: int = typer.Option(96, "--size", help="Image side in pixels."),
    ) -> None:
        """Write synthetic captioned scenes as WebDataset shards (img2dataset layout)."""
        from ramcli_train.synth import write_shards

        manifest = write_shards(out_dir, samples, shards=shards, seed=seed, val_samples=val_samples, size=size)
        counts = manifest["samples"]
        console.print(
            f"wrote {counts['train']} training samples in {len(manifest['shards']['train'])} shard(s) and "
            f"{counts['val']} held-out samples to {out_dir} ({len(manifest['tags'])} tags, see tags.txt)",
            highlight=False,
        )
