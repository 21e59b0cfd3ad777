"""A photo library is never harmed: hostile names, layouts and values, against the real ExifTool.

Every check reads the files back through a separate one-shot `exiftool -X` (exact strings, see
`exact_tags`), never through the writer under test.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
import zlib
from pathlib import Path

import numpy as np
import pytest
import sqlite_utils
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageSequence

from media import USER_KEYWORDS, USER_TITLE, decoded_pixels_digest, make_photo
from small_disk import fill, small_disk
from ramcli.library.ledger import Ledger, LedgerEntry
from ramcli.metadata import CREATED_SIDECAR, MetadataWriter, WriterOptions, keyword_name
from ramcli.tagging.records import TagScore

DOG = TagScore("dog", "", 0.9)
BEACH = TagScore("beach", "", 0.8)
SUBJECT, HIERARCHICAL, DESCRIPTION = "XMP-dc:Subject", "XMP-lr:HierarchicalSubject", "XMP-dc:Description"
_RDF = "{http://www.w3.org/1999/02/22-rdf-syntax-ns#}"


@pytest.fixture
def ledger(tmp_path) -> Ledger:
    return Ledger(sqlite_utils.Database(tmp_path / "index.db"))


def exiftool(*args: str | os.PathLike) -> bytes:
    """A one-shot ExifTool run (set-up and read-back); arguments go as argv, never as lines."""
    return subprocess.run(["exiftool", *args], capture_output=True, check=True).stdout


def exact_tags(path: Path) -> dict[str, list[str]]:
    """Every XMP and IPTC value of a file as the exact string it holds (`Group:Tag` -> list).

    ExifTool's -j output would turn `TRUE` into `true` and type numbers; its -X output keeps
    strings, with base64 for bytes XML cannot carry, and a CR left raw (escaped before parsing).
    `-m`: a list of more than 1,000 items is read whole."""
    raw = exiftool("-X", "-m", "-G1", "-XMP:all", "-IPTC:all", "-EXIF:DateTimeOriginal", path)
    found: dict[str, list[str]] = {}
    for elem in ET.fromstring(raw.replace(b"\r", b"&#13;")).find(f"{_RDF}Description"):
        uri, _, tag = elem.tag[1:].partition("}")
        group = uri.rstrip("/").split("/")[-2]
        items = list(elem.iter(f"{_RDF}li")) if len(elem) else [elem]
        found[f"{group}:{tag}"] = [_text(i) for i in items]
    found.pop("XMP-x:XMPToolkit", None)
    return found


def _text(elem: ET.Element) -> str:
    if elem.get(f"{_RDF}datatype", "").endswith("base64Binary"):
        return base64.b64decode("".join((elem.text or "").split())).decode("utf-8", "surrogateescape")
    return elem.text or ""


def set_user_values(path: Path, values: dict) -> None:
    """Put a user's values into a file as another app would (ExifTool's JSON import, each value
    base64-encoded so that it arrives byte for byte)."""
    enc = lambda v: "base64:" + base64.b64encode(v.encode()).decode()  # noqa: E731
    entry = {k: [enc(x) for x in v] if isinstance(v, list) else enc(v) for k, v in values.items()}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump([{"SourceFile": "*", **entry}], fh)
    try:
        exiftool("-q", "-overwrite_original", f"-j={fh.name}", path)
    finally:
        os.unlink(fh.name)


def tree_digest(root: Path, ignore: set[Path] = frozenset()) -> dict[bytes, str]:
    """Every file under `root` (bytes paths, links as their targets' names) -> a digest."""
    out = {}
    for folder, dirs, files in os.walk(os.fsencode(root)):
        for name in dirs + files:
            path = os.path.join(folder, name)
            if Path(os.fsdecode(path)) in ignore:
                continue
            if os.path.islink(path):
                out[path] = "link:" + os.fsdecode(os.readlink(path))
            elif os.path.isfile(path):
                out[path] = hashlib.sha256(open(path, "rb").read()).hexdigest()
            else:
                out[path] = "dir"
    return out


# --- file names never become ExifTool arguments -------------------------------------------------


def test_newline_names_never_reach_exiftool_as_arguments(tmp_path, ledger, monkeypatch):
    """A name with line breaks would be several `-stay_open` arguments: Perl code through `-if`,
    and `-all=` wiping another photo. Nothing runs, no other photo changes, no backup is left,
    and the photos with such names get their tags like any other."""
    lib = tmp_path / "lib"
    lib.mkdir()
    monkeypatch.chdir(lib)  # relative names in an injected command would resolve here
    perl = make_photo(lib, "x\n-if\nsystem(q{id>PWNED.txt}) || 1\ny", "jpg", seed=1)
    wipe = make_photo(lib, "z\n-all=\nw", "jpg", seed=2)
    other = make_photo(lib, "w", "jpg", seed=3)  # `w.jpg`: what `-all=` would have wiped
    dash = make_photo(lib, "-o\n..\n-P", "png", seed=4)
    photos = [perl, wipe, other, dash]
    before = {p: exact_tags(p) for p in photos}
    tree = tree_digest(tmp_path, {tmp_path / "index.db"})

    with MetadataWriter(WriterOptions(), ledger) as w:
        plans = w.plan_batch([(p, [DOG]) for p in photos])  # the dry run reads every file
        assert [p.error for p in plans] == [None] * 4
        assert tree_digest(tmp_path, {tmp_path / "index.db"}) == tree
        outcomes = w.write_batch([(p, [DOG]) for p in photos])
    assert [o.status for o in outcomes] == ["written"] * 4, [o.error for o in outcomes]
    assert not list(tmp_path.rglob("PWNED*")) and not list(Path.cwd().rglob("PWNED*"))
    assert not list(tmp_path.rglob("*_original"))
    for p in photos:
        after = exact_tags(p)
        assert after[SUBJECT] == USER_KEYWORDS + ["dog"], p
        assert after["XMP-dc:Title"] == [USER_TITLE] and after["ExifIFD:DateTimeOriginal"] == ["2023:07:14 10:20:30"]
        keywords = (SUBJECT, HIERARCHICAL, "IPTC:Keywords")
        assert {k: v for k, v in after.items() if k not in keywords} == {
            k: v for k, v in before[p].items() if k not in keywords}
    assert sorted(os.listdir(lib)) == sorted(p.name for p in photos)  # nothing created beside them


# --- everything that is there is read -----------------------------------------------------------


def png_with_xmp_after_idat(path: Path, subject: list[str], description: str) -> Path:
    """A PNG laid out as ExifTool before 11.58 and other programs write it: the XMP iTXt chunk
    after the image data (a reader that stops at IDAT sees no metadata)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    rows = np.random.default_rng(7).integers(0, 256, (8, 8 * 3), dtype=np.uint8)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)
    items = "".join(f"<rdf:li>{k}</rdf:li>" for k in subject)
    xmp = (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?><x:xmpmeta xmlns:x="adobe:ns:meta/">'
        '<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"><rdf:Description rdf:about="" '
        f'xmlns:dc="http://purl.org/dc/elements/1.1/"><dc:subject><rdf:Bag>{items}</rdf:Bag></dc:subject>'
        f'<dc:description><rdf:Alt><rdf:li xml:lang="x-default">{description}</rdf:li></rdf:Alt></dc:description>'
        '</rdf:Description></rdf:RDF></x:xmpmeta><?xpacket end="w"?>'
    ).encode()
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"iTXt", b"XML:com.adobe.xmp\x00\x00\x00\x00\x00" + xmp)
        + chunk(b"IEND", b"")
    )
    return path


def test_png_whose_xmp_follows_the_image_data_keeps_the_users_values(tmp_path, ledger):
    png = png_with_xmp_after_idat(tmp_path / "late.png", ["Oma"], "My own words")
    pixels = decoded_pixels_digest(png)
    with MetadataWriter(WriterOptions(), ledger) as w:
        assert w.write_batch([(png, [DOG, BEACH])], captions=["a dog on a beach"])[0].status == "written"
        after = exact_tags(png)
        assert after[SUBJECT] == ["Oma", "dog", "beach"]
        assert after[DESCRIPTION] == ["My own words"]  # the user's: never replaced by a caption
        assert decoded_pixels_digest(png) == pixels
        assert w.untag_batch([png])[0].status == "written"
    assert exact_tags(png)[SUBJECT] == ["Oma"] and exact_tags(png)[DESCRIPTION] == ["My own words"]


# --- the file stays the same file ---------------------------------------------------------------


def test_writes_keep_inode_hard_links_xattrs_owner_mode_and_mtime(tmp_path, ledger):
    """ramcli copies the new version into the file: a KDE/Finder tag in an extended attribute, a
    second hard link, the mode and owner survive a write and an untag, in a photo and in a user's
    sidecar; `--preserve-mtime` keeps the modification time to the nanosecond."""
    lib = tmp_path / "lib"
    lib.mkdir()
    jpg = make_photo(lib, "photo", "jpg")
    raw = make_photo(lib, "raw", "CR2")
    sidecar = lib / "raw.xmp"
    exiftool("-q", "-XMP-dc:Subject=Oma", "-XMP-crs:Exposure2012=+0.50", sidecar)
    alias = tmp_path / "alias.jpg"
    os.link(jpg, alias)
    for f in (jpg, sidecar):
        os.setxattr(f, "user.xdg.tags", b"Favourites,Oma")
        f.chmod(0o640)
    os.utime(jpg, ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))
    identity = {f: (f.stat().st_ino, f.stat().st_dev, f.stat().st_uid, f.stat().st_gid) for f in (jpg, sidecar)}
    pixels = decoded_pixels_digest(jpg)

    def unchanged_identity():
        for f in (jpg, sidecar):
            st_ = f.stat()
            assert (st_.st_ino, st_.st_dev, st_.st_uid, st_.st_gid) == identity[f], f
            assert stat.S_IMODE(st_.st_mode) == 0o640
            assert os.getxattr(f, "user.xdg.tags") == b"Favourites,Oma"
        assert jpg.stat().st_nlink == 2 and alias.read_bytes() == jpg.read_bytes()
        assert jpg.stat().st_mtime_ns == 1_600_000_000_123_456_789

    with MetadataWriter(WriterOptions(preserve_mtime=True), ledger) as w:
        assert [o.status for o in w.write_batch([(jpg, [DOG]), (raw, [DOG])])] == ["written"] * 2
        unchanged_identity()
        assert exact_tags(alias)[SUBJECT] == USER_KEYWORDS + ["dog"]
        assert exact_tags(sidecar)[SUBJECT] == ["Oma", "dog"]
        assert exact_tags(sidecar)["XMP-crs:Exposure2012"] == ["+0.50"]
        assert decoded_pixels_digest(jpg) == pixels
        assert [o.status for o in w.untag_batch([jpg, raw])] == ["written"] * 2
    unchanged_identity()
    assert exact_tags(jpg)[SUBJECT] == USER_KEYWORDS and exact_tags(sidecar)[SUBJECT] == ["Oma"]
    assert not list(tmp_path.rglob("*_original")) and not list(tmp_path.rglob(".ramcli-*"))


def test_a_full_disk_never_leaves_a_photo_half_written(tmp_path, ledger):
    """Photos on a disk that is full: one whose new version does not fit is reported as not
    written and keeps every byte, and so does a hard-linked snapshot of it; the ledger learns
    nothing; the batch's photo on another disk is written. The next run, still on the full disk,
    finds nothing half done; once there is room the write goes in, in place."""
    with small_disk(tmp_path / "disk", 2 << 20) as disk:
        photo = make_photo(disk, "photo", "jpg")
        snapshot = disk / "snapshot.jpg"
        os.link(photo, snapshot)
        elsewhere = make_photo(tmp_path, "elsewhere", "jpg", seed=1)
        before, pixels = photo.read_bytes(), decoded_pixels_digest(photo)
        tags = [TagScore(f"tag {i:03d}", "", 0.9) for i in range(300)]  # the new version is pages longer
        filler = fill(disk)
        with MetadataWriter(WriterOptions(), ledger) as w:
            outcomes = w.write_batch([(photo, tags), (elsewhere, tags)])
        assert photo.read_bytes() == before == snapshot.read_bytes()
        assert [o.status for o in outcomes] == ["failed", "written"]
        assert "no space left on device" in outcomes[0].error and "unchanged" in outcomes[0].error
        assert ledger.entries(os.path.realpath(photo)) == [] and ledger.entries(os.path.realpath(elsewhere))
        with MetadataWriter(WriterOptions(), ledger) as w:  # the next run, the disk still full
            assert w.journal.replayed == 0 and w.journal.waiting == []
            assert w.write_batch([(photo, tags)])[0].status == "failed"
        assert photo.read_bytes() == before and decoded_pixels_digest(photo) == pixels

        filler.unlink()
        with MetadataWriter(WriterOptions(), ledger) as w:
            assert w.write_batch([(photo, tags)])[0].status == "written"
        assert exact_tags(snapshot)[SUBJECT] == USER_KEYWORDS + [t.name for t in tags]
        assert snapshot.stat().st_ino == photo.stat().st_ino and decoded_pixels_digest(photo) == pixels


KILLED_MID_COPY = """
import os, signal, sys
import sqlite_utils
import ramcli.inplace
from ramcli.library.ledger import Ledger
from ramcli.metadata import MetadataWriter, WriterOptions
from ramcli.tagging.records import TagScore

def write_into(fd, source, sync=True):  # half of the new content, no space reserved, then a kill
    data = open(source, "rb").read()
    os.pwrite(fd, data[: len(data) // 2], 0)
    os.kill(os.getpid(), signal.SIGKILL)

ramcli.inplace.write_into = write_into
ramcli.inplace.reserve = lambda fd, size: None  # a file system where space cannot be reserved
db, photo, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
with MetadataWriter(WriterOptions(), Ledger(sqlite_utils.Database(db))) as writer:
    writer.write_batch([(photo, [TagScore(f"tag {i:03d}", "", 0.9) for i in range(count)])])
"""


@pytest.mark.slow
def test_a_write_the_journal_cannot_complete_yet_keeps_its_ledger_rows_staged(tmp_path, ledger):
    """A run killed in the middle of a copy on a file system where no space could be reserved,
    then the disk fills up: the next run cannot complete the photo, so it keeps the journal
    record and the ledger's staged rows (it does not settle them against the torn file), and
    writes nothing into that photo. Once there is room, the next run completes the photo, the
    ledger learns exactly ramcli's keywords, and untag gives the photo's own metadata back."""
    with small_disk(tmp_path / "disk", 2 << 20) as disk:
        photo = make_photo(disk, "photo", "jpg")
        before, pixels = exact_tags(photo), decoded_pixels_digest(photo)
        names = [f"tag {i:03d}" for i in range(300)]
        script = tmp_path / "killed.py"
        script.write_text(KILLED_MID_COPY)
        done = subprocess.run([sys.executable, script, tmp_path / "index.db", photo, str(len(names))],
                              capture_output=True, text=True)
        assert done.returncode == -signal.SIGKILL, done.stderr
        torn = photo.read_bytes()
        filler = fill(disk)
        staged = lambda: ledger.db["metadata_ledger_staged"].count  # noqa: E731

        with MetadataWriter(WriterOptions(), ledger) as w:
            assert w.journal.replayed == 0 and photo.read_bytes() == torn
            assert w.journal.waiting_targets == {str(photo)}
            assert staged() > 0 and ledger.entries(os.path.realpath(photo)) == []
            outcome = w.write_batch([(photo, [DOG])])[0]
            assert outcome.status == "failed" and photo.read_bytes() == torn
        assert staged() > 0

        filler.unlink()
        with MetadataWriter(WriterOptions(), ledger) as w:
            assert w.journal.replayed == 1 and staged() == 0
            assert exact_tags(photo)[SUBJECT] == USER_KEYWORDS + names
            assert decoded_pixels_digest(photo) == pixels
            rows = {(e.field, e.value): e.preexisting for e in ledger.entries(os.path.realpath(photo))}
            assert {v for (f, v), preexisting in rows.items() if f == SUBJECT and not preexisting} == set(names)
            assert w.untag_batch([photo])[0].status == "written"
        assert exact_tags(photo) == before


def test_more_than_a_thousand_keywords_are_read_and_kept_whole(tmp_path, ledger):
    """ExifTool reads only the first 1,000 items of a list unless it ignores minor errors: a photo
    with 1,500 keywords in each list keeps all of them, gets ramcli's, is reported as written, and
    untag gives back exactly what it had."""
    photo = make_photo(tmp_path, "many", "jpg", user_metadata=False)
    mine = [f"keyword {i:04d}" for i in range(1500)]
    set_user_values(photo, {SUBJECT: mine, HIERARCHICAL: [f"places|{k}" for k in mine]})
    before = exact_tags(photo)
    assert before[SUBJECT] == mine and len(before[HIERARCHICAL]) == 1500
    with MetadataWriter(WriterOptions(), ledger) as w:
        outcome = w.write_batch([(photo, [DOG])])[0]
        assert (outcome.status, outcome.error) == ("written", None)
        after = exact_tags(photo)
        assert after[SUBJECT] == mine + ["dog"]
        assert after[HIERARCHICAL][:1500] == before[HIERARCHICAL]
        assert w.write_batch([(photo, [DOG])])[0].status == "unchanged"
        assert w.untag_batch([photo])[0].status == "written"
    assert exact_tags(photo) == before


def test_a_new_version_that_does_not_hold_the_plan_is_never_copied_in(tmp_path, ledger, monkeypatch):
    """A new version that ExifTool warned about is read back before it is copied into the photo:
    here ExifTool is handed an IPTC keyword longer than IPTC's 64 bytes, warns, and stores it cut
    short. That version is never copied in: the photo keeps every byte, the outcome says why,
    and the ledger learns nothing."""
    from ramcli.metadata import ExifToolProcess
    from ramcli.metadata.exiftool import encode_value

    photo = make_photo(tmp_path, "photo", "jpg")
    before = photo.read_bytes()
    real = ExifToolProcess.write

    def too_long_a_keyword(self, entries, *args):
        for entry in entries:
            entry["IPTC:Keywords"] = [*entry["IPTC:Keywords"], encode_value("x" * 100)]
        return real(self, entries, *args)

    monkeypatch.setattr(ExifToolProcess, "write", too_long_a_keyword)
    with MetadataWriter(WriterOptions(iptc="always"), ledger) as w:
        outcome = w.write_batch([(photo, [DOG, BEACH])])[0]
    assert photo.read_bytes() == before
    assert outcome.status == "failed", outcome
    assert "ExifTool did not store IPTC:Keywords as planned (the file is unchanged)" in outcome.error
    assert any("exceeds length limit" in w for w in outcome.warnings)
    assert ledger.entries(os.path.realpath(photo)) == []


# --- values round-trip byte for byte ------------------------------------------------------------

AWKWARD = ["true", "TRUE", "False", "null", "007", "1e5", "1.50", "-0", "-", "=", "@", "base64:aGVsbG8=",
           " leading", "trailing ", "a, b", "tab\there", "two\nlines", "cr\rhere", "😀", "שלום עולם",
           "x" * 2000]


def test_every_string_round_trips_byte_for_byte(tmp_path, ledger):
    """User keywords and descriptions that look like JSON literals, numbers, options or base64
    stay exactly what they are, and ramcli's own tags that look so are written and removed exactly."""
    jpg = make_photo(tmp_path, "photo", "jpg", user_metadata=False)
    bare = make_photo(tmp_path, "bare", "jpg", seed=1, user_metadata=False)
    set_user_values(jpg, {SUBJECT: AWKWARD, DESCRIPTION: "base64:TXkgb3du  ", "IPTC:CodedCharacterSet": "UTF8",
                          "IPTC:Keywords": ["TRUE", "007", "1e5", "base64:aGVsbG8=", " x "]})
    before = exact_tags(jpg)
    assert before[SUBJECT] == AWKWARD  # the set-up itself is exact
    ours = [TagScore(n, "", 0.9) for n in ("True", "base64:Zm9vYmFy", "0x10", "1E5")]
    names = [t.name for t in ours]
    with MetadataWriter(WriterOptions(iptc="always"), ledger) as w:
        outcomes = w.write_batch([(jpg, ours), (bare, ours)], captions=[None, "base64:Zm9v true"])
        assert [o.status for o in outcomes] == ["written"] * 2
        after = exact_tags(jpg)
        assert after[SUBJECT] == AWKWARD + names
        # the hierarchy ramcli creates starts with the user's keywords from dc:subject and IPTC, exactly
        seeds = list(dict.fromkeys(AWKWARD + before["IPTC:Keywords"]))
        assert after[HIERARCHICAL] == seeds + [f"auto|{n}" for n in names]
        assert after["IPTC:Keywords"] == before["IPTC:Keywords"] + names
        assert after[DESCRIPTION] == before[DESCRIPTION]
        assert exact_tags(bare)[DESCRIPTION] == ["base64:Zm9v true"]
        assert [o.status for o in w.write_batch([(jpg, ours)])] == ["unchanged"]  # read back exactly
        assert [o.status for o in w.untag_batch([jpg, bare])] == ["written"] * 2
    assert exact_tags(jpg) == before
    assert DESCRIPTION not in exact_tags(bare) and SUBJECT not in exact_tags(bare)


# --- GIF ----------------------------------------------------------------------------------------


def test_gif_still_and_animated_get_embedded_xmp(tmp_path, ledger):
    still = tmp_path / "still.gif"
    Image.new("RGB", (16, 16), (200, 10, 10)).save(still)
    animated = tmp_path / "animated.gif"
    frames = [Image.new("RGB", (16, 16), (60 * i, 255 - 60 * i, 0)) for i in range(4)]
    frames[0].save(animated, save_all=True, append_images=frames[1:], loop=0, duration=80)

    def frame_digests(path):
        with Image.open(path) as im:
            return [hashlib.sha256(f.convert("RGB").tobytes()).hexdigest() for f in ImageSequence.Iterator(im)]

    pixels = {p: frame_digests(p) for p in (still, animated)}
    with MetadataWriter(WriterOptions(), ledger) as w:
        outcomes = w.write_batch([(still, [DOG]), (animated, [DOG, BEACH])], captions=["a red square", None])
        assert [(o.status, o.error) for o in outcomes] == [("written", None)] * 2
        assert exact_tags(still)[SUBJECT] == ["dog"] and exact_tags(still)[DESCRIPTION] == ["a red square"]
        assert exact_tags(animated)[SUBJECT] == ["dog", "beach"]
        assert {p: frame_digests(p) for p in pixels} == pixels
        assert not list(tmp_path.glob("*.xmp"))
        assert [o.status for o in w.untag_batch([still, animated])] == ["written"] * 2
    assert SUBJECT not in exact_tags(still) and SUBJECT not in exact_tags(animated)
    assert {p: frame_digests(p) for p in pixels} == pixels


# --- one list of file kinds: discovery's -----------------------------------------------------------


@pytest.mark.parametrize("name, head", [
    ("scan.MOS", None),  # TIFF-based RAW: discovery knows it by its extension
    ("old.CRW", b"II\x1a\x00\x00\x00HEAPCCDR"),  # Canon CRW, by its signature
    ("minolta.MRW", b"\x00MRM\x00\x00\x00\x10"),  # Minolta MRW, by its signature
])
def test_raw_formats_discovery_knows_get_sidecars(tmp_path, ledger, name, head):
    from ramcli.media.discover import sniff

    path = tmp_path / name
    if head is None:
        Image.new("RGB", (8, 8)).save(path, format="TIFF")
    else:
        path.write_bytes(head + bytes(200))
    data = path.read_bytes()
    assert sniff(path).kind == "raw"
    with MetadataWriter(WriterOptions(), ledger) as w:
        assert w.write_batch([(path, [DOG])])[0].status == "written"
    assert path.read_bytes() == data
    assert exact_tags(path.with_suffix(".xmp"))[SUBJECT] == ["dog"]


# --- untag deletes only what ramcli created ---------------------------------------------------------


def test_untag_deletes_only_a_sidecar_ramcli_created_there_holding_only_its_values(tmp_path, ledger):
    """Ledger rows that name another file (a crafted or merged ledger), a sidecar the user added
    to, and a sidecar replaced by a link: untag deletes none of them and writes nothing outside
    the photo's own targets."""
    photo = make_photo(tmp_path, "photo", "CR2")
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    other = make_photo(tmp_path, "other", "jpg", seed=5)  # holds the user's Oma
    other_bytes = other.read_bytes()
    with MetadataWriter(WriterOptions(), ledger) as w:
        assert w.write_batch([(photo, [DOG])])[0].status == "written"
    sidecar = photo.with_suffix(".xmp")
    real = os.path.realpath(photo)
    ledger.record([
        LedgerEntry(real, str(victim), CREATED_SIDECAR, "1", False),
        LedgerEntry(real, str(other), SUBJECT, "Oma", False),
        LedgerEntry(real, str(other), CREATED_SIDECAR, "1", False),
    ])
    exiftool("-q", "-overwrite_original", "-XMP-dc:Subject+=my own", sidecar)  # the user adds a keyword
    with MetadataWriter(WriterOptions(), ledger) as w:
        assert w.untag_batch([photo])[0].status == "written"
    assert victim.read_text() == "precious" and other.read_bytes() == other_bytes
    assert exact_tags(sidecar)[SUBJECT] == ["my own"]  # kept: it holds the user's keyword now

    # a created sidecar swapped for a link to a file elsewhere: neither deleted nor written through
    photo2 = make_photo(tmp_path, "photo2", "NEF")
    with MetadataWriter(WriterOptions(), ledger) as w:
        assert w.write_batch([(photo2, [DOG])])[0].status == "written"
    elsewhere = tmp_path / "elsewhere.xmp"
    shutil.copy(photo2.with_suffix(".xmp"), elsewhere)
    elsewhere_bytes = elsewhere.read_bytes()
    photo2.with_suffix(".xmp").unlink()
    photo2.with_suffix(".xmp").symlink_to(elsewhere)
    with MetadataWriter(WriterOptions(), ledger) as w:
        outcome = w.untag_batch([photo2])[0]
    assert outcome.status == "failed" and "symbolic link" in outcome.error
    assert photo2.with_suffix(".xmp").is_symlink() and elsewhere.read_bytes() == elsewhere_bytes


# --- the property: whatever the names and values ---------------------------------------------------

_NAME_PARTS = st.sampled_from(
    ["x", "IMG_0001", " ", "\n", "\r", "\t", "-", "--", "-all=", "\n-if\n", "=", "@", "@argfile", "%d%f",
     "*", "?", "é", "😀", "\udcff", "\udce9\udc80", "$(id)", "'", '"', "\\", "-o\n..\n", "#"]
)
NAMES = st.one_of(
    st.lists(_NAME_PARTS, min_size=1, max_size=6).map("".join),
    st.integers(100, 230).map(lambda n: "L" * n),  # near the 255-byte limit with the extension
).filter(lambda n: n not in (".", "..") and not n.startswith("."))
VALUES = st.one_of(
    st.sampled_from(AWKWARD + ["base64:", "", "  ", "&amp;", "<rdf:li>", "]]>", "\u202eRTL\u202c", "ø" * 300]),
    st.text(st.characters(whitelist_categories=("L", "M", "N", "P", "S", "Zs")), max_size=40),
)
FORMATS = st.sampled_from(["jpg", "png", "gif"])


def _new_photo(folder: Path, name: str, fmt: str) -> Path:
    path = folder / f"{name}.{fmt}"
    Image.fromarray(np.random.default_rng(len(name)).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(
        path, format={"jpg": "JPEG", "png": "PNG", "gif": "GIF"}[fmt])
    return path


@pytest.mark.slow
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(folder_name=NAMES, file_name=NAMES, fmt=FORMATS, user_subject=st.lists(VALUES, max_size=6),
       user_description=st.none() | VALUES, ours=st.lists(VALUES, min_size=1, max_size=5), caption=VALUES)
def test_property_hostile_names_and_values(tmp_path, folder_name, file_name, fmt, user_subject,
                                           user_description, ours, caption):
    """Whatever the names and values: every user value is there after the write, byte for byte;
    ramcli's are added; no other file in the tree is created, changed or deleted; untag gives the
    user's values back exactly."""
    with tempfile.TemporaryDirectory(dir=tmp_path) as tmp:
        root = Path(tmp) / "library"
        folder = root / folder_name
        folder.mkdir(parents=True)
        for decoy in (root / "w.jpg", folder / "x.jpg", folder / "notes.txt"):  # what an injection would hit
            decoy.write_bytes(b"decoy")
        photo = _new_photo(folder, file_name, fmt)
        user = {SUBJECT: user_subject, "XMP-dc:Title": "mine"}
        if user_description is not None:
            user[DESCRIPTION] = user_description
        set_user_values(photo, user)
        before = exact_tags(photo)
        user_subject = before.get(SUBJECT, [])  # as the set-up stored them (exact: see the test above)
        tree = tree_digest(root, {photo})
        tags = [TagScore(v, "", 0.9) for v in ours]
        wanted = list(dict.fromkeys(n for n in map(keyword_name, ours) if n))
        led = Ledger(sqlite_utils.Database(Path(tmp) / "index.db"))
        with MetadataWriter(WriterOptions(), led) as w:
            outcome = w.write_batch([(photo, tags)], captions=[caption])[0]
            assert outcome.status in ("written", "unchanged"), outcome.error
            after = exact_tags(photo)
            assert after.get(SUBJECT, []) == user_subject + [v for v in wanted if v not in user_subject]
            assert after["XMP-dc:Title"] == ["mine"]
            if DESCRIPTION in before:
                assert after[DESCRIPTION] == before[DESCRIPTION]
            elif caption.strip():
                assert after[DESCRIPTION] == [caption.strip()]
            assert tree_digest(root, {photo}) == tree
            assert w.untag_batch([photo])[0].status in ("written", "unchanged")
        assert exact_tags(photo) == before
        assert tree_digest(root, {photo}) == tree
        assert not list(Path(tmp).rglob("*_original"))


@pytest.mark.slow
def test_tag_end_to_end_with_newline_names(tmp_path, monkeypatch):
    """`ramcli tag` on a folder with such names: nothing runs, the decoy is untouched, and their
    tags reach both the index and the photos' metadata."""
    from typer.testing import CliRunner

    from ckpt_factory import make_labels_dir, make_official_checkpoint
    from ramcli.cli.app import app
    from ramcli.library.index import Index

    weights = make_official_checkpoint(tmp_path / "ram_tiny.pth", "ram_tiny", num_classes=8)
    labels = make_labels_dir(tmp_path, 8)
    lib = tmp_path / "lib"
    lib.mkdir()
    monkeypatch.chdir(lib)
    photos = [make_photo(lib, "x\n-if\nsystem(q{id>PWNED.txt}) || 1\ny", "jpg", seed=1),
              make_photo(lib, "z\n-all=\nw", "jpg", seed=2)]
    decoy = make_photo(lib, "w", "jpg", seed=3)
    decoy_bytes = decoy.read_bytes()
    result = CliRunner().invoke(app, ["tag", str(photos[0]), str(photos[1]), "--weights", str(weights),
                                      "--labels", str(labels), "--threshold", "0", "--workers", "0", "-q"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert not list(tmp_path.rglob("PWNED*")) and decoy.read_bytes() == decoy_bytes
    with Index.open() as index:
        for p in photos:
            names = [t.name for t in index.photo_tags(str(p))]
            assert len(names) == 8
            assert exact_tags(p)[SUBJECT] == USER_KEYWORDS + [n for n in names if n not in USER_KEYWORDS]
