"""Every keyword a photo app showed before `ramcli tag` is still shown after, next to ramcli's tags,
and `untag` gives every value back. Checked against the real ExifTool, for each app's reading rule.

Each app is a small pure-Python model of the rule by which it picks its keyword field, fed with
the fields as a separate one-shot ExifTool reads them (never the writer under test):

- MWG (Lightroom and most DAMs; ExifTool's `-use MWG`): dc:subject, unless there is IPTC and
  either no dc:subject or an IPTCDigest that no longer matches the IPTC; then IPTC Keywords (a
  value cut to 64 bytes is recovered from dc:subject). The model is checked against ExifTool's
  own MWG:Keywords on every file, before and after;
- darktable: HierarchicalSubject, else dc:subject (`|` separates levels);
- Immich: TagsList, else HierarchicalSubject (its `|` read as `/`), else IPTC Keywords (`/`
  separates levels);
- digiKam: TagsList, else HierarchicalSubject, else dc:subject, else IPTC Keywords (likewise).

"Shown": an app shows a tree of keyword paths. A path of several levels stays shown if it is
still a path of the tree or the start of one; a single keyword stays shown if it is still a node
of the tree (`Oma` is shown by `People|Oma`). ramcli's tag `dog` is shown as the path `auto|dog`
(`auto` being the tag root), or as `dog` by the flat MWG rule.
"""

from __future__ import annotations

import base64
import json
import subprocess
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import sqlite_utils
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from media import make_photo
from ramcli.library.ledger import Ledger
from ramcli.metadata import MetadataWriter, WriterOptions
from ramcli.tagging.records import TagScore

SUBJECT, HIER, IPTC = "XMP-dc:Subject", "XMP-lr:HierarchicalSubject", "IPTC:Keywords"
TAGSLIST = "XMP-digiKam:TagsList"
DIGEST, CURRENT_DIGEST = "Photoshop:IPTCDigest", "File:CurrentIPTCDigest"
READ = ("-XMP:all", "-IPTC:all", f"-{DIGEST}", f"-{CURRENT_DIGEST}")
_RDF = "{http://www.w3.org/1999/02/22-rdf-syntax-ns#}"
EMPTY_XMP = b'<?xpacket begin="\xef\xbb\xbf" id="W5M0MpCehiHzreSzNTczkc9d"?>\n<x:xmpmeta xmlns:x="adobe:ns:meta/">\n</x:xmpmeta>\n<?xpacket end="w"?>\n'
IPTC_FORMATS = ("jpg", "tif")  # where IPTC has its standard place
FORMATS = ("jpg", "tif", "png", "heic", "CR2")  # CR2: the layout lives in its XMP sidecar

Path_ = tuple[str, ...]


# --- the readers -------------------------------------------------------------------------------


def _recover(iptc: str, xmp: str | None) -> str:
    """MWG: an IPTC value cut at 64 bytes is the dc:subject value at the same index it starts."""
    cut = iptc.encode()
    if xmp is not None and len(cut) == 64 and len(xmp.encode()) > 64 and xmp.encode()[:64] == cut:
        return xmp
    return iptc


def mwg(f: dict) -> list[str]:
    subject, iptc = f.get(SUBJECT), f.get(IPTC)
    now, stored = f.get(CURRENT_DIGEST), f.get(DIGEST)
    if not now or (subject and (not stored or stored == now)):
        return subject or []
    return [_recover(v, subject[i] if subject and i < len(subject) else None) for i, v in enumerate(iptc or [])]


def darktable(f: dict) -> list[Path_]:
    return [tuple(v.split("|")) for v in f.get(HIER) or f.get(SUBJECT) or []]


def immich(f: dict) -> list[Path_]:
    values = f.get(TAGSLIST) or [v.replace("|", "/") for v in f.get(HIER, [])] or f.get(IPTC) or []
    return [tuple(v.split("/")) for v in values]


def digikam(f: dict) -> list[Path_]:
    values = (f.get(TAGSLIST) or [v.replace("|", "/") for v in f.get(HIER, [])]
              or f.get(SUBJECT) or f.get(IPTC) or [])
    return [tuple(v.split("/")) for v in values]


