"""Find the photos under a set of roots, recognising each file by its content.

Why content and not extensions: libraries are full of photos without an extension, PNGs
saved as `.jpg`, and text files that only claim to be images. Each file's first bytes are
sniffed; what no signature names is offered to Pillow (with pillow-heif registered), which
reads only the header. Nothing here decodes pixels: a truncated or bomb-sized image is still
an 'image' and its decode reports the one-line reason.

Symlinks, because a link can lead a write out of the library (docs/formats.md has the policy):
a link whose target stays inside the roots is followed. A link to a *file* outside every root
is found like any photo but carries `link` (its place inside the roots), so the sinks know it
leads out: the index records it, the metadata writer leaves it alone unless asked. A link to a
*folder* outside every root is not walked (kind 'link', with the reason) unless `follow_links`;
one to a folder that contains a root (`/`, `..`) never is. Each directory is visited once (by
`(st_dev, st_ino)`), so any remaining loop ends.

Hidden entries and OS junk are skipped silently; an unreadable directory is reported as an
'error' and the walk goes on. A file with a photo's extension that is not a photo (empty, a note
saved as `.jpg`) is an 'error' too: a broken photo, not noise. Order is deterministic: entries
sorted by name, depth first.
"""

from __future__ import annotations

import fnmatch
import os
import stat
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pillow_heif
from PIL import Image, UnidentifiedImageError

pillow_heif.register_heif_opener()  # HEIC/HEIF through Pillow's open(); idempotent

Kind = Literal["image", "raw", "video", "unsupported", "error", "link"]
#: The kinds that are photos: tagged, indexed and given metadata; every other kind is reported or skipped.
PHOTO_KINDS = frozenset({"image", "raw"})

#: Camera RAW files whose header is a plain TIFF one: told apart from TIFF by extension.
RAW_SUFFIXES = frozenset(
    ".cr2 .nef .nrw .arw .srf .sr2 .dng .pef .orf .rw2 .rwl .raf .cr3 .srw .3fr .erf .kdc .dcr .mos .iiq .x3f"
    " .crw .mrw".split()
)
#: Extensions that mark a file as meant to be a photo: an empty one is then an error, not noise.
PHOTO_SUFFIXES = RAW_SUFFIXES | frozenset(
    ".jpg .jpeg .jpe .jfif .png .tif .tiff .webp .gif .bmp .heic .heif .hif .avif".split()
)
VIDEO_SUFFIXES = frozenset(".mp4 .m4v .mov .avi .mkv .webm .mts .m2ts .3gp .mpg .mpeg .wmv .flv".split())
#: Metadata sidecars (ours and other tools'): part of a photo, not a file to report.
SIDECAR_SUFFIXES = frozenset({".xmp", ".aae"})
#: Junk that OSes, NASes and viewers leave in photo folders; names starting with "." are skipped too.
JUNK_NAMES = frozenset(
    {"@eaDir", "#recycle", "$RECYCLE.BIN", "System Volume Information", "lost+found", "Thumbs.db", "desktop.ini"}
)

_ISOBMFF_IMAGE_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1", b"avif", b"avis"}
_ISOBMFF_VIDEO_BRANDS = {b"isom", b"iso2", b"iso4", b"iso5", b"iso6", b"mp41", b"mp42", b"qt  ", b"M4V ", b"avc1", b"dash", b"MSNV"}
_HEAD_BYTES = 512


@dataclass(frozen=True)
class Found:
    """One file the walk met. `kind` says what to do with it; `reason` why it is skipped.

    `format` is the detected format ('JPEG', 'HEIF', 'DNG', 'video/mp4', ...) when known;
    `size` and `mtime_ns` come from the same stat, for incremental runs. `link` is set when the
    file lies outside every root and was reached through a symlink: the absolute path inside
    the roots by which it was reached (its root resolved, the rest as walked).
    """

    path: Path
    kind: Kind
    reason: str | None = None
    format: str | None = None
    size: int = 0
    mtime_ns: int = 0
    link: Path | None = None


@dataclass(frozen=True)
class Sniffed:
    kind: Kind
    format: str | None
    reason: str | None = None


