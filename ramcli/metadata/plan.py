"""Change planning: from what a file holds, what the ledger remembers and what ramcli wants, the
new value of each field. Pure functions and plain records; nothing here touches a file.

The rules (`plan_field` for keywords, `plan_description` for the caption) never remove a value
that ramcli did not put there, so they are only as good as the read they are given: the reader
(`ExifToolProcess.read`) reads every field in full and keeps every value as the exact string the
file holds.

Keeping the user's keywords visible. Photo apps read the first non-empty keyword field in their
own order (MWG readers such as Lightroom: `dc:subject`, unless the IPTC changed since its
IPTCDigest; darktable: HierarchicalSubject, else dc:subject; Immich: TagsList, else
HierarchicalSubject, else IPTC; digiKam: TagsList, else HierarchicalSubject, else dc:subject,
else IPTC). A field that ramcli creates would therefore hide the user's keywords from every app
that now stops at it. So a field ramcli creates is first seeded with the user's keywords that the
other fields hold, in its own syntax (`seed_values`), and IPTC that changed since its digest is
merged into dc:subject before the digest is refreshed (`iptc_seeds`). The ledger records seeded
values as such: a re-tag keeps them, `untag` removes them with ramcli's tags.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple

from ramcli.library.ledger import LedgerEntry
from ramcli.metadata.options import Lang, Policy, WriterOptions
from ramcli.tagging.records import TagScore

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

# The stored MWG digest of the IPTC, and the one ExifTool computes from the IPTC as it is now.
IPTC_DIGEST = "Photoshop:IPTCDigest"
CURRENT_IPTC_DIGEST = "File:CurrentIPTCDigest"
# A ledger pseudo-field: the IPTCDigest a target had before ramcli first changed it, so that `untag`
# puts that state back: "none", "in-sync" (it matched the IPTC), or the stale digest itself.
DIGEST_BEFORE = "ramcli:IPTCDigestBefore"
NO_DIGEST, IN_SYNC = "none", "in-sync"
LEDGER_ONLY_FIELDS = (CREATED_SIDECAR, DIGEST_BEFORE)  # rows about a file, not values in it

IPTC_KEYWORD_BYTES = 64  # IPTC IIM 2:25 limit

# Hierarchical fields and their level separators. A separator inside one of ramcli's names would
# read as an extra level (`胡同/球道` as 球道 under 胡同 in Immich and digiKam), so names carry the
# fullwidth look-alike instead (`keyword_name`).
HIERARCHIES = {HIERARCHICAL: "|", TAGSLIST: "/"}
SEPARATOR_LOOKALIKES = {"/": "\uff0f", "|": "\uff5c"}
FLAT_SOURCES = (SUBJECT, IPTC_KEYWORDS)  # where the user's flat keywords are read from for seeding

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


class FieldPlan(NamedTuple):
    """What `plan_field` decides for one field: the new list, the values to record (of which
    `seeded` are the user's keywords ramcli copies in), and the ledger values to forget."""

    new: list[str]
    record: list[str]
    forget: list[str]
    seeded: list[str]


@dataclass
class TargetPlan:
    """What will change in one file that is written (the photo itself or one of its sidecars)."""

    target: str
    is_sidecar: bool
    exists: bool
    changes: list[FieldChange] = field(default_factory=list)
    new_values: dict[str, list[str]] = field(default_factory=dict)  # full new list per changed field
    extra: dict[str, str | list[str]] = field(default_factory=dict)  # IPTC charset and digest ([]: delete)
    record: list[LedgerEntry] = field(default_factory=list)
    forget: list[LedgerEntry] = field(default_factory=list)
    delete: bool = False  # a sidecar ramcli created that holds nothing else any more

    @property
    def writes(self) -> bool:
        return bool(self.new_values or self.extra) and not self.delete


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




def keyword_name(name: str) -> str:
    """A tag name as ramcli writes it in every field: stripped, hierarchy separators replaced by
    their fullwidth look-alikes (one spelling everywhere, so each field names the same keyword)."""
    for separator, lookalike in SEPARATOR_LOOKALIKES.items():
        name = name.replace(separator, lookalike)
    return name.strip()


def leaves(tags: Iterable[TagScore], lang: Lang) -> list[str]:
    """Flat keywords for the tags, in tag order, without duplicates."""
    out: list[str] = []
    for t in tags:
        names = {"en": [t.name], "zh": [t.name_zh or t.name], "both": [t.name, t.name_zh]}[lang]
        out += [keyword_name(n) for n in names if n and keyword_name(n)]
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
    current: list[str], wanted: list[str], ledger: dict[str, bool],
    seeded: Collection[str] = (), seeds: Sequence[str] = (),
) -> FieldPlan:
    """The merge rule for one field.

    `ledger` maps each value ramcli wrote earlier to whether it was already there (the user's);
    `seeded`: those of its values that are the user's keywords ramcli copied in; `seeds`: the
    user's keywords to copy in now (`seed_values`, `iptc_seeds`).
    - User values are never removed; ramcli's own ones go when no longer wanted.
    - A wanted value is added once; one the ledger knows but the file lacks was deleted by the
      user, and stays deleted.
    - Seeds go in (before ramcli's tags) only together with ramcli's tags, and stay as long as
      ramcli wants anything in the field; when it wants nothing (`untag`), they go too.
    """
    owned = {v for v, pre in ledger.items() if not pre and v not in seeded}
    wanted_set = set(wanted)
    drop = {v for v in current if v in owned and v not in wanted_set}
    if not wanted:
        drop |= {v for v in current if v in seeded}
    add = [v for v in wanted if v not in current and v not in ledger]
    kept = [v for v in current if v not in drop]
    with_tags = bool(add) or any(v in wanted_set for v in kept)
    new_seeds = [v for v in dict.fromkeys(seeds) if v not in current and v not in ledger] if with_tags else []
    add = new_seeds + [v for v in add if v not in new_seeds]
    record = new_seeds + [v for v in wanted if v not in ledger and v not in new_seeds]
    forget = [v for v in ledger if v not in wanted_set and not (wanted and v in seeded)]
    return FieldPlan(kept + add, record, forget, new_seeds)


