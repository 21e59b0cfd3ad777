"""Random-weight CLIP text towers saved to files, for the open-vocabulary tests.

The real OpenAI weights cannot be downloaded here, so tests check the *procedure* (templates,
normalisation, averaging, loading) on random weights. `TINY_CLIP` keeps the 512-d output space
RAM needs but a 2-layer, 64-wide text transformer, so most tests run in milliseconds.
"""

from __future__ import annotations

from pathlib import Path

import open_clip
import torch
from safetensors.torch import save_file

TINY_CLIP = {
    "embed_dim": 512,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def save_random_clip(path: Path, config: dict, seed: int = 0, text_only: bool = False) -> Path:
    """Build an open_clip CLIP with random weights from `config` and save it as safetensors.

    Weights are spread wider than open_clip's init so that different prompts give clearly
    different embeddings (a near-constant encoder would make every comparison pass).
    """
    torch.manual_seed(seed)
    model = open_clip.CLIP(**config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim >= 2 and not name.startswith("visual."):
                param.normal_(0.0, 0.05)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not (text_only and k.startswith("visual."))}
    save_file(state, str(path))
    return path
