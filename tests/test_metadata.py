"""The metadata writer against real ExifTool on real files of every format (never mocked).

Read-back always goes through a separate one-shot `exiftool` process (tests/media.py), not
through the writer under test.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import stat
from pathlib import Path

import pytest
import sqlite_utils

from media import (
    EMBEDDED_FORMATS,
    IPTC_FORMATS,
    RAW_FORMATS,
    RAW_WITH_SIDECAR,
    USER_KEYWORDS,
    USER_TITLE,
    decoded_pixels_digest,
    exiftool,
    make_photo,
    make_samples,
    read_tags,
)
from ramcli.errors import RamcliError, UsageError
from ramcli.library.ledger import Ledger, LedgerEntry, mergeable
from ramcli.metadata import (
    DIGEST_BEFORE,
    MetadataWriter,
    WriterOptions,
    keyword_name,
    leaves,
    plan_description,
    plan_field,
    seed_values,
    sidecar_targets,
    trim_iptc,
)
from ramcli.tagging.records import TagScore

DOG = TagScore("dog", "狗", 0.9)
BEACH = TagScore("beach", "海滩", 0.8)
OMA = TagScore("Oma", "奶奶", 0.7)  # same text as a user keyword already in every sample
KEYWORD_TAGS = ("XMP-dc:Subject", "XMP-lr:HierarchicalSubject", "IPTC:Keywords",
                "XMP-digiKam:TagsList", "XMP-microsoft:LastKeywordXMP")
OTHER_TAGS = ("ExifIFD:DateTimeOriginal", "GPS:GPSLatitude", "GPS:GPSLongitude", "XMP-dc:Title")
DESCRIPTION = "XMP-dc:Description"
CAPTION = "a dog running on the beach"


@pytest.fixture(scope="module")
def samples_src(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("samples")
    make_samples(folder)
    return folder


@pytest.fixture
def samples(samples_src, tmp_path) -> dict[str, Path]:
    folder = tmp_path / "photos"
    shutil.copytree(samples_src, folder)
    return {p.suffix.lstrip("."): p for p in folder.iterdir() if p.suffix.lower() != ".xmp"}


@pytest.fixture
def ledger(tmp_path) -> Ledger:
    return Ledger(sqlite_utils.Database(tmp_path / "index.db"))


def writer(ledger: Ledger, **options) -> MetadataWriter:
    return MetadataWriter(WriterOptions(**options), ledger)


def keywords(path: Path) -> dict[str, list]:
    return read_tags(path, *KEYWORD_TAGS)


def sidecar_of(raw: Path) -> Path:
    adobe = raw.with_suffix(".xmp")
    return adobe if adobe.exists() else raw.with_name(raw.name + ".xmp")


# --- pure rules --------------------------------------------------------------------------------


def test_merge_rule_keeps_user_values_and_drops_only_ramcli_ones():
    # current: the user's Oma and ramcli's dog (ledger: dog ours, Oma was there before ramcli)
    new, record, forget, _ = plan_field(["Oma", "dog"], ["Oma", "cat"], {"dog": False, "Oma": True})
    assert new == ["Oma", "cat"]
    assert record == ["cat"] and forget == ["dog"]
    # dropping a preexisting value from the wanted list never removes it from the file
    new, _, forget, _ = plan_field(["Oma"], [], {"Oma": True})
    assert new == ["Oma"] and forget == ["Oma"]
    # a ramcli value the user deleted from the file stays deleted
    new, record, _, _ = plan_field(["Oma"], ["dog"], {"dog": False})
    assert new == ["Oma"] and record == []
    # nothing wanted changes nothing
    assert plan_field(["a", "b"], ["a", "b"], {"a": False, "b": True}).new == ["a", "b"]


def test_seeds_come_with_ramcli_tags_stay_on_retag_and_go_on_untag():
    # a field ramcli creates: the user's keywords first, recorded as seeded
    assert plan_field([], ["auto|dog"], {}, seeds=["sunset", "holiday"]) == (
        ["sunset", "holiday", "auto|dog"], ["sunset", "holiday", "auto|dog"], [], ["sunset", "holiday"])
    # seeds never create a field on their own (nothing of ramcli's to go with them)
    assert plan_field([], [], {}, seeds=["sunset"]).new == []
    assert plan_field([], ["dog"], {"dog": False}, seeds=["sunset"]).new == []  # the user deleted dog
    # a seed that is also a tag is recorded once, as the user's keyword
    assert plan_field([], ["dog"], {}, seeds=["dog"]) == (["dog"], ["dog"], [], ["dog"])
    ledger, seeded = {"sunset": False, "auto|dog": False}, {"sunset"}
    # a re-tag without dog keeps the seed (and its row), drops ramcli's own tag
    assert plan_field(["sunset", "auto|dog"], ["auto|cat"], ledger, seeded) == (
        ["sunset", "auto|cat"], ["auto|cat"], ["auto|dog"], [])
    # untag: the seed goes with ramcli's tags
    assert plan_field(["sunset", "auto|dog"], [], ledger, seeded) == ([], [], ["sunset", "auto|dog"], [])


def test_seed_values_copy_the_users_keywords_in_the_fields_own_syntax():
    user = {"IPTC:Keywords": ["kitchen", "Oma"], "XMP-dc:Subject": ["Oma", "People", "a|b"],
            "XMP-digiKam:TagsList": ["People/Oma", "Music/AC"]}
    # a hierarchy: the other hierarchy's paths, then flat keywords that are no level of them
    assert seed_values(user, "XMP-lr:HierarchicalSubject") == ["People|Oma", "Music|AC", "a|b", "kitchen"]
    assert seed_values({"XMP-lr:HierarchicalSubject": ["People|AC/DC"], "XMP-dc:Subject": ["x"]},
                       "XMP-digiKam:TagsList") == ["People/AC/DC", "x"]
    # a flat field: IPTC keywords, then the leaves of the user's hierarchies
    assert seed_values(user, "XMP-dc:Subject") == ["kitchen", "Oma", "AC"]
    assert seed_values(user, "IPTC:Keywords") == []  # IPTC is only ever written where it exists


def test_ledger_tells_seeded_values_and_the_digest_before_apart(ledger):
    photo = "/p/a.jpg"
    ledger.record([LedgerEntry(photo, photo, "XMP-lr:HierarchicalSubject", "sunset", False, seeded=True),
                   LedgerEntry(photo, photo, "XMP-lr:HierarchicalSubject", "auto|dog", False),
                   LedgerEntry(photo, photo, "XMP-dc:Subject", "Oma", True),
                   LedgerEntry(photo, photo, DIGEST_BEFORE, "in-sync", False)])
    assert [(e.value, e.preexisting, e.seeded) for e in ledger.entries(photo)] == [
        ("sunset", False, True), ("auto|dog", False, False), ("Oma", True, False), ("in-sync", False, False)]
    # rows merged from another index: a seeded row and a digest state of the photo itself, nothing else
    row = lambda target, field, value, pre=0: (photo, target, field, value, pre, None, None)  # noqa: E731
    assert mergeable(row(photo, "XMP-dc:Subject", "sunset", 2))
    assert not mergeable(row(photo, "XMP-dc:Subject", "sunset", 3))
    assert all(mergeable(row(photo, DIGEST_BEFORE, v)) for v in ("none", "in-sync", "0123456789abcdef" * 2))
    assert not mergeable(row(photo, DIGEST_BEFORE, "new"))
    assert not mergeable(row("/p/a.xmp", DIGEST_BEFORE, "none"))


def test_separators_in_names_are_replaced_by_lookalikes():
    assert keyword_name(" 胡同/球道 ") == "胡同\uff0f球道"
    assert keyword_name("a|b") == "a\uff5cb"
    assert leaves([TagScore("alley", "胡同/球道", 0.9)], "both") == ["alley", "胡同\uff0f球道"]


def test_iptc_trim_cuts_on_character_boundaries():
    long_zh = "狗" * 30  # 90 bytes in UTF-8
    cut = trim_iptc(long_zh, "utf-8")
    assert cut == "狗" * 21 and len(cut.encode()) == 63
    assert trim_iptc("狗", "latin-1") is None
    assert trim_iptc("café", "latin-1") == "café"


def test_leaves_per_language():
    assert leaves([DOG, BEACH], "en") == ["dog", "beach"]
    assert leaves([DOG, TagScore("x", "", 0.5)], "zh") == ["狗", "x"]
    assert leaves([DOG], "both") == ["dog", "狗"]


def test_bad_options_are_usage_errors():
    with pytest.raises(UsageError):
        WriterOptions(iptc="sometimes")
    with pytest.raises(UsageError):
        WriterOptions(tag_root="a|b")


def test_missing_exiftool_is_a_clear_error(ledger):
    with pytest.raises(RamcliError, match="ExifTool not found.*apt install libimage-exiftool-perl"):
        MetadataWriter(WriterOptions(exiftool="/nonexistent/exiftool"), ledger)


def test_an_exiftool_killed_under_ramcli_is_a_clear_error(tmp_path):
    from ramcli.metadata import ExifToolProcess

    photo = make_photo(tmp_path, "p", "jpg", seed=1)
    process = ExifToolProcess()
    try:
        assert str(photo) in process.read([str(photo)])[0]
        os.kill(process._et._process.pid, signal.SIGKILL)  # PyExifTool's own child: no public handle
        process._et._process.wait()
        with pytest.raises(RamcliError, match="ExifTool stopped while ramcli was using it; re-run to continue"):
            process.read([str(photo)])
    finally:
        process.close()


# --- every format, end to end ------------------------------------------------------------------


@pytest.mark.slow
def test_every_format_write_rerun_untag(samples, ledger):
    photos = list(samples.values())
    assert sorted(samples) == sorted(EMBEDDED_FORMATS + RAW_FORMATS)
    before_keywords = {p: keywords(p) for p in photos}
    before_keywords.update({sidecar_of(samples[e]): keywords(sidecar_of(samples[e])) for e in RAW_WITH_SIDECAR})
    before_other = {p: read_tags(p, *OTHER_TAGS) for p in photos}
    before_pixels = {p: decoded_pixels_digest(p) for p in photos}
    before_sidecars = {ext: read_tags(sidecar_of(samples[ext]), "XMP:all") for ext in RAW_WITH_SIDECAR}

    with writer(ledger) as w:
        outcomes = w.write_batch([(p, [DOG, OMA]) for p in photos], model_id="test_model",
                                 captions=[CAPTION] * len(photos))
    assert {o.path: o.status for o in outcomes} == {os.path.realpath(p): "written" for p in photos}

    for ext, p in samples.items():
        target = sidecar_of(p) if ext in RAW_FORMATS else p
        got = keywords(target)
        user = USER_KEYWORDS if ext not in RAW_FORMATS or ext in RAW_WITH_SIDECAR else []
        # the user's Oma is not duplicated; where there was none, Oma is added like any tag
        assert got["XMP-dc:Subject"] == (user + ["dog"] if user else ["dog", "Oma"]), ext
        # the hierarchy ramcli creates starts with the user's keywords, so apps that read it see them
        assert got["XMP-lr:HierarchicalSubject"] == user + ["auto|dog", "auto|Oma"], ext
        assert read_tags(target, DESCRIPTION) == {DESCRIPTION: [CAPTION]}, ext
        if ext in IPTC_FORMATS:
            assert got["IPTC:Keywords"] == USER_KEYWORDS + ["dog"], ext
            digest = read_tags(p, "Photoshop:IPTCDigest", "File:CurrentIPTCDigest")
            if ext == "jpg":  # the MWG digest is kept consistent with the IPTC we wrote
                assert digest["Photoshop:IPTCDigest"] == digest["File:CurrentIPTCDigest"], ext
            else:  # TIFF/DNG without a digest: none is invented
                assert "Photoshop:IPTCDigest" not in digest, ext
        else:
            assert "IPTC:Keywords" not in got, ext
        assert read_tags(p, *OTHER_TAGS) == before_other[p], ext
        assert decoded_pixels_digest(p) == before_pixels[p], ext
        assert not list(p.parent.glob("*_original")), ext

    for ext in RAW_WITH_SIDECAR:  # the Lightroom sidecar was updated in place, develop settings kept
        side = read_tags(sidecar_of(samples[ext]), "XMP:all")
        assert side["XMP-crs:Exposure2012"] == before_sidecars[ext]["XMP-crs:Exposure2012"]
        assert side["XMP-dc:Title"] == [USER_TITLE]
    assert samples["CR3"].with_suffix(".xmp").exists()  # new sidecars: Adobe naming by default
    for p in photos:  # trusting ExifTool's per-file status: the ledger claims nothing the file lacks
        for e in ledger.entries(os.path.realpath(p)):
            if e.field not in ("ramcli:CreatedSidecar", DIGEST_BEFORE):
                assert e.value in read_tags(Path(e.target), e.field).get(e.field, []), (p, e)

    # second run: nothing to do, no file touched
    stamps = {p: (sidecar_of(p) if p.suffix.lstrip(".") in RAW_FORMATS else p).stat().st_mtime_ns for p in photos}
    with writer(ledger) as w:
        again = w.write_batch([(p, [DOG, OMA]) for p in photos], captions=[CAPTION] * len(photos))
    assert {o.status for o in again} == {"unchanged"}
    assert stamps == {p: (sidecar_of(p) if p.suffix.lstrip(".") in RAW_FORMATS else p).stat().st_mtime_ns
                      for p in photos}

    # untag: exactly what ramcli added goes; the user's Oma stays; ramcli's own sidecars vanish
    with writer(ledger) as w:
        removed = w.untag_batch(photos)
    assert {o.status for o in removed} == {"written"}
    for ext, p in samples.items():
        if ext in RAW_FORMATS and ext not in RAW_WITH_SIDECAR:
            assert not p.with_suffix(".xmp").exists(), ext
            continue
        target = sidecar_of(p) if ext in RAW_FORMATS else p
        got = keywords(target)
        assert got == before_keywords[target], ext
        assert DESCRIPTION not in read_tags(target, DESCRIPTION), ext
        assert decoded_pixels_digest(p) == before_pixels[p], ext
    assert all(ledger.entries(p) == [] for p in photos)


# --- merge behaviour ---------------------------------------------------------------------------


def test_retag_drops_only_ramcli_copy(samples, ledger):
    jpg = samples["jpg"]
    with writer(ledger) as w:
        w.write_batch([(jpg, [DOG, BEACH, OMA])])
        # the user adds a keyword meanwhile, with another tool
        exiftool("-q", "-overwrite_original", "-XMP-dc:Subject+=sunset", jpg)
        out = w.write_batch([(jpg, [DOG])])
    assert out[0].status == "written"
    got = keywords(jpg)
    assert got["XMP-dc:Subject"] == USER_KEYWORDS + ["dog", "sunset"]  # Oma (user's) survives
    assert got["XMP-lr:HierarchicalSubject"] == USER_KEYWORDS + ["auto|dog"]  # seeded with the user's
    assert got["IPTC:Keywords"] == USER_KEYWORDS + ["dog"]


def test_keyword_the_user_deleted_is_not_written_again(samples, ledger):
    png = samples["png"]
    with writer(ledger) as w:
        w.write_batch([(png, [DOG])])
        exiftool("-q", "-overwrite_original", "-XMP-dc:Subject-=dog", png)
        assert w.write_batch([(png, [DOG])])[0].status == "unchanged"
    assert keywords(png)["XMP-dc:Subject"] == USER_KEYWORDS


def test_number_like_keywords_survive_unchanged(samples, ledger):
    webp = samples["webp"]
    exiftool("-q", "-overwrite_original", "-XMP-dc:Subject+=1.50", "-XMP-dc:Subject+=007", webp)
    with writer(ledger) as w:
        w.write_batch([(webp, [DOG])])
    assert keywords(webp)["XMP-dc:Subject"] == USER_KEYWORDS + ["1.50", "007", "dog"]


def test_dry_run_plans_without_writing(samples, ledger):
    jpg = samples["jpg"]
    digest = jpg.read_bytes()
    with writer(ledger) as w:
        [plan] = w.plan_batch([(jpg, [DOG])])
    assert "photo_jpg.jpg XMP-dc:Subject +dog" in plan.changes
    assert jpg.read_bytes() == digest
    assert ledger.entries(jpg) == []


def test_discoverys_verdict_is_used_and_only_a_photo_without_one_is_sniffed(samples, ledger, monkeypatch):
    """`ramcli tag` hands the writer each photo's `Found`; `ramcli write` from the index has none,
    and the writer then asks discovery's own `what_is`, once per photo."""
    from ramcli.media import discover

    photos = [samples["jpg"], samples["png"], samples["CR3"]]
    found = {f.path: f for f in discover.discover([photos[0].parent])}
    sniffed: list[Path] = []
    real_sniff = discover.sniff
    monkeypatch.setattr(discover, "sniff", lambda path: sniffed.append(Path(path)) or real_sniff(path))
    with writer(ledger) as w:
        outcomes = w.write_batch([(p, [DOG]) for p in photos], kinds=[found[p] for p in photos])
    assert [o.status for o in outcomes] == ["written"] * 3 and sniffed == []
    assert "dog" in keywords(samples["jpg"])["XMP-dc:Subject"] and sidecar_of(samples["CR3"]).exists()
    with writer(ledger) as w:
        outcomes = w.write_batch([(p, [TagScore("cat", "", 0.8)]) for p in photos])
        with pytest.raises(ValueError, match="1 kinds for 3 photos"):
            w.write_batch([(p, [DOG]) for p in photos], kinds=[None])
    assert [o.status for o in outcomes] == ["written"] * 3
    assert sorted(sniffed) == sorted(Path(os.path.realpath(p)) for p in photos)


