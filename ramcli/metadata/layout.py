"""Sidecar layout and targets: which file carries a photo's metadata, decided from what the photo is.

What a photo *is* is discovery's decision (`ramcli.media.discover`: its content, and for TIFF-based
RAW its extension), passed along as the photo's `Found`, or asked of `discover.what_is` by a caller
that has none; the writer only maps that decision to a place:

- RAW (every format discovery calls 'raw', except DNG): an XMP sidecar, because ExifTool's Known
  Problems list RAW writes that vendor software rejects. ramcli never opens a RAW file.
- The formats in `EMBED_FORMATS` (JPEG, TIFF, PNG, WebP, HEIF, AVIF, GIF, DNG): in the file itself,
  unless `--sidecar`. Anything else (BMP, ...) only with `--sidecar`.

`EMBED_FORMATS` also gives the extension under which ExifTool sees the file (see
`ramcli.metadata.exiftool.Workspace`): the extension of the user's file name plays no part, so a
PNG saved as `.jpg` is written as the PNG it is.
"""

from __future__ import annotations

import os
from pathlib import Path

from ramcli.media.discover import Found, Sniffed
from ramcli.metadata.options import WriterOptions

# Detected format -> the extension ExifTool is shown. MPO is a JPEG with extra frames (phones).
EMBED_FORMATS = {
    "JPEG": ".jpg", "MPO": ".jpg", "TIFF": ".tif", "DNG": ".dng", "PNG": ".png", "WEBP": ".webp",
    "HEIF": ".heic", "AVIF": ".avif", "GIF": ".gif",
}
# Formats whose IPTC ramcli writes (MWG: IPTC in PNG, WebP, HEIF is non-standard or ignored).
IPTC_FORMATS = frozenset({"JPEG", "MPO", "TIFF", "DNG"})
# Formats where ExifTool's new IPTC digest matches its own check (12.57 pads TIFF's differently).
DIGEST_FORMATS = frozenset({"JPEG", "MPO"})
SIDECAR_EXTENSION = ".xmp"


def embeds(found: Sniffed | Found) -> bool:
    """Whether metadata goes into the file itself (as opposed to a sidecar)."""
    return found.format in EMBED_FORMATS and (found.kind == "image" or found.format == "DNG")


def is_raw(found: Sniffed | Found) -> bool:
    return found.kind == "raw" and found.format != "DNG"


class DirCache:
    """Directory listings cached for one batch (sidecar and name-collision look-ups)."""

    def __init__(self) -> None:
        self._cache: dict[Path, set[str]] = {}

    def names(self, folder: Path) -> set[str]:
        if folder not in self._cache:
            try:
                self._cache[folder] = set(os.listdir(folder))
            except OSError:
                self._cache[folder] = set()
        return self._cache[folder]


def sidecar_names(photo: Path) -> list[Path]:
    """Every name a sidecar of `photo` may have: `IMG.EXT.xmp` and `IMG.xmp`, either case."""
    return [photo.parent / n for n in (photo.name + ".xmp", photo.name + ".XMP", photo.stem + ".xmp", photo.stem + ".XMP")]


def belongs_to(photo: Path, target: str) -> bool:
    """Whether `target` may carry `photo`'s metadata: the photo itself or one of its sidecar names.
    A ledger row naming any other file (a crafted or stale ledger) is never acted on."""
    return target == str(photo) or target in {str(p) for p in sidecar_names(photo)}


def sidecar_targets(photo: Path, options: WriterOptions, dirs: DirCache | None = None, raw: bool = False) -> list[Path]:
    """The sidecar(s) of `photo`: every existing one, else the one to create.

    `IMG.EXT.xmp` is always this photo's. `IMG.xmp` is, unless another non-sidecar file shares the
    base name (RAW+JPEG pairs, Live Photos) and this photo is not the RAW one (`raw`; Adobe pairs
    `IMG.xmp` with the RAW)."""
    names = (dirs or DirCache()).names(photo.parent)
    siblings = [n for n in names if Path(n).stem == photo.stem and n != photo.name
                and Path(n).suffix.lower() != SIDECAR_EXTENSION]
    shares_base = bool(siblings)
    adobe_ok = not shares_base or raw
    existing = [photo.parent / n for n in (photo.name + ".xmp", photo.name + ".XMP") if n in names]
    if adobe_ok:
        existing += [photo.parent / n for n in (photo.stem + ".xmp", photo.stem + ".XMP") if n in names]
    if existing:
        return existing
    if options.sidecar_name == "adobe" and not shares_base:
        return [photo.with_suffix(SIDECAR_EXTENSION)]
    return [photo.with_name(photo.name + SIDECAR_EXTENSION)]
