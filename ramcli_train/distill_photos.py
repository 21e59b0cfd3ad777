"""The photos a distillation learns from: photo folders and files, and shards unpacked once;
each photo keyed by its content hash, and split into training and held-out by that key."""

from __future__ import annotations

import tarfile
from collections.abc import Sequence
from pathlib import Path

from ramcli.errors import RamcliError, UsageError
from ramcli.media.decode import ImageError, content_hash
from ramcli_train.data import resolve_shards

SHARD_DIR = "shards"
SHARD_IMAGES = (".jpg", ".jpeg", ".png", ".webp")


def is_shard_source(item: str) -> bool:
    path = Path(item)
    return item.endswith(".tar") or "{" in item or (path.is_dir() and any(path.glob("*.tar"))) or (
        path.is_dir() and any(path.glob("*/*.tar")) and not _has_photos(path))


def _has_photos(folder: Path) -> bool:
    return any(p.suffix.lower() in SHARD_IMAGES for p in folder.iterdir() if p.is_file())


def unpack_shards(sources: Sequence[str], dest: Path) -> list[Path]:
    """The image members of shards as files under `dest`, named by shard and member index (never
    by the names inside the archive); each shard is unpacked once (a marker says it is complete)."""
    shards: list[str] = []
    for source in sources:
        path = Path(source)
        nested = sorted(str(p) for p in path.glob("*/*.tar")) if path.is_dir() and not any(path.glob("*.tar")) else []
        shards += nested or resolve_shards(source)
    out: list[Path] = []
    for i, shard in enumerate(shards):
        folder = dest / f"{i:05d}"
        done = folder / ".complete"
        if not done.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            try:
                with tarfile.open(shard) as tar:
                    n = 0
                    for member in tar:
                        suffix = Path(member.name).suffix.lower()
                        if not member.isfile() or suffix not in SHARD_IMAGES:
                            continue
                        data = tar.extractfile(member).read()
                        target = folder / f"{n:07d}{suffix}"
                        target.write_bytes(data)
                        n += 1
            except (tarfile.TarError, OSError) as exc:
                raise RamcliError(f"cannot read shard {Path(shard).name}: {str(exc).splitlines()[0][:160]}") from None
            done.write_text(shard + "\n", encoding="utf-8")
        out += sorted(p for p in folder.iterdir() if p.suffix in SHARD_IMAGES)
    return out


def collect_photos(data: Sequence[str], work: Path) -> tuple[list[Path], dict[str, str]]:
    """(photos, skipped path -> reason) from photo folders/files and shards."""
    from ramcli.media.discover import PHOTO_KINDS, discover

    if not data:
        raise UsageError("no data: pass --data PHOTOS_OR_SHARDS")
    shards = [d for d in data if is_shard_source(d)]
    photos = unpack_shards(shards, work / SHARD_DIR) if shards else []
    skipped: dict[str, str] = {}
    roots = [Path(d) for d in data if d not in shards]
    for found in discover(roots):
        if found.kind in PHOTO_KINDS:
            photos.append(found.path)
        elif found.kind in ("error", "link"):  # links are not followed, as in `tag` without --follow-links
            skipped[str(found.path)] = found.reason or "unreadable"
    if not photos:
        raise RamcliError("no photos found in --data")
    return photos, skipped



def key_photos(photos: Sequence[Path]) -> tuple[dict[str, Path], dict[str, str]]:
    """(content hash -> photo, unreadable photo -> reason): the same image twice is one sample,
    with one target and one place in the split."""
    keys: dict[str, Path] = {}
    failures: dict[str, str] = {}
    for path in photos:
        try:
            keys.setdefault(content_hash(path), path)
        except ImageError as exc:
            failures[str(path)] = str(exc)
        except OSError as exc:
            failures[str(path)] = exc.strerror or type(exc).__name__
    return keys, failures



def split(keys: Sequence[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """(train, held-out) by content hash: the same photo always lands on the same side."""
    if not 0 < val_fraction < 1:
        raise UsageError("--val-fraction must be between 0 and 1")
    ordered = sorted(keys)
    held = [k for k in ordered if int(k[:8], 16) / 16**8 < val_fraction]
    if not held and len(ordered) > 1:
        held = [ordered[0]]
    if len(held) == len(ordered):
        held = held[:-1]
    train = [k for k in ordered if k not in set(held)]
    if not train:
        raise RamcliError("too few photos to distil on: at least two are needed (one is held out)")
    return train, held