# --- fields and options ------------------------------------------------------------------------


def test_iptc_utf8_trimmed_and_created_only_when_asked(tmp_path, ledger):
    bare = make_photo(tmp_path, "bare", "jpg", user_metadata=False)
    long_zh = TagScore("long", "狗" * 30, 0.9)
    with writer(ledger, lang="zh") as w:
        w.write_batch([(bare, [long_zh])])
    assert "IPTC:Keywords" not in keywords(bare)  # auto: no IPTC in the file, none created
    with writer(ledger, lang="zh", iptc="always") as w:
        w.write_batch([(bare, [long_zh])])
    got = read_tags(bare, "IPTC:Keywords", "IPTC:CodedCharacterSet", "XMP-dc:Subject")
    assert got["IPTC:Keywords"] == ["狗" * 21]
    assert got["IPTC:CodedCharacterSet"] == ["UTF8"]
    assert got["XMP-dc:Subject"] == ["狗" * 30]  # XMP has no length limit


def test_latin1_iptc_stays_latin1(tmp_path, ledger):
    jpg = make_photo(tmp_path, "legacy", "jpg", user_metadata=False)
    exiftool("-q", "-overwrite_original", "-IPTC:Keywords=café", jpg)  # no CodedCharacterSet: Latin-1
    with writer(ledger, lang="both") as w:
        w.write_batch([(jpg, [DOG])])
    got = read_tags(jpg, "IPTC:Keywords", "IPTC:CodedCharacterSet")
    assert got["IPTC:Keywords"] == ["café", "dog"]  # 狗 is not Latin-1: XMP only
    assert "IPTC:CodedCharacterSet" not in got