def _leaf(path: str, separator: str) -> str:
    return path.rsplit(separator, 1)[-1]


def seed_values(user: dict[str, list[str]], field: str) -> list[str]:
    """The user's keywords that the other fields hold, in `field`'s syntax, for a field ramcli
    creates (`user`: per field, the values that are not ramcli's tags).

    - A hierarchy gets the other hierarchy's paths (separator swapped, as Immich and digiKam
      convert them when they read), then every flat keyword (dc:subject, IPTC) that is not a level
      of those paths, as a top-level entry.
    - A flat field gets the IPTC keywords (MWG: IPTC -> XMP; LastKeywordXMP also dc:subject's),
      then the leaves of the user's hierarchies.
    IPTC is never seeded: it is written only where it exists."""
    if field in HIERARCHIES:
        separator = HIERARCHIES[field]
        out = [v.replace(other, separator) for f, other in HIERARCHIES.items() if f != field for v in user.get(f, [])]
        levels = {level for v in out for level in v.split(separator)}
        out += [v for f in FLAT_SOURCES for v in user.get(f, []) if v not in levels]
    elif field == IPTC_KEYWORDS:
        return []
    else:
        out = [v for f in (IPTC_KEYWORDS, SUBJECT) if f != field for v in user.get(f, [])]
        out += [_leaf(v, separator) for f, separator in HIERARCHIES.items() for v in user.get(f, [])]
    return [v for v in dict.fromkeys(out) if v]


def iptc_stale(data: dict) -> bool:
    """Whether the IPTC changed since its MWG digest was stored (MWG readers then show IPTC
    Keywords instead of dc:subject)."""
    stored, now = data.get(IPTC_DIGEST), data.get(CURRENT_IPTC_DIGEST)
    return bool(stored and now and stored != now)


def iptc_seeds(user: dict[str, list[str]], subject: list[str], encoding: str) -> list[str]:
    """The user's IPTC keywords that dc:subject lacks, for IPTC that changed since its digest:
    MWG readers show IPTC there, and show dc:subject once ramcli refreshes the digest. An IPTC
    keyword that is a dc:subject value cut to IPTC's 64 bytes is that value, not a new one."""
    cut = {trim_iptc(v, encoding) for v in subject}
    return [v for v in user.get(IPTC_KEYWORDS, []) if v not in subject and v not in cut]


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
