"""`ramcli search ... --gallery out.html`: a static page of the hits, with thumbnails and tags.

Thumbnails are made once with Pillow and cached under `<home>/cache/thumbs`, keyed by the
photo's path, size and mtime (so an edited photo gets a new one). The page is self-contained
next to its `<name>_files/` folder of thumbnails, so it can be zipped or served as is; each
thumbnail links to the original file. A tiny script marks thumbnails that fail to load, which is
also what the headless-browser test reads.
"""

from __future__ import annotations

import hashlib
import html
import io
import os
import shutil
from pathlib import Path
from string import Template

from PIL import Image, ImageOps, UnidentifiedImageError

from ramcli import config
from ramcli.errors import RamcliError
from ramcli.fileio import atomic_write
from ramcli.library.search import Hit

THUMB_SIZE = 320

try:  # HEIC/AVIF thumbnails where the plugin is installed (it is a dependency)
    from pillow_heif import register_heif_opener

    register_heif_opener()
except ImportError:  # pragma: no cover
    pass

_PAGE = Template("""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>$title</title>
<style>
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; background: #fafafa; color: #222; }
h1 { font-size: 1.2em; font-weight: 600; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(220px, 1fr)); gap: 14px; }
figure { margin: 0; background: #fff; border: 1px solid #ddd; border-radius: 6px; overflow: hidden; }
figure img, .missing { display: block; width: 100%; height: 200px; object-fit: cover; background: #eee; }
.missing { display: flex; align-items: center; justify-content: center; color: #888; }
img.broken { outline: 3px solid #c00; }
figcaption { padding: 6px 8px; }
.name { font-weight: 600; overflow-wrap: anywhere; }
.score { color: #666; float: right; }
.tags { margin-top: 4px; display: flex; flex-wrap: wrap; gap: 4px; }
.tag { background: #eef3fb; border-radius: 3px; padding: 0 5px; font-size: 12px; }
</style>
</head>
<body>
<h1>$title</h1>
<p>$count</p>
<div class="grid">
$figures
</div>
<script>
// Mark thumbnails that did not load, and record the tally on <body> (read by the tests).
window.addEventListener("load", () => {
  const imgs = [...document.querySelectorAll("figure img")];
  const bad = imgs.filter(i => !(i.complete && i.naturalWidth > 0));
  bad.forEach(i => i.classList.add("broken"));
  document.body.dataset.thumbsLoaded = imgs.length - bad.length;
  document.body.dataset.thumbsBroken = bad.length;
});
</script>
</body>
</html>
""")

_FIGURE = Template("""<figure class="hit" data-path="$path">
<a href="$href">$image</a>
<figcaption><span class="score">$score</span><div class="name">$name</div>
<div class="tags">$tags</div></figcaption>
</figure>""")


def _shown(text: str) -> str:
    """HTML text of a name: escaped, and a file name that is not valid UTF-8 shown with U+FFFD
    where its bad bytes are (the page itself must be UTF-8)."""
    return html.escape(os.fsencode(text).decode("utf-8", "replace"))


def thumbnail(photo: Path, cache: Path | None = None) -> Path | None:
    """The cached JPEG thumbnail of a photo (made on first use); None if it cannot be read."""
    cache = cache or config.home().cache / "thumbs"
    try:
        st = photo.stat()
    except OSError:
        return None
    key = hashlib.sha256(f"{photo}\0{st.st_size}\0{st.st_mtime_ns}\0{THUMB_SIZE}".encode("utf-8", "surrogateescape"))
    target = cache / key.hexdigest()[:2] / f"{key.hexdigest()}.jpg"
    if target.exists():
        return target
    try:
        with Image.open(photo) as im:
            im = ImageOps.exif_transpose(im)
            im.thumbnail((THUMB_SIZE, THUMB_SIZE))
            image = im.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
        return None
    target.parent.mkdir(parents=True, exist_ok=True)
    # Whole or not at all: a killed run never leaves a half thumbnail in the cache.
    encoded = io.BytesIO()
    image.save(encoded, "JPEG", quality=85)
    atomic_write(target, encoded.getvalue())
    return target


def write_gallery(hits: list[Hit], out: Path, *, title: str = "ramcli search", cache: Path | None = None) -> Path:
    """Write `out` (HTML) and `<out stem>_files/` (its thumbnails); returns `out`."""
    out = out.resolve()
    files = out.with_name(f"{out.stem}_files")
    try:
        files.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RamcliError(f"cannot write the gallery next to {out}: {exc.strerror}") from exc
    figures = []
    for hit in hits:
        photo = Path(hit.path)
        thumb = thumbnail(photo, cache)
        if thumb is not None:
            local = files / thumb.name
            if not local.exists():
                shutil.copyfile(thumb, local)
            image = f'<img src="{_shown(f"{files.name}/{local.name}")}" alt="{_shown(photo.name)}">'
        else:
            image = '<div class="missing">no preview</div>'
        figures.append(
            _FIGURE.substitute(
                path=_shown(hit.path),
                href=html.escape(photo.as_uri()),
                image=image,
                score="" if hit.score is None else f"{hit.score:.2f}",
                name=_shown(photo.name),
                tags=" ".join(
                    f'<span class="tag" title="{t.score:.2f}">{_shown(t.name)}</span>' for t in hit.tags[:12]
                ),
            )
        )
    count = f"{len(hits)} photo{'s' if len(hits) != 1 else ''}"
    out.write_text(
        _PAGE.substitute(title=_shown(title), count=count, figures="\n".join(figures)), encoding="utf-8"
    )
    return out
