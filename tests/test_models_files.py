"""Every published file loads, whatever it carries: family inference, wrappers, prefixes, extra and
missing tensors, labels a file brings, bad files, reduced-precision files, verify-once downloads."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from ckpt_factory import LAYOUTS, arch_config, make_labels_dir, official_state_dict, save_variant
from images import photo_like
from official_reference import official_logits
from ramcli.cli.app import app
from ramcli.errors import CheckpointError, RamcliError
from ramcli.models.labels import official_dir, read_label_dir
from ramcli.models import convert, load_any, load_model
from ramcli.models import registry
from ramcli.models.configs import infer_arch, infer_family

N = 40  # classes of the small variants
OFFICIAL = 4585  # classes of the shipped RAM/RAM++ label files


def _images(seed: int = 0, n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def ram_plus_like_the_issue(tmp_path_factory) -> tuple[Path, dict]:
    """A RAM++ file for the official 4,585 tags without `reweight_scale` and with an unused CLIP
    `logit_scale`, as a file re-saved by another tool may be (3 descriptions per tag keep it small)."""
    sd = official_state_dict("ram_plus_tiny", num_classes=OFFICIAL, des_per_class=3)
    path = save_variant(tmp_path_factory.mktemp("rpp") / "ram_plus_variant.pth", sd, drop=("reweight_scale",),
                        extra={"logit_scale": torch.tensor(4.6052)})
    return path, {k: v for k, v in sd.items() if k != "reweight_scale"}


def test_ram_plus_without_reweight_scale_loads_with_the_official_initial_value(ram_plus_like_the_issue):
    path, sd = ram_plus_like_the_issue
    model = load_any(path)  # the shipped official labels: 4,585 classes
    assert model.arch.family == "ram_plus" and model.arch.descriptions_per_class == 3
    assert model.num_classes == OFFICIAL and model.labels.names[0] == "3D CG rendering"
    assert model.reweight_scale.item() == pytest.approx(math.log(1 / 0.07), rel=1e-7)
    assert model.ignored_keys == ("logit_scale",) and model.defaulted_keys == ("reweight_scale",)
    x = _images()
    with torch.no_grad():
        ours = model(x)
        reference = official_logits(sd, arch_config("ram_plus_tiny", OFFICIAL, 3), x)
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=0)


def test_models_info_lists_ignored_and_defaulted_tensors(ram_plus_like_the_issue, tmp_path):
    res = CliRunner().invoke(app, ["models", "info", str(ram_plus_like_the_issue[0])],
                             env={"RAMCLI_HOME": str(tmp_path)})
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["family"] == "ram_plus" and info["classes"] == OFFICIAL
    assert info["ignored_keys"] == ["logit_scale"] and info["defaulted_keys"] == ["reweight_scale"]
    assert info["data_config"]["input_size"] == [3, 64, 64] and info["data_config"]["interpolation"] == "bilinear"
    # a converted file keeps the record of what its source held
    dst = convert(ram_plus_like_the_issue[0], tmp_path / "c.safetensors")
    info = json.loads(CliRunner().invoke(app, ["models", "info", str(dst)], env={"RAMCLI_HOME": str(tmp_path)}).stdout)
    assert info["source_ignored_keys"] == ["logit_scale"] and info["family"] == "ram_plus"


def test_full_size_family_is_inferred_from_the_label_table_alone():
    """The published RAM++ layout (4,585 x 51 rows) without reweight_scale: RAM++, with or
    without a label list; RAM's one row per tag and caption branch: RAM."""
    rpp = official_state_dict("ram_plus_swin_large_384", meta=True)
    del rpp["reweight_scale"]
    rpp["logit_scale"] = torch.zeros(())
    assert rpp["label_embed"].shape[0] == 233835
    for classes in (None, OFFICIAL):
        assert infer_family(rpp, num_classes=classes) == "ram_plus"
        arch = infer_arch(rpp, num_classes=classes)
        assert arch.name == "ram_plus_swin_large_384" and arch.descriptions_per_class == 51
    ram = official_state_dict("ram_swin_large_384", meta=True)
    assert infer_family(ram) == infer_family(ram, num_classes=OFFICIAL) == "ram"
    # a verified published file's family decides where the tensors alone could not
    small = official_state_dict("ram_plus_tiny", num_classes=N, des_per_class=3, meta=True)
    del small["reweight_scale"]
    assert infer_family(small) == "ram" and infer_family(small, known="ram_plus") == "ram_plus"


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> dict[str, tuple[dict, Path, torch.Tensor]]:
    """Per family: the official state dict, its labels folder, and the logits of the plain file."""
    root = tmp_path_factory.mktemp("plain")
    out = {}
    for arch in ("ram_tiny", "ram_plus_tiny", "tag2text_tiny"):
        family = "tag2text" if arch.startswith("tag2text") else "ram"
        sd = official_state_dict(arch, num_classes=N, des_per_class=3)
        labels = make_labels_dir(root, N, family)
        with torch.no_grad():
            logits = load_any(save_variant(root / f"{arch}.pth", sd), labels_dir=labels)(_images(1))
        out[arch] = (sd, labels, logits)
    return out


