"""Finding photos: content sniffing, junk and hidden folders, symlinks and loops, globs, errors."""

from __future__ import annotations

from collections import Counter

import os
from pathlib import Path

import pytest
from images import MP4_HEADER, make_image, make_library, run_unprivileged

from ramcli.media.discover import describe_skipped, discover


def by_path(found) -> dict[Path, object]:
    return {f.path: f for f in found}


def test_library_is_classified_by_content(tmp_path):
    library = make_library(tmp_path / "lib")
    found = list(discover([tmp_path / "lib"]))
    assert {f.path for f in found} == set(library)  # junk, hidden folders and sidecars are not reported
    for f in found:
        expected = library[f.path]
        assert f.kind == expected.kind, f.path.name
        if f.kind in ("unsupported", "error", "video"):
            assert expected.reason in f.reason, f.path.name
        assert f.size == f.path.stat().st_size and f.mtime_ns == f.path.stat().st_mtime_ns
    formats = {f.path.name: f.format for f in found}
    assert formats["really a png.jpg"] == "PNG" and formats["iphone.HEIC"] == "HEIF" and formats["camera.dng"] == "DNG"


def test_order_is_sorted_and_repeatable(tmp_path):
    make_library(tmp_path / "lib")
    first = [f.path for f in discover([tmp_path / "lib"])]
    assert first == [f.path for f in discover([tmp_path / "lib"])]
    top_level_files = [p.name for p in first if p.parent == tmp_path / "lib"]
    assert top_level_files == sorted(top_level_files)


def test_photos_without_extension_and_lying_extensions(tmp_path):
    make_image(tmp_path / "IMG_0001", "jpeg")
    make_image(tmp_path / "holiday.txt", "heic")
    (tmp_path / "readme.md").write_text("# my photos\n")
    (tmp_path / "data.bin").write_bytes(bytes(range(256)))
    found = by_path(discover([tmp_path]))
    assert (found[tmp_path / "IMG_0001"].kind, found[tmp_path / "IMG_0001"].format) == ("image", "JPEG")
    assert (found[tmp_path / "holiday.txt"].kind, found[tmp_path / "holiday.txt"].format) == ("image", "HEIF")
    assert found[tmp_path / "readme.md"].reason == "not an image (text)"
    assert found[tmp_path / "data.bin"].reason == "not an image (unknown format)"


def test_raw_and_video_signatures(tmp_path):
    (tmp_path / "a.CR3").write_bytes(b"\x00\x00\x00\x18ftypcrx \x00\x00\x00\x01crx isom")
    (tmp_path / "b.RAF").write_bytes(b"FUJIFILMCCD-RAW 0201FF383501" + bytes(64))
    (tmp_path / "c.mov").write_bytes(b"\x00\x00\x00\x14ftypqt  \x00\x00\x00\x00qt  " + bytes(16))
    (tmp_path / "d.mkv").write_bytes(b"\x1a\x45\xdf\xa3" + bytes(32))
    (tmp_path / "e.mp4").write_bytes(MP4_HEADER)
    (tmp_path / "f.tif").write_bytes(b"II*\x00" + bytes(64))  # TIFF header without a RAW name: not RAW
    found = by_path(discover([tmp_path]))
    assert [found[tmp_path / n].kind for n in ("a.CR3", "b.RAF")] == ["raw", "raw"]
    assert [found[tmp_path / n].format for n in ("a.CR3", "b.RAF")] == ["CR3", "RAF"]
    assert [found[tmp_path / n].kind for n in ("c.mov", "d.mkv", "e.mp4")] == ["video"] * 3
    assert found[tmp_path / "f.tif"].kind != "raw"


def test_symlink_loops_end_and_outside_folders_are_not_walked(tmp_path):
    lib, outside = tmp_path / "lib", tmp_path / "outside"
    make_image(lib / "a" / "one.jpg", "jpeg")
    make_image(outside / "two.png", "png")
    (lib / "a" / "loop").symlink_to(lib)  # lib/a/loop -> lib
    (lib / "self").symlink_to(lib / "self")  # a link to itself
    (lib / "linked").symlink_to(outside)  # a folder outside the root
    (lib / "root").symlink_to("/")  # the whole file system
    (lib / "b").symlink_to(lib / "a")  # a folder inside the root: followed (and visited once)
    (lib / "dangling.jpg").symlink_to(tmp_path / "nowhere.jpg")
    found = list(discover([lib]))
    paths = [f.path for f in found]
    assert paths.count(lib / "a" / "one.jpg") + paths.count(lib / "b" / "one.jpg") == 1
    assert len(found) == len(set(paths)) and not any(f.kind == "image" and f.link for f in found)
    assert lib / "linked" / "two.png" not in paths
    links = {f.path.name: f.reason for f in found if f.kind == "link"}
    assert set(links) == {"loop", "linked", "root"}
    assert "--follow-links" in links["linked"] and "never followed" in links["root"]
    errors = {f.path.name: f.reason for f in found if f.kind == "error"}
    assert errors["dangling.jpg"] == "broken symlink"
    assert describe_skipped(Counter(f.kind for f in found)) == "skipped: 3 folder links not followed, 2 errors"


