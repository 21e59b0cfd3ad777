"""Model core: official-checkpoint loading, key mapping, fidelity, conversion, failures."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from ckpt_factory import arch_config, make_labels_dir, make_official_checkpoint, official_state_dict
from official_reference import official_logits
from ramcli.errors import CheckpointError
from ramcli.models.labels import read_label_dir
from ramcli.models import convert, load_any
from ramcli.models.checkpoint import map_official
from ramcli.models.converted import load_converted, read_converted_metadata
from ramcli.models.configs import infer_arch
from ramcli.models.ram import RecognitionModel

N = 40  # classes of the tiny test models
ARCHS = [("ram_tiny", "ram"), ("ram_plus_tiny", "ram"), ("tag2text_tiny", "tag2text")]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("ckpts")
    out = {}
    for arch, family in ARCHS:
        path = make_official_checkpoint(root / f"{arch}.pth", arch, num_classes=N, des_per_class=3,
                                        optimizer_state=True)
        out[arch] = (path, make_labels_dir(root, N, family))
    return out


def _images(seed: int = 0, n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", [a for a, _ in ARCHS])
def test_logits_equal_the_official_computation(ckpts, arch):
    path, labels = ckpts[arch]
    model = load_any(path, labels_dir=labels)
    sd = torch.load(path, weights_only=True)["model"]
    x = _images()
    with torch.no_grad():
        ours, ref = model(x), official_logits(sd, arch_config(arch, N, 3), x)
    assert ours.shape == (3, N)
    assert ref.std() > 0.05  # the comparison is not between constants
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", [a for a, _ in ARCHS])
def test_every_tagging_tensor_is_consumed_and_training_parts_are_not(ckpts, arch):
    path, labels = ckpts[arch]
    sd = torch.load(path, weights_only=True)["model"]
    model = load_any(path, labels_dir=labels)
    mapped = map_official(sd, model)
    assert set(mapped) == set(model.state_dict())
    names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    assert not any("tag_encoder" in n or "text_decoder" in n for n in names)
    # the official file carries much more than tagging needs (text encoder/decoder)
    if arch != "ram_plus_tiny":
        assert sum(v.numel() for k, v in sd.items() if k.startswith(("tag_encoder", "text_decoder"))) > 0


def test_arch_is_inferred_from_tensor_shapes(ckpts):
    for arch, family in ARCHS:
        sd = torch.load(ckpts[arch][0], weights_only=True)["model"]
        inferred = infer_arch(sd, num_classes=N)
        assert inferred.name == arch and inferred.num_classes == N
        assert inferred.image_size == 64 and inferred.swin.window_size == 4
    full = official_state_dict("ram_plus_swin_large_384", meta=True)
    arch = infer_arch(full, num_classes=4585)
    assert arch.name == "ram_plus_swin_large_384" and arch.descriptions_per_class == 51
    assert arch.swin.num_heads == (6, 12, 24, 48)


def test_ram_falls_back_to_the_tied_tag_encoder_and_old_vision_multi_names(ckpts, tmp_path):
    path, labels = ckpts["ram_tiny"]
    sd = torch.load(path, weights_only=True)["model"]
    x = _images(1)
    with torch.no_grad():
        expected = load_any(path, labels_dir=labels)(x)
    tied_only = {k: v for k, v in sd.items() if not k.startswith("tagging_head.")}
    renamed = {k.replace("tagging_head.", "vision_multi."): v for k, v in sd.items()}
    for i, variant in enumerate((tied_only, renamed)):
        p = tmp_path / f"v{i}.pth"
        torch.save({"model": variant}, p)
        with torch.no_grad():
            torch.testing.assert_close(load_any(p, labels_dir=labels)(x), expected)


def test_converted_file_gives_the_same_logits_and_carries_its_labels(ckpts, tmp_path, monkeypatch):
    path, labels = ckpts["ram_plus_tiny"]
    dst = convert(path, tmp_path / "tiny.safetensors", labels_dir=labels)
    meta = read_converted_metadata(dst)
    assert meta["format"] == "ramcli-tagger" and "labels.names" in meta
    x = _images(2)
    with torch.no_grad():
        a = load_any(path, labels_dir=labels)(x)
        converted = load_converted(dst)  # no labels given: the embedded ones
        b = converted(x)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert converted.labels == read_label_dir(labels, "ram")
    assert len(converted.labels.names_zh[0]) > 0


def test_a_format_1_converted_file_still_loads(ckpts, tmp_path):
    """Format 1 named the decoder's cross-attention flat: decoder.layers.N.q, attn_out, attn_norm."""
    from safetensors.torch import load_file, save_file

    path, labels = ckpts["ram_tiny"]
    dst = convert(path, tmp_path / "tiny.safetensors", labels_dir=labels)
    meta = dict(read_converted_metadata(dst), format_version="1")
    flat = {"cross_attn.q": "q", "cross_attn.k": "k", "cross_attn.v": "v", "cross_attn.out": "attn_out",
            "cross_attn.norm": "attn_norm"}
    old = {}
    for k, v in load_file(dst).items():
        for ours, legacy in flat.items():
            k = k.replace(f".{ours}.", f".{legacy}.")
        old[k] = v
    assert "decoder.layers.0.attn_out.weight" in old
    save_file(old, tmp_path / "format1.safetensors", metadata=meta)
    x = _images(4, 2)
    with torch.no_grad():
        torch.testing.assert_close(load_converted(tmp_path / "format1.safetensors")(x), load_converted(dst)(x),
                                   atol=0, rtol=0)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_reduced_precision_conversion_keeps_most_decisions(ckpts, tmp_path, dtype):
    path, labels = ckpts["ram_tiny"]
    dst = convert(path, tmp_path / f"tiny-{dtype}.safetensors", dtype=dtype, labels_dir=labels)
    assert dst.stat().st_size < 0.6 * convert(path, tmp_path / "fp32.safetensors", labels_dir=labels).stat().st_size
    x = _images(3, 4)
    with torch.no_grad():
        ref = torch.sigmoid(load_any(path, labels_dir=labels)(x))
        low = torch.sigmoid(load_any(dst, dtype=torch.float32)(x))
    assert (ref - low).abs().max() < 0.05


