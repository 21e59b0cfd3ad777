"""The caption generator: tokenizer conventions, official weight mapping, decoding.

Fidelity is checked against `_official_decoder_logits`, an independent functional statement of
the official BertModel/BertLMHeadModel forward written from the official semantics (BERT post-LN
layers, tag input padded to 40 with [ENC] first, the decoder cross-attending to all 40 states),
reading the official-layout state dict directly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from ckpt_factory import arch_config, official_state_dict

from ramcli.models.caption import CaptionTokenizer, beam_search
from ramcli.models.checkpoint import (
    caption_state_from_official,
    load_official_generator,
    official_to_ours,
    ours_to_official,
)
from ramcli_train.tokenizer import train_tokenizer

CAPTIONS = ["a picture of a red dog on the grass", "a picture of two blue cats in the snow",
            "a picture of a green star over the sea", "a picture of a dog and a cat"]


def _tokenizer() -> CaptionTokenizer:
    tok = train_tokenizer(CAPTIONS * 3, vocab_size=98)
    assert len(tok) <= 100  # fits the factory's tiny vocabulary
    return tok


def test_bert_vocab_gives_the_official_ids():
    tok = CaptionTokenizer.from_vocab()
    assert len(tok) == 30524 and (tok.bos_id, tok.enc_id) == (30522, 30523)
    assert tok.prompt_ids("a picture of ") == [30522, 1037, 3861, 1997]
    ids, mask = tok.encode_tags(["dog | grass", " | ".join(["cat"] * 60)])
    assert ids.shape == (2, 40) and ids[0, 0] == 30523 and int(mask[0].sum()) == 5  # ENC dog | grass SEP
    assert ids[1, -1] == tok.sep_id and int(mask[1].sum()) == 40  # truncated, [SEP] kept
    caps, cmask = tok.encode_captions(["a picture of a dog.", "hi"])
    assert caps[0, 0] == 30522 and caps.shape[1] == int(cmask[0].sum()) and caps[1, 3] == tok.pad_id
    assert tok.decode(caps[0].tolist()) == "a picture of a dog."


# ----------------------------------------------------------------------------- reference


def _ln(x, sd, k):
    return F.layer_norm(x, (x.shape[-1],), sd[k + ".weight"], sd[k + ".bias"], 1e-12)


def _lin(x, sd, k):
    return F.linear(x, sd[k + ".weight"], sd[k + ".bias"])


def _attn(x, mem, sd, k, heads, mask):
    b, t, d = x.shape
    q = _lin(x, sd, k + ".self.query").view(b, t, heads, -1).transpose(1, 2)
    kk = _lin(mem, sd, k + ".self.key").view(b, mem.shape[1], heads, -1).transpose(1, 2)
    v = _lin(mem, sd, k + ".self.value").view(b, mem.shape[1], heads, -1).transpose(1, 2)
    s = q @ kk.transpose(-1, -2) / (d // heads) ** 0.5 + (1.0 - mask) * -10000.0
    h = (s.softmax(-1) @ v).transpose(1, 2).reshape(b, t, d)
    return _ln(_lin(h, sd, k + ".output.dense") + x, sd, k + ".output.LayerNorm")


def _bert(sd, p, ids, mask, mem, layers, heads):
    x = sd[p + "embeddings.word_embeddings.weight"][ids] + sd[p + "embeddings.position_embeddings.weight"][: ids.shape[1]]
    x = _ln(x, sd, p + "embeddings.LayerNorm")
    ones = torch.ones(mem.shape[0], 1, 1, mem.shape[1])
    for i in range(layers):
        k = f"{p}encoder.layer.{i}."
        x = _attn(x, x, sd, k + "attention", heads, mask)
        x = _attn(x, mem, sd, k + "crossattention", heads, ones)
        h = _lin(F.gelu(_lin(x, sd, k + "intermediate.dense")), sd, k + "output.dense")
        x = _ln(h + x, sd, k + "output.LayerNorm")
    return x


def _official_decoder_logits(sd, cfg, tok, image_embeds, tags, ids):
    layers, heads = cfg["text_layers"], cfg["text_heads"]
    tag_ids, tag_mask = tok.encode_tags(tags)
    states = _bert(sd, "tag_encoder.", tag_ids, tag_mask[:, None, None, :].float(), image_embeds, layers, heads)
    t = ids.shape[1]
    causal = torch.ones(t, t).tril()[None, None]
    x = _bert(sd, "text_decoder.bert.", ids, causal, states, layers, heads)
    p = "text_decoder.cls.predictions."
    h = _ln(F.gelu(_lin(x, sd, p + "transform.dense")), sd, p + "transform.LayerNorm")
    return F.linear(h, sd[p + "decoder.weight"], sd[p + "decoder.bias"])


def _setup():
    sd = official_state_dict("tag2text_tiny", num_classes=20, seed=3)
    # the factory's tiny stacks have 32 positions; the official tag input always fills 40
    g = torch.Generator().manual_seed(1)
    for p in ("tag_encoder.", "text_decoder.bert."):
        k = p + "embeddings.position_embeddings.weight"
        sd[k] = torch.cat([sd[k], torch.randn(32, sd[k].shape[1], generator=g) * 0.02])
        sd[p + "embeddings.position_ids"] = torch.arange(64)[None]
    cfg = arch_config("tag2text_tiny", 20)
    tok = _tokenizer()
    gen = load_official_generator(sd, tok, heads=cfg["text_heads"])
    embeds = torch.randn(2, 5, cfg["vision_width"], generator=torch.Generator().manual_seed(0))
    return sd, cfg, tok, gen, embeds


def test_every_official_caption_tensor_is_mapped_and_round_trips():
    sd, _, _, gen, _ = _setup()
    caption_keys = [k for k in sd if k.startswith(("tag_encoder.", "text_decoder."))]
    unmapped = {k for k in caption_keys if official_to_ours(k) is None}
    # only buffers and the tensors tied to the word embeddings / bias have no own slot
    assert unmapped == {"tag_encoder.embeddings.position_ids", "text_decoder.bert.embeddings.position_ids",
                        "text_decoder.cls.predictions.decoder.weight", "text_decoder.cls.predictions.decoder.bias"}
    ours = gen.state_dict()
    for k in caption_keys:
        if k not in unmapped:
            assert torch.equal(ours[official_to_ours(k)], sd[k]), k
    back = ours_to_official(ours)
    assert set(back) == set(caption_keys)
    assert all(torch.equal(back[k], sd[k]) for k in caption_keys)
    broken = dict(sd)
    del broken["text_decoder.bert.encoder.layer.1.crossattention.self.key.weight"]
    import pytest

    from ramcli.errors import CheckpointError

    with pytest.raises(CheckpointError, match="incomplete"):
        caption_state_from_official(broken, gen)


def test_teacher_forced_logits_match_the_official_forward():
    sd, cfg, tok, gen, embeds = _setup()
    tags = ["dog | grass", "cat"]
    ids, _ = tok.encode_captions(CAPTIONS[:1] * 2)
    states = gen.encode_tags(embeds, tags)
    ours, _ = gen.text_decoder(ids, states)
    ref = _official_decoder_logits(sd, cfg, tok, embeds, tags, ids)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_greedy_decoding_with_cache_equals_the_uncached_reference_loop():
    sd, cfg, tok, gen, embeds = _setup()
    tags = ["dog | grass", "star | sea"]
    out = gen.generate(embeds, tags, num_beams=1, min_length=6, max_length=14)
    for b in range(2):
        ids = torch.tensor([tok.prompt_ids(gen.prompt)])
        while ids.shape[1] < 14:
            logits = _official_decoder_logits(sd, cfg, tok, embeds[b:b + 1], tags[b:b + 1], ids)[0, -1]
            if ids.shape[1] < 6:
                logits[tok.sep_id] = float("-inf")
            nxt = int(logits.argmax())
            if nxt == tok.sep_id:
                break
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
        assert out[b] == tok.decode(ids[0].tolist())[len(gen.prompt):]


def test_beam_search_is_deterministic_and_respects_lengths_and_prompt():
    sd, cfg, tok, gen, embeds = _setup()
    tags = ["dog | grass", "cat"]
    a = gen.generate(embeds, tags)
    assert a == gen.generate(embeds, tags)
    # lengths, checked on the raw sequences: prompt kept, min 10 and max 30 tokens counted with it
    prompt = torch.tensor([tok.prompt_ids(gen.prompt)] * 2)

    def step(ids, caches, offset):
        logits = torch.zeros(ids.shape[0], 100)
        logits[:, tok.sep_id] = 5.0  # eos is the favourite from the start
        logits[:, 50] = 1.0
        return logits, [(torch.zeros(ids.shape[0], 1, 1, 1),) * 2]

    seqs = beam_search(step, prompt, 3, 10, 30, tok.sep_id, tok.pad_id)
    n = prompt.shape[1]
    assert all(s.shape[0] == 10 and s[:n].tolist() == prompt[0].tolist() for s in seqs)  # eos as soon as allowed
    seqs = beam_search(step, prompt, 3, 40, 30, tok.sep_id, tok.pad_id)
    assert all(s.shape[0] == 30 for s in seqs)  # eos never allowed: cut at max_length
