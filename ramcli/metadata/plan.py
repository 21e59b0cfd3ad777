"""Change planning: from what a file holds, what the ledger remembers and what ramcli wants, the
new value of each field. Pure functions and plain records; nothing here touches a file.

The rules (`plan_field` for keywords, `plan_description` for the caption) never remove a value
that ramcli did not put there, so they are only as good as the read they are given: the reader
(`ExifToolProcess.read`) reads every field in full and keeps every value as the exact string the
file holds.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ramcli.ledger import LedgerEntry
from ramcli.metadata.options import Lang, Policy, WriterOptions
from ramcli.records import TagScore

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

Status = Literal["written", "unchanged", "failed"]


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


def as_list(value) -> list[str]:
    """A field read by `ExifToolProcess.read` as a list (a one-item list may come as a text)."""
    if value is None:
        return []
    if isinstance(value, list):
        return [str(v) for v in value]
    return [str(value)]
