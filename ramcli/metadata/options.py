"""What the metadata writer writes where: the options shared by `tag`, `write` and `untag`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ramcli.errors import UsageError

Policy = Literal["auto", "always", "never"]
Lang = Literal["en", "zh", "both"]
SidecarName = Literal["adobe", "ext"]


@dataclass(frozen=True)
class WriterOptions:
    """What to write where. Defaults are chosen so every common photo app sees the tags.

    - `tag_root`: root of the hierarchical keywords (`auto|dog`); '' writes bare leaves there.
    - `iptc`: IPTC Keywords. 'auto' updates them only in files that already carry IPTC.
    - `digikam` (TagsList) and `windows` (LastKeywordXMP): 'auto' updates them only where the
      file already has the field, because digiKam and Immich read the first non-empty field and
      a stale one would hide the new tags.
    - `lang`: keyword language: English names, Chinese names, or both.
    - `sidecar`: write XMP sidecars for every format, not only RAW.
    - `sidecar_name`: name of a new sidecar: 'adobe' `IMG.xmp` (`IMG.EXT.xmp` when another file
      shares the base name), 'ext' always `IMG.EXT.xmp`.
    - `keep_backups`: keep a copy of each photo as it was, `FILE_original` (as ExifTool names it).
    - `preserve_mtime`: keep the file modification time (to the nanosecond). Off by default, because
      Immich and PhotoPrism only re-read files whose mtime changed.
    """

    tag_root: str = "auto"
    iptc: Policy = "auto"
    digikam: Policy = "auto"
    windows: Policy = "auto"
    lang: Lang = "en"
    sidecar: bool = False
    sidecar_name: SidecarName = "adobe"
    keep_backups: bool = False
    preserve_mtime: bool = False
    batch_size: int = 64
    exiftool: str = "exiftool"

    def __post_init__(self) -> None:
        for name in ("iptc", "digikam", "windows"):
            if getattr(self, name) not in ("auto", "always", "never"):
                raise UsageError(f"--{name} must be auto, always or never, not {getattr(self, name)!r}")
        if self.lang not in ("en", "zh", "both"):
            raise UsageError(f"--lang must be en, zh or both, not {self.lang!r}")
        if self.sidecar_name not in ("adobe", "ext"):
            raise UsageError(f"--sidecar-name must be adobe or ext, not {self.sidecar_name!r}")
        if "|" in self.tag_root or "/" in self.tag_root:
            raise UsageError(f"--tag-root must be one level without '|' or '/', not {self.tag_root!r}")
        if self.batch_size < 1:
            raise UsageError("the write batch size must be at least 1")


