"""The BERT layer both text heads are built from (no transformers dependency).

RAM's recognition decoder is a BERT whose self-attention was deleted (Query2Label style): per
layer, cross-attention from the label queries to the image tokens and an FFN. The caption
generator's tag encoder and text decoder are full BERT layers: self-attention, cross-attention,
FFN. All sub-layers are post-LayerNorm residuals. One class serves both, so that the official
tie (the tag encoder's lowest cross-attention and FFN *are* the recognition decoder's tensors)
shares modules of the same kind.

Dropout is the caller's (`dropout`): the tied tensors run without it in the recognition decoder
and with it in the caption branch, as in the official code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BertAttention(nn.Module):
    """Multi-head attention + output projection + post-LayerNorm residual (a BERT sub-layer).

    Queries may have batch 1 against a context of batch B: projected once, then broadcast (label
    queries are the same for every image).
    """

    def __init__(self, hidden: int, kv_width: int, heads: int, eps: float):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(hidden, hidden)
        self.k = nn.Linear(kv_width, hidden)
        self.v = nn.Linear(kv_width, hidden)
        self.out = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden, eps=eps)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        return x.view(b, n, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, x, context, mask=None, causal=False, cache=None, dropout: float = 0.0):
        """(B, N, hidden) and the keys/values, with `cache`'s prepended (for incremental decoding)."""
        q = self._split(self.q(x)).expand(context.shape[0], -1, -1, -1)
        k, v = self._split(self.k(context)), self._split(self.v(context))
        if cache is not None:
            k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
        p = dropout if self.training else 0.0
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal and mask is None)
        a = F.dropout(self.out(a.transpose(1, 2).flatten(2)), p, self.training)
        return self.norm(a + x), (k, v)


class BertLayer(nn.Module):
    """[self-attention,] cross-attention to `context`, FFN; returns the self-attention keys/values."""

    def __init__(self, hidden: int, kv_width: int, heads: int, intermediate: int, eps: float,
                 dropout: float = 0.0, self_attention: bool = True):
        super().__init__()
        self.self_attn = BertAttention(hidden, hidden, heads, eps) if self_attention else None
        self.cross_attn = BertAttention(hidden, kv_width, heads, eps)
        self.ffn_in = nn.Linear(hidden, intermediate)
        self.ffn_out = nn.Linear(intermediate, hidden)
        self.ffn_norm = nn.LayerNorm(hidden, eps=eps)
        self.dropout = dropout

    def tie_to(self, other: BertLayer) -> None:
        """Share `other`'s cross-attention and FFN tensors (the official tag-encoder tie); each
        layer keeps its own dropout."""
        for name in ("q", "k", "v", "out", "norm"):
            setattr(self.cross_attn, name, getattr(other.cross_attn, name))
        for name in ("ffn_in", "ffn_out", "ffn_norm"):
            setattr(self, name, getattr(other, name))

    def forward(self, x, context, self_mask=None, causal=False, cache=None):
        kv = None
        if self.self_attn is not None:
            x, kv = self.self_attn(x, x, self_mask, causal, cache, self.dropout)
        x, _ = self.cross_attn(x, context, dropout=self.dropout)
        p = self.dropout if self.training else 0.0
        h = F.dropout(self.ffn_out(F.gelu(self.ffn_in(x))), p, self.training)
        return self.ffn_norm(h + x), kv


class RecognitionDecoder(nn.Module):
    """RAM's tagging head: label queries cross-attend to the image tokens, layer after layer."""

    def __init__(self, hidden: int, context_dim: int, heads: int, intermediate: int, layers: int, eps: float):
        super().__init__()
        self.layers = nn.ModuleList(
            BertLayer(hidden, context_dim, heads, intermediate, eps, self_attention=False) for _ in range(layers)
        )

    def forward(self, queries: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """queries (1 or B, Q, hidden), context (B, T, context_dim) -> (B, Q, hidden)."""
        x = queries
        for layer in self.layers:
            x, _ = layer(x, context)
        return x
