"""Tags into the photos' own metadata, through ExifTool, without losing a user keyword or a pixel.

API (what the tagging pipeline and `ramcli write`/`untag` call)::

    from ramcli.metadata import MetadataWriter, WriterOptions
    from ramcli.library.ledger import Ledger

    with MetadataWriter(WriterOptions(), Ledger(db)) as writer:     # starts ExifTool, replays the journal
        plans = writer.plan_batch([(path, [TagScore, ...]), ...])     # dry run: nothing written
        outcomes = writer.write_batch([(path, tags), ...], model_id="ram_plus_swin_large_14m")
        outcomes = writer.write_batch(items, model_id=..., captions=["a dog on a beach", None, ...])
        outcomes = writer.untag_batch([path, ...])                    # remove ramcli's keywords only

Each `WriteOutcome` says per photo: `status` 'written' | 'unchanged' | 'failed', a one-line
`error`, `changes` (human-readable lines such as `IMG.CR2.xmp XMP-dc:Subject +dog -cat`) and,
when the photo file itself was rewritten, its new `size`/`mtime_ns` (give them to
`Index.update_stat` so the incremental tagger does not think the photo changed). One bad file
never fails the batch.

The package, by concern:

- `options`: `WriterOptions`, what to write where;
- `plan`: the merge rules and the plan records (pure: nothing is read or written);
- `layout`: which file carries a photo's metadata (the photo or its sidecars), from what
  discovery says the photo is;
- `exiftool`: the ExifTool process, which never sees a user's file name or value as an argument;
- `planner`: a batch's layout, one ExifTool read, and its plan;
- `commit`: the ExifTool write into the journal, the copy into place, settling the ledger, recovery;
- `writer`: `MetadataWriter`, the transactional read-plan-stage-write-settle loop over batches.
"""

import importlib

# Where each public name lives. Imported on first use (PEP 562), so that the command line can
# read `WriterOptions` without loading ExifTool's wrapper, the image sniffers and SQLite.
_HOMES = {
    "ExifToolProcess": "exiftool",
    "sidecar_names": "layout", "sidecar_targets": "layout",
    "Lang": "options", "Policy": "options", "SidecarName": "options", "WriterOptions": "options",
    "CREATED_SIDECAR": "plan", "MANAGED_FIELDS": "plan", "FilePlan": "plan", "WriteOutcome": "plan",
    "leaves": "plan", "plan_description": "plan", "plan_field": "plan", "trim_iptc": "plan",
    "DIGEST_BEFORE": "plan", "keyword_name": "plan", "seed_values": "plan",
    "MetadataWriter": "writer",
}


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)


__all__ = [
    "CREATED_SIDECAR",
    "DIGEST_BEFORE",
    "MANAGED_FIELDS",
    "ExifToolProcess",
    "FilePlan",
    "Lang",
    "MetadataWriter",
    "Policy",
    "SidecarName",
    "WriteOutcome",
    "WriterOptions",
    "keyword_name",
    "leaves",
    "plan_description",
    "plan_field",
    "seed_values",
    "sidecar_names",
    "sidecar_targets",
    "trim_iptc",
]
