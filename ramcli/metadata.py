"""Tags into the photos' own metadata, through ExifTool, without losing a user keyword or a pixel.

API (what the tagging pipeline and `ramcli write`/`untag` call)::

    from ramcli.metadata import MetadataWriter, WriterOptions
    from ramcli.ledger import Ledger

    with MetadataWriter(WriterOptions(), Ledger(db)) as writer:     # starts ExifTool, checks version
        plans = writer.plan_batch([(path, [TagScore, ...]), ...])     # dry run: nothing written
        outcomes = writer.write_batch([(path, tags), ...], model_id="ram_plus_swin_large_14m")
        outcomes = writer.write_batch(items, model_id=..., captions=["a dog on a beach", None, ...])
        outcomes = writer.untag_batch([path, ...])                    # remove ramcli's keywords only

Captions (Tag2Text) go to `XMP-dc:Description` (x-default), to the same targets as the keywords,
only where no description is there yet or where the description is still exactly the one ramcli
wrote (the ledger knows it, under the field `XMP-dc:Description`). A user's description, in any
language or in IPTC `Caption-Abstract` / EXIF `ImageDescription`, is never touched and keeps
ramcli from writing one. A caption of None leaves the description as it is (only `untag`
removes ramcli's).

Each `WriteOutcome` says per photo: `status` 'written' | 'unchanged' | 'failed', a one-line
`error`, `changes` (human-readable lines such as `IMG.CR2.xmp XMP-dc:Subject +dog -cat`) and,
when the photo file itself was rewritten, its new `size`/`mtime_ns` (give them to
`Index.update_stat` so the incremental tagger does not think the photo changed). One bad file
never fails the batch.

How a batch runs, and why:

1. Targets. Embedded-capable formats (JPEG, TIFF, PNG, WebP, HEIC/HEIF, AVIF, DNG) are written in
   place; RAW formats (and everything with `sidecar=True`) get XMP sidecars, because ExifTool's
   Known Problems list RAW writes that vendor software rejects. Every existing sidecar of a photo
   is updated in place (it may hold develop settings); a new one is named per `sidecar_name`.
   Targets the ledger knows from earlier runs are always included, so that switching modes
   moves ramcli's keywords instead of leaving stale ones behind.
2. One ExifTool call (`-j`) reads the current keyword and description fields of every target.
3. The per-field diff is computed here, in Python, from the current values, the ledger and the
   wanted tags (`plan_field`) and caption (`plan_description`). Files whose fields would not change are not touched at all, so a
   re-run is a no-op.
4. The ledger changes that hang on the write are staged (committed) in the ledger database, so
   that a kill during the write cannot leave ramcli keywords the ledger does not know (see
   ramcli/ledger.py).
5. One ExifTool call writes every changed target: a JSON file with one object per target (the
   full new list of each changed field) imported with `-j=`. This is how per-file values fit in
   a single command; ExifTool still rewrites each file via a temporary file and a rename and
   never touches the image data. Per file, ExifTool says what failed (stderr, `-efile`) and what
   it left unchanged (`-efile2`).
6. Settle, in one transaction: the staged changes of targets ExifTool wrote go into the ledger.
   A target that ExifTool warned about, or a batch during which ExifTool died, is read back, and
   the ledger records exactly what the file holds. Failed targets are reported, the ledger is
   not told.

Staged changes that a killed run left behind are settled from the files' contents when the next
writer starts. When one call spans several batches, a second ExifTool process writes batch k in
a background thread while the first reads batch k+1.

ExifTool is kept running (`-stay_open`) for the life of the writer.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ramcli.errors import RamcliError, UsageError
from ramcli.ledger import Intent, Ledger, LedgerEntry
from ramcli.records import TagScore

MIN_EXIFTOOL = (12, 15)  # PyExifTool 0.5.6 needs -echo4 ${status}

SUBJECT = "XMP-dc:Subject"
HIERARCHICAL = "XMP-lr:HierarchicalSubject"
IPTC_KEYWORDS = "IPTC:Keywords"
TAGSLIST = "XMP-digiKam:TagsList"
LAST_KEYWORD_XMP = "XMP-microsoft:LastKeywordXMP"
KEYWORD_FIELDS = (SUBJECT, HIERARCHICAL, IPTC_KEYWORDS, TAGSLIST, LAST_KEYWORD_XMP)
# The caption: the x-default item of the dc:description language alternative, as ExifTool reads
# it (also the ledger's field name). It is written under the explicit x-default name, because
# deleting plain `XMP-dc:Description` would delete every language of it.
DESCRIPTION = "XMP-dc:Description"
DESCRIPTION_WRITE = "XMP-dc:Description-x-default"
MANAGED_FIELDS = (*KEYWORD_FIELDS, DESCRIPTION)
# Where else a user's description may live (MWG Description): any of these keeps ramcli's caption out.
OTHER_DESCRIPTIONS = ("IPTC:Caption-Abstract", "IFD0:ImageDescription")
# What cameras put into EXIF ImageDescription by themselves: not a description anyone wrote.
CAMERA_DESCRIPTIONS = frozenset(
    {"OLYMPUS DIGITAL CAMERA", "SONY DSC", "DIGITAL CAMERA", "MINOLTA DIGITAL CAMERA",
     "KONICA MINOLTA DIGITAL CAMERA", "SAMSUNG DIGITAL CAMERA", "DCIM\\100MEDIA"}
)
# A ledger pseudo-field: ramcli created this sidecar, so `untag` may delete it once it is empty.
CREATED_SIDECAR = "ramcli:CreatedSidecar"

IPTC_KEYWORD_BYTES = 64  # IPTC IIM 2:25 limit

EMBED_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".tif", ".tiff", ".png", ".webp", ".heic", ".heif", ".avif", ".dng"}
)
IPTC_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".tif", ".tiff", ".dng"})
RAW_EXTENSIONS = frozenset(
    {".cr2", ".cr3", ".crw", ".nef", ".nrw", ".arw", ".srf", ".sr2", ".raf", ".orf", ".rw2",
     ".pef", ".srw", ".rwl", ".3fr", ".iiq", ".erf", ".mrw", ".x3f", ".dcr", ".kdc"}
)

Policy = Literal["auto", "always", "never"]
Lang = Literal["en", "zh", "both"]
SidecarName = Literal["adobe", "ext"]
Status = Literal["written", "unchanged", "failed"]


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
    - `keep_backups`: leave ExifTool's `FILE_original` copies.
    - `preserve_mtime`: keep the file modification time (ExifTool -P). Off by default, because
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


@dataclass
class FieldChange:
    field: str
    added: list[str]
    removed: list[str]

    def describe(self) -> str:
        """`XMP-dc:Subject +dog -cat`; a description is quoted (it has spaces)."""
        show = (lambda v: json.dumps(v, ensure_ascii=False)) if self.field == DESCRIPTION else str
        return " ".join([self.field] + [f"+{show(v)}" for v in self.added] + [f"-{show(v)}" for v in self.removed])


@dataclass
class TargetPlan:
    """What will change in one file that is written (the photo itself or one of its sidecars)."""

    target: str
    is_sidecar: bool
    exists: bool
    changes: list[FieldChange] = field(default_factory=list)
    new_values: dict[str, list[str]] = field(default_factory=dict)  # full new list per changed field
    extra: dict[str, str] = field(default_factory=dict)  # e.g. IPTC charset and digest
    record: list[LedgerEntry] = field(default_factory=list)
    forget: list[LedgerEntry] = field(default_factory=list)
    delete: bool = False  # a sidecar ramcli created that holds nothing else any more

    @property
    def writes(self) -> bool:
        return bool(self.new_values) and not self.delete


@dataclass
class FilePlan:
    path: str
    targets: list[TargetPlan] = field(default_factory=list)
    error: str | None = None

    @property
    def changes(self) -> list[str]:
        lines = []
        for t in self.targets:
            name = Path(t.target).name
            if t.delete:
                lines.append(f"{name} delete (created by ramcli, now empty)")
            lines += [f"{name} {c.describe()}" for c in t.changes]
        return lines


@dataclass
class WriteOutcome:
    path: str
    status: Status
    error: str | None = None
    changes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    size: int | None = None  # set when the photo file itself was rewritten
    mtime_ns: int | None = None


# --- what to write ----------------------------------------------------------------------------


def leaves(tags: Iterable[TagScore], lang: Lang) -> list[str]:
    """Flat keywords for the tags, in tag order, without duplicates."""
    out: list[str] = []
    for t in tags:
        names = {"en": [t.name], "zh": [t.name_zh or t.name], "both": [t.name, t.name_zh]}[lang]
        out += [n.strip() for n in names if n and n.strip()]
    return list(dict.fromkeys(out))


def trim_iptc(value: str, encoding: str) -> str | None:
    """A keyword cut to IPTC's 64 bytes on a character boundary; None if not encodable."""
    try:
        raw = value.encode(encoding)
    except UnicodeEncodeError:
        return None
    return raw[:IPTC_KEYWORD_BYTES].decode(encoding, errors="ignore").rstrip() or None


