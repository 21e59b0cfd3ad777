"""The examples at the end of every command's --help, in one place, by command path."""

from __future__ import annotations

EXAMPLES: dict[str, list[tuple[str, str]]] = {
    "": [("ramcli tag ~/Pictures", "tag new and changed photos"),
         ("ramcli search dog beach", "find photos with both tags"),
         ("ramcli doctor", "what is installed and what is missing")],
    "tag": [("ramcli tag ~/Pictures", "new and changed photos, the default model"),
            ("ramcli tag --weights ram_plus_swin_large_14m.pth ~/Pictures", "a weights file you have"),
            ("ramcli tag --no-write -f csv -o tags.csv .", "the index and a CSV only, photos untouched"),
            ("ramcli tag --dry-run ~/Pictures", "what would be tagged")],
    "watch": [("ramcli watch ~/Pictures", "catch up, then tag photos as they arrive"),
              ("ramcli watch --once ~/Pictures", "catch up and exit (cron)")],
    "search": [("ramcli search dog beach", "both tags"),
               ("ramcli search dog OR cat", "either"),
               ("ramcli search dog not night", "exclude; or after --: ramcli search -- dog -night"),
               ("ramcli search '\"christmas tree\"' --since 2023-12-01 -f paths", "a multi-word tag, paths only"),
               ("ramcli search --caption \"on a beach\" --gallery beach.html", "by caption, with a page of thumbnails")],
    "show": [("ramcli show ~/Pictures/2024/IMG_0042.jpg", "tags, scores, what was written where"),
             ("ramcli show IMG_0042.jpg -f json", "by file name, from any folder")],
    "stats": [("ramcli stats --top 30", "the 30 most used tags"), ("ramcli stats -f json", "for scripts")],
    "write": [("ramcli write --dry-run ~/Pictures", "what would change, per file"),
              ("ramcli write ~/Pictures", "index to metadata, no model run")],
    "untag": [("ramcli untag --dry-run ~/Pictures/2023", "what would be removed"),
              ("ramcli untag ~/Pictures/2023", "remove exactly what ramcli added")],
    "index prune": [("ramcli index prune --dry-run", "photos whose files are gone")],
    "index check": [("ramcli index check", "SQLite, foreign keys, counts, search index")],
    "index merge": [("ramcli index merge node1/index.db node2/index.db", "each node's index into this one")],
    "vocab add": [("ramcli vocab add tram", "CLIP text embedding of the official prompts"),
                  ("ramcli vocab add funicular -d \"a cliff railway\"", "RAM++ descriptions")],
    "vocab list": [("ramcli vocab list --custom", "your own tags"),
                   ("ramcli vocab list --search dog -f json", "tags and synonyms matching 'dog'")],
    "vocab remove": [("ramcli vocab remove tram", "")],
    "vocab disable": [("ramcli vocab disable person", "never emit a built-in tag")],
    "vocab enable": [("ramcli vocab enable person", "")],
    "vocab threshold": [("ramcli vocab threshold dog 0.8", "emit 'dog' only above 0.8")],
    "vocab synonym": [("ramcli vocab synonym tram streetcar", "`search streetcar` finds trams")],
    "vocab import": [("ramcli vocab import my-tags.csv", "name,threshold,descriptions...")],
    "vocab export": [("ramcli vocab export my-vocab.json", "")],
    "vocab build": [("ramcli vocab build --data shards/ --top 10000 --out my_labels/", "")],
    "models list": [("ramcli models list", "")],
    "models info": [("ramcli models info ram_plus_swin_large_14m.pth", "")],
    "models pull": [("ramcli models pull", "the default model (3.0 GB), verified, converted"),
                    ("ramcli models pull clip-vit-b-16", "the text encoder of `vocab add`")],
    "models import": [("ramcli models import ~/Downloads/ram_swin_large_14m.pth", "then --weights ram_swin_large_14m")],
    "models convert": [("ramcli models convert ram_swin_large_14m.pth ram.safetensors --dtype bf16", ""),
                       ("ramcli models convert ram_swin_large_14m.pth ram.onnx", "for ONNX Runtime")],
    "doctor": [("ramcli doctor", "")],
    "eval": [("ramcli eval --annotations annots.txt --taglist taglist.txt --images imgs/ --weights W.pth", ""),
             ("ramcli eval --annotations annots.txt --taglist taglist.txt --calibrate", "per-class thresholds")],
    "train": [("ramcli synth data/ --samples 3000", "synthetic captioned shards"),
              ("ramcli train --data data/ --preset cpu --out runs/cpu", "a small RAM on the CPU, minutes"),
              ("ramcli train export runs/cpu/checkpoint_last.pt cpu.safetensors", "then: ramcli tag --weights cpu.safetensors")],
    "train export": [("ramcli train export runs/cpu/checkpoint_last.pt cpu.safetensors", "")],
    "train clip-features": [("ramcli train clip-features --data shards/ --out shards_clip/", "then --set distill=precomputed")],
    "finetune": [("ramcli finetune --from ram_plus_swin_large_14m.pth --data shards/ --out runs/ft", ""),
                 ("ramcli finetune --from W.pth --data shards/ --add-tag tram", "a new tag")],
    "distill": [("ramcli distill --teacher W.pth --data ~/Pictures --out small.safetensors", "the teacher's encoder at half its depth"),
                ("ramcli distill --teacher W.pth --data ~/Pictures --backbone teacher --depths 2,2,6,2 --out s.safetensors",
                 "a shallower copy of the teacher")],
    "engine generate": [("ramcli engine generate --weights W.pth --data shards/ --out shards_gen/", "")],
    "engine clean": [("ramcli engine clean --weights W.pth --data shards_gen/ --out shards_clean/", "")],
    "parse": [("ramcli parse \"a dog sitting on a couch\"", "")],
    "synth": [("ramcli synth data/ --samples 3000 --shards 6", "")],
}


def epilog(path: str) -> str | None:
    """The examples of the command `path` ("tag", "vocab add"), as a help epilog."""
    rows = EXAMPLES.get(path)
    if not rows:
        return None
    lines = [line for command, note in rows for line in ([f"  # {note}"] if note else []) + [f"  {command}"]]
    return "[bold]Examples[/]\n\n" + "\n".join(lines)
