"""CLIP text embeddings for open-vocabulary tags, computed the way the official open-set code does.

RAM's recognition decoder takes label queries in the CLIP ViT-B/16 text space, so a tag it never
trained on only needs a text embedding. The official scripts (`ram/utils/openset_utils.py`) build
it by expanding the tag name with 63 prompt templates, encoding each prompt, L2-normalising,
averaging and re-normalising (RAM), or by encoding LLM-written descriptions one by one (RAM++).
This module reproduces that procedure with open_clip, so no `clip` package and no OpenAI key are
needed.

Why `ViT-B-16-quickgelu`: OpenAI's CLIP was trained with QuickGELU. open_clip's plain `ViT-B-16`
config uses nn.GELU; asking it for `pretrained='openai'` only *warns* about the mismatch and
returns a network whose embeddings differ from the official ones. The `-quickgelu` config is the
same network as `clip.load("ViT-B/16")` (same weights, same tokenizer, same activation).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ramcli.errors import CheckpointError, RamcliError
from ramcli.hashing import file_sha256
from ramcli.models.safeload import load_weights

#: open_clip model config that matches OpenAI's ViT-B/16 exactly (QuickGELU activations).
CLIP_MODEL_NAME = "ViT-B-16-quickgelu"
#: Where open_clip (and `ramcli models pull clip-vit-b-16`) keep the OpenAI ViT-B/16 weights.
CLIP_HF_REPO = "timm/vit_base_patch16_clip_224.openai"
CLIP_HF_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
#: Environment variable naming a local weights file (the config-level equivalent of --clip-weights).
CLIP_WEIGHTS_ENV = "RAMCLI_CLIP_WEIGHTS"

#: The official prompt ensemble (`multiple_templates` in ram/utils/openset_utils.py), verbatim.
MULTIPLE_TEMPLATES: tuple[str, ...] = (
    "There is {article} {} in the scene.",
    "There is the {} in the scene.",
    "a photo of {article} {} in the scene.",
    "a photo of the {} in the scene.",
    "a photo of one {} in the scene.",
    "itap of {article} {}.",
    "itap of my {}.",  # itap: I took a picture of
    "itap of the {}.",
    "a photo of {article} {}.",
    "a photo of my {}.",
    "a photo of the {}.",
    "a photo of one {}.",
    "a photo of many {}.",
    "a good photo of {article} {}.",
    "a good photo of the {}.",
    "a bad photo of {article} {}.",
    "a bad photo of the {}.",
    "a photo of a nice {}.",
    "a photo of the nice {}.",
    "a photo of a cool {}.",
    "a photo of the cool {}.",
    "a photo of a weird {}.",
    "a photo of the weird {}.",
    "a photo of a small {}.",
    "a photo of the small {}.",
    "a photo of a large {}.",
    "a photo of the large {}.",
    "a photo of a clean {}.",
    "a photo of the clean {}.",
    "a photo of a dirty {}.",
    "a photo of the dirty {}.",
    "a bright photo of {article} {}.",
    "a bright photo of the {}.",
    "a dark photo of {article} {}.",
    "a dark photo of the {}.",
    "a photo of a hard to see {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of {article} {}.",
    "a low resolution photo of the {}.",
    "a cropped photo of {article} {}.",
    "a cropped photo of the {}.",
    "a close-up photo of {article} {}.",
    "a close-up photo of the {}.",
    "a jpeg corrupted photo of {article} {}.",
    "a jpeg corrupted photo of the {}.",
    "a blurry photo of {article} {}.",
    "a blurry photo of the {}.",
    "a pixelated photo of {article} {}.",
    "a pixelated photo of the {}.",
    "a black and white photo of the {}.",
    "a black and white photo of {article} {}.",
    "a plastic {}.",
    "the plastic {}.",
    "a toy {}.",
    "the toy {}.",
    "a plushie {}.",
    "the plushie {}.",
    "a cartoon {}.",
    "the cartoon {}.",
    "an embroidered {}.",
    "the embroidered {}.",
    "a painting of the {}.",
    "a painting of a {}.",
)


def article(name: str) -> str:
    """The article the official code puts before a tag name.

    Reproduced as is: it looks at the *raw* first character, case-sensitively, so "Apple" gets
    "a" and "apple" gets "an" (the official behaviour; changing it would change embeddings).
    """
    return "an" if name[0] in "aeiou" else "a"


def processed_name(name: str) -> str:
    """The official name normalisation: "_" -> space, "/" -> " or ", lowercase, trailing dots off."""
    return name.replace("_", " ").replace("/", " or ").lower().rstrip(".")


def prompts_for(name: str) -> list[str]:
    """The 63 prompts of a tag name; prompts starting with "a" or "the" get "This is " in front."""
    texts = [t.format(processed_name(name), article=article(name)) for t in MULTIPLE_TEMPLATES]
    return ["This is " + t if t.startswith("a") or t.startswith("the") else t for t in texts]


@dataclass
class ClipTextEncoder:
    """An open_clip text tower plus its tokenizer; `weights_id` says which weights produced it."""

    model: torch.nn.Module
    tokenizer: object
    weights_id: str

    @torch.no_grad()
    def encode(self, texts: list[str]) -> torch.Tensor:
        """L2-normalised fp32 embeddings (N, D), one per text; texts over 77 tokens are truncated
        with the end token kept, like `clip.tokenize(..., truncate=True)`."""
        tokens = self.tokenizer(texts)
        features = self.model.encode_text(tokens).float()
        return features / features.norm(dim=-1, keepdim=True)

    def token_count(self, text: str) -> int:
        """Tokens including start and end markers (what has to fit in 77)."""
        return len(self.tokenizer.encode(text)) + 2

    def template_embeddings(self, name: str) -> torch.Tensor:
        """The 63 normalised prompt embeddings (63, D) of a tag name.

        The official RAM path does not truncate (clip.tokenize raises on long prompts), so a name
        whose prompts do not fit is refused here rather than silently cut.
        """
        prompts = prompts_for(name)
        longest = max(prompts, key=self.token_count)
        limit = self.tokenizer.context_length  # the model's own (77 for CLIP)
        if self.token_count(longest) > limit:
            raise RamcliError(
                f"tag name is too long for CLIP ({self.token_count(longest)} tokens in its longest "
                f"prompt, at most {limit}): {name[:40]!r}"
            )
        return self.encode(prompts)

    def description_embeddings(self, descriptions: list[str]) -> torch.Tensor:
        """One normalised embedding per description (K, D), kept apart (the RAM++ way)."""
        return self.encode(list(descriptions))


def ensemble(template_embeddings: torch.Tensor) -> torch.Tensor:
    """The RAM open-set label query: the mean of normalised prompt embeddings, re-normalised."""
    mean = template_embeddings.mean(dim=0)
    return mean / mean.norm()


def find_clip_weights(explicit: Path | None = None, hf_cache_dir: Path | None = None) -> Path:
    """The CLIP weights file: --clip-weights, then $RAMCLI_CLIP_WEIGHTS, then the Hugging Face cache.

    Never downloads: a missing file is an error that says exactly how to get it.
    `hf_cache_dir` overrides the Hugging Face cache location (default: huggingface_hub's).
    """
    for candidate, origin in ((explicit, "--clip-weights"), (os.environ.get(CLIP_WEIGHTS_ENV), CLIP_WEIGHTS_ENV)):
        if candidate:
            path = Path(candidate).expanduser()
            if not path.is_file():
                raise RamcliError(f"CLIP weights file not found ({origin}): {path}")
            return path
    from huggingface_hub import try_to_load_from_cache

    for filename in CLIP_HF_FILES:
        cached = try_to_load_from_cache(CLIP_HF_REPO, filename, cache_dir=hf_cache_dir)
        if isinstance(cached, str) and Path(cached).is_file():
            return Path(cached)
    raise RamcliError(
        "CLIP ViT-B/16 text weights not found: run `ramcli models pull clip-vit-b-16` (downloads "
        f"{CLIP_HF_REPO}/{CLIP_HF_FILES[0]} into the Hugging Face cache), or pass "
        f"--clip-weights FILE (or set {CLIP_WEIGHTS_ENV}) with that file copied from a machine that has it"
    )


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors or plain PyTorch state-dict file (never unpickles objects)."""
    try:
        state = load_weights(path)
    except CheckpointError as exc:
        raise RamcliError(
            f"cannot read CLIP weights {path} ({exc}); expected open_clip's {CLIP_HF_FILES[0]} "
            "(OpenAI's TorchScript ViT-B-16.pt is not accepted)"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise RamcliError(f"CLIP weights {path} do not hold a state dict")
    return {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def load_text_encoder(weights: Path | None = None, model_config: dict | None = None) -> ClipTextEncoder:
    """Build the open_clip text tower and load CLIP weights into it (visual weights are ignored).

    `model_config` replaces open_clip's `ViT-B-16-quickgelu` config (tests use a small one); the
    production path never passes it.
    """
    import open_clip

    path = find_clip_weights(weights)
    config = dict(model_config or open_clip.get_model_config(CLIP_MODEL_NAME))
    model = open_clip.CLIP(**config)
    del model.visual  # only the text tower is used; drop the image tower's memory
    state = {k: v for k, v in _read_state_dict(path).items() if not k.startswith("visual.")}
    state.pop("logit_bias", None)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise RamcliError(f"{path} is not a CLIP ViT-B/16 checkpoint ({detail})")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError:
        raise RamcliError(f"{path} does not fit CLIP ViT-B/16 (tensor shapes differ)") from None
    model.eval()
    tokenizer = open_clip.SimpleTokenizer(context_length=model.context_length)
    return ClipTextEncoder(model=model, tokenizer=tokenizer, weights_id=file_sha256(path)[:16])