def test_follow_links_walks_outside_folders_and_marks_what_leaves_the_roots(tmp_path):
    lib, outside = tmp_path / "lib", tmp_path / "outside"
    make_image(lib / "in.jpg", "jpeg")
    make_image(outside / "two.png", "png")
    make_image(outside / "real.jpg", "jpeg")
    (lib / "linked").symlink_to(outside)
    (lib / "link.jpg").symlink_to(outside / "real.jpg")
    (lib / "root").symlink_to("/")
    plain = {f.path.name: f for f in discover([lib])}
    assert plain["link.jpg"].kind == "image" and plain["link.jpg"].link == lib.resolve() / "link.jpg"
    assert plain["in.jpg"].link is None and "two.png" not in plain
    followed = {f.path.name: f for f in discover([lib], follow_links=True)}
    assert followed["two.png"].link == lib.resolve() / "linked" / "two.png"
    assert followed["root"].kind == "link"  # a folder containing the root: never, even when asked
    # a link given as a root, or a file inside another root, does not leave the roots
    assert [f.link for f in discover([lib / "link.jpg"])] == [None]
    assert {f.path.name: f.link for f in discover([lib, outside])}["link.jpg"] is None


def test_hidden_and_junk_are_skipped(tmp_path):
    make_image(tmp_path / "keep.jpg", "jpeg")
    for junk in (".thumbnails/t.jpg", "@eaDir/keep.jpg/SYNOFILE_THUMB_M.jpg", ".hidden.jpg", "$RECYCLE.BIN/x.jpg", "sub/.git/x.jpg"):
        make_image(tmp_path / junk, "jpeg")
    (tmp_path / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (tmp_path / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    assert [f.path for f in discover([tmp_path])] == [tmp_path / "keep.jpg"]


def test_include_and_exclude_globs(tmp_path):
    for rel in ("2023/a.jpg", "2023/raw/b.JPG", "2024/c.png", "2024/drafts/d.jpg", "e.jpg"):
        make_image(tmp_path / rel, "jpeg")

    def names(**kw) -> list[str]:
        return [f.path.relative_to(tmp_path).as_posix() for f in discover([tmp_path], **kw)]

    assert names(include=["*.jpg"]) == ["2023/a.jpg", "2023/raw/b.JPG", "2024/drafts/d.jpg", "e.jpg"]  # case-insensitive
    assert names(include=["2023/*"]) == ["2023/a.jpg", "2023/raw/b.JPG"]  # '*' crosses '/'
    assert names(exclude=["drafts"]) == ["2023/a.jpg", "2023/raw/b.JPG", "2024/c.png", "e.jpg"]  # prunes the folder
    assert names(exclude=["*/raw/*"]) == ["2023/a.jpg", "2024/c.png", "2024/drafts/d.jpg", "e.jpg"]
    assert names(include=["*.jpg"], exclude=["2024/*"]) == ["2023/a.jpg", "2023/raw/b.JPG", "e.jpg"]


def test_roots_may_be_files_or_missing(tmp_path):
    make_image(tmp_path / "one.jpg", "jpeg")
    found = list(discover([tmp_path / "one.jpg", tmp_path / "missing"]))
    assert [(f.path.name, f.kind) for f in found] == [("one.jpg", "image"), ("missing", "error")]
    assert found[1].reason == "no such file or directory"


def test_a_second_link_to_the_same_file_is_reported_once(tmp_path):
    make_image(tmp_path / "a.jpg", "jpeg")
    os.link(tmp_path / "a.jpg", tmp_path / "b.jpg")
    (tmp_path / "c.jpg").symlink_to(tmp_path / "a.jpg")
    assert [f.path.name for f in discover([tmp_path])] == ["a.jpg"]


def test_skipped_summary():
    counts = Counter()
    assert describe_skipped(counts) == ""
    counts.update({"image": 5, "video": 3, "unsupported": 2, "error": 1})
    assert describe_skipped(counts) == "skipped: 3 videos, 2 unsupported, 1 error"


def test_real_sample_photos_are_images(sample_photos):
    found = list(discover(sample_photos))
    assert found and all((f.kind, f.format) == ("image", "JPEG") for f in found)


@pytest.mark.slow
def test_unreadable_folder_and_file_are_errors_and_the_walk_goes_on():
    out = run_unprivileged(
        "from images import make_image\nfrom ramcli.media.discover import discover\n"
        "make_image(WORKDIR / 'a_locked' / 'x.jpg', 'jpeg')\n(WORKDIR / 'a_locked').chmod(0)\n"
        "make_image(WORKDIR / 'b_secret.jpg', 'jpeg')\n(WORKDIR / 'b_secret.jpg').chmod(0)\n"
        "make_image(WORKDIR / 'c_open' / 'y.jpg', 'jpeg')\n"
        "for f in discover([WORKDIR]):\n    print(f.path.relative_to(WORKDIR).as_posix(), f.kind, f.reason, sep='|')\n"
    )
    assert out.splitlines() == [
        "a_locked|error|permission denied",
        "b_secret.jpg|error|permission denied",
        "c_open/y.jpg|image|None",
    ]
