"""The published models, where they live on the Hugging Face hub, and how they are fetched.

Downloads go through huggingface_hub (its cache, resumable downloads, progress bars). After a
download the file's SHA-256 is compared with the pinned digest where we know one, else with the
hub's own record of it (the LFS object id, which names the blob in the hub cache), so a
corrupted or substituted file is refused. A file is verified once: the verdict is remembered
in `RAMCLI_HOME/verified.json` under the file's path, size and mtime, and a file found there
unchanged is used without hashing it again or asking the hub (`tag --caption` reads the
original Tag2Text file on every run). `pull` converts a checkpoint to the tag-only safetensors
file by default, which is what `tag` loads afterwards.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ramcli.errors import RamcliError
from ramcli.hashing import file_sha256


@dataclass(frozen=True)
class Published:
    name: str
    repo_id: str
    filename: str
    size: int
    arch: str | None  # None: not a tagger (the CLIP text encoder)
    description: str
    sha256: str | None = None  # pinned digest; None where it could not be checked offline
    repo_type: str = "model"


PUBLISHED: dict[str, Published] = {
    p.name: p
    for p in [
        Published(
            "ram_plus_swin_large_14m", "xinyu1205/recognize-anything-plus-model",
            "ram_plus_swin_large_14m.pth", 3_010_218_801, "ram_plus_swin_large_384",
            "RAM++ Swin-L 384, 14M images, 4,585 tags + open set (the default)",
        ),
        Published(
            "ram_swin_large_14m", "xinyu1205/recognize_anything_model",
            "ram_swin_large_14m.pth", 5_625_634_877, "ram_swin_large_384",
            "RAM Swin-L 384, 14M images, 4,585 tags",
        ),
        Published(
            "tag2text_swin_14m", "xinyu1205/recognize_anything_model",
            "tag2text_swin_14m.pth", 4_478_705_095, "tag2text_swin_base_384",
            "Tag2Text Swin-B 384, 14M images, 3,429 tags (closed set) + captions",
        ),
        Published(
            "clip-vit-b-16", "timm/vit_base_patch16_clip_224.openai",
            "open_clip_model.safetensors", 598_000_000, None,
            "OpenAI CLIP ViT-B/16 (open_clip): the text encoder of `ramcli vocab add`",
        ),
    ]
}

DEFAULT_MODEL = "ram_plus_swin_large_14m"


def get_published(name: str) -> Published:
    try:
        return PUBLISHED[name]
    except KeyError:
        raise RamcliError(f"unknown model {name!r}; `ramcli models list` shows the published ones") from None


def converted_path(models_dir: Path, name: str) -> Path:
    return Path(models_dir) / f"{name}.safetensors"


def _records_path() -> Path:
    from ramcli.config import home

    return home().root / "verified.json"


def _identity(path: Path) -> tuple[str, dict]:
    st = Path(path).stat()
    return str(Path(path).resolve()), {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _read_records() -> dict:
    try:
        records = json.loads(_records_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return records if isinstance(records, dict) else {}


def verified_as(path: Path) -> str | None:
    """The published name this very file (same path, size and mtime) was verified as, or None."""
    try:
        key, ident = _identity(path)
    except OSError:
        return None
    record = _read_records().get(key)
    if isinstance(record, dict) and all(record.get(k) == v for k, v in ident.items()):
        name = record.get("name")
        return name if name in PUBLISHED else None
    return None


def remember_verified(path: Path, name: str, sha256: str) -> None:
    """Record that `path`, as it is now, is the published file `name` (atomic replace)."""
    key, ident = _identity(path)
    records = _read_records()
    records[key] = {**ident, "name": name, "sha256": sha256}
    target = _records_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(records, indent=1, sort_keys=True), encoding="utf-8")
    tmp.replace(target)


_SHA256 = re.compile(r"[0-9a-f]{64}")


def hub_status() -> tuple[bool, str]:
    """Whether the Hugging Face hub answers (a TCP connection, 3 s at most), or why not.

    Asked before a download, so that an offline machine gets one line of advice at once instead
    of huggingface_hub's retries (half a minute of "Retrying in 8s" lines)."""
    import socket
    from urllib.parse import urlsplit

    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False, "offline: HF_HUB_OFFLINE is set"
    url = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=3).close()
    except OSError as exc:
        return False, f"{url.hostname} unreachable: {exc.strerror or type(exc).__name__}"
    return True, f"{url.hostname} reachable"


def unreachable_advice(p: Published, why: str) -> RamcliError:
    """The one-line error for a model that must be downloaded and cannot be."""
    url = f"https://huggingface.co/{p.repo_id}/resolve/main/{p.filename}"
    if p.arch is None:  # the CLIP text encoder is not a tagger: `models import` would refuse it
        use = "and pass it with --clip-weights FILE (or set RAMCLI_CLIP_WEIGHTS=FILE)"
    else:
        use = f"and pass it with `--weights {p.filename}` (or `ramcli models import {p.filename}` once)"
    return RamcliError(f"cannot download {p.name} ({why}): use a weights file you have, or fetch {url} "
                       f"yourself {use}")


def ensure_downloadable(p: Published, cache_dir: Path | None = None) -> None:
    """Raise the advice at once when `p` is not in the hub cache and the hub cannot be reached."""
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(p.repo_id, p.filename, cache_dir=cache_dir, repo_type=p.repo_type), str):
        return
    reachable, why = hub_status()
    if not reachable:
        raise unreachable_advice(p, why)


def download(p: Published, cache_dir: Path | None = None) -> Path:
    """Fetch a published file into the hub cache and verify it, once; clear error when offline.

    A copy in the hub cache that was verified before is returned at once: no hashing, no network.
    """
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    cached = try_to_load_from_cache(p.repo_id, p.filename, cache_dir=cache_dir, repo_type=p.repo_type)
    if isinstance(cached, str) and verified_as(Path(cached)) == p.name:
        return Path(cached)
    ensure_downloadable(p, cache_dir)
    try:
        local = Path(hf_hub_download(p.repo_id, p.filename, repo_type=p.repo_type, cache_dir=cache_dir))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        raise unreachable_advice(p, type(exc).__name__) from None
    digest = file_sha256(local)
    blob = local.resolve().name  # the hub cache names an LFS file's blob by its SHA-256
    expected = p.sha256 or (blob if _SHA256.fullmatch(blob) else None)
    if expected and digest != expected:
        resolved = local.resolve()
        local.unlink(missing_ok=True)
        resolved.unlink(missing_ok=True)
        raise RamcliError(f"checksum mismatch for {p.filename}: got {digest[:12]}…, the hub says {expected[:12]}…; removed it, run pull again")
    remember_verified(local, p.name, digest)
    return local