def policy_applies(policy: Policy, present: bool) -> bool:
    return policy == "always" or (policy == "auto" and present)


def wanted_values(
    tags: Sequence[TagScore], options: WriterOptions, current: dict[str, list[str]], iptc: str | None
) -> dict[str, list[str]]:
    """Per field, the values ramcli wants in a target. `iptc` is the IPTC encoding, or None if
    IPTC is not written to this target."""
    flat = leaves(tags, options.lang)
    root = options.tag_root
    wanted = {
        SUBJECT: flat,
        HIERARCHICAL: [f"{root}|{v}" if root else v for v in flat],
    }
    if iptc:
        trimmed = (trim_iptc(v, iptc) for v in flat)
        wanted[IPTC_KEYWORDS] = list(dict.fromkeys(v for v in trimmed if v))
    if policy_applies(options.digikam, bool(current.get(TAGSLIST))):
        wanted[TAGSLIST] = [f"{root}/{v}" if root else v for v in flat]
    if policy_applies(options.windows, bool(current.get(LAST_KEYWORD_XMP))):
        wanted[LAST_KEYWORD_XMP] = flat
    return wanted


def plan_field(
    current: list[str], wanted: list[str], ledger: dict[str, bool]
) -> tuple[list[str], list[str], list[str]]:
    """The merge rule for one field: (new list, values to record, values to forget).

    `ledger` maps each value ramcli wrote earlier to whether it was already there (the user's).
    - User values are never removed; ramcli's own ones go when no longer wanted.
    - A wanted value is added once; one the ledger knows but the file lacks was deleted by the
      user, and stays deleted.
    """
    owned = {v for v, pre in ledger.items() if not pre}
    wanted_set = set(wanted)
    drop = {v for v in current if v in owned and v not in wanted_set}
    add = [v for v in wanted if v not in current and v not in ledger]
    new = [v for v in current if v not in drop] + add
    record = [v for v in wanted if v not in ledger]
    forget = [v for v in ledger if v not in wanted_set]
    return new, record, forget