def test_digikam_and_windows_fields_follow_what_is_there(tmp_path, ledger):
    present = make_photo(tmp_path, "dk", "jpg", user_metadata=False)
    exiftool("-q", "-overwrite_original", "-XMP-digiKam:TagsList=People/Oma",
             "-XMP-microsoft:LastKeywordXMP=Oma", present)
    absent = make_photo(tmp_path, "plain", "jpg", user_metadata=False)
    with writer(ledger, tag_root="ai") as w:
        w.write_batch([(present, [DOG]), (absent, [DOG])])
    got = keywords(present)
    assert got["XMP-digiKam:TagsList"] == ["People/Oma", "ai/dog"]
    assert got["XMP-microsoft:LastKeywordXMP"] == ["Oma", "dog"]
    assert got["XMP-lr:HierarchicalSubject"] == ["People|Oma", "ai|dog"]  # created, seeded from TagsList
    assert got["XMP-dc:Subject"] == ["Oma", "dog"]  # created, seeded with the TagsList leaf
    assert "XMP-digiKam:TagsList" not in keywords(absent)
    with writer(ledger, tag_root="ai", digikam="always") as w:
        w.write_batch([(absent, [DOG])])
    assert keywords(absent)["XMP-digiKam:TagsList"] == ["ai/dog"]