READERS = {"MWG": lambda f: [(v,) for v in mwg(f)], "darktable": darktable, "Immich": immich, "digiKam": digikam}


def shown(path: Path_, tree: list[Path_]) -> bool:
    if len(path) == 1:
        return any(path[0] in p for p in tree)
    return any(p[: len(path)] == path for p in tree)


# --- reading and laying out files (one-shot ExifTool) ------------------------------------------------


def exiftool(*args: str | Path) -> bytes:
    return subprocess.run(["exiftool", *map(str, args)], capture_output=True, check=True).stdout


def _text(elem: ET.Element) -> str:
    if elem.get(f"{_RDF}datatype", "").endswith("base64Binary"):
        return base64.b64decode("".join((elem.text or "").split())).decode("utf-8", "surrogateescape")
    return elem.text or ""


def read_all(paths: list[Path], *tags: str) -> dict[Path, dict[str, list[str]]]:
    """Exact values (ExifTool -X) of many files in one run: path -> `Group:Tag` -> list."""
    raw = exiftool("-X", "-G1", *tags, *paths)
    out: dict[Path, dict[str, list[str]]] = {p: {} for p in paths}
    for desc in ET.fromstring(raw).iter(f"{_RDF}Description"):
        found = out[Path(desc.get(f"{_RDF}about"))]
        for elem in desc:
            uri, _, tag = elem.tag[1:].partition("}")
            group = uri.rstrip("/").split("/")[-2]
            found[f"{group}:{tag}"] = [_text(i) for i in (list(elem.iter(f"{_RDF}li")) if len(elem) else [elem])]
        found.pop("XMP-x:XMPToolkit", None)
    return out


def fields(paths: list[Path]) -> dict[Path, dict[str, list[str]]]:
    """The keyword fields and digests, checked against ExifTool's own MWG rule on the way."""
    found = read_all(paths, *READ)
    reference = read_all(paths, "-use", "MWG", "-MWG:Keywords")
    for p in paths:
        assert mwg(found[p]) == reference[p].get("MWG:Keywords", []), (p, found[p])
    return found


def _import(path: Path, values: dict) -> None:
    """Values as another app writes them (JSON import; lists base64-encoded UTF-8, which ExifTool
    turns into Latin-1 in IPTC that declares no UTF-8)."""
    b64 = lambda v: "base64:" + base64.b64encode(v.encode()).decode()  # noqa: E731
    entry = {k: [b64(x) for x in v] if isinstance(v, list) else v for k, v in values.items()}
    json_path = path.parent / "layout.json"
    json_path.write_text(json.dumps([{"SourceFile": "*", **entry}]))
    exiftool("-q", "-overwrite_original", f"-j={json_path}", path)
    json_path.unlink()


@dataclass
class Layout:
    """A user's keywords as other apps leave them. IPTC fields only apply to JPEG and TIFF."""

    fmt: str
    subject: list[str] = field(default_factory=list)
    hierarchy: list[str] = field(default_factory=list)
    tagslist: list[str] = field(default_factory=list)
    iptc: list[str] = field(default_factory=list)
    latin1: bool = False  # IPTC without a UTF-8 declaration (older apps)
    mwg: list[str] = field(default_factory=list)  # written by `exiftool -use MWG -MWG:Keywords=...`
    iptc_later: list[str] = field(default_factory=list)  # then added to IPTC by a tool that ignores MWG

    def make(self, folder: Path, name: str) -> tuple[Path, Path]:
        """(photo, target): the file ramcli is given and the one that carries its metadata."""
        photo = make_photo(folder, name, self.fmt, user_metadata=False)
        target = photo
        if self.fmt == "CR2":
            target = photo.with_suffix(".xmp")
            target.write_bytes(EMPTY_XMP)
        iptc_here = self.fmt in IPTC_FORMATS
        if iptc_here and self.iptc:
            charset = {} if self.latin1 else {"IPTC:CodedCharacterSet": "UTF8"}
            _import(target, {**charset, IPTC: self.iptc})
        if self.mwg:
            exiftool("-q", "-overwrite_original", "-use", "MWG", *[f"-MWG:Keywords={v}" for v in self.mwg], target)
        xmp = {k: v for k, v in ((SUBJECT, self.subject), (HIER, self.hierarchy), (TAGSLIST, self.tagslist)) if v}
        if xmp:
            _import(target, xmp)
        if iptc_here and self.iptc_later:  # ExifTool without MWG leaves the digest as it was
            exiftool("-q", "-overwrite_original", *[f"-IPTC:Keywords+={v}" for v in self.iptc_later], target)
        return photo, target


