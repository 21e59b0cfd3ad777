"""`ramcli search --gallery`: cached thumbnails, and the page checked in a real headless Chromium."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from datetime import datetime
from pathlib import Path

import pytest
from PIL import Image

from ramcli.cli.app import main
from ramcli.config import home
from ramcli.library.gallery import thumbnail, write_gallery
from ramcli.library.index import Index
from ramcli.library.search import Hit
from ramcli.tagging.records import PhotoResult, TagScore


def test_thumbnail_is_made_once_and_cached(tmp_path):
    photo = tmp_path / "p.jpg"
    Image.new("RGB", (800, 400), (200, 30, 30)).save(photo)
    thumb = thumbnail(photo)
    assert thumb is not None and thumb.is_relative_to(home().cache)
    with Image.open(thumb) as im:
        assert max(im.size) == 320 and im.size[0] == 2 * im.size[1]
    stamp = thumb.stat().st_mtime_ns
    assert thumbnail(photo) == thumb and thumb.stat().st_mtime_ns == stamp  # reused, not regenerated
    Image.new("RGB", (100, 100)).save(photo)  # an edited photo gets a new thumbnail
    assert thumbnail(photo) != thumb
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    assert thumbnail(tmp_path / "bad.jpg") is None


def test_gallery_escapes_names_and_handles_unreadable_photos(tmp_path):
    bad = tmp_path / "<b>bad&.jpg"
    bad.write_bytes(b"not an image")
    out = write_gallery([Hit(str(bad), "tagged", id=1, score=0.5, tags=[TagScore("<script>", "", 0.5)])], tmp_path / "g.html")
    page = out.read_text()
    assert "&lt;b&gt;bad&amp;.jpg" in page and "&lt;script&gt;" in page and "no preview" in page
    assert "<b>bad" not in page


def test_gallery_of_a_name_that_is_not_utf8(tmp_path):
    photo = Path(os.fsdecode(bytes(tmp_path) + b"/caf\xe9.jpg"))  # Latin-1 on disk
    Image.new("RGB", (64, 48), (0, 90, 200)).save(photo)
    out = write_gallery([Hit(str(photo), "tagged", id=1, score=0.5)], tmp_path / "g.html", title=os.fsdecode(b"caf\xe9"))
    page = out.read_bytes().decode("utf-8")  # valid UTF-8 throughout
    assert "caf\ufffd.jpg" in page and "caf%E9.jpg" in page  # shown with U+FFFD; the link keeps the byte
    assert len(list((tmp_path / "g_files").glob("*.jpg"))) == 1


def chromium(*args: str, tmp: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("chromium")
    assert exe, "chromium is required for this test (scripts/setup.sh installs it)"
    return subprocess.run(
        [exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp / 'chrome'}",
         "--virtual-time-budget=5000", *args],
        capture_output=True, text=True, timeout=120,
    )


@pytest.mark.slow
def test_gallery_in_headless_browser(tmp_path, sample_photos, capsysbinary):
    lib = tmp_path / "lib"
    lib.mkdir()
    tags = [[("dog", 0.9), ("beach", 0.7)], [("dog", 0.6), ("night", 0.8)], [("cat", 0.9)]]
    photos = [Path(shutil.copy(p, lib / p.name)) for p in sample_photos[:3]]
    with Index.open() as ix:
        ix.record_batch([
            PhotoResult(str(p), "tagged", 1, 1, taken_at=datetime(2021, 1, 1), tags=[TagScore(n, "", s) for n, s in t])
            for p, t in zip(photos, tags)
        ])
    out = tmp_path / "out.html"
    with pytest.raises(SystemExit) as exc:
        main(["search", "dog", "--gallery", str(out), "--format", "paths"])
        raise SystemExit(0)
    assert exc.value.code in (0, None)
    assert "gallery:" in capsysbinary.readouterr().err.decode()
    assert len(list((home().cache / "thumbs").rglob("*.jpg"))) == 2  # cached

    dom = chromium("--dump-dom", out.as_uri(), tmp=tmp_path).stdout
    body = re.search(r"<body[^>]*>", dom).group(0)
    assert 'data-thumbs-loaded="2"' in body and 'data-thumbs-broken="0"' in body
    figures = re.findall(r'<figure class="hit" data-path="([^"]+)">', dom)
    assert figures == [str(photos[0]), str(photos[1])]  # the hits, best first; not the cat
    assert dom.count('class="tag"') == 4 and ">night<" in dom and ">cat<" not in dom

    shot = tmp_path / "shot.png"
    chromium("--window-size=1000,700", f"--screenshot={shot}", out.as_uri(), tmp=tmp_path)
    with Image.open(shot) as im:
        assert im.size == (1000, 700)
        assert len(im.convert("RGB").resize((100, 70)).getcolors(maxcolors=7000)) > 50  # real thumbnails, not a blank page
