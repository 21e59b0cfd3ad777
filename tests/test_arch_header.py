"""The architecture a converted file's header records (.safetensors, .onnx, .xml): every field is
checked for type and range, and a hostile one is a one-line error that names it."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ramcli.errors import CheckpointError
from ramcli.models.converted import converted_arch
from ramcli.models.configs import ARCHS, ArchConfig

GOOD = json.loads(ARCHS["ram_tiny"].to_json())

HOSTILE = [
    ("image_size", -3, "image_size must be a whole number"),
    ("image_size", 10 ** 9, "image_size must be a whole number"),
    ("image_size", 64.0, "image_size must be a whole number"),
    ("image_size", True, "image_size must be a whole number"),
    ("num_classes", 0, "num_classes must be a whole number"),
    ("num_classes", "30", "num_classes must be a whole number"),
    ("hidden", 10 ** 7, "hidden must be a whole number"),
    ("heads", 0, "heads must be a whole number"),
    ("heads", 7, "hidden must be a multiple of heads"),
    ("layers", 10 ** 6, "layers must be a whole number"),
    ("intermediate", None, "intermediate must be a whole number"),
    ("descriptions_per_class", -1, "descriptions_per_class must be a whole number"),
    ("layer_norm_eps", float("nan"), "layer_norm_eps"),
    ("layer_norm_eps", -1, "layer_norm_eps"),
    ("layer_norm_eps", "1e-12", "layer_norm_eps"),
    ("interpolation", "lanczos\x1b[2J", "interpolation must be"),
    ("mean", [0.5, 0.5], "mean must be three numbers"),
    ("mean", [0.5, 0.5, float("inf")], "mean must be three numbers"),
    ("std", [0.0, 0.2, 0.2], "std must be three numbers"),
    ("std", "0.2", "std must be three numbers"),
    ("family", "../../etc", "family must be one of"),
    ("name", "\x1b]0;owned\x07", "name must be 1 to 200 printable"),
    ("name", 5, "name must be 1 to 200 printable"),
    ("backbone", "resnet18; rm -rf /", "backbone is not a timm model name"),
    ("backbone", ["resnet18"], "backbone is not a timm model name"),
    ("depths", [10 ** 6], "depths must be"),
    ("swin", {"embed_dim": 32}, "swin must hold"),
    ("swin", [1, 2], "swin must hold"),
    ("swin", {"embed_dim": 32, "depths": [2], "num_heads": [5], "window_size": 8}, "swin.num_heads"),
    ("swin", {"embed_dim": -32, "depths": [2], "num_heads": [1], "window_size": 8}, "swin.embed_dim"),
    ("swin", {"embed_dim": 32, "depths": [2], "num_heads": [1], "window_size": 10 ** 9}, "swin.window_size"),
    ("surprise", 1, "unknown field 'surprise'"),
]


def _arch(**changes) -> str:
    return json.dumps({**GOOD, **changes}, allow_nan=True)


def test_every_field_of_a_sound_architecture_round_trips():
    for arch in ARCHS.values():
        assert ArchConfig.from_json(arch.to_json()) == arch


@pytest.mark.parametrize("field, value, message", HOSTILE, ids=[f"{f}={v!r}"[:40] for f, v, _ in HOSTILE])
def test_a_hostile_field_is_a_one_line_error_naming_it(field, value, message):
    with pytest.raises(CheckpointError) as caught:
        converted_arch({"arch": _arch(**{field: value})}, "model.safetensors")
    text = str(caught.value)
    assert message in text and text.startswith("model.safetensors: damaged ramcli header (arch: ")
    assert "\n" not in text and "\x1b" not in text and "\x07" not in text


def test_a_missing_field_is_named():
    data = dict(GOOD)
    del data["num_classes"]
    with pytest.raises(CheckpointError, match=r"\(arch: no num_classes\)"):
        converted_arch({"arch": json.dumps(data)}, "m.onnx")


JSON = st.recursive(st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
                    max_leaves=10)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(field=st.sampled_from(sorted(GOOD) + ["swin", "extra"]), value=JSON)
def test_any_value_in_any_field_is_a_sound_architecture_or_one_error(field, value):
    try:
        arch = converted_arch({"arch": _arch(**{field: value})}, "m.xml")
    except CheckpointError as exc:
        assert "\n" not in str(exc) and "damaged ramcli header" in str(exc)
        return
    assert 16 <= arch.image_size <= 4096 and 1 <= arch.num_classes <= 200_000 and arch.hidden % arch.heads == 0
    assert arch.family in ("ram", "ram_plus", "tag2text") and arch.interpolation in ("bilinear", "bicubic")
    assert ArchConfig.from_json(arch.to_json()) == arch
