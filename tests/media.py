"""Real sample photos of every format the metadata writer handles, with user metadata already in.

Pixels come from Pillow / pillow-heif (JPEG, TIFF, PNG, WebP, HEIC, AVIF, and DNG as a TIFF
carrying the DNGVersion tag, which is what makes a TIFF a DNG). The user's metadata (EXIF date,
GPS, XMP title, their own keywords in XMP and IPTC) is put in by a separate one-shot `exiftool`
command, as another photo app would have done, before the writer under test sees the file.

RAW samples: no package we can install ships small camera RAW files, and ramcli never writes into
a RAW file (it writes XMP sidecars beside it, and never opens the RAW itself). So each RAW sample
is a TIFF-structured file with the RAW extension (ExifTool identifies such a `.CR2` as CR2); what
the tests check for RAW is that the file stays byte-identical and that its sidecar holds the
tags. Some RAW samples come with a Lightroom-style `IMG.xmp` sidecar holding user keywords and a
develop setting, to prove that existing sidecars are updated, not replaced.
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import numpy as np
from PIL import Image, TiffImagePlugin

EMBEDDED_FORMATS = ("jpg", "tif", "png", "webp", "heic", "avif", "dng")
RAW_FORMATS = ("CR2", "CR3", "NEF", "ARW", "RAF", "ORF", "RW2", "PEF")
USER_KEYWORDS = ["Holiday 2023", "Oma"]
USER_TITLE = "Beach walk"
IPTC_FORMATS = ("jpg", "tif", "dng")
# RAW samples that get a pre-existing Lightroom sidecar (IMG.xmp) with user keywords.
RAW_WITH_SIDECAR = ("CR2", "NEF")


def pixels(seed: int, size: tuple[int, int] = (48, 32)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def _save(image: Image.Image, path: Path, fmt: str) -> None:
    if fmt in ("heic",):
        import pillow_heif

        pillow_heif.from_pillow(image).save(str(path), quality=90)
    elif fmt == "dng":
        ifd = TiffImagePlugin.ImageFileDirectory_v2()
        ifd[50706] = b"\x01\x04\x00\x00"  # DNGVersion 1.4.0.0
        ifd.tagtype[50706] = 1
        ifd[50708] = "ramcli test camera"  # UniqueCameraModel
        ifd.tagtype[50708] = 2
        image.save(path, format="TIFF", tiffinfo=ifd)
    elif fmt in RAW_FORMATS:
        image.save(path, format="TIFF")
    else:
        image.save(path, quality=90) if fmt in ("jpg", "webp", "avif") else image.save(path)


def exiftool(*args: str | Path) -> str:
    """A one-shot ExifTool run (set-up and independent read-back, never the code under test)."""
    done = subprocess.run(["exiftool", *map(str, args)], capture_output=True, text=True, check=True)
    return done.stdout


def user_metadata_args(fmt: str) -> list[str]:
    args = [
        "-EXIF:DateTimeOriginal=2023:07:14 10:20:30",
        "-GPSLatitude=52.52", "-GPSLatitudeRef=N", "-GPSLongitude=13.40", "-GPSLongitudeRef=E",
        f"-XMP-dc:Title={USER_TITLE}",
    ]
    args += [f"-XMP-dc:Subject={k}" for k in USER_KEYWORDS]
    if fmt in IPTC_FORMATS:
        args += ["-IPTC:CodedCharacterSet=UTF8"] + [f"-IPTC:Keywords={k}" for k in USER_KEYWORDS]
    return args


def make_photo(folder: Path, name: str, fmt: str, seed: int = 0, user_metadata: bool = True) -> Path:
    path = folder / f"{name}.{fmt}"
    _save(pixels(seed), path, fmt)
    if user_metadata and fmt not in RAW_FORMATS:
        exiftool("-q", "-overwrite_original", *user_metadata_args(fmt), path)
    return path


def make_raw(folder: Path, name: str, ext: str, seed: int = 0, sidecar: bool = False) -> Path:
    path = make_photo(folder, name, ext, seed)
    if sidecar:
        xmp = path.with_suffix(".xmp")
        exiftool("-q", *[f"-XMP-dc:Subject={k}" for k in USER_KEYWORDS],
                 "-XMP-crs:Exposure2012=+0.50", f"-XMP-dc:Title={USER_TITLE}", xmp)
    return path


def make_samples(folder: Path) -> dict[str, Path]:
    """One photo per embedded format and per RAW extension; keys are the extensions."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {fmt: make_photo(folder, f"photo_{fmt}", fmt, seed=i) for i, fmt in enumerate(EMBEDDED_FORMATS)}
    for i, ext in enumerate(RAW_FORMATS):
        out[ext] = make_raw(folder, f"raw_{ext.lower()}", ext, seed=100 + i, sidecar=ext in RAW_WITH_SIDECAR)
    return out


def decoded_pixels_digest(path: Path) -> str:
    """SHA-256 of the decoded pixels (RAW samples: of the whole file, which must not change)."""
    if path.suffix.lstrip(".") in RAW_FORMATS:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    if path.suffix.lower() == ".heic":
        import pillow_heif

        pillow_heif.register_heif_opener()
    with Image.open(path) as im:
        return hashlib.sha256(np.asarray(im.convert("RGB")).tobytes()).hexdigest()


def read_tags(path: Path, *tags: str) -> dict:
    """Tags as ExifTool reports them (JSON, grouped), read by a separate process."""
    import json

    found = json.loads(exiftool("-j", "-G1", *[f"-{t}" for t in tags], path), parse_float=str, parse_int=str)[0]
    found.pop("SourceFile")
    return {k: v if isinstance(v, list) else [v] for k, v in found.items()}