@pytest.mark.parametrize("arch", ["ram_tiny", "ram_plus_tiny", "tag2text_tiny"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_wrappers_prefixes_and_optimizer_state_give_the_same_model(plain, tmp_path, arch, layout):
    sd, labels, expected = plain[arch]
    prefix = "module." if layout in ("model", "nested") else ""
    path = save_variant(tmp_path / "v.pth", sd, layout=layout, key_prefix=prefix, optimizer_state=True)
    model = load_any(path, labels_dir=labels)
    assert model.arch.name == arch and model.ignored_keys == ()
    with torch.no_grad():
        torch.testing.assert_close(model(_images(1)), expected, atol=0, rtol=0)


def test_a_file_with_no_state_dict_names_where_it_looked(tmp_path):
    path = tmp_path / "x.pth"
    torch.save({"epoch": 3, "config": {"lr": 1}}, path)
    with pytest.raises(CheckpointError, match="holds no state dict of tensors"):
        load_any(path)


# ----------------------------------------------------------------------------- labels a file carries


def test_a_file_with_its_own_labels_ignores_ramcli_labels(tmp_path, monkeypatch):
    own = make_labels_dir(tmp_path, 22)
    small = official_state_dict("ram_tiny", num_classes=22)
    exported = convert(save_variant(tmp_path / "s.pth", small), tmp_path / "model.safetensors", labels_dir=own)
    monkeypatch.setenv("RAMCLI_LABELS", str(official_dir()))  # set for the official models
    assert len(load_any(exported).labels) == 22
    assert load_any(exported).labels == read_label_dir(own, "ram")
    assert len(load_any(save_variant(tmp_path / "o.pth", official_state_dict("ram_tiny", num_classes=OFFICIAL))).labels) == OFFICIAL
    with pytest.raises(CheckpointError, match="22 classes but the labels list 4585"):
        load_any(exported, labels_dir=official_dir())  # only an explicit --labels overrides
    photo = tmp_path / "p.jpg"
    photo_like(96, 64).save(photo)
    res = _tag([str(photo), "--weights", str(exported), "--threshold", "0"], tmp_path / "home")
    assert res.exit_code == 0, res.output
    assert {t["name"] for t in json.loads(res.stdout)["tags"]} == set(read_label_dir(own, "ram").names)


# ----------------------------------------------------------------------------- bad files, one line


def _tag(args: list[str], home: Path):
    return CliRunner().invoke(app, ["tag", *args, "--no-write", "--no-index", "--workers", "0", "-q", "-f", "jsonl"],
                              env={"RAMCLI_HOME": str(home)})


def _tag_as_user(args: list[str], home: Path) -> subprocess.CompletedProcess:
    """The real entry point in a process of its own: what a user sees, exit code included."""
    return subprocess.run([sys.executable, "-m", "ramcli", "tag", *args, "--no-write", "--no-index", "--workers", "0"],
                          env={**os.environ, "RAMCLI_HOME": str(home)}, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("name, content, reason", [
    ("empty.pth", b"", "empty file"),
    ("garbage.pth", bytes(range(256)) * 4, "not a PyTorch checkpoint"),
    ("garbage.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + b"\x00" * 64, "not a valid safetensors file"),
    ("noise.safetensors", bytes(reversed(range(256))) * 4, "not a valid safetensors file"),
])
def test_bad_weights_are_one_line_errors(tmp_path, name, content, reason):
    bad = tmp_path / name
    bad.write_bytes(content)
    photo = tmp_path / "p.jpg"
    photo_like(96, 64).save(photo)
    res = _tag_as_user([str(photo), "--weights", str(bad)], tmp_path / "home")
    assert res.returncode == 1
    assert reason in res.stderr and name in res.stderr and not res.stdout
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_damaged_tensor_data_in_a_converted_file_is_one_line(plain, tmp_path):
    sd, labels, _ = plain["ram_tiny"]
    good = convert(save_variant(tmp_path / "a.pth", sd), tmp_path / "a.safetensors", labels_dir=labels)
    data = good.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 4096])
    with pytest.raises(RamcliError, match="cut.safetensors"):
        load_any(tmp_path / "cut.safetensors")


@pytest.mark.parametrize("precision", ["auto", "fp32"])
def test_a_bf16_file_tags_on_the_cpu_like_its_fp32_source(plain, tmp_path, precision):
    sd, labels, _ = plain["ram_tiny"]
    src = save_variant(tmp_path / "a.pth", sd)
    low = convert(src, tmp_path / "bf16.safetensors", dtype="bf16", labels_dir=labels)
    assert next(load_any(low).parameters()).dtype == torch.float32  # upcast for an fp32 run
    photos = []
    for i in range(3):
        photos.append(tmp_path / f"p{i}.jpg")
        photo_like(96, 64, seed=i).save(photos[-1])
    res = _tag([*map(str, photos), "--weights", str(low), "--precision", precision, "--device", "cpu"], tmp_path / "h")
    assert res.exit_code == 0, res.output
    ref = _tag([*map(str, photos), "--weights", str(src), "--labels", str(labels), "--device", "cpu"], tmp_path / "h2")
    got = [{t["name"] for t in json.loads(line)["tags"]} for line in res.stdout.splitlines()]
    want = [{t["name"] for t in json.loads(line)["tags"]} for line in ref.stdout.splitlines()]
    same = sum(len(a & b) for a, b in zip(got, want)) / max(1, sum(len(a | b) for a, b in zip(got, want)))
    assert len(got) == 3 and same > 0.9


def test_threshold_file_with_nan_is_a_usage_error_in_tag(plain, tmp_path):
    sd, labels, _ = plain["ram_tiny"]
    src = save_variant(tmp_path / "a.pth", sd)
    photo = tmp_path / "p.jpg"
    photo_like(96, 64).save(photo)
    thresholds = tmp_path / "t.txt"
    thresholds.write_text("0.5\n" * (N - 1) + "nan\n", encoding="utf-8")
    res = _tag_as_user([str(photo), "--weights", str(src), "--labels", str(labels), "--threshold-file", str(thresholds)],
                       tmp_path / "h")
    assert res.returncode == 2 and f"line {N}" in res.stderr and "Traceback" not in res.stderr


# ----------------------------------------------------------------------------- hostile metadata


@pytest.fixture(scope="module")
def converted(plain, tmp_path_factory) -> Path:
    sd, labels, _ = plain["ram_tiny"]
    root = tmp_path_factory.mktemp("converted")
    return convert(save_variant(root / "a.pth", sd), root / "a.safetensors", labels_dir=labels)


def _with_header(src: Path, dst: Path, **values: str) -> Path:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(dst), metadata={**meta, **values})
    return dst


@pytest.mark.parametrize("key, value, message", [
    ("labels.thresholds", json.dumps([-1.0] * N), "threshold -1.0 is not a number from 0 to 1"),
    ("labels.thresholds", json.dumps([0.5] * (N - 1) + [float("nan")]), "threshold nan"),
    ("labels.thresholds", json.dumps([True] * N), "threshold True"),
    ("labels.names", json.dumps([{"a": 1}] * N), "is not text"),
    ("labels.names", json.dumps(["\x1b[2J\x1b]0;owned\x07"] * N), "control characters"),
    ("labels.names_zh", json.dumps(["\u202eevil"] * N), "control characters"),
    ("labels.deleted", json.dumps([N + 5]), "is not a label number"),
    ("labels.names", "[not json", "not JSON"),
    ("model_id", "x\x1b[31m", "model_id"),
    ("arch", "null", "damaged ramcli header"),
])
def test_hostile_label_metadata_in_a_converted_file_is_one_line(converted, tmp_path, key, value, message):
    bad = _with_header(converted, tmp_path / "bad.safetensors", **{key: value})
    photo = tmp_path / "p.jpg"
    photo_like(96, 64).save(photo)
    res = _tag_as_user([str(photo), "--weights", str(bad)], tmp_path / "home")
    assert res.returncode == 1 and message in res.stderr and "bad.safetensors" in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and not res.stdout
    assert "\x1b" not in res.stderr and "\u202e" not in res.stderr


def _plain(text) -> bool:
    """Text with nothing a terminal acts on: no control characters, no format characters other
    than the zero-width joiners, no lone surrogates, no line or paragraph separators."""
    import unicodedata

    return isinstance(text, str) and not any(
        unicodedata.category(c) in ("Cc", "Cs", "Zl", "Zp") or (unicodedata.category(c) == "Cf" and c not in "\u200c\u200d")
        for c in text)


JSON = st.recursive(st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
                    max_leaves=8)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_header_loads_as_a_sound_model_or_is_refused(converted, tmp_path, data):
    """Any value in any field a converted file's header carries: the file loads with a label system
    that passes the threshold rule and plain-text names, or it is one CheckpointError."""
    from ramcli.tagging.decision import is_threshold

    key = data.draw(st.sampled_from(["labels.names", "labels.names_zh", "labels.thresholds", "labels.deleted",
                                     "model_id", "arch"]))
    value = data.draw(st.one_of(JSON.map(json.dumps), st.lists(JSON, min_size=N, max_size=N).map(json.dumps),
                                st.text(max_size=20)))
    bad = _with_header(converted, tmp_path / "hostile.safetensors", **{key: value})
    try:
        model = load_any(bad)
    except CheckpointError:
        return
    assert len(model.labels) == N and all(is_threshold(t) for t in model.labels.thresholds)
    assert all(_plain(n) for n in model.labels.names + model.labels.names_zh)
    assert _plain(model.model_id)


# ----------------------------------------------------------------------------- verify once


def _fake_hub_cache(cache: Path, p: registry.Published, data: bytes) -> Path:
    """A hub cache holding `p` as huggingface_hub lays it out: a blob named by its SHA-256."""
    repo = cache / f"models--{p.repo_id.replace('/', '--')}"
    blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True)
    blob.write_bytes(data)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    snapshot = repo / "snapshots" / ("0" * 40) / p.filename
    snapshot.parent.mkdir(parents=True)
    snapshot.symlink_to(blob)
    return snapshot