def plan_description(
    current: str | None, elsewhere: bool, wanted: str | None, ledger: dict[str, bool]
) -> tuple[str | None, list[str], list[str]]:
    """The rule for the caption in one target: (new description, value to record, values to forget).

    `current`: the x-default description there now; `elsewhere`: the user has a description in
    another language or field; `wanted`: the caption (None: remove ramcli's); `ledger`: the
    captions ramcli wrote there (value -> preexisting, always False for captions).
    - A description the ledger did not write is the user's: it stays, and ramcli's stale rows go.
    - ramcli's own one is replaced by the wanted caption, or removed when none is wanted.
    - An empty slot gets the caption, unless the user has a description elsewhere, or deleted
      this very caption after ramcli wrote it (like a deleted keyword, it stays deleted).
    """
    owned = {v for v, pre in ledger.items() if not pre}
    if current is not None and current not in owned:  # the user's
        return current, [], list(ledger)
    if current is None and wanted is not None and (elsewhere or wanted in ledger):
        return None, [], [v for v in ledger if v != wanted]  # remember a deleted caption
    record = [wanted] if wanted is not None and wanted not in ledger else []
    return wanted, record, [v for v in ledger if v != wanted]


def description_elsewhere(data: dict) -> bool:
    """Whether a target read by `ExifToolProcess.read` has a description other than x-default."""
    other_languages = any(k.startswith(DESCRIPTION + "-") for k in data)
    fields = (as_list(data.get(f)) for f in OTHER_DESCRIPTIONS)
    return other_languages or any(v.strip() and v.strip() not in CAMERA_DESCRIPTIONS for f in fields for v in f)


def clean_caption(caption: str | None) -> str | None:
    """A caption as written: stripped; None when there is none."""
    if caption is None:
        return None
    return caption.strip() or None


# --- targets ----------------------------------------------------------------------------------


def is_raw(path: Path) -> bool:
    return path.suffix.lower() in RAW_EXTENSIONS


class _Dirs:
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


def sidecar_targets(photo: Path, options: WriterOptions, dirs: _Dirs | None = None) -> list[Path]:
    """The sidecar(s) of `photo`: every existing one, else the one to create.

    `IMG.EXT.xmp` is always this photo's. `IMG.xmp` is, unless another non-sidecar file shares the
    base name (RAW+JPEG pairs, Live Photos) and this photo is not the RAW one (Adobe pairs
    `IMG.xmp` with the RAW)."""
    names = (dirs or _Dirs()).names(photo.parent)
    siblings = [n for n in names if Path(n).stem == photo.stem and n != photo.name
                and Path(n).suffix.lower() != ".xmp"]
    shares_base = bool(siblings)
    adobe_ok = not shares_base or is_raw(photo)
    existing = [photo.parent / n for n in (photo.name + ".xmp", photo.name + ".XMP") if n in names]
    if adobe_ok:
        existing += [photo.parent / n for n in (photo.stem + ".xmp", photo.stem + ".XMP") if n in names]
    if existing:
        return existing
    if options.sidecar_name == "adobe" and not shares_base:
        return [photo.with_suffix(".xmp")]
    return [photo.with_name(photo.name + ".xmp")]


# --- ExifTool -----------------------------------------------------------------------------------


def parse_exiftool_json(text: str) -> list[dict]:
    """ExifTool's -j output with every value as text (so keyword `1.50` stays `1.50`)."""
    if not text.strip():
        return []
    return json.loads(text, parse_int=str, parse_float=str)


