"""The training losses of RAM, RAM++ and Tag2Text, as the paper and the official code define them.

- Tagging: asymmetric loss (ASL; gamma_neg 7, gamma_pos 0, clip 0.05), *summed* over batch and
  classes. The focusing weights carry no gradient (ASL's `disable_torch_grad_focal_loss`).
- Captioning (RAM, Tag2Text): next-token cross-entropy with label smoothing 0.1, averaged over the
  caption tokens that are neither padding nor prompt.
- Distillation (RAM, RAM++): L1 between the pooled image embedding and frozen CLIP image features.
- Alignment (RAM++): ASL (gamma_neg 4) over image x caption logits, the diagonal positive.
- Pooled tags (not in the paper; off unless `pooled_tag_weight` is set, as in the `cpu` preset):
  BCE of the pooled image embedding's dot product with each tag's label embedding.

`combine` applies the official weighting: RAM rescales the tag loss to the LM loss's magnitude
(`tag / (tag / lm).detach()`), which keeps a summed loss over thousands of classes from drowning
the caption loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def asymmetric_loss(logits: torch.Tensor, targets: torch.Tensor, gamma_neg: float = 7.0,
                    gamma_pos: float = 0.0, clip: float = 0.05, eps: float = 1e-8) -> torch.Tensor:
    """ASL (Ridnik et al. 2021), summed: the official tagging loss."""
    logits, targets = logits.float(), targets.float()
    p = torch.sigmoid(logits)
    p_neg = 1 - p
    if clip > 0:
        p_neg = (p_neg + clip).clamp(max=1)
    loss = targets * torch.log(p.clamp(min=eps)) + (1 - targets) * torch.log(p_neg.clamp(min=eps))
    if gamma_neg > 0 or gamma_pos > 0:
        with torch.no_grad():
            pt = p * targets + p_neg * (1 - targets)
            gamma = gamma_pos * targets + gamma_neg * (1 - targets)
            weight = torch.pow(1 - pt, gamma)
        loss = loss * weight
    return -loss.sum()


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, smoothing: float = 0.1) -> torch.Tensor:
    """Label-smoothed next-token cross-entropy; targets of -100 (padding, prompt) are ignored."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=-100, label_smoothing=smoothing)


def distillation_loss(pooled: torch.Tensor, clip_features: torch.Tensor) -> torch.Tensor:
    """L1 to the frozen CLIP image embedding (mean over batch and the 512 dimensions)."""
    return F.l1_loss(pooled.float(), clip_features.float())


def alignment_loss(logits: torch.Tensor) -> torch.Tensor:
    """RAM++ image-text alignment: (B images, B captions) logits, matching pairs positive."""
    targets = torch.eye(logits.shape[0], logits.shape[1], device=logits.device)
    return asymmetric_loss(logits, targets, gamma_neg=4.0, gamma_pos=0.0, clip=0.05)


def pooled_tag_loss(pooled: torch.Tensor, class_embeds: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """BCE of `pooled @ class_embeds.T` (B, C) as tag logits, summed like the tag loss.

    Why: the recognition decoder passes its tag gradient back to the image encoder through
    cross-attention over a handful of tokens, which teaches an encoder trained from scratch
    slowly; this loss hands the encoder a linear probe's gradient, through the label embeddings
    the decoder already has (no new weights, nothing to export). The CLIP distillation loss plays
    that part when a CLIP teacher exists; synthetic data and random label queries have none.
    """
    logits = pooled.float() @ class_embeds.float().t()
    return F.binary_cross_entropy_with_logits(logits, targets.float(), reduction="sum")


def combine(parts: dict[str, torch.Tensor], rescale_tag: bool = True) -> torch.Tensor:
    """The official total from the parts a family has: RAM lm + rescaled tag + dis; RAM++
    tag + dis + align; Tag2Text lm + rescaled tag; plus pooled_tag where it was computed.

    `rescale_tag=False` adds the summed tag loss as it is. With few classes the rescaling hands
    the shared image encoder to the caption loss (Adam sees mostly its gradient), which is what
    a small model on a CPU budget cannot afford; the `cpu` preset turns it off."""
    tag = parts["tag"]
    if "lm" in parts and rescale_tag:
        total = parts["lm"] + tag / (tag / parts["lm"]).detach()
    elif "lm" in parts:
        total = parts["lm"] + tag
    else:
        total = tag
    for name in ("dis", "align", "pooled_tag"):
        if name in parts:
            total = total + parts[name]
    return total