def test_forced_sidecars_and_naming(tmp_path, ledger):
    jpg = make_photo(tmp_path, "IMG_1", "jpg")
    pair_raw = make_photo(tmp_path, "IMG_2", "CR2")
    pair_jpg = make_photo(tmp_path, "IMG_2", "jpg")
    before = jpg.read_bytes()
    with writer(ledger, sidecar=True) as w:
        w.write_batch([(jpg, [DOG]), (pair_raw, [DOG]), (pair_jpg, [BEACH])])
    assert jpg.read_bytes() == before
    assert keywords(tmp_path / "IMG_1.xmp")["XMP-dc:Subject"] == ["dog"]
    # RAW+JPEG share a base name: each gets IMG.EXT.xmp so they never share a sidecar
    assert keywords(tmp_path / "IMG_2.CR2.xmp")["XMP-dc:Subject"] == ["dog"]
    assert keywords(tmp_path / "IMG_2.jpg.xmp")["XMP-dc:Subject"] == ["beach"]
    assert sidecar_targets(tmp_path / "new.NEF", WriterOptions(sidecar_name="ext")) == [tmp_path / "new.NEF.xmp"]


def test_switching_to_sidecars_moves_ramcli_keywords(samples, ledger):
    jpg = samples["jpg"]
    with writer(ledger) as w:
        w.write_batch([(jpg, [DOG])])
    with writer(ledger, sidecar=True) as w:
        w.write_batch([(jpg, [DOG])])
    assert keywords(jpg)["XMP-dc:Subject"] == USER_KEYWORDS
    assert keywords(jpg.with_suffix(".xmp"))["XMP-dc:Subject"] == ["dog"]