def as_list(value) -> list[str]:
    """ExifTool prints a one-item list as a scalar."""
    if value is None:
        return []
    if isinstance(value, list):
        return [str(v) for v in value]
    return [str(value)]


def per_file_messages(stderr: str) -> dict[str, list[str]]:
    """`Error: msg - FILE` / `Warning: msg - FILE` lines of stderr, keyed by FILE."""
    out: dict[str, list[str]] = {}
    for line in stderr.splitlines():
        if " - " in line and (line.startswith("Error") or line.startswith("Warning")):
            message, _, name = line.rpartition(" - ")
            out.setdefault(name.strip(), []).append(message.strip())
    return out


class ExifToolProcess:
    """One long-lived `exiftool -stay_open` process, with a clear error when ExifTool is missing."""

    def __init__(self, executable: str = "exiftool"):
        import exiftool

        found = shutil.which(executable)
        if not found:
            raise RamcliError(
                f"ExifTool not found ({executable!r}): install it (Debian/Ubuntu: apt install "
                "libimage-exiftool-perl; macOS: brew install exiftool; Windows: exiftool.org) "
                "or write the index only with --no-write"
            )
        self._et = exiftool.ExifTool(executable=found, common_args=["-G1", "-charset", "filename=utf8"])
        try:
            self._et.run()
            version = self._et.version
        except Exception as exc:  # PyExifTool raises its own types for a bad binary or old version
            raise RamcliError(f"ExifTool at {found} could not be started: {exc}") from exc
        parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
        if parts < MIN_EXIFTOOL:
            self.close()
            raise RamcliError(
                f"ExifTool {version} is too old: ramcli needs {'.'.join(map(str, MIN_EXIFTOOL))} or newer"
            )
        self.version = version

    def execute(self, *args: str) -> tuple[str, str]:
        """Run one command; returns (stdout, stderr). A non-zero status is left to the caller,
        which reads per-file errors from stderr."""
        stdout = self._et.execute(*args)
        return stdout, self._et.last_stderr

    def read(self, targets: Sequence[str]) -> tuple[dict[str, dict], dict[str, list[str]]]:
        """All XMP and IPTC (keywords, descriptions) and EXIF ImageDescription of `targets`, keyed
        by target; plus read errors."""
        if not targets:
            return {}, {}
        stdout, stderr = self.execute(
            "-j", "-fast2", "-XMP:all", "-IPTC:all", "-Photoshop:IPTCDigest", "-EXIF:ImageDescription", *targets
        )
        found = {os.path.abspath(d["SourceFile"]): d for d in parse_exiftool_json(stdout)}
        return found, per_file_messages(stderr)

    def close(self) -> None:
        if self._et.running:
            self._et.terminate()


# --- the writer -------------------------------------------------------------------------------


WriteState = Literal["written", "failed", "uncertain"]
_Item = tuple[str | os.PathLike, Sequence[TagScore], str | None]  # (photo, tags, caption) in the writer


@dataclass
class _Batch:
    """One chunk of a call, from layout (targets, ledger rows) through reading and planning."""

    plans: list[FilePlan]
    wanted: dict[str, tuple[str, bool, list[TagScore], str | None]]  # target -> (photo, wanted there, tags, caption)
    rows: dict[str, list[LedgerEntry]]  # photo -> its ledger rows
    untag: bool = False

    @property
    def names(self) -> set[str]:
        """Every photo and target the chunk touches (two chunks overlap only when disjoint)."""
        return {p.path for p in self.plans} | set(self.wanted)

    def staged(self) -> list[TargetPlan]:
        """Targets whose ledger changes depend on a file operation (ExifTool write, delete)."""
        return [t for p in self.plans if not p.error for t in p.targets if t.writes or t.delete]


