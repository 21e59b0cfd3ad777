"""A small caption vocabulary built from the training captions (tests and tiny CPU runs)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from ramcli.models.caption import SPECIAL, CaptionTokenizer


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1000) -> CaptionTokenizer:
    """A small WordPiece vocabulary from `texts` (tests, tiny CPU models), bert-style normalised.

    Deterministic on purpose (the `tokenizers` trainer breaks frequency ties differently from
    run to run, which would make runs irreproducible): the special tokens, every character seen
    (alone and as a ##continuation), then whole words by descending count, ties alphabetical.
    """
    from tokenizers.implementations import BertWordPieceTokenizer
    from tokenizers.normalizers import BertNormalizer
    from tokenizers.pre_tokenizers import BertPreTokenizer

    normalizer, pre = BertNormalizer(lowercase=True), BertPreTokenizer()
    words: Counter[str] = Counter()
    for text in texts:
        words.update(w for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = sorted({c for w in words for c in w})
    vocab = list(SPECIAL) + chars + ["##" + c for c in chars]
    known = set(vocab)
    ranked = [w for w, _ in sorted(words.items(), key=lambda x: (-x[1], x[0])) if w not in known]
    vocab += ranked[: max(0, vocab_size - len(vocab) - 2)]  # 2 slots for [DEC] and [ENC]
    wp = BertWordPieceTokenizer({t: i for i, t in enumerate(vocab)}, lowercase=True)
    return CaptionTokenizer(wp._tokenizer)
