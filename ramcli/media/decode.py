"""Turn one photo file into the model's input, plus what the index needs to know about it.

The official RAM preprocessing is `convert('RGB')`, torchvision `Resize((S, S))` on the PIL
image (bilinear with PIL's antialiasing, aspect ratio not kept), `ToTensor`, `Normalize`
(ImageNet mean/std). Those settings are the model's data config (`ArchConfig.data_config`,
timm's keys: input size, interpolation, mean, std); everything here takes them from it, so
`tag`, `eval`, the data engine, the captioner and the crop embedder prepare images alike.
ramcli keeps the official steps, with deliberate differences:

- EXIF orientation is applied first (`ImageOps.exif_transpose`): a portrait photo is tagged
  upright, as the user sees it.
- Optional JPEG draft mode (`img.draft('RGB', (2S, 2S))`): libjpeg scales by 1/2, 1/4 or 1/8
  in the DCT domain while keeping at least 2x the input size, so a 12 MP photo is decoded at a
  fraction of the cost before the same antialiased resize. It moves scores slightly, so it is
  used only where decoding bounds the speed (workers feeding a GPU) or when asked for; the
  default `draft=False` matches the official pipeline exactly (for photos without an
  orientation tag).

Two conversions go beyond `convert('RGB')`, which mishandles them: 16-bit greyscale is scaled
to 8 bits (convert clips it to white), and camera RAW is read through its embedded JPEG
preview (rawpy/LibRaw, in-process: no subprocess per file, and the preview is what the camera
rendered). RGBA/LA lose their alpha exactly as `convert('RGB')` drops it (no compositing), so
the model sees what it saw in training.

Workers return uint8 (3, S, S) tensors, four times less to move than float; `normalize` does
the ToTensor + Normalize arithmetic on the device in one place. Every failure is an
`ImageError` with a one-line reason; Pillow's decompression-bomb guard stays on.
"""

from __future__ import annotations

import hashlib
import io
import struct
import warnings
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import rawpy
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from ramcli.media.discover import not_an_image_reason, os_reason, sniff_bytes
from ramcli.errors import RamcliError

#: data-config interpolation names -> Pillow filters; torch's antialiased `interpolate` (device
#: decoding) takes the same names
_PIL_FILTERS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}

#: Where a RAW's preview records its byte hash (the RAW file itself has no byte rule).
_PREVIEW_HASH = "ramcli_preview_hash"
_EXIF_IFD = 0x8769
_DATETIME_ORIGINAL = 0x9003
_ORIENTATION = 0x0112
#: LibRaw's `flip` (the RAW's orientation) as the PIL transpose that puts it upright.
_LIBRAW_FLIP = {3: Image.Transpose.ROTATE_180, 5: Image.Transpose.ROTATE_90, 6: Image.Transpose.ROTATE_270}


class ImageError(RamcliError):
    """A photo that cannot be read; the message is the one-line reason shown to the user."""


@dataclass
class Decoded:
    """A photo ready for the model: pixels (uint8, (3, S, S)) and facts for the index.

    `width`/`height` are the original size after EXIF orientation; `content_hash` identifies
    the image data whatever happens to its metadata.
    """

    pixels: torch.Tensor | None
    width: int
    height: int
    taken_at: datetime | None
    content_hash: str
    #: `defer_jpeg`: the JPEG's bytes (1-D uint8) and EXIF orientation, decoded later on the
    #: model's device by `deferred_jpeg.decode_jpegs` (nvJPEG on CUDA); `pixels` is then None.
    encoded: torch.Tensor | None = None
    orientation: int = 1