class MetadataWriter:
    """Plans and writes keyword metadata for batches of photos; see the module docstring."""

    def __init__(self, options: WriterOptions, ledger: Ledger):
        self.options = options
        self.ledger = ledger
        # [reader, background writer]; None: not started yet, or died (restarted when next needed)
        self._exiftools: list[ExifToolProcess | None] = [ExifToolProcess(options.exiftool), None]
        self._background: ThreadPoolExecutor | None = None
        self._tmp = tempfile.TemporaryDirectory(prefix="ramcli-exiftool-")
        try:
            self.recovered = self._recover()
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> MetadataWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._background is not None:
            self._background.shutdown(wait=True)
        for process in self._exiftools:
            if process is not None:
                process.close()
        self._tmp.cleanup()

    @property
    def exiftool(self) -> ExifToolProcess:
        """The process that reads (and writes when nothing runs beside the write)."""
        return self._process(0)

    def _process(self, slot: int) -> ExifToolProcess:
        """The ExifTool process in `slot`, started if needed. Only the main thread starts them:
        PyExifTool ties each process to the life of the thread that started it (PDEATHSIG)."""
        process = self._exiftools[slot]
        if process is None:
            process = self._exiftools[slot] = ExifToolProcess(self.options.exiftool)
        return process

    # planning

    def plan_batch(
        self,
        items: Sequence[tuple[str | os.PathLike, Sequence[TagScore]]],
        captions: Sequence[str | None] | None = None,
    ) -> list[FilePlan]:
        """What `write_batch` would change, per photo (the dry run)."""
        chunks = self._chunks(_with_captions(items, captions))
        return [plan for chunk in chunks for plan in self._read_and_plan(self._layout(chunk, False))]

    def plan_untag(self, paths: Sequence[str | os.PathLike]) -> list[FilePlan]:
        """What `untag_batch` would remove, per photo."""
        items = [(p, [], None) for p in paths]
        return [plan for chunk in self._chunks(items) for plan in self._read_and_plan(self._layout(chunk, True))]

    def write_batch(
        self,
        items: Sequence[tuple[str | os.PathLike, Sequence[TagScore]]],
        model_id: str | None = None,
        captions: Sequence[str | None] | None = None,
    ) -> list[WriteOutcome]:
        """Merge the tags into each photo's metadata; one outcome per item, in order.

        `captions`, aligned with `items`: a caption for `XMP-dc:Description` per photo, or None
        to leave that photo's description as it is (see the module docstring)."""
        return self._run(self._chunks(_with_captions(items, captions)), False, model_id)

    def untag_batch(self, paths: Sequence[str | os.PathLike]) -> list[WriteOutcome]:
        """Remove exactly the keywords and caption ramcli added (per the ledger) and nothing else."""
        return self._run(self._chunks([(p, [], None) for p in paths]), True, None)

    def _chunks(self, items: Sequence) -> list[list]:
        size = self.options.batch_size
        return [list(items[start : start + size]) for start in range(0, len(items), size)]

    def _layout(self, items: list[_Item], untag: bool) -> _Batch:
        """Plans with their targets, before anything is read (cheap: stat and directory listings)."""
        dirs = _Dirs()
        latest = {os.path.realpath(p): (list(tags), caption) for p, tags, caption in items}  # repeated: last wins
        rows = self.ledger.entries_of(list(latest))
        plans: dict[str, FilePlan] = {}
        wanted_by_target: dict[str, tuple[str, bool, list[TagScore], str | None]] = {}
        for path, (tags, caption) in latest.items():
            plan = plans[path] = FilePlan(path)
            targets, plan.error = self._targets(Path(path), dirs, untag, {e.target for e in rows[path]})
            for target, wanted in targets:
                key = str(target)
                if key in wanted_by_target:  # two photos sharing one sidecar: first one keeps it
                    continue
                wanted_by_target[key] = (path, wanted, tags, caption)
                plan.targets.append(TargetPlan(key, is_sidecar=target != Path(path), exists=target.exists()))
        return _Batch([plans[os.path.realpath(p)] for p, _, _ in items], wanted_by_target, rows, untag)

    def _targets(
        self, photo: Path, dirs: _Dirs, untag: bool, known: set[str]
    ) -> tuple[list[tuple[Path, bool]], str | None]:
        """(target, wanted) pairs for a photo, or an error. Ledger targets come along unwanted."""
        targets: list[tuple[Path, bool]] = []
        if not untag:
            if not photo.is_file():
                return [], "file not found"
            if self.options.sidecar or is_raw(photo):
                targets = [(t, True) for t in sidecar_targets(photo, self.options, dirs)]
            elif photo.suffix.lower() in EMBED_EXTENSIONS:
                targets = [(photo, True)]
            elif not known:
                return [], f"unsupported format {photo.suffix or '(no extension)'} for embedded metadata (use --sidecar)"
        chosen = {str(t) for t, _ in targets}
        targets += [(Path(t), False) for t in sorted(known - chosen)]
        return targets, None

    def _read_and_plan(self, batch: _Batch) -> list[FilePlan]:
        """One ExifTool read for every existing target of the chunk, then the diff per target."""
        unique = {p.path: p for p in batch.plans}.values()  # a repeated photo is planned once
        readable = [t.target for p in unique for t in p.targets if t.exists]
        current_all, messages = self.exiftool.read(readable)
        for plan in unique:
            for t in plan.targets:
                path, wanted, tags, caption = batch.wanted[t.target]
                read_errors = [m for m in messages.get(t.target, []) if m.startswith("Error")]
                if t.exists and (t.target not in current_all or read_errors):
                    plan.error = plan.error or f"{Path(t.target).name}: " + (
                        read_errors[0] if read_errors else "ExifTool could not read it"
                    )
                    continue
                data = current_all.get(t.target, {})
                self._plan_target(t, path, data, tags if wanted else [], wanted, batch.rows[path])
                if caption is not None or batch.untag:  # None: the description is left alone
                    self._plan_caption(t, path, data, caption if wanted else None, batch.rows[path])
                if t.is_sidecar and not t.exists and t.new_values:
                    t.record.append(LedgerEntry(path, t.target, CREATED_SIDECAR, "1", False))
                if not wanted:
                    self._plan_deletion(t, data, batch.rows[path])
        return batch.plans

    def _plan_target(
        self, t: TargetPlan, path: str, data: dict, tags: list[TagScore], wanted: bool, path_rows: list[LedgerEntry]
    ) -> None:
        current = {f: as_list(data.get(f)) for f in KEYWORD_FIELDS}
        rows: dict[str, dict[str, LedgerEntry]] = {}
        for e in path_rows:
            if e.target == t.target:
                rows.setdefault(e.field, {})[e.value] = e
        iptc = self._iptc_encoding(t, data) if wanted else None
        want = wanted_values(tags, self.options, current, iptc) if wanted else {}
        for f in KEYWORD_FIELDS:
            ledger = {v: e.preexisting for v, e in rows.get(f, {}).items()}
            new, record, forget = plan_field(current[f], want.get(f, []), ledger)
            t.record += [LedgerEntry(path, t.target, f, v, v in current[f]) for v in record]
            t.forget += [rows[f][v] for v in forget]
            if new != current[f]:
                t.new_values[f] = new
                t.changes.append(
                    FieldChange(f, [v for v in new if v not in current[f]], [v for v in current[f] if v not in new])
                )
        if IPTC_KEYWORDS in t.new_values:
            if iptc == "utf-8" or not any(k.startswith("IPTC:") for k in data):
                t.extra["IPTC:CodedCharacterSet"] = "UTF8"
            # MWG: a stale digest makes readers ignore the XMP, so refresh it. In TIFF/DNG ExifTool
            # 12.57's "new" digest differs from its CurrentIPTCDigest (padding), so there we only
            # refresh a digest the file already has and never create one.
            if Path(t.target).suffix.lower() in (".jpg", ".jpeg", ".jpe") or "Photoshop:IPTCDigest" in data:
                t.extra["Photoshop:IPTCDigest"] = "new"
        if not wanted:
            t.forget += list(rows.get(CREATED_SIDECAR, {}).values())

    def _plan_caption(
        self, t: TargetPlan, path: str, data: dict, caption: str | None, path_rows: list[LedgerEntry]
    ) -> None:
        """The caption's part of a target's plan (`plan_description`), after the keywords'."""
        current = as_list(data.get(DESCRIPTION))
        rows = {e.value: e for e in path_rows if e.target == t.target and e.field == DESCRIPTION}
        new, record, forget = plan_description(
            current[0] if current else None, description_elsewhere(data), caption,
            {v: e.preexisting for v, e in rows.items()},
        )
        t.record += [LedgerEntry(path, t.target, DESCRIPTION, v, False) for v in record]
        t.forget += [rows[v] for v in forget]
        new_list = [new] if new is not None else []
        if new_list != current:
            t.new_values[DESCRIPTION] = new_list
            t.changes.append(FieldChange(DESCRIPTION, new_list, current))

    def _plan_deletion(self, t: TargetPlan, data: dict, path_rows: list[LedgerEntry]) -> None:
        """A sidecar ramcli created goes once nothing but ramcli's (removed) values was in it."""
        if not any(e.target == t.target and e.field == CREATED_SIDECAR for e in path_rows):
            return
        others = [k for k in data if k not in MANAGED_FIELDS and k not in ("SourceFile", "XMP-x:XMPToolkit")]
        left = any(t.new_values.get(f, as_list(data.get(f))) for f in MANAGED_FIELDS)
        t.delete = t.exists and not others and not left

    def _iptc_encoding(self, t: TargetPlan, data: dict) -> str | None:
        """The encoding of IPTC keywords in this target, or None when IPTC is not written there."""
        if t.is_sidecar or Path(t.target).suffix.lower() not in IPTC_EXTENSIONS:
            return None
        has_iptc = any(k.startswith("IPTC:") for k in data)
        if not policy_applies(self.options.iptc, has_iptc):
            return None
        # Existing IPTC without a UTF-8 declaration is Latin-1: keep it so (FAQ 10), rather than
        # re-declaring a record whose other fields are Latin-1 bytes.
        if has_iptc and data.get("IPTC:CodedCharacterSet") != "UTF8":
            return "latin-1"
        return "utf-8"

    # writing

    def _run(self, chunks: list[list], untag: bool, model_id: str | None) -> list[WriteOutcome]:
        """Each chunk: stage, write, settle. While ExifTool writes chunk k in the background
        process, the reader process reads chunk k+1 and it is planned, unless the two chunks share
        a photo or target (then k+1 is laid out and read only after k is settled)."""
        outcomes: list[WriteOutcome] = []
        batch = self._layout(chunks[0], untag) if chunks else None
        if batch is not None:
            self._read_and_plan(batch)
        for k in range(len(chunks)):
            following = self._layout(chunks[k + 1], untag) if k + 1 < len(chunks) else None
            overlap = following is not None and not (following.names & batch.names)
            intents = self._stage(batch, model_id)
            targets = [t for t in batch.staged() if t.writes]
            if overlap:
                if self._background is None:
                    self._background = ThreadPoolExecutor(1, thread_name_prefix="ramcli-exiftool")
                self._process(1)
                job = self._background.submit(self._write_targets, targets, 1)
                try:
                    self._read_and_plan(following)
                finally:
                    results = job.result()  # never leave a write running unaccounted for
            else:
                self._process(0)
                results = self._write_targets(targets, 0)
            outcomes += self._settle(batch, intents, results)
            if following is not None and not overlap:  # laid out before chunk k changed the files
                following = self._layout(chunks[k + 1], untag)
                self._read_and_plan(following)
            batch = following
        return outcomes

    def _stage(self, batch: _Batch, model_id: str | None) -> dict[str, list[Intent]]:
        """The ledger intents per target, stamped with the model; those that hang on a file
        operation are committed to the staging table before it starts."""
        intents: dict[str, list[Intent]] = {}
        for plan in batch.plans:
            if plan.error:
                continue
            for t in plan.targets:
                intents[t.target] = [
                    Intent(LedgerEntry(e.path, e.target, e.field, e.value, e.preexisting, model_id)) for e in t.record
                ] + [Intent(e, remove=True) for e in t.forget]
        self.ledger.stage([i for t in batch.staged() for i in intents[t.target]])
        return intents

    def _write_targets(self, targets: list[TargetPlan], slot: int) -> dict[str, tuple[WriteState, list[str]]]:
        """One ExifTool command for all targets: per target its state and its error/warning lines.

        'written': no error, not reported unchanged, no warning; 'failed': an error, or ExifTool
        left the file unchanged; 'uncertain': a warning, or ExifTool itself failed: what the file
        holds is then read back before the ledger is told anything."""
        results: dict[str, tuple[WriteState, list[str]]] = {}
        ready = []
        for t in targets:
            problem = _unwritable(Path(t.target), t.exists)
            if problem:
                results[t.target] = ("failed", [f"Error: {problem}"])
            else:
                ready.append(t)
        if not ready:
            return results
        folder = Path(self._tmp.name) / f"slot{slot}"
        folder.mkdir(exist_ok=True)
        json_path, errors_path, same_path = folder / "batch.json", folder / "errors.txt", folder / "unchanged.txt"
        errors_path.unlink(missing_ok=True)  # ExifTool appends to these
        same_path.unlink(missing_ok=True)
        with open(json_path, "w", encoding="utf-8") as fh:
            json.dump([{"SourceFile": t.target, **_import_values(t.new_values), **t.extra} for t in ready], fh,
                      ensure_ascii=False)
        args = [f"-j={json_path}", "-efile", str(errors_path), "-efile2", str(same_path)]
        if not self.options.keep_backups:
            args.append("-overwrite_original")
        if self.options.preserve_mtime:
            args.append("-P")
        try:
            _, stderr = self._exiftools[slot].execute(*args, *(t.target for t in ready))
        except Exception as exc:  # ExifTool died mid-command: some files may have been written
            self._exiftools[slot].close()
            self._exiftools[slot] = None
            return {**results, **{t.target: ("uncertain", [f"Error: ExifTool failed: {exc}"]) for t in ready}}
        messages: dict[str, list[str]] = {}
        for name, lines in per_file_messages(stderr).items():
            messages.setdefault(os.path.abspath(name), []).extend(lines)
        errored, unchanged = _listed(errors_path), _listed(same_path)
        for t in ready:
            lines = messages.get(t.target, [])
            if t.target in errored or any(m.startswith("Error") for m in lines):
                state: WriteState = "failed"
                if not any(m.startswith("Error") for m in lines):
                    lines.insert(0, "Error: ExifTool could not write it")
            elif t.target in unchanged:
                state = "failed"
                lines.insert(0, "Error: ExifTool left it unchanged")
            else:
                state = "uncertain" if lines else "written"
            results[t.target] = (state, lines)
        return results

    def _settle(
        self, batch: _Batch, intents: dict[str, list[Intent]], results: dict[str, tuple[WriteState, list[str]]]
    ) -> list[WriteOutcome]:
        """Outcomes per photo, and the ledger told exactly what the files now hold (one commit)."""
        staged = {t.target: t for t in batch.staged()}
        unclear = [t for t in staged.values() if t.writes and results.get(t.target, ("", []))[0] == "uncertain"]
        now, _ = self.exiftool.read([t.target for t in unclear])
        applied: list[Intent] = []
        outcomes: dict[str, WriteOutcome] = {}
        for plan in batch.plans:
            if plan.path in outcomes:  # a repeated photo: the same outcome again
                continue
            outcome = outcomes[plan.path] = WriteOutcome(plan.path, "unchanged", changes=plan.changes)
            if plan.error:
                outcome.status, outcome.error = "failed", plan.error
                continue
            failures = []
            for t in plan.targets:
                state, lines = results.get(t.target, ("written", []))
                if t.delete:
                    state, lines = _delete(t.target)
                if state == "uncertain":
                    got = now.get(t.target)
                    applied += [i for i in intents[t.target] if _holds(i, got)]
                    bad = [f for f, v in t.new_values.items() if got is None or as_list(got.get(f)) != v]
                    errors = [m for m in lines if m.startswith("Error")]
                    lines = [m for m in lines if not m.startswith("Error")]
                    if bad:
                        state = "failed"
                        lines.insert(0, errors[0] if errors else f"Error: ExifTool did not store {', '.join(bad)}")
                elif state == "written":
                    applied += intents[t.target]
                outcome.warnings += [f"{Path(t.target).name}: {m}" for m in lines if not m.startswith("Error")]
                if state == "failed":
                    failed = next(m for m in lines if m.startswith("Error"))
                    failures.append(f"{Path(t.target).name}: {failed.removeprefix('Error: ')}")
                elif t.target in staged:
                    outcome.status = "written"
                    if t.target == plan.path:
                        st = os.stat(t.target)
                        outcome.size, outcome.mtime_ns = st.st_size, st.st_mtime_ns
            if failures:
                outcome.status, outcome.error = "failed", "; ".join(failures)
        self.ledger.settle(applied, [i for target in staged for i in intents[target]])
        return [outcomes[plan.path] for plan in batch.plans]

    def _recover(self) -> int:
        """Resolve what a killed run staged and never settled, against what the files now hold.

        Returns the number of resolved intents. Targets that exist but cannot be read now stay
        staged for a later run."""
        intents = self.ledger.staged()
        if not intents:
            return 0
        targets = sorted({i.entry.target for i in intents})
        found, _ = self.exiftool.read([t for t in targets if os.path.exists(t)])
        decidable = [i for i in intents if i.entry.target in found or not os.path.exists(i.entry.target)]
        self.ledger.settle([i for i in decidable if _holds(i, found.get(i.entry.target))], decidable)
        return len(decidable)