def discover(
    roots: Sequence[Path], include: Sequence[str] = (), exclude: Sequence[str] = (), follow_links: bool = False
) -> Iterator[Found]:
    """Every file under `roots`, classified. Roots may be files (always yielded) or folders.

    `follow_links` also walks symlinked folders outside the roots (never one containing a root).

    Glob semantics (case-insensitive, `fnmatch`, where `*` also crosses `/`): a pattern without
    `/` is matched against the file or folder *name* (`*.jpg`, `IMG_*`); a pattern with `/` is
    matched against the path relative to its root, in POSIX form (`2023/*`, `*/drafts/*`).
    `exclude` prunes whole folders and drops files; `include`, when given, keeps only files
    that match one of its patterns. Excluded and not-included files are not reported.
    """
    walk = _Walk([Path(os.path.realpath(r)) for r in roots], include, exclude, follow_links)
    for root in roots:
        root = Path(root)
        try:
            st = root.stat()
        except OSError as exc:
            yield Found(root, "error", os_reason(exc))
            continue
        if stat.S_ISDIR(st.st_mode):
            yield from walk.folder(root, root, st, None)
        else:
            yield from walk.classify(root, st, None)


def sniff(path: Path) -> Sniffed:
    """What a file is, from its first bytes (and, for TIFF-based RAW, its extension)."""
    with open(path, "rb") as fh:
        head = fh.read(_HEAD_BYTES)
    suffix = path.suffix.lower()
    broken: Kind = "error" if suffix in PHOTO_SUFFIXES else "unsupported"  # a photo's name, no photo inside
    if not head:
        return Sniffed(broken, None, "empty file (0 bytes)")
    by_magic = sniff_bytes(head, suffix)
    if by_magic is not None:
        return by_magic
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as img:
                return Sniffed("image", img.format)
    except Image.DecompressionBombError:
        return Sniffed("image", None)  # a real header: decoding reports the bomb guard
    except (UnidentifiedImageError, SyntaxError, ValueError, OSError):
        pass
    if suffix in VIDEO_SUFFIXES:
        return Sniffed("video", f"video/{suffix[1:]}", "video (not supported)")
    return Sniffed(broken, None, not_an_image_reason(head))


def what_is(path: Path) -> Sniffed | None:
    """`sniff`, for a caller that has no `Found` (a photo named by the index, a ledger target):
    None when the file cannot be read."""
    try:
        return sniff(path)
    except OSError:
        return None


def sniff_bytes(head: bytes, suffix: str = "") -> Sniffed | None:
    """Signatures Pillow alone does not settle: RAW (often a TIFF header), HEIF/AVIF, videos."""
    if head.startswith(b"FUJIFILMCCD-RAW"):
        return Sniffed("raw", "RAF")
    if head[:4] in (b"IIRO", b"IIRS", b"MMOR"):
        return Sniffed("raw", "ORF")
    if head[:4] == b"IIU\x00":
        return Sniffed("raw", "RW2")
    if head[:2] == b"II" and head[6:14] == b"HEAPCCDR":
        return Sniffed("raw", "CRW")
    if head[:4] == b"\x00MRM":
        return Sniffed("raw", "MRW")
    if head[:4] in (b"II*\x00", b"MM\x00*") and suffix in RAW_SUFFIXES:
        return Sniffed("raw", suffix[1:].upper())
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand == b"crx ":
            return Sniffed("raw", "CR3")
        if brand in _ISOBMFF_IMAGE_BRANDS:
            return Sniffed("image", "AVIF" if brand.startswith(b"avi") else "HEIF")
        if brand in _ISOBMFF_VIDEO_BRANDS or brand.startswith((b"3g", b"M4")):
            return Sniffed("video", "video/" + brand.decode("latin-1").strip().lower(), "video (not supported)")
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return Sniffed("video", "video/matroska", "video (not supported)")
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return Sniffed("video", "video/avi", "video (not supported)")
    if head[:4] in (b"\x00\x00\x01\xba", b"\x00\x00\x01\xb3"):
        return Sniffed("video", "video/mpeg", "video (not supported)")
    return None


def not_an_image_reason(head: bytes) -> str:
    """'not an image (text)' for text (a note saved as .jpg), else '(unknown format)'."""
    if b"\x00" not in head:
        try:
            head.decode("utf-8")
            return "not an image (text)"
        except UnicodeDecodeError as exc:
            if exc.start >= len(head) - 3:  # a multi-byte character cut by the read
                return "not an image (text)"
    return "not an image (unknown format)"


def describe_skipped(counts: Counter[str]) -> str:
    """'skipped: 3 videos, 2 unsupported, 1 error', or '' when nothing was skipped."""
    parts = []
    kinds = (("video", "video", "videos"), ("unsupported", "unsupported", "unsupported"),
             ("link", "folder link not followed", "folder links not followed"), ("error", "error", "errors"))
    for kind, one, many in kinds:
        n = counts.get(kind, 0)
        if n:
            parts.append(f"{n} {one if n == 1 else many}")
    return "skipped: " + ", ".join(parts) if parts else ""