def expected_names(tags: list[TagScore], lang: str) -> list[str]:
    """ramcli's keywords, as the tests expect them: a separator inside a name is no new level."""
    names = {"en": lambda t: [t.name], "zh": lambda t: [t.name_zh or t.name], "both": lambda t: [t.name, t.name_zh]}[lang]
    return [n.replace("/", "\uff0f").replace("|", "\uff5c").strip() for t in tags for n in names(t) if n and n.strip()]


def check_visible(before: dict, after: dict, names: list[str], root: str, where: str) -> None:
    for reader, view in READERS.items():
        was, now = view(before), view(after)
        lost = [p for p in was if not shown(p, now)]
        assert not lost, f"{where}: {reader} no longer shows {lost} (before {was}, after {now})"
        for n in names:
            want = (n,) if reader == "MWG" or not root else (root, n)
            assert want in now, f"{where}: {reader} does not show ramcli's {want} (shows {now})"


def run(cases: list[Layout], folder: Path, tags: list[TagScore], retag: list[TagScore], options: WriterOptions) -> None:
    """Lay the cases out, tag, re-tag with other tags, untag; check every reader at each step."""
    made = [case.make(folder, f"p{i}") for i, case in enumerate(cases)]
    photos, targets = [p for p, _ in made], [t for _, t in made]
    before = fields(targets)
    root = options.tag_root
    led = Ledger(sqlite_utils.Database(folder / "index.db"))
    with MetadataWriter(options, led) as writer:
        for step, step_tags in (("tag", tags), ("re-tag", retag)):
            outcomes = writer.write_batch([(p, step_tags) for p in photos])
            assert {o.status for o in outcomes} <= {"written", "unchanged"}, [o.error for o in outcomes]
            after = fields(targets)
            names = list(dict.fromkeys(expected_names(step_tags, options.lang)))
            for case, target in zip(cases, targets):
                check_visible(before[target], after[target], names, root, f"{step} {case}")
        assert {o.status for o in writer.untag_batch(photos)} <= {"written", "unchanged"}
    restored = fields(targets)
    for case, target in zip(cases, targets):
        # Every value as it was (the stored IPTCDigest too). The IPTC block may differ in the order
        # of its datasets only (ExifTool writes them in the standard order), hence its current
        # digest; what matters to MWG readers, stale or not, is the same as before:
        values = lambda f: {k: v for k, v in f.items() if k != CURRENT_DIGEST}  # noqa: E731
        assert values(restored[target]) == values(before[target]), f"untag {case}"
        assert all(view(restored[target]) == view(before[target]) for view in READERS.values()), f"untag {case}"


def _matrix() -> list[tuple[str, Layout]]:
    layouts = {
        "IPTC only": lambda fmt: Layout(fmt, iptc=["kitchen", "Aunt May"]),
        "IPTC only, Latin-1": lambda fmt: Layout(fmt, iptc=["kitchen", "Café"], latin1=True),
        "dc:subject only": lambda fmt: Layout(fmt, subject=["sunset", "holiday"]),
        "hierarchy + subject": lambda fmt: Layout(fmt, hierarchy=["People|Oma", "Places|Berlin"], subject=["Oma", "Berlin"]),
        "TagsList + subject": lambda fmt: Layout(fmt, tagslist=["People/Oma", "Events/Wedding"], subject=["Oma", "Wedding"]),
        "MWG-written": lambda fmt: Layout(fmt, iptc=["kitchen"] if fmt in IPTC_FORMATS else [], mwg=["sunset", "holiday"]),
        "MWG-written, IPTC changed since": lambda fmt: Layout(fmt, iptc=["kitchen"], mwg=["sunset"], iptc_later=["Aunt May"]),
    }
    return [(f"{name} ({fmt})", make(fmt)) for name, make in layouts.items() for fmt in FORMATS
            if "IPTC" not in name or fmt in IPTC_FORMATS]


