"""Regions for the data engine's cleaning step: an open-set detector and a crop embedder.

The RAM paper cleans tags by cropping the regions of a category that Grounding DINO finds,
embedding the crops and dropping outliers. Both parts are interfaces here, so the engine does
not depend on one model:

- `Detector`: image + phrases -> boxes with the phrase each belongs to. `GroundingDino` is the
  real one, through Hugging Face `transformers` (imported only when it is used; missing library
  or weights give one actionable line). Tests use a double that finds coloured regions.
- `CropEmbedder`: crops -> vectors. `ModelCropEmbedder` uses the baseline RAM model's pooled
  image embedding (the 512-d vector RAM distils towards CLIP's image embedding), so cleaning
  needs no second image model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from ramcli.errors import RamcliError

GROUNDING_DINO = "IDEA-Research/grounding-dino-tiny"


@dataclass(frozen=True)
class Detection:
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels
    phrase: str
    score: float


class Detector(Protocol):
    def detect(self, image: Image.Image, phrases: Sequence[str]) -> list[Detection]:
        """Boxes of `phrases` in `image`; each detection names one of the phrases."""


class CropEmbedder(Protocol):
    def embed(self, crops: Sequence[Image.Image]) -> np.ndarray:
        """(N, D) float vectors, one per crop."""


class GroundingDino:
    """Grounding DINO (open-set detection from text) through `transformers`.

    One forward per image with all its phrases in one prompt ("cat. red car."), as the model
    card recommends; boxes above `box_threshold` whose text matches above `text_threshold`.
    """

    def __init__(self, model_id: str = GROUNDING_DINO, device: str = "cpu", box_threshold: float = 0.35,
                 text_threshold: float = 0.25):
        try:
            from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor
        except ImportError:
            raise RamcliError("the Grounding DINO detector needs the transformers package: pip install 'ramcli[train]'") from None
        try:
            self.processor = AutoProcessor.from_pretrained(model_id)
            self.model = AutoModelForZeroShotObjectDetection.from_pretrained(model_id).to(device).eval()
        except (OSError, ValueError) as exc:
            raise RamcliError(f"Grounding DINO weights {model_id!r} not available ({type(exc).__name__}): download them "
                              "with `huggingface-cli download` or pass --detector-model DIR") from None
        self.device = device
        self.box_threshold = box_threshold
        self.text_threshold = text_threshold

    @torch.inference_mode()
    def detect(self, image: Image.Image, phrases: Sequence[str]) -> list[Detection]:
        if not phrases:
            return []
        text = " ".join(f"{p.lower().strip()}." for p in phrases)
        inputs = self.processor(images=image, text=text, return_tensors="pt").to(self.device)
        outputs = self.model(**inputs)
        result = self.processor.post_process_grounded_object_detection(
            outputs, inputs["input_ids"], threshold=self.box_threshold, text_threshold=self.text_threshold,
            target_sizes=[image.size[::-1]])[0]
        labels = result.get("text_labels", result.get("labels"))
        wanted = {p.lower().strip(): p for p in phrases}
        out = []
        for box, label, score in zip(result["boxes"].tolist(), labels, result["scores"].tolist()):
            phrase = wanted.get(str(label).strip())
            if phrase is not None:
                out.append(Detection(tuple(box), phrase, float(score)))
        return out


class ModelCropEmbedder:
    """The baseline model's pooled image embedding of each crop, prepared by the model's data config."""

    def __init__(self, model, device: str = "cpu", batch_size: int = 16):
        self.model = model.to(device).eval()
        self.device = device
        self.batch_size = batch_size

    @torch.inference_mode()
    def embed(self, crops: Sequence[Image.Image]) -> np.ndarray:
        from ramcli.media.decode import model_input, normalize

        data_config = self.model.pretrained_cfg
        out = []
        for start in range(0, len(crops), self.batch_size):
            pixels = torch.stack([model_input(c, data_config) for c in crops[start:start + self.batch_size]]).to(self.device)
            pooled = self.model.encode_image(normalize(pixels, data_config))[:, 0, :]
            out.append(torch.nn.functional.normalize(pooled.float(), dim=-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 512), dtype=np.float32)


def crop(image: Image.Image, box: tuple[float, float, float, float], min_size: int = 4) -> Image.Image | None:
    """The box's pixels, clipped to the image; None for a box thinner than `min_size`."""
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    x0, y0 = max(0, x0), max(0, y0)
    x1, y1 = min(image.width, x1), min(image.height, y1)
    if x1 - x0 < min_size or y1 - y0 < min_size:
        return None
    return image.crop((x0, y0, x1, y1))
