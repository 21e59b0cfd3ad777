"""`ramcli vocab build`: build a label system from captions and dataset label lists.
Mounted on the `vocab` group of ramcli/cli/vocab.py; a thin wrapper over ramcli_train.label_system."""

from __future__ import annotations

from pathlib import Path

import typer

from ramcli.cli.common import console


def build(
    data: list[str] = typer.Option(..., "--data", help="Shards or official JSON annotation files with captions; repeatable."),
    out: Path = typer.Option(..., "--out", help="Folder for the label system."),
    top: int = typer.Option(10000, "--top", help="Keep the most frequent tags."),
    min_count: int = typer.Option(1, "--min-count", help="Drop tags seen in fewer samples."),
    dataset_list: list[Path] = typer.Option(None, "--dataset-list", help="A dataset's label list (COCO, ImageNet, OpenImages...; a name a line), always kept; repeatable."),
    synonyms: list[Path] = typer.Option(None, "--synonyms", help='Synonym groups: JSON {"alias": "name"} / {"name": [aliases]} or lines "name, alias, ..."; repeatable.'),
    base: str = typer.Option("official", "--base", help="Candidate tags: 'official' (the 4,585 RAM tags), a label folder, or 'none'."),
    embed: str = typer.Option("clip", "--embed", help="clip: store frozen CLIP label embeddings; none: names only."),
    clip_weights: Path | None = typer.Option(None, "--clip-weights", help="CLIP ViT-B/16 weights (default: RAMCLI_CLIP_WEIGHTS, then the HF cache)."),
) -> None:
    """Build a label system: parse captions, count tags, merge synonyms and dataset lists."""
    from ramcli.errors import UsageError
    from ramcli.models.labels import resolve_labels
    from ramcli_train.label_system import build_label_system

    if embed not in ("clip", "none"):
        raise UsageError("--embed must be clip or none")
    base_labels = None if base == "none" else resolve_labels("ram", labels_dir=None if base == "official" else Path(base))
    loader = None
    if embed == "clip":
        def loader():
            from ramcli.models.clip_text import load_text_encoder

            return load_text_encoder(clip_weights)
    system = build_label_system(data, base_labels, dataset_list or [], synonyms or [], top, min_count, loader)
    system.save(out)
    console.print(f"wrote {out}: {len(system.names)} tags ({len(system.info['from_dataset_lists'])} from dataset lists), "
                  f"{len(system.synonyms)} synonyms{', CLIP embeddings' if system.embeddings is not None else ''}",
                  highlight=False)


def register(app: typer.Typer) -> None:
    from ramcli.cli.vocab import vocab_app

    vocab_app.command("build")(build)