@pytest.mark.slow
def test_every_layout_and_format_keeps_the_users_keywords_visible_in_every_app(tmp_path):
    """{IPTC only, dc:subject only, hierarchy + subject, TagsList + subject, MWG-written} x {JPEG,
    TIFF, PNG, HEIC, RAW sidecar} x {MWG, darktable, Immich, digiKam}, with `--lang both` names
    that hold `/`: after tag and re-tag each app shows what it showed before plus ramcli's tags,
    and untag gives back the exact values, the stored IPTCDigest included."""
    cases = _matrix()
    tags = [TagScore("dog", "狗", 0.9), TagScore("alley", "胡同/球道", 0.8), TagScore("Oma", "奶奶", 0.7)]
    run([c for _, c in cases], tmp_path, tags, [TagScore("cat", "猫", 0.9)], WriterOptions(lang="both"))


WORD = st.text(st.sampled_from(list("abXY09 é狗/|-")), min_size=1, max_size=8).map(str.strip).filter(bool)
# A user's flat keyword holding `|` is a hierarchy to darktable and one keyword to digiKam and
# Immich: no field can show it the same way to both, so the user's flat keywords here have none
# (ramcli's own names may: it replaces the separators in them). `/` is fine: all read it alike.
FLAT = WORD.filter(lambda w: "|" not in w)
LATIN1 = FLAT.filter(lambda w: "狗" not in w)
LEVEL = FLAT  # a Lightroom level may hold `/` (AC/DC)
TAG = st.builds(lambda en, zh: TagScore(en, zh, 0.9), WORD, st.sampled_from(["", "狗", "胡同/球道", "背后/后面", "a|b"]))


@st.composite
def layouts(draw) -> Layout:
    fmt = draw(st.sampled_from(FORMATS))
    words = lambda s, n=0: draw(st.lists(s, min_size=n, max_size=4, unique=True))  # noqa: E731
    case = Layout(fmt)
    case.hierarchy = words(st.lists(LEVEL, min_size=1, max_size=3).map("|".join))
    case.tagslist = words(st.lists(LEVEL.filter(lambda w: "/" not in w), min_size=1, max_size=3).map("/".join))
    iptc_here = fmt in IPTC_FORMATS
    if iptc_here:
        case.latin1 = draw(st.booleans())
        case.iptc = words(LATIN1 if case.latin1 else FLAT)
    flat = LATIN1 if case.latin1 else FLAT
    if draw(st.booleans()):
        case.mwg = words(flat, 1)
    else:
        case.subject = words(FLAT)
    if iptc_here and (case.iptc or case.mwg):
        case.iptc_later = words(flat)
    return case


@pytest.mark.slow
@settings(max_examples=20, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large])
@given(cases=st.lists(layouts(), min_size=1, max_size=3), tags=st.lists(TAG, min_size=1, max_size=4),
       retag=st.lists(TAG, min_size=1, max_size=3), lang=st.sampled_from(["en", "zh", "both"]),
       root=st.sampled_from(["auto", "ai", ""]), digikam=st.sampled_from(["auto", "always"]))
def test_property_random_layouts_stay_visible_in_every_app(tmp_path_factory, cases, tags, retag, lang, root, digikam):
    """Random layouts of the user's keywords (any mix of dc:subject, HierarchicalSubject, TagsList,
    IPTC in UTF-8 or Latin-1, MWG-written, IPTC changed since its digest) and random tag lists, with
    separators in names: every app keeps showing what it showed, plus ramcli's tags; untag restores."""
    options = WriterOptions(lang=lang, tag_root=root, digikam=digikam)
    run(cases, tmp_path_factory.mktemp("layouts"), tags, retag, options)