def _with_captions(
    items: Sequence[tuple[str | os.PathLike, Sequence[TagScore]]], captions: Sequence[str | None] | None
) -> list[_Item]:
    if captions is None:
        return [(p, tags, None) for p, tags in items]
    if len(captions) != len(items):
        raise ValueError(f"{len(captions)} captions for {len(items)} photos: pass one per photo (None for none)")
    return [(p, tags, clean_caption(c)) for (p, tags), c in zip(items, captions)]


def _import_values(new_values: dict[str, list[str]]) -> dict[str, list[str] | str]:
    """The new lists as ExifTool's JSON import takes them: the caption as its x-default item
    (a text; an empty list deletes that item and no other language)."""
    out: dict[str, list[str] | str] = {f: v for f, v in new_values.items() if f != DESCRIPTION}
    if DESCRIPTION in new_values:
        out[DESCRIPTION_WRITE] = new_values[DESCRIPTION][0] if new_values[DESCRIPTION] else []
    return out


def _holds(intent: Intent, data: dict | None) -> bool:
    """Whether a target as it is now (`data` read from it; None: gone) bears the intent out:
    a value to add is there, a value to remove is gone (a user's value may always be forgotten)."""
    e = intent.entry
    present = data is not None and (e.field == CREATED_SIDECAR or e.value in as_list(data.get(e.field)))
    return (e.preexisting or not present) if intent.remove else present


def _delete(target: str) -> tuple[WriteState, list[str]]:
    """Delete a sidecar ramcli created that holds nothing else any more."""
    try:
        os.remove(target)
    except FileNotFoundError:
        return "written", []
    except OSError as exc:
        return "failed", [f"Error: cannot delete: {exc.strerror}"]
    return "written", []


def _listed(efile: Path) -> set[str]:
    """The files named in an ExifTool -efile list (absolute paths, one a line)."""
    if not efile.exists():
        return set()
    return {os.path.abspath(n) for n in efile.read_text(encoding="utf-8", errors="surrogateescape").splitlines() if n}


def _unwritable(target: Path, exists: bool) -> str | None:
    """Why ramcli will not write this file, if it will not: a file the user made read-only is a
    request to leave it alone, even where the folder would let ExifTool replace it (and for root)."""
    if exists:
        if not os.stat(target).st_mode & 0o222:
            return "read-only file (make it writable, or use --sidecar)"
        if (target.parent / (target.name + "_exiftool_tmp")).exists():
            return f"stale {target.name}_exiftool_tmp from an interrupted write: delete it and retry"
    elif not os.access(target.parent, os.W_OK):
        return "cannot create a sidecar: folder not writable"
    return None