def test_backups_and_mtime_options(samples, ledger):
    jpg, tif = samples["jpg"], samples["tif"]
    old = 1_600_000_000
    os.utime(tif, (old, old))
    with writer(ledger, keep_backups=True, preserve_mtime=True) as w:
        [a, b] = w.write_batch([(jpg, [DOG]), (tif, [DOG])])
    assert Path(str(jpg) + "_original").exists()
    assert int(tif.stat().st_mtime) == old
    assert b.mtime_ns == tif.stat().st_mtime_ns and b.size == tif.stat().st_size
    os.utime(jpg, (old, old))
    with writer(ledger) as w:  # default: mtime bumped, so library scanners re-read the file
        w.write_batch([(jpg, [BEACH])])
    assert int(jpg.stat().st_mtime) > old


# --- failures ----------------------------------------------------------------------------------


def broken_jpeg(folder: Path, name: str) -> Path:
    """A JPEG whose headers are fine (discovery calls it a JPEG) but whose image data is missing:
    ExifTool refuses to write it ("Corrupted JPEG image")."""
    data = make_photo(folder, name + "_src", "jpg", user_metadata=False).read_bytes()
    path = folder / f"{name}.jpg"
    path.write_bytes(data[: data.index(b"\xff\xda")] + b"\xff\xd9")
    return path


def test_bad_files_are_reported_and_the_batch_goes_on(tmp_path, samples, ledger):
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"not an image at all")
    broken = broken_jpeg(tmp_path, "broken")
    readonly = tmp_path / "readonly.jpg"
    shutil.copy(samples["jpg"], readonly)
    readonly.chmod(stat.S_IRUSR | stat.S_IRGRP)
    unsupported = tmp_path / "notes.txt"
    unsupported.write_text("hello")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    wrong_ext = tmp_path / "really_png.jpg"  # discovery says PNG: written as the PNG it is
    shutil.copy(samples["png"], wrong_ext)
    good = samples["heic"]
    batch = [garbage, broken, readonly, unsupported, empty, tmp_path / "missing.jpg", wrong_ext, good]
    untouched = {p: p.read_bytes() for p in batch[:5]}
    with writer(ledger) as w:
        outcomes = w.write_batch([(p, [DOG]) for p in batch])
    status = {Path(o.path).name: (o.status, o.error) for o in outcomes}
    assert status["photo_heic.heic"] == ("written", None)
    assert status["really_png.jpg"] == ("written", None)
    assert keywords(good)["XMP-dc:Subject"] == USER_KEYWORDS + ["dog"]
    assert keywords(wrong_ext)["XMP-dc:Subject"] == USER_KEYWORDS + ["dog"]
    for name, needle in [("garbage.jpg", "not an image (text)"), ("broken.jpg", "Corrupted JPEG image"),
                         ("readonly.jpg", "read-only"), ("notes.txt", "not an image (text)"),
                         ("empty.jpg", "empty file"), ("missing.jpg", "not found")]:
        assert status[name][0] == "failed" and needle in status[name][1], (name, status[name])
    assert all(p.read_bytes() == data for p, data in untouched.items())
    assert all(ledger.entries(p) == [] for p in batch[:6])


# --- pipelining and the kill window -------------------------------------------------------------


def staged_rows(ledger: Ledger) -> int:
    table = ledger.db["metadata_ledger_staged"]
    return table.count if table.exists() else 0


def test_pipelined_batches_report_failures_per_file(tmp_path, samples, ledger):
    """batch_size 2: ExifTool reads each next batch while the previous one is written."""
    good = [make_photo(tmp_path, f"good{i}", "jpg", seed=i) for i in range(5)]
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"not an image at all")
    wrong_ext = broken_jpeg(tmp_path, "broken")  # ExifTool's own error, in a background write
    # chunks: [g0 g1] [g2 garbage] [g3 g2] [wrong_ext g4]: the third shares g2 with the second, so
    # it is read only once the second is written (g2 is then unchanged); the others overlap
    batch = [good[0], good[1], good[2], garbage, good[3], good[2], wrong_ext, good[4]]
    with writer(ledger, batch_size=2) as w:
        outcomes = w.write_batch([(p, [DOG, BEACH]) for p in batch], model_id="m")
    assert [o.status for o in outcomes] == (
        ["written"] * 3 + ["failed", "written", "unchanged", "failed", "written"])
    assert "not an image (text)" in outcomes[3].error and "Corrupted JPEG image" in outcomes[6].error
    for p in good:
        assert keywords(p)["XMP-dc:Subject"] == USER_KEYWORDS + ["dog", "beach"], p
        assert {(e.field, e.value, e.preexisting, e.model_id) for e in ledger.entries(os.path.realpath(p))} >= {
            ("XMP-dc:Subject", "dog", False, "m"), ("XMP-lr:HierarchicalSubject", "auto|beach", False, "m")}
    assert ledger.entries(os.path.realpath(garbage)) == [] and ledger.entries(os.path.realpath(wrong_ext)) == []
    assert staged_rows(ledger) == 0
    with writer(ledger, batch_size=2) as w:  # the re-run, pipelined too, changes nothing
        assert {o.status for o in w.write_batch([(p, [DOG, BEACH]) for p in good])} == {"unchanged"}


