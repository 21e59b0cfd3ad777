"""CLIP text embeddings: the official prompt ensemble, name normalisation and weight loading."""

from __future__ import annotations

import hashlib

import open_clip
import pytest
import torch
from clip_fixtures import TINY_CLIP, save_random_clip

from ramcli.models import clip_text
from ramcli.errors import RamcliError

#: sha256 of "\n".join(multiple_templates) in the official ram/utils/openset_utils.py (7cb804a).
OFFICIAL_TEMPLATES_SHA256 = "93950afe1b680521d3ec1161d6576ce5288b26acb2263338329674abfb4160a1"
NAMES = ["tram", "Aerial_photography", "apple", "Apple", "Newsagent's shop", "cat/dog", "Dr. Who.", "ice_cream"]


@pytest.fixture(scope="session")
def tiny_clip_file(tmp_path_factory):
    return save_random_clip(tmp_path_factory.mktemp("clip") / "tiny_clip.safetensors", TINY_CLIP)


def official_openset_embedding(model, name: str) -> torch.Tensor:
    """Independent transliteration of the official `build_openset_label_embedding` for one name,
    using a plain open_clip model and `open_clip.tokenize` instead of the `clip` package."""
    article = "an" if name[0] in "aeiou" else "a"
    processed = name.replace("_", " ").replace("/", " or ").lower().rstrip(".")
    texts = [t.format(processed, article=article) for t in clip_text.MULTIPLE_TEMPLATES]
    texts = ["This is " + t if t.startswith("a") or t.startswith("the") else t for t in texts]
    with torch.no_grad():
        emb = model.encode_text(open_clip.tokenize(texts))
    emb = emb / emb.norm(dim=-1, keepdim=True)
    mean = emb.mean(dim=0)
    return mean / mean.norm()


def reference_model(path, config):
    model = open_clip.CLIP(**config)
    from safetensors.torch import load_file

    missing, unexpected = model.load_state_dict(load_file(str(path)), strict=False)
    assert not unexpected and all(k.startswith("visual.") for k in missing)
    return model.eval()


def test_templates_are_the_official_63():
    assert len(clip_text.MULTIPLE_TEMPLATES) == 63
    digest = hashlib.sha256("\n".join(clip_text.MULTIPLE_TEMPLATES).encode()).hexdigest()
    assert digest == OFFICIAL_TEMPLATES_SHA256


def test_name_normalisation_and_prompts():
    assert clip_text.processed_name("Ice_Cream/Gelato.") == "ice cream or gelato"
    assert clip_text.article("apple") == "an" and clip_text.article("Apple") == "a"
    prompts = clip_text.prompts_for("Apple")
    assert prompts[0] == "There is a apple in the scene."
    assert prompts[2] == "This is a photo of a apple in the scene."
    assert prompts[5] == "itap of a apple."
    assert "This is an embroidered apple." in prompts
    assert "This is the toy apple." in prompts
    assert sum(p.startswith("This is ") for p in prompts) == 63 - 5  # 2 "There is", 3 "itap"


def test_template_ensemble_matches_independent_computation(tiny_clip_file):
    encoder = clip_text.load_text_encoder(tiny_clip_file, model_config=TINY_CLIP)
    reference = reference_model(tiny_clip_file, TINY_CLIP)
    ours = torch.stack([clip_text.ensemble(encoder.template_embeddings(n)) for n in NAMES])
    theirs = torch.stack([official_openset_embedding(reference, n) for n in NAMES])
    assert ours.shape == (len(NAMES), 512)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.norm(dim=-1), torch.ones(len(NAMES)))
    # Different names give clearly different queries (the random encoder is not degenerate).
    sims = ours @ ours.T
    assert sims[0, 1] < 0.99


