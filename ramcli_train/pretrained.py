"""Pretrained weights of a training run's backbone: from the Hugging Face hub cache, by one quick
download, or not at all.

timm's own `pretrained=True` retries an unreachable hub for most of a minute before it gives up;
a training run on a machine without network should instead say at once that its backbone starts
random. So the weights file is looked up here first: timm's pretrained config names the hub
repository, `huggingface_hub` finds the file in its cache, and only when the hub answers a TCP
connection within a few seconds is it downloaded (into that cache, for the next run). The file
then goes through timm's own loader (`pretrained_cfg_overlay=dict(file=...)`, `weights_only`
pickles or safetensors), which also adapts it to the model (classifier dropped, position
embeddings resized).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

#: timm names of the ImageNet-22k Swin weights the official code starts from, by (width, window)
SWIN_PRETRAINED = {
    (128, 7): "swin_base_patch4_window7_224.ms_in22k",
    (128, 12): "swin_base_patch4_window12_384.ms_in22k",
    (192, 7): "swin_large_patch4_window7_224.ms_in22k",
    (192, 12): "swin_large_patch4_window12_384.ms_in22k",
}
#: the files timm publishes weights under, safest first
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclass
class Loaded:
    """What happened to a backbone's weights, for the run's log."""

    name: str
    pretrained: bool
    message: str


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub accepts a TCP connection within `timeout` seconds (never when offline mode is set)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout):
            return True
    except OSError:
        return False


def weights_file(name: str, cache_dir: Path | None = None, download: bool = True) -> tuple[Path | None, str]:
    """(local weights file or None, where it came from / why not) for timm model `name`."""
    import timm
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(name)
    repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not repo:
        return None, "timm publishes no hub weights for it"
    files = (cfg.hf_hub_filename,) if getattr(cfg, "hf_hub_filename", None) else WEIGHT_FILES
    for filename in files:
        cached = try_to_load_from_cache(repo, filename, cache_dir=cache_dir)
        if isinstance(cached, str):
            return Path(cached), f"{repo} (hub cache)"
    if not download:
        return None, f"{repo} is not in the hub cache"
    if not hub_reachable():
        return None, f"{repo} is not in the hub cache and the hub cannot be reached"
    errors = []
    for filename in files:
        try:
            return Path(hf_hub_download(repo, filename, cache_dir=cache_dir)), f"{repo} (downloaded)"
        except Exception as exc:  # a missing file variant or a dropped connection: try the next, then report
            errors.append(type(exc).__name__)
    return None, f"downloading {repo} failed ({', '.join(errors)})"


def timm_name(arch) -> str | None:
    """The timm model whose weights fit `arch`'s backbone: its own name, or the official Swin's."""
    if arch.backbone:
        return arch.backbone
    return SWIN_PRETRAINED.get((arch.swin.embed_dim, arch.swin.window_size))


def load_pretrained_backbone(tagger: nn.Module, cache_dir: Path | None = None, download: bool = True) -> Loaded:
    """Copy pretrained weights into `tagger.backbone` when they can be had quickly; else keep the
    random initialisation. The message says which, for the log."""
    from ramcli.models.ram import timm_backbone

    arch = tagger.arch
    name = timm_name(arch)
    label = arch.backbone or f"Swin (width {arch.swin.embed_dim}, window {arch.swin.window_size})"
    if name is None:
        return Loaded(label, False, f"backbone {label}: no published weights of this size; random initialisation")
    path, source = weights_file(name, cache_dir, download=download)
    if path is None:
        return Loaded(label, False, f"backbone {label}: pretrained weights unavailable ({source}); random initialisation")
    with torch.device("cpu"):
        # a timm backbone at the run's size (timm adapts position embeddings); the official Swin
        # at the weights' own size, as the official code loads them
        source_model = timm_backbone(name, arch.image_size if arch.backbone else None, pretrained=True,
                                     pretrained_cfg_overlay={"file": str(path)})
    result = tagger.backbone.load_state_dict(source_model.state_dict(), strict=False)
    kept = len(result.missing_keys)
    note = f"; {kept} tensors kept random" if kept else ""
    return Loaded(label, True, f"backbone {label}: pretrained weights {source}{note}")