def test_exiftool_dying_mid_write_leaves_every_file_as_it_was(tmp_path, ledger, monkeypatch):
    """ExifTool writes its new versions, then dies: it only ever wrote into the journal, so every
    file is as it was, each is reported, the ledger learns nothing, and a re-run writes them."""
    from ramcli.metadata import ExifToolProcess

    photos = [make_photo(tmp_path, f"p{i}", "jpg", seed=i) for i in range(3)]
    before = [p.read_bytes() for p in photos]
    real = ExifToolProcess.write

    def dies_after_writing(self, *args):
        real(self, *args)
        raise RuntimeError("simulated crash")

    with writer(ledger) as w:
        monkeypatch.setattr(ExifToolProcess, "write", dies_after_writing)
        outcomes = w.write_batch([(p, [DOG]) for p in photos])
        monkeypatch.setattr(ExifToolProcess, "write", real)
        assert [o.status for o in outcomes] == ["failed"] * 3
        assert all("ExifTool failed: simulated crash" in o.error for o in outcomes)
        assert [p.read_bytes() for p in photos] == before
        assert all(ledger.entries(os.path.realpath(p)) == [] for p in photos)
        assert staged_rows(ledger) == 0
        assert [o.status for o in w.write_batch([(p, [DOG]) for p in photos])] == ["written"] * 3
    assert all(keywords(p)["XMP-dc:Subject"] == USER_KEYWORDS + ["dog"] for p in photos)


KILLED_WRITER = """
import os, signal, sys
import sqlite_utils
import ramcli.inplace
from ramcli.library.ledger import Ledger
from ramcli.metadata import ExifToolProcess, MetadataWriter, WriterOptions
import ramcli.metadata.writer as writer_module
from ramcli.tagging.records import TagScore

db, when, photos = sys.argv[1], sys.argv[2], sys.argv[3:]
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
real_write, real_into, real_settle = ExifToolProcess.write, ramcli.inplace.write_into, writer_module.settle

def write(self, *args):
    if when == "before_exiftool":
        die()
    result = real_write(self, *args)
    if when == "before_journal_record":
        die()
    return result

def write_into(fd, source, sync=True):  # the copy into place, cut after half of the new content
    if when == "mid_copy":
        data = open(source, "rb").read()
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, data[: len(data) // 2])
        die()
    return real_into(fd, source, sync)

def settle(*args):
    if when == "before_settle":
        die()
    return real_settle(*args)

ExifToolProcess.write, ramcli.inplace.write_into, writer_module.settle = write, write_into, settle
writer = MetadataWriter(WriterOptions(), Ledger(sqlite_utils.Database(db)))
writer.write_batch([(p, [TagScore("dog", "", 0.9), TagScore("Oma", "", 0.8)]) for p in photos], model_id="m",
                   captions=["a dog on a beach"] * len(photos))
"""

KILL_MOMENTS = ["before_exiftool", "before_journal_record", "mid_copy", "before_settle"]


@pytest.mark.slow
@pytest.mark.parametrize("when", KILL_MOMENTS)
def test_kill_9_at_any_moment_leaves_old_or_new_file_whole(tmp_path, samples, when):
    """kill -9 before ExifTool runs, after it wrote into the journal, in the middle of the copy
    into the photo, and before the ledger commit. Right after the kill a photo is its old self,
    or (mid-copy) torn; the next writer completes the journal, so it is then the old file or the
    new one, whole, with the same inode, and the ledger knows exactly which of ramcli's values
    each file holds, so that untag restores the photo's own metadata exactly."""
    jpg, cr3 = samples["jpg"], samples["CR3"]  # the CR3 gets a new sidecar, created by ramcli
    before, before_bytes, inode = keywords(jpg), jpg.read_bytes(), jpg.stat().st_ino
    db = tmp_path / "index.db"
    script = tmp_path / "killed.py"
    script.write_text(KILLED_WRITER)
    done = subprocess.run([sys.executable, script, db, when, jpg, cr3], capture_output=True, text=True)
    assert done.returncode == -signal.SIGKILL, done.stderr
    ledger = Ledger(sqlite_utils.Database(db))
    assert ledger.entries(os.path.realpath(jpg)) == [] and staged_rows(ledger) > 0
    written = when in ("mid_copy", "before_settle")
    if when == "mid_copy":
        assert jpg.read_bytes() != before_bytes  # torn: half old, half new
    else:
        assert (jpg.read_bytes() == before_bytes) == (not written)
    links_in_home = lambda: [p for p in Path(os.environ["RAMCLI_HOME"]).rglob("*") if p.is_symlink()]
    if when == "before_exiftool":
        assert links_in_home()  # the dead run's workspace: links to the photos

    with writer(ledger) as w:  # replays the journal, then settles the staged rows
        assert links_in_home() == []  # the dead run's workspace went with its journal session
        assert jpg.stat().st_ino == inode
        assert staged_rows(ledger) == 0
        assert not list((Path(os.environ["RAMCLI_HOME"]) / "journal").rglob("b*"))  # nothing left to redo
        rows = {(e.field, e.value): e.preexisting for e in ledger.entries(os.path.realpath(jpg))}
        if written:  # the new file, whole; ramcli's dog is ramcli's, Oma is the user's
            assert keywords(jpg)["XMP-dc:Subject"] == USER_KEYWORDS + ["dog"]
            assert decoded_pixels_digest(jpg) == decoded_pixels_digest(samples["jpg"])
            assert rows[("XMP-dc:Subject", "dog")] is False and rows[("XMP-dc:Subject", "Oma")] is True
            assert rows[(DESCRIPTION, "a dog on a beach")] is False
        else:  # the old file, byte for byte; only the user's own Oma may be known (as the user's)
            assert jpg.read_bytes() == before_bytes
            # (the IPTC digest the photo had is recorded either way: it is that digest, written or not)
            assert all(v for (f, _), v in rows.items() if f != DIGEST_BEFORE) and ("XMP-dc:Subject", "dog") not in rows
        again = w.write_batch([(p, [DOG, OMA]) for p in (jpg, cr3)], captions=["a dog on a beach"] * 2)
        assert again[0].status == ("unchanged" if written else "written")
        assert read_tags(jpg, DESCRIPTION) == {DESCRIPTION: ["a dog on a beach"]}
        assert [o.status for o in w.untag_batch([jpg, cr3])] == ["written", "written"]
    assert keywords(jpg) == before and jpg.stat().st_ino == inode
    assert DESCRIPTION not in read_tags(jpg, DESCRIPTION)
    assert not cr3.with_suffix(".xmp").exists()


