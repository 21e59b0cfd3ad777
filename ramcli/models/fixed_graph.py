"""What the tagging graphs that another runtime runs (ONNX Runtime, OpenVINO) have in common:
the `RecognitionModel` surface the pipeline uses (`arch`, `labels`, `num_classes`,
`forward(x, classes)`), pixels in and logits out, and label queries fixed when the graph was
made, so custom tags added later and image embeddings are refused with what to do instead."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ramcli.errors import UsageError


class FixedGraph(nn.Module):
    #: what the user holds, for messages ("ONNX file", "OpenVINO model")
    kind = "converted model"
    #: the command that makes the graph again with the vocabulary's custom tags
    remake = "`ramcli models convert SRC DST`"

    @property
    def device_advice(self) -> str:
        """What to do when a PyTorch device (cuda, mps) was asked for."""
        return f"an {self.kind} runs on the CPU; use --device cpu or the .pth/.safetensors weights"

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def pretrained_cfg(self) -> dict:
        return self.arch.data_config

    def run(self, pixels: np.ndarray) -> np.ndarray:
        """Logits (B, C) of normalised float32 NCHW pixels, by the runtime."""
        raise NotImplementedError

    def forward(self, images: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
        logits = torch.from_numpy(np.array(self.run(images.detach().to("cpu", torch.float32).contiguous().numpy())))
        return logits if classes is None else logits[:, classes.cpu()]

    def add_label_queries(self, embeds, names, *args, **kwargs) -> None:
        raise UsageError(f"custom tag(s) {', '.join(list(names)[:5])} are not in this {self.kind}: its label "
                         f"queries are fixed when it is made. Make it again ({self.remake}) to bake the "
                         "vocabulary's custom tags in")

    @property
    def logits_only(self) -> str:
        """Why image embeddings (captions, the embedding cache) cannot come from this graph."""
        return (f"an {self.kind} gives logits only: --cache-embeddings and --caption need the "
                ".pth or .safetensors weights")

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        raise UsageError(self.logits_only)
