"""The image-tag recognition decoder: label queries cross-attend to image tokens.

RAM's "tagging head" is a 2-layer BERT from which the word embeddings and every self-attention
block were deleted (Query2Label style). What is left per layer is cross-attention from the label
queries to the image tokens and an FFN, each followed by a post-LayerNorm residual. That is all
this module is; there is no BERT here.

Label queries are identical for every image in a batch, so the first layer projects them once and
broadcasts, instead of repeating the (C, hidden) query matrix per image as the official code does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CrossAttentionLayer(nn.Module):
    def __init__(self, hidden: int, context_dim: int, heads: int, intermediate: int, eps: float):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(hidden, hidden)
        self.k = nn.Linear(context_dim, hidden)
        self.v = nn.Linear(context_dim, hidden)
        self.attn_out = nn.Linear(hidden, hidden)
        self.attn_norm = nn.LayerNorm(hidden, eps=eps)
        self.ffn_in = nn.Linear(hidden, intermediate)
        self.ffn_out = nn.Linear(intermediate, hidden)
        self.ffn_norm = nn.LayerNorm(hidden, eps=eps)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        return x.view(b, n, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, queries: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """queries (1 or B, Q, hidden), context (B, T, context_dim) -> (B, Q, hidden)."""
        batch = context.shape[0]
        q = self._split(self.q(queries)).expand(batch, -1, -1, -1)
        k = self._split(self.k(context))
        v = self._split(self.v(context))
        attn = F.scaled_dot_product_attention(q, k, v)
        attn = attn.transpose(1, 2).flatten(2)
        x = self.attn_norm(self.attn_out(attn) + queries)
        return self.ffn_norm(self.ffn_out(F.gelu(self.ffn_in(x))) + x)


class RecognitionDecoder(nn.Module):
    def __init__(self, hidden: int, context_dim: int, heads: int, intermediate: int, layers: int, eps: float):
        super().__init__()
        self.layers = nn.ModuleList(
            CrossAttentionLayer(hidden, context_dim, heads, intermediate, eps) for _ in range(layers)
        )

    def forward(self, queries: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = queries
        for layer in self.layers:
            x = layer(x, context)
        return x


#: official tagging-head key suffix -> ours, per layer
OFFICIAL_LAYER_KEYS = {
    "crossattention.self.query": "q",
    "crossattention.self.key": "k",
    "crossattention.self.value": "v",
    "crossattention.output.dense": "attn_out",
    "crossattention.output.LayerNorm": "attn_norm",
    "intermediate.dense": "ffn_in",
    "output.dense": "ffn_out",
    "output.LayerNorm": "ffn_norm",
}