def normalize(batch: torch.Tensor, data_config: dict | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (B, 3, S, S) or (3, S, S) -> normalised float, on the tensor's own device.

    The same arithmetic as ToTensor (`/255` in float32) then Normalize (`(x - mean) / std`) with
    the data config's mean and std (the model's `pretrained_cfg`; ImageNet's when None), so
    `draft=False` inputs equal the official pipeline's; cast to `dtype` at the end.
    """
    cfg = data_config or {}
    x = batch.to(torch.float32).div(255)
    mean = torch.tensor(cfg.get("mean", IMAGENET_DEFAULT_MEAN), dtype=torch.float32, device=x.device).view(-1, 1, 1)
    std = torch.tensor(cfg.get("std", IMAGENET_DEFAULT_STD), dtype=torch.float32, device=x.device).view(-1, 1, 1)
    return x.sub(mean).div(std).to(dtype)


def resize_for_model(img: Image.Image, size: int, interpolation: str = "bilinear") -> torch.Tensor:
    """An image (any mode) -> uint8 (3, size, size): RGB, squash-resized with the data config's
    interpolation (Pillow's antialiased filter, as torchvision's Resize on a PIL image)."""
    try:
        resample = _PIL_FILTERS[interpolation]
    except KeyError:
        raise RamcliError(f"unknown interpolation {interpolation!r}; use one of {', '.join(_PIL_FILTERS)}") from None
    resized = to_rgb(img).resize((size, size), resample)
    return torch.from_numpy(np.array(resized, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def model_input(img: Image.Image, data_config: dict) -> torch.Tensor:
    """uint8 (3, S, S) for a model with this data config (`model.pretrained_cfg`), from a PIL image
    already oriented: for crops and images that do not come from files (engine, captioner)."""
    return resize_for_model(img, data_config["input_size"][-1], data_config.get("interpolation", "bilinear"))


def open_image(path: Path, data: bytes | None = None) -> Image.Image:
    """Open a photo by its content, not its name: Pillow formats, HEIF, or a RAW's preview.

    The image is opened lazily (header read, pixels not decoded), so JPEG draft mode still
    applies. `data`, when given, is the file's bytes already read. Raises `ImageError`.
    """
    path = Path(path)
    if data is None:
        data = read_bytes(path)
    if not data:
        raise ImageError("empty file (0 bytes)")
    sniffed = sniff_bytes(data[:512], path.suffix.lower())
    if sniffed is not None and sniffed.kind == "video":
        raise ImageError("video (not supported)")
    if sniffed is not None and sniffed.kind == "raw":
        return _open_raw_preview(data)
    try:
        return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageError(_bomb_reason(exc)) from None
    except UnidentifiedImageError:
        raise ImageError(not_an_image_reason(data[:512])) from None
    except (OSError, SyntaxError, ValueError, struct.error) as exc:
        raise ImageError(_decode_reason(exc)) from None


def load_for_model(path: Path, size: int, draft: bool = False, defer_jpeg: bool = False,
                   interpolation: str = "bilinear", data: bytes | None = None) -> Decoded:
    """Decode, orient, convert and resize one photo to uint8 (3, size, size). Raises `ImageError`.

    `size` and `interpolation` come from the model's data config; `draft` decodes JPEGs in DCT
    draft mode (faster, slightly different scores).

    `defer_jpeg`: a plain JPEG (RGB or greyscale, complete up to its EOI marker) is only
    parsed, not decoded: its bytes come back for `deferred_jpeg.decode_jpegs` on the model's
    device. Anything else (CMYK, RAW previews, truncated files, other formats) is decoded here
    as usual, so every bad file still gets its one-line reason.

    `data`: the file's bytes, already read (from object storage); `path` then only names it.
    """
    path = Path(path)
    data = read_bytes(path) if data is None else data
    img = open_image(path, data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's EXIF/palette chatter must not reach the terminal
            width, height = img.size
            orientation = img.getexif().get(_ORIENTATION, 1)
            if orientation in (5, 6, 7, 8):
                width, height = height, width
            taken_at = _taken_at(img)
            known_hash = _byte_hash(data) or img.info.get(_PREVIEW_HASH)
            if defer_jpeg and known_hash and _deferrable(img, data):
                encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
                return Decoded(None, width, height, taken_at, known_hash, encoded, orientation)
            if draft and img.format == "JPEG":
                img.draft("RGB", (2 * size, 2 * size))
            rgb = to_rgb(upright(img))
            digest = known_hash or pixel_hash(rgb)
            pixels = resize_for_model(rgb, size, interpolation)
    except Image.DecompressionBombError as exc:
        raise ImageError(_bomb_reason(exc)) from None
    except (OSError, SyntaxError, ValueError, struct.error, EOFError, IndexError) as exc:
        raise ImageError(_decode_reason(exc)) from None
    finally:
        img.close()
    return Decoded(pixels, width, height, taken_at, digest)


def _deferrable(img: Image.Image, data: bytes) -> bool:
    """A JPEG that nvJPEG / libjpeg decode to the same RGB as Pillow: YCbCr or greyscale, with
    its EOI marker (a truncated file is left to Pillow, which names the problem)."""
    return (img.format == "JPEG" and img.mode in ("RGB", "L") and _PREVIEW_HASH not in img.info
            and data.rstrip(b"\0").endswith(b"\xff\xd9"))


def content_hash(path: Path) -> str:
    """A hash of the image data that survives metadata edits (EXIF, XMP, IPTC).

    JPEG: the bytes from the first SOS marker to EOI (the entropy-coded scans); PNG: the
    critical chunks (IHDR, PLTE, tRNS, IDAT); a RAW: its preview's JPEG scans; anything else:
    the decoded RGB pixels. Raises `ImageError`.
    """
    data = read_bytes(Path(path))
    digest = _byte_hash(data)
    if digest is not None:
        return digest
    img = open_image(Path(path), data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return img.info.get(_PREVIEW_HASH) or pixel_hash(to_rgb(upright(img)))
    except (OSError, SyntaxError, ValueError, struct.error, EOFError) as exc:
        raise ImageError(_decode_reason(exc)) from None
    finally:
        img.close()


def upright(img: Image.Image) -> Image.Image:
    """`img` decoded and turned as its EXIF orientation says, in place: `exif_transpose`'s default
    copies the image even when there is nothing to turn, a 36 MB copy per 12 MP photo."""
    ImageOps.exif_transpose(img, in_place=True)
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """`convert('RGB')`, except 16-bit greyscale, which is scaled to 8 bits instead of clipped."""
    if img.mode.startswith("I;16") or img.mode == "I":
        wide = np.asarray(img, dtype=np.uint32)
        if img.mode == "I":
            wide = np.clip(wide, 0, 65535)
        img = Image.fromarray((wide >> 8).astype(np.uint8), mode="L")
    return img if img.mode == "RGB" else img.convert("RGB")


def pixel_hash(rgb: Image.Image) -> str:
    """Hash of decoded pixels: the fallback identity for formats without a byte-level rule."""
    h = hashlib.blake2b(b"pixels", digest_size=16)
    h.update(struct.pack("<II", *rgb.size))
    h.update(rgb.tobytes())
    return h.hexdigest()


def read_bytes(path: Path) -> bytes:
    """The whole file, or `ImageError` with the OS reason ('permission denied', ...)."""
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except IsADirectoryError:
        raise ImageError("is a directory") from None
    except OSError as exc:
        raise ImageError(os_reason(exc)) from None


def _byte_hash(data: bytes) -> str | None:
    """The metadata-proof byte hash for JPEG and PNG; None for other formats."""
    if data.startswith(b"\xff\xd8"):
        return _jpeg_scan_hash(data)
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return _png_critical_hash(data)
    return None


def _jpeg_scan_hash(data: bytes) -> str | None:
    """Walk the JPEG marker segments to the first SOS and hash from there to EOI.

    The segments are walked (not searched) because EXIF often carries a thumbnail JPEG with
    its own SOS marker. Inside scans 0xFF is byte-stuffed, so the first FFD9 after SOS is the
    main image's EOI; anything after it (trailers, MPF images) is not pixels of this image.
    """
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xDA:
            end = data.find(b"\xff\xd9", pos)
            scans = data[pos : end + 2] if end >= 0 else data[pos:]
            return hashlib.blake2b(b"jpeg" + scans, digest_size=16).hexdigest()
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        pos += 2 + length
    return None


def _png_critical_hash(data: bytes) -> str | None:
    h = hashlib.blake2b(b"png", digest_size=16)
    pos = 8
    while pos + 8 <= len(data):
        length, ctype = struct.unpack(">I4s", data[pos : pos + 8])
        if ctype in (b"IHDR", b"PLTE", b"tRNS", b"IDAT"):
            h.update(ctype)
            h.update(data[pos + 8 : pos + 8 + length])
        if ctype == b"IEND":
            break
        pos += 12 + length
    return h.hexdigest()


def _open_raw_preview(data: bytes) -> Image.Image:
    """A camera RAW's embedded preview (the camera's own JPEG rendering), oriented like the RAW."""
    try:
        with rawpy.imread(io.BytesIO(data)) as raw:
            thumb = raw.extract_thumb()
            flip = raw.sizes.flip
    except rawpy.LibRawNoThumbnailError:
        raise ImageError("camera RAW without an embedded preview") from None
    except (rawpy.LibRawError, OSError, ValueError) as exc:
        raise ImageError(f"unreadable camera RAW ({_one_line(exc)})") from None
    if thumb.format == rawpy.ThumbFormat.JPEG:
        img = Image.open(io.BytesIO(thumb.data))
        img.info[_PREVIEW_HASH] = _jpeg_scan_hash(thumb.data)
        if flip not in _LIBRAW_FLIP or img.getexif().get(_ORIENTATION, 1) != 1:
            return img  # still lazy, so draft mode applies
    else:
        img = Image.fromarray(thumb.data)
    return img.transpose(_LIBRAW_FLIP[flip]) if flip in _LIBRAW_FLIP else img


def _taken_at(img: Image.Image) -> datetime | None:
    """EXIF DateTimeOriginal ('YYYY:MM:DD HH:MM:SS'), or None when absent or malformed."""
    try:
        value = img.getexif().get_ifd(_EXIF_IFD).get(_DATETIME_ORIGINAL)
        return datetime.strptime(str(value).strip("\x00 "), "%Y:%m:%d %H:%M:%S") if value else None
    except (ValueError, TypeError, KeyError, OSError, SyntaxError, struct.error):
        return None


def _bomb_reason(exc: Exception) -> str:
    limit = 2 * Image.MAX_IMAGE_PIXELS if Image.MAX_IMAGE_PIXELS else 0
    return f"larger than Pillow's limit of {limit} pixels (decompression bomb guard)"


def _decode_reason(exc: Exception) -> str:
    message = _one_line(exc)
    if "truncated" in message or "broken data stream" in message or isinstance(exc, EOFError):
        return "image file is truncated"
    if isinstance(exc, PermissionError):
        return "permission denied"
    return f"cannot decode image ({message})" if message else f"cannot decode image ({type(exc).__name__})"


def _one_line(exc: Exception) -> str:
    """The exception's message on one short line (LibRaw's come as bytes)."""
    arg = exc.args[0] if len(exc.args) == 1 else str(exc)
    text = arg.decode("utf-8", "replace") if isinstance(arg, bytes) else str(arg)
    return " ".join(text.split())[:200]