# --- captions in XMP-dc:Description ------------------------------------------------------------


def test_caption_rule_never_takes_a_user_description():
    # an empty slot gets the caption, recorded as ramcli's
    assert plan_description(None, False, "a dog", {}) == ("a dog", ["a dog"], [])
    # the user's description stays; a stale ramcli row goes
    assert plan_description("Oma at the sea", False, "a dog", {"a cat": False}) == ("Oma at the sea", [], ["a cat"])
    # a description in another language or field keeps the slot empty
    assert plan_description(None, True, "a dog", {}) == (None, [], [])
    # ramcli's own caption: kept, replaced, or (nothing wanted: untag) removed
    assert plan_description("a dog", False, "a dog", {"a dog": False}) == ("a dog", [], [])
    assert plan_description("a dog", False, "two dogs", {"a dog": False}) == ("two dogs", ["two dogs"], ["a dog"])
    assert plan_description("a dog", False, None, {"a dog": False}) == (None, [], ["a dog"])
    # the user deleted ramcli's caption: it stays deleted, and the ledger remembers it
    assert plan_description(None, False, "a dog", {"a dog": False}) == (None, [], [])


def test_caption_into_jpeg_and_raw_sidecars_rerun_replace_untag(samples, ledger):
    jpg, cr3, cr2 = samples["jpg"], samples["CR3"], samples["CR2"]  # CR3: new sidecar; CR2: Lightroom's
    targets = {jpg: jpg, cr3: cr3.with_suffix(".xmp"), cr2: cr2.with_suffix(".xmp")}
    raw_bytes = {p: p.read_bytes() for p in (cr3, cr2)}
    photos = list(targets)
    with writer(ledger) as w:
        out = w.write_batch([(p, [DOG]) for p in photos], model_id="t2t", captions=[CAPTION] * 3)
    assert [o.status for o in out] == ["written"] * 3
    for p, target in targets.items():
        got = read_tags(target, DESCRIPTION, "XMP-dc:Subject", "XMP-dc:Title")
        assert got[DESCRIPTION] == [CAPTION], p
        assert "dog" in got["XMP-dc:Subject"], p  # keywords in the same write
        entries = [e for e in ledger.entries(os.path.realpath(p)) if e.field == DESCRIPTION]
        assert [(e.target, e.value, e.preexisting, e.model_id) for e in entries] == [
            (str(target), CAPTION, False, "t2t")], p
    assert read_tags(targets[cr2], "XMP-dc:Title")["XMP-dc:Title"] == [USER_TITLE]  # sidecar updated in place
    assert all(p.read_bytes() == data for p, data in raw_bytes.items())  # RAW files never written

    stamps = {t: t.stat().st_mtime_ns for t in targets.values()}
    with writer(ledger) as w:  # same caption: nothing to do, no file touched
        assert {o.status for o in w.write_batch([(p, [DOG]) for p in photos], captions=[CAPTION] * 3)} == {"unchanged"}
        # no caption this time (e.g. a re-tag without --caption): ramcli's caption stays
        assert {o.status for o in w.write_batch([(p, [DOG]) for p in photos])} == {"unchanged"}
    assert stamps == {t: t.stat().st_mtime_ns for t in targets.values()}

    with writer(ledger) as w:  # a new caption replaces ramcli's old one, and only that
        w.write_batch([(p, [DOG]) for p in photos], captions=["two dogs on a beach"] * 3)
    for p, target in targets.items():
        assert read_tags(target, DESCRIPTION)[DESCRIPTION] == ["two dogs on a beach"], p
        assert [e.value for e in ledger.entries(os.path.realpath(p)) if e.field == DESCRIPTION] == [
            "two dogs on a beach"], p

    with writer(ledger) as w:
        assert [o.status for o in w.untag_batch(photos)] == ["written"] * 3
    assert read_tags(jpg, DESCRIPTION, "XMP-dc:Subject", "XMP-dc:Title") == {
        "XMP-dc:Subject": USER_KEYWORDS, "XMP-dc:Title": [USER_TITLE]}
    assert not targets[cr3].exists()  # ramcli created it; nothing else was in it
    assert DESCRIPTION not in read_tags(targets[cr2], DESCRIPTION)
    assert read_tags(targets[cr2], "XMP-crs:Exposure2012")  # the user's sidecar stays, develop settings too
    assert all(ledger.entries(os.path.realpath(p)) == [] for p in photos)