def test_a_download_is_verified_once_then_used_without_hashing_or_network(tmp_path, monkeypatch):
    import huggingface_hub

    p = registry.PUBLISHED["tag2text_swin_14m"]
    cache = tmp_path / "hub"
    local = _fake_hub_cache(cache, p, b"weights" * 1000)
    calls = {"download": 0, "hash": 0}
    real_hash = registry.file_sha256

    def fake_download(*args, **kwargs):  # what the hub would return: the cached file
        calls["download"] += 1
        return str(local)

    def counting_hash(path, *args):
        calls["hash"] += 1
        return real_hash(path, *args)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.setattr(registry, "file_sha256", counting_hash)
    assert registry.download(p, cache_dir=cache) == local
    assert calls == {"download": 1, "hash": 1} and registry.verified_as(local) == p.name
    for _ in range(3):  # later runs (`tag --caption`): no hub, no hash
        assert registry.download(p, cache_dir=cache) == local
    assert calls == {"download": 1, "hash": 1}
    # a changed file is verified again, and a wrong one refused and removed
    local.resolve().write_bytes(b"tampered")
    with pytest.raises(RamcliError, match="checksum mismatch"):
        registry.download(p, cache_dir=cache)
    assert calls["download"] == 2 and not local.exists()


def test_a_verified_published_file_gives_its_family(tmp_path, monkeypatch):
    """A RAM++ file that carries nothing to tell it from RAM loads as RAM++ once it is verified as the published one."""
    sd = official_state_dict("ram_plus_tiny", num_classes=N, des_per_class=3)
    path = save_variant(tmp_path / "ram_plus_swin_large_14m.pth", sd, drop=("reweight_scale",))
    labels = make_labels_dir(tmp_path, N * 3)
    assert load_any(path, labels_dir=labels).arch.family == "ram"  # 120 rows, 120 labels: RAM
    registry.remember_verified(path, "ram_plus_swin_large_14m", "0" * 64)
    model = load_model(path, labels_dir=labels)
    assert model.arch.family == "ram_plus" and model.arch.descriptions_per_class == 1
    path.touch()  # changed since it was verified: the record no longer speaks for it
    assert load_any(path, labels_dir=labels).arch.family == "ram"
