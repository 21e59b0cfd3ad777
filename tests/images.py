"""Generate every sample photo the tests need: each supported format and each kind of bad input.

Other test modules reuse this:

    from images import make_image, make_library, photo_like
    expected = make_image(tmp_path / "a.heic", "heic")        # -> Expected
    library = make_library(tmp_path / "lib")                  # -> {Path: Expected}

`Expected` says what discovery should call the file and whether decoding succeeds (with the
oriented size) or fails (with a substring of its one-line reason). Everything is small (a few
KB) and deterministic, so tests stay fast.
"""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pillow_heif
import tifffile
from PIL import Image, features

pillow_heif.register_heif_opener()

W, H = 96, 64  # the size of every generated decodable sample (landscape)
TAKEN_AT = "2021:07:04 12:34:56"


@dataclass(frozen=True)
class Expected:
    """What ramcli should make of a sample.

    kind: what `discover()` reports ('image', 'raw', 'video', 'unsupported', 'error').
    decodes: whether `load_for_model` succeeds; then `size` is (width, height) after orientation.
    reason: otherwise, a substring of the one-line reason (from discovery or decoding).
    """

    kind: str
    decodes: bool
    reason: str | None = None
    size: tuple[int, int] | None = None


def photo_like(width: int, height: int, seed: int = 0) -> Image.Image:
    """A photo-like RGB image: smooth gradients and blobs, edges, and sensor-like noise.

    Flat or random images are poor stand-ins: JPEG and resampling behave on real photos
    the way they do on smooth content with some detail and noise.
    """
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (max(2, height // 48), max(2, width // 48), 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    for _ in range(6):  # a few hard-edged discs: objects with edges
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(0.05, 0.25) * min(width, height)
        colour = rng.uniform(0, 255, 3).astype(np.float32)
        mask = ((xx - cx) ** 2 + (yy - cy) ** 2) < r * r
        base[mask] = 0.4 * base[mask] + 0.6 * colour
    base += rng.normal(0, 6, base.shape).astype(np.float32)
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


def jpeg_bytes(img: Image.Image, quality: int = 90, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality, **kwargs)
    return buf.getvalue()


def exif_with(orientation: int | None = None, taken_at: str | None = None) -> Image.Exif:
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    if taken_at is not None:
        exif.get_ifd(0x8769)[0x9003] = taken_at
    return exif


def write_dng(path: Path, preview: Image.Image, orientation: int | None = None) -> None:
    """A minimal valid DNG: a JPEG preview in IFD0 and a 16-bit Bayer raw in a SubIFD.

    tifffile writes the structure; JPEG strips need imagecodecs, so IFD0 is written
    uncompressed and then re-pointed at the JPEG bytes (it fits: JPEG is smaller).
    """
    jpg = jpeg_bytes(preview)
    cfa = np.random.default_rng(1).integers(0, 4000, (64, 96)).astype(np.uint16)
    dng_tags = [(50706, "B", 4, (1, 4, 0, 0), True), (50708, "s", 0, "ramcli test camera", True),
                (271, "s", 0, "Canon", True), (272, "s", 0, "EOS test", True)]
    if orientation is not None:
        dng_tags.append((274, "H", 1, (orientation,), True))
    with tifffile.TiffWriter(path) as tif:
        tif.write(np.asarray(preview), photometric="rgb", subfiletype=1, subifds=1, extratags=dng_tags)
        tif.write(cfa, photometric=32803, subfiletype=0,
                  extratags=[(33421, "H", 2, (2, 2), True), (33422, "B", 4, (0, 1, 1, 2), True), (50717, "I", 1, (4095,), True)])
    with tifffile.TiffFile(path, mode="r+b") as tf:
        page = tf.pages[0]
        assert len(jpg) <= page.databytecounts[0]
        page.tags["Compression"].overwrite(7)
        page.tags["PhotometricInterpretation"].overwrite(6)
        page.tags["StripByteCounts"].overwrite((len(jpg),))
        tf.filehandle.seek(page.dataoffsets[0])
        tf.filehandle.write(jpg)


def bomb_png(width: int = 20000, height: int = 20000) -> bytes:
    """A tiny PNG whose header claims width x height: trips Pillow's bomb guard at open."""

    def chunk(ctype: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + ctype + data + struct.pack(">I", zlib.crc32(ctype + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


MP4_HEADER = b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom" + b"\x00\x00\x00\x08free" + b"\x00\x00\x00\x10mdat" + bytes(8)


def _write(path: Path, kind: str) -> Expected:
    img = photo_like(W, H, seed=len(kind))
    ok = Expected("image", True, None, (W, H))
    if kind == "jpeg":
        path.write_bytes(jpeg_bytes(img, exif=exif_with(taken_at=TAKEN_AT)))
    elif kind == "jpeg_rotated":  # stored landscape, EXIF orientation 6: shown portrait
        path.write_bytes(jpeg_bytes(img, exif=exif_with(orientation=6)))
        return Expected("image", True, None, (H, W))
    elif kind == "jpeg_cmyk":
        path.write_bytes(jpeg_bytes(img.convert("CMYK")))
    elif kind == "jpeg_grey":
        path.write_bytes(jpeg_bytes(img.convert("L")))
    elif kind == "png":
        img.save(path, "PNG")
    elif kind == "png16":
        ramp = (np.linspace(0, 65535, W * H, dtype=np.float64).reshape(H, W)).astype(np.uint16)
        Image.fromarray(ramp).save(path, "PNG")  # uint16 -> mode I;16
    elif kind == "png_alpha":
        rgba = img.convert("RGBA")
        rgba.putalpha(Image.linear_gradient("L").resize((W, H)))
        rgba.save(path, "PNG")
    elif kind == "png_palette_alpha":
        pal = img.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
        pal.save(path, "PNG", transparency=0)
    elif kind == "tiff":
        img.save(path, "TIFF")
    elif kind == "webp":
        img.save(path, "WEBP", quality=90)
    elif kind == "gif_animated":  # first frame red, then green and blue
        frames = [Image.new("RGB", (W, H), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
        frames[0].save(path, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    elif kind == "bmp":
        img.save(path, "BMP")
    elif kind == "heic":
        img.save(path, "HEIF", quality=90)
    elif kind == "avif":
        img.save(path, "AVIF", quality=90)
    elif kind == "dng":
        write_dng(path, img)
        return Expected("raw", True, None, (W, H))
    elif kind == "raw_broken":  # a TIFF header under a RAW name, nothing inside
        path.write_bytes(b"II*\x00\x08\x00\x00\x00" + bytes(64))
        return Expected("raw", False, "camera RAW")
    elif kind == "png_as_jpg":
        img.save(path, "PNG")
    elif kind == "zero_byte":
        path.write_bytes(b"")
        return Expected("error", False, "empty file (0 bytes)")
    elif kind == "truncated_jpeg":
        data = jpeg_bytes(photo_like(W * 4, H * 4, seed=7))
        path.write_bytes(data[: len(data) // 2])
        return Expected("image", False, "image file is truncated")
    elif kind == "text_as_jpg":
        path.write_text("Holiday notes: remember to back up the photos.\n")
        return Expected("error", False, "not an image (text)")  # a photo's name: a broken photo
    elif kind == "bomb":
        path.write_bytes(bomb_png())
        return Expected("image", False, "decompression bomb guard")
    elif kind == "mp4":
        path.write_bytes(MP4_HEADER)
        return Expected("video", False, "video")
    else:
        raise ValueError(f"unknown sample kind {kind!r}; known: {', '.join(KINDS)}")
    return ok


#: kind -> file name used by make_library (names chosen to exercise unicode and spaces too).
KINDS: dict[str, str] = {
    "jpeg": "photo.jpg",
    "jpeg_rotated": "portrait (rotated).jpg",
    "jpeg_cmyk": "cmyk.jpg",
    "jpeg_grey": "grey.jpeg",
    "png": "Fête d'été 🎉.png",
    "png16": "sixteen bit.png",
    "png_alpha": "alpha.png",
    "png_palette_alpha": "palette.png",
    "tiff": "scan.tif",
    "webp": "web.webp",
    "gif_animated": "animated.gif",
    "bmp": "old.bmp",
    "heic": "iphone.HEIC",
    "avif": "modern.avif",
    "dng": "camera.dng",
    "raw_broken": "broken.nef",
    "png_as_jpg": "really a png.jpg",
    "zero_byte": "empty.jpg",
    "truncated_jpeg": "truncated.jpg",
    "text_as_jpg": "notes.jpg",
    "bomb": "bomb.png",
    "mp4": "clip.mp4",
}


def available_kinds() -> list[str]:
    """All kinds this Pillow build can write (AVIF needs Pillow's AVIF support)."""
    return [k for k in KINDS if k != "avif" or features.check("avif")]


def make_image(path: Path, kind: str) -> Expected:
    """Write one sample of `kind` (see KINDS) at `path`; returns what ramcli should make of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return _write(path, kind)


def make_library(root: Path, read_only: bool = True) -> dict[Path, Expected]:
    """A folder with one file of every kind (plus a read-only photo) -> {path: Expected}.

    Files live in a few sub-folders (one with a space and non-ASCII name) so that the walk is
    exercised too. Junk the walk must ignore (hidden folders, @eaDir, .DS_Store, sidecars) is
    added but not listed in the result.
    """
    root = Path(root)
    out: dict[Path, Expected] = {}
    for i, kind in enumerate(available_kinds()):
        folder = root / ("2021 été" if i % 3 == 0 else "misc" if i % 3 == 1 else "")
        path = folder / KINDS[kind]
        out[path] = make_image(path, kind)
    if read_only:
        path = root / "misc" / "read only.jpg"
        out[path] = make_image(path, "jpeg")
        path.chmod(0o444)
    (root / ".thumbnails").mkdir()
    make_image(root / ".thumbnails" / "thumb.jpg", "jpeg")
    (root / "@eaDir" / "photo.jpg").mkdir(parents=True)
    make_image(root / "@eaDir" / "photo.jpg" / "SYNOPHOTO_THUMB_XL.jpg", "jpeg")
    (root / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(32))
    (root / "misc" / "photo.jpg.xmp").write_text("<x:xmpmeta xmlns:x='adobe:ns:meta/'/>")
    return out


def run_unprivileged(code: str) -> str:
    """Run Python `code` where file permissions apply; returns its stdout, stripped.

    Permission-denied cases cannot be made as root (root reads a chmod-000 file), and tests
    run as root on CI. So the code runs in a subprocess which, when we are root, has lost the
    capabilities that bypass permissions (util-linux `setpriv`), with `WORKDIR` (a fresh folder
    it may write in) defined and `images` importable.
    """
    tests_dir = Path(__file__).resolve().parent
    no_bypass = "-dac_override,-dac_read_search"
    wrapper = ["setpriv", f"--bounding-set={no_bypass}", f"--inh-caps={no_bypass}"] if os.geteuid() == 0 else []
    with tempfile.TemporaryDirectory(prefix="ramcli-perm-") as tmp:
        prelude = (
            f"import sys\nfrom pathlib import Path\nsys.path[:0] = [{str(tests_dir)!r}, {str(tests_dir.parent)!r}]\n"
            f"WORKDIR = Path({tmp!r})\n"
        )
        try:
            done = subprocess.run([*wrapper, sys.executable, "-c", prelude + code], capture_output=True, text=True, cwd=tmp)
        finally:
            subprocess.run(["chmod", "-R", "u+rwx", tmp], check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()