def test_user_description_is_never_touched(tmp_path, ledger):
    own = make_photo(tmp_path, "own", "jpg")  # x-default plus a German description
    exiftool("-q", "-overwrite_original", "-XMP-dc:Description=Oma am Meer, 1987",
             "-XMP-dc:Description-de=Oma am Meer", own)
    german_only = make_photo(tmp_path, "de", "jpg")
    exiftool("-q", "-overwrite_original", "-XMP-dc:Description-de=Oma am Meer", german_only)
    iptc_only = make_photo(tmp_path, "iptc", "jpg")  # e.g. written by an older app
    exiftool("-q", "-overwrite_original", "-IPTC:Caption-Abstract=Oma am Meer", iptc_only)
    camera = make_photo(tmp_path, "camera", "jpg")  # a camera's placeholder is not a description
    exiftool("-q", "-overwrite_original", "-EXIF:ImageDescription=OLYMPUS DIGITAL CAMERA         ", camera)
    photos = [own, german_only, iptc_only, camera]
    descriptions = {p: read_tags(p, "XMP-dc:all", "IPTC:Caption-Abstract") for p in photos[:3]}
    whole = {p: p.read_bytes() for p in photos}

    with writer(ledger) as w:  # a caption alone: files with a description are not even rewritten
        out = w.write_batch([(p, []) for p in photos], captions=[CAPTION] * 4)
        assert [o.status for o in out] == ["unchanged"] * 3 + ["written"]
        assert all(p.read_bytes() == whole[p] for p in photos[:3])
        assert read_tags(camera, DESCRIPTION)[DESCRIPTION] == [CAPTION]
        out = w.write_batch([(p, [DOG]) for p in photos[:3]], captions=[CAPTION] * 3)  # keywords go in
        assert [o.status for o in out] == ["written"] * 3
    for p in photos[:3]:
        got = read_tags(p, "XMP-dc:all", "IPTC:Caption-Abstract")
        assert {k: v for k, v in got.items() if k != "XMP-dc:Subject"} == {
            k: v for k, v in descriptions[p].items() if k != "XMP-dc:Subject"}, p
        assert [e for e in ledger.entries(os.path.realpath(p)) if e.field == DESCRIPTION] == [], p

    # the user overwrites ramcli's caption with their own: it is theirs from then on
    exiftool("-q", "-overwrite_original", "-XMP-dc:Description=Our dog Bello", camera)
    with writer(ledger) as w:
        w.write_batch([(camera, [])], captions=["another caption"])
        assert read_tags(camera, DESCRIPTION)[DESCRIPTION] == ["Our dog Bello"]
        w.untag_batch(photos)
    assert read_tags(camera, DESCRIPTION)[DESCRIPTION] == ["Our dog Bello"]
    for p in photos[:3]:
        got = read_tags(p, "XMP-dc:all", "IPTC:Caption-Abstract")
        assert {k: v for k, v in got.items() if k != "XMP-dc:Subject"} == {
            k: v for k, v in descriptions[p].items() if k != "XMP-dc:Subject"}, p


def test_caption_the_user_deleted_is_not_written_again(samples, ledger):
    png = samples["png"]
    with writer(ledger) as w:
        w.write_batch([(png, [])], captions=[CAPTION])
        exiftool("-q", "-overwrite_original", "-XMP-dc:Description=", png)
        assert w.write_batch([(png, [])], captions=[CAPTION])[0].status == "unchanged"
    assert DESCRIPTION not in read_tags(png, DESCRIPTION)


def test_dry_run_shows_the_description_change(samples, ledger):
    jpg = samples["jpg"]
    data = jpg.read_bytes()
    with writer(ledger) as w:
        [plan] = w.plan_batch([(jpg, [DOG])], captions=[f"  {CAPTION}\n"])  # stripped, like every caption
        assert f'photo_jpg.jpg XMP-dc:Description +"{CAPTION}"' in plan.changes
        assert "photo_jpg.jpg XMP-dc:Subject +dog" in plan.changes
        w.write_batch([(jpg, [DOG])], captions=[CAPTION])
        [plan] = w.plan_batch([(jpg, [DOG])], captions=["two dogs"])
        assert plan.changes == ['photo_jpg.jpg XMP-dc:Description +"two dogs" -"a dog running on the beach"']
        [plan] = w.plan_untag([jpg])
        assert f'photo_jpg.jpg XMP-dc:Description -"{CAPTION}"' in plan.changes
        with pytest.raises(ValueError, match="2 captions for 1 photos"):
            w.plan_batch([(jpg, [DOG])], captions=["a", "b"])
    assert read_tags(jpg, DESCRIPTION)[DESCRIPTION] == [CAPTION]
    assert data != jpg.read_bytes()