class _Walk:
    """The state of one `discover` call: the resolved roots and what was visited already."""

    def __init__(self, roots: list[Path], include: Sequence[str], exclude: Sequence[str], follow_links: bool):
        self.roots, self.include, self.exclude, self.follow_links = roots, include, exclude, follow_links
        self.seen_dirs: set[tuple[int, int]] = set()
        self.seen_files: set[tuple[int, int]] = set()

    def inside(self, real: str) -> bool:
        return any(real == str(r) or real.startswith(str(r).rstrip(os.sep) + os.sep) for r in self.roots)

    def contains_a_root(self, real: str) -> bool:
        base = real.rstrip(os.sep) + os.sep
        return any(str(r) == real or str(r).startswith(base) for r in self.roots)

    def folder(self, root: Path, folder: Path, folder_stat: os.stat_result, via: Path | None) -> Iterator[Found]:
        """Walk `folder`; `via` is its path inside the roots when the walk has left them."""
        key = (folder_stat.st_dev, folder_stat.st_ino)
        if key in self.seen_dirs:
            return  # a symlink loop, or a folder reached twice
        self.seen_dirs.add(key)
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            yield Found(folder, "error", os_reason(exc))
            return
        for entry in entries:
            if _is_junk(entry.name):
                continue
            path = Path(entry.path)
            rel = path.relative_to(root).as_posix()
            if _matches(entry.name, rel, self.exclude):
                continue
            try:
                st = os.stat(path)  # follows symlinks
            except OSError as exc:
                reason = "broken symlink" if entry.is_symlink() else os_reason(exc)
                yield Found(path, "error", reason)
                continue
            child_via = via / entry.name if via is not None else None
            if entry.is_symlink():
                if self.inside(os.path.realpath(path)):
                    child_via = None
                elif child_via is None:
                    child_via = Path(os.path.realpath(root)) / rel
            if stat.S_ISDIR(st.st_mode):
                if entry.is_symlink():
                    refused = self._refuse_folder_link(os.path.realpath(path), child_via is not None)
                    if refused:
                        yield Found(path, "link", refused)
                        continue
                yield from self.folder(root, path, st, child_via)
            elif stat.S_ISREG(st.st_mode):
                if entry.name.lower().endswith(tuple(SIDECAR_SUFFIXES)):
                    continue
                if self.include and not _matches(entry.name, rel, self.include):
                    continue
                yield from self.classify(path, st, child_via)

    def _refuse_folder_link(self, real: str, leaves: bool) -> str | None:
        """Why a symlinked folder is not walked, or None to walk it."""
        if self.contains_a_root(real):
            return f"symlink to {real}, which contains the tagged folder: never followed"
        if leaves and not self.follow_links:
            return f"symlink to the folder {real} outside the tagged folders: not followed (--follow-links walks it)"
        return None

    def classify(self, path: Path, st: os.stat_result, via: Path | None) -> Iterator[Found]:
        key = (st.st_dev, st.st_ino)
        if key in self.seen_files:
            return  # the same file through a second link
        self.seen_files.add(key)
        try:
            s = sniff(path)
        except OSError as exc:
            yield Found(path, "error", os_reason(exc), None, st.st_size, st.st_mtime_ns, via)
            return
        yield Found(path, s.kind, s.reason, s.format, st.st_size, st.st_mtime_ns, via)


def _is_junk(name: str) -> bool:
    return name.startswith(".") or name in JUNK_NAMES


def _matches(name: str, rel: str, patterns: Sequence[str]) -> bool:
    for pattern in patterns:
        target = rel if "/" in pattern else name
        if fnmatch.fnmatch(target.lower(), pattern.lower()):
            return True
    return False


def os_reason(exc: OSError) -> str:
    """A one-line reason for an OS error: 'permission denied', 'no such file or directory'."""
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, FileNotFoundError):
        return "no such file or directory"
    return (exc.strerror or str(exc)).lower()


def walk_reaches(root: Path, path: Path, include: Sequence[str] = (), exclude: Sequence[str] = ()) -> bool:
    """Whether a walk of `root` with these globs would yield the file `path` (which need not
    exist any more): no hidden or junk name and no excluded folder on the way, not a sidecar,
    and included. `ramcli watch` asks this of every path the OS reports."""
    try:
        rel = Path(path).relative_to(root)
    except ValueError:
        return False
    parts = rel.parts
    for depth, name in enumerate(parts, start=1):
        if _is_junk(name) or _matches(name, "/".join(parts[:depth]), exclude):
            return False
    if not parts or parts[-1].lower().endswith(tuple(SIDECAR_SUFFIXES)):
        return False
    return not include or _matches(parts[-1], rel.as_posix(), include)
