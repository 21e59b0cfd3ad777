"""The published models, where they live on the Hugging Face hub, and how they are fetched.

Downloads go through huggingface_hub (its cache, resumable downloads, progress bars). After a
download the file's SHA-256 is compared with the hub's own record of it (the LFS object id),
and with the pinned digest where we know one, so a corrupted or substituted file is refused.
`pull` converts a checkpoint to the tag-only safetensors file by default, which is what `tag`
loads afterwards.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from ramcli.errors import RamcliError


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


def sha256_file(path: Path, chunk: int = 16 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def download(p: Published, cache_dir: Path | None = None) -> Path:
    """Fetch a published file into the hub cache and verify it; clear error when offline."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        local = Path(hf_hub_download(p.repo_id, p.filename, repo_type=p.repo_type, cache_dir=cache_dir))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        raise RamcliError(
            f"cannot reach the Hugging Face hub ({type(exc).__name__}): download "
            f"https://huggingface.co/{p.repo_id}/resolve/main/{p.filename} yourself and run "
            f"`ramcli models import {p.filename}`"
        ) from None
    digest = sha256_file(local)
    expected = p.sha256
    if expected is None:
        try:
            meta = get_hf_file_metadata(hf_hub_url(p.repo_id, p.filename, repo_type=p.repo_type))
            expected = (meta.etag or "").strip('"') if len(meta.etag or "") >= 64 else None
        except (HfHubHTTPError, OSError):
            expected = None
    if expected and digest != expected:
        local.unlink(missing_ok=True)
        raise RamcliError(f"checksum mismatch for {p.filename}: got {digest[:12]}…, the hub says {expected[:12]}…; removed it, run pull again")
    return local