def test_description_embeddings_truncate_like_clip(tiny_clip_file):
    encoder = clip_text.load_text_encoder(tiny_clip_file, model_config=TINY_CLIP)
    reference = reference_model(tiny_clip_file, TINY_CLIP)
    descriptions = ["a photo of a tram.", "A tram runs on rails in a city street. " * 20]
    ours = encoder.description_embeddings(descriptions)
    with torch.no_grad():
        theirs = reference.encode_text(open_clip.tokenize(descriptions))  # truncates, keeps <eot>
    theirs = theirs / theirs.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


def test_long_name_refused(tiny_clip_file):
    encoder = clip_text.load_text_encoder(tiny_clip_file, model_config=TINY_CLIP)
    with pytest.raises(RamcliError, match="too long for CLIP"):
        encoder.template_embeddings("very " * 80 + "long tram")


def test_missing_weights_message(tmp_path, monkeypatch):
    monkeypatch.delenv(clip_text.CLIP_WEIGHTS_ENV, raising=False)
    with pytest.raises(RamcliError, match=r"ramcli models pull clip-vit-b-16.*--clip-weights FILE"):
        clip_text.find_clip_weights(hf_cache_dir=tmp_path)
    with pytest.raises(RamcliError, match="not found \\(--clip-weights\\)"):
        clip_text.find_clip_weights(tmp_path / "nope.safetensors", hf_cache_dir=tmp_path)


def test_weights_found_in_hf_cache_and_env(tmp_path, monkeypatch, tiny_clip_file):
    monkeypatch.delenv(clip_text.CLIP_WEIGHTS_ENV, raising=False)
    repo = tmp_path / ("models--" + clip_text.CLIP_HF_REPO.replace("/", "--"))
    snapshot = repo / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    (snapshot / clip_text.CLIP_HF_FILES[0]).write_bytes(b"x")
    assert clip_text.find_clip_weights(hf_cache_dir=tmp_path) == snapshot / clip_text.CLIP_HF_FILES[0]
    monkeypatch.setenv(clip_text.CLIP_WEIGHTS_ENV, str(tiny_clip_file))
    assert clip_text.find_clip_weights(hf_cache_dir=tmp_path) == tiny_clip_file


def test_bad_weight_files(tmp_path, tiny_clip_file):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(RamcliError, match="cannot read CLIP weights"):
        clip_text.load_text_encoder(garbage, model_config=TINY_CLIP)
    # A tiny checkpoint is not ViT-B/16: the production config refuses it with one line.
    with pytest.raises(RamcliError, match="does not fit CLIP ViT-B/16|is not a CLIP ViT-B/16"):
        clip_text.load_text_encoder(tiny_clip_file)


@pytest.mark.slow
def test_real_vit_b16_architecture_and_quickgelu(tmp_path):
    """The production config is open_clip's ViT-B-16 with QuickGELU, like OpenAI's CLIP.

    open_clip's registry says the 'openai' ViT-B-16 weights are QuickGELU weights; loading them
    into the plain `ViT-B-16` config (nn.GELU) gives different embeddings, which is why ramcli
    uses `ViT-B-16-quickgelu`.
    """
    assert open_clip.get_pretrained_cfg("ViT-B-16", "openai")["quick_gelu"] is True
    config = open_clip.get_model_config(clip_text.CLIP_MODEL_NAME)
    assert config["quick_gelu"] is True and config["text_cfg"]["width"] == 512
    path = save_random_clip(tmp_path / "vit_b16.safetensors", config, text_only=True)
    encoder = clip_text.load_text_encoder(path)
    assert any(isinstance(m, open_clip.transformer.QuickGELU) for m in encoder.model.modules())
    reference = reference_model(path, config)
    for name in ("tram", "Aerial_photography"):
        ours = clip_text.ensemble(encoder.template_embeddings(name))
        torch.testing.assert_close(ours, official_openset_embedding(reference, name), atol=1e-5, rtol=0)
    gelu = reference_model(path, open_clip.get_model_config("ViT-B-16"))
    tram = clip_text.ensemble(encoder.template_embeddings("tram"))
    assert (official_openset_embedding(gelu, "tram") - tram).abs().max() > 1e-3