def test_truncated_checkpoint_is_a_clear_error(ckpts, tmp_path):
    data = ckpts["ram_tiny"][0].read_bytes()
    bad = tmp_path / "truncated.pth"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated|cannot read"):
        load_any(bad, labels_dir=ckpts["ram_tiny"][1])


def test_missing_and_misshaped_tensors_are_named(ckpts, tmp_path):
    path, labels = ckpts["ram_tiny"]
    sd = torch.load(path, weights_only=True)["model"]
    missing = {k: v for k, v in sd.items() if k != "wordvec_proj.bias"}
    torch.save({"model": missing}, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match="wordvec_proj.bias"):
        load_any(tmp_path / "missing.pth", labels_dir=labels)
    shaped = dict(sd)
    shaped["image_proj.weight"] = torch.zeros(512, 7)
    torch.save({"model": shaped}, tmp_path / "shape.pth")
    with pytest.raises(CheckpointError, match=r"image_proj.weight has shape \(512, 7\)"):
        load_any(tmp_path / "shape.pth", labels_dir=labels)


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['RAMCLI_EVIL_MARKER']}",))


def test_a_pickle_that_would_run_code_is_refused(ckpts, tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("RAMCLI_EVIL_MARKER", str(marker))
    evil = tmp_path / "evil.pth"
    torch.save({"model": {"x": torch.zeros(1)}, "payload": _Evil()}, evil)
    with pytest.raises(CheckpointError, match="refusing to load evil.pth"):
        load_any(evil, labels_dir=ckpts["ram_tiny"][1])
    assert not marker.exists()
    legacy = tmp_path / "legacy.pth"  # a plain (non-zip) pickle stream
    legacy.write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(CheckpointError):
        load_any(legacy, labels_dir=ckpts["ram_tiny"][1])
    assert not marker.exists()


def test_label_count_must_match_the_weights(ckpts, tmp_path):
    path, _ = ckpts["ram_tiny"]
    with pytest.raises(CheckpointError, match="40 label rows, which does not fit the 10 classes"):
        load_any(path, labels_dir=make_labels_dir(tmp_path, 10))


def test_ram_plus_batch_reweighting_equals_one_image_at_a_time(ckpts):
    path, labels = ckpts["ram_plus_tiny"]
    model = load_any(path, labels_dir=labels)
    x = _images(4, 5)
    with torch.no_grad():
        batched = model(x)
        single = torch.cat([model(x[i : i + 1]) for i in range(5)])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["ram_tiny", "ram_plus_tiny", "tag2text_tiny"])
def test_restricting_classes_equals_slicing_the_full_output(ckpts, arch):
    path, labels = ckpts[arch]
    model = load_any(path, labels_dir=labels)
    x = _images(5, 2)
    classes = torch.tensor([7, 0, 33, 12])
    with torch.no_grad():
        torch.testing.assert_close(model(x, classes), model(x)[:, classes], atol=1e-5, rtol=0)


def test_custom_queries_with_unequal_description_counts(ckpts):
    """RAM++ custom tags: each tag's descriptions are softmax-weighted on their own."""
    path, labels = ckpts["ram_plus_tiny"]
    model = load_any(path, labels_dir=labels)
    g = torch.Generator().manual_seed(9)
    descs = [torch.nn.functional.normalize(torch.randn(k, 512, generator=g), dim=-1) for k in (1, 4, 2)]
    model.add_label_queries(torch.cat(descs), ["t1", "t2", "t3"], ["t1", "t2", "t3"], [0.5] * 3, [1, 4, 2])
    x = _images(6, 2)
    with torch.no_grad():
        out = model(x)
        emb = model.encode_image(x)
        pooled = torch.nn.functional.normalize(emb[:, 0], dim=-1)
        scale = model.reweight_scale.exp()
        for j, d in enumerate(descs):  # independent computation, one tag and one image at a time
            for b in range(2):
                w = torch.softmax(scale * d @ pooled[b], dim=0)
                query = (w[:, None] * d).sum(0)
                single = torch.relu(model.wordvec_proj(query))[None, None]
                h = model.decoder(single, emb[b : b + 1])
                torch.testing.assert_close(out[b, N + j], model.fc(h).squeeze(), atol=1e-5, rtol=0)
    assert len(model.labels) == N + 3 and model.labels.names[-1] == "t3"


def test_fresh_model_matches_its_converted_roundtrip(tmp_path, labels_dir):
    """A model built from a config (training) saves and loads through the converted format."""
    from ramcli.models.labels import LabelSet
    from ramcli.models.converted import save_converted
    from ramcli.models.configs import ARCHS as REGISTRY

    arch = REGISTRY["ram_tiny"]
    labels = read_label_dir(make_labels_dir(tmp_path, arch.num_classes), "ram")
    torch.manual_seed(0)
    model = RecognitionModel(arch, labels, "fresh").eval()
    dst = save_converted(model, tmp_path / "fresh.safetensors")
    x = _images(7, 2)
    with torch.no_grad():
        torch.testing.assert_close(load_converted(dst)(x), model(x))
    assert isinstance(load_converted(dst).labels, LabelSet)
