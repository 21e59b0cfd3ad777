"""Data engine: generate (through the tagging pipeline) and clean (detector regions, K-Means++
outliers, region check) on synthetic shards with a tiny real RAM model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from ckpt_factory import make_official_checkpoint
from PIL import Image

from ramcli.models import load_any
from ramcli_train.detector import Detection, ModelCropEmbedder
from ramcli_train.engine_clean import clean, outliers
from ramcli_train.engine_generate import generate
from ramcli_train.engine_shards import read_samples
from ramcli_train.label_system import write_label_files
from ramcli_train.synth import ALL_TAGS, COLOURS, write_shards
from ramcli.models.labels import LabelSet


class ColourDetector:
    """Test double: the box around the pixels of a colour tag's colour; other tags: nothing."""

    def detect(self, image: Image.Image, phrases):
        px = np.asarray(image.convert("RGB")).astype(int)
        out = []
        for p in phrases:
            if p not in COLOURS:
                continue
            mask = (np.abs(px - np.array(COLOURS[p])).sum(-1) < 90)
            ys, xs = np.nonzero(mask)
            if len(xs) >= 4:
                out.append(Detection((xs.min(), ys.min(), xs.max() + 1, ys.max() + 1), p, float(mask.mean())))
        return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    write_shards(root / "s", 24, shards=2, seed=5, size=64)
    labels = root / "labels"
    n = len(ALL_TAGS)
    write_label_files(labels, LabelSet(ALL_TAGS, ALL_TAGS, (0.65,) * n))
    ckpt = make_official_checkpoint(root / "ram.pth", "ram_tiny", num_classes=n)
    return root, labels, ckpt


def _samples(folder: Path) -> list[dict]:
    return [s for shard in sorted(folder.glob("*.tar")) for s in read_samples(str(shard))]


def test_generate_adds_pipeline_tags(setup, tmp_path):
    from ramcli.tagging.pipeline import score_files

    root, labels, ckpt = setup
    model = load_any(ckpt, labels_dir=labels)
    report = generate(model, [str(root / "s" / "train")], tmp_path / "gen", device="cpu")
    before, after = _samples(root / "s" / "train"), _samples(tmp_path / "gen")
    assert [s["__key__"] for s in before] == [s["__key__"] for s in after]
    # what `ramcli tag` scores for the same images
    images = tmp_path / "imgs"
    images.mkdir()
    for s in before:
        (images / f"{s['__key__']}.jpg").write_bytes(s["jpg"])
    scored = score_files(model, sorted(images.glob("*.jpg")), device="cpu", workers=0)
    predicted = {p.stem: {ALL_TAGS[i] for i in np.flatnonzero(row > 0.65)} for p, row in zip(scored.paths, scored.scores)}
    added = 0
    for old, new in zip(before, after):
        assert new["jpg"] == old["jpg"] and new["txt"] == old["txt"]
        given, meta = set(json.loads(old["json"])["tags"]), json.loads(new["json"])
        assert set(meta["generated_tags"]) == predicted[old["__key__"]] - given
        assert set(meta["tags"]) == given | predicted[old["__key__"]]
        added += len(meta["generated_tags"])
    assert added > 0 and report["generated"] == added
    assert report["tag_count_after"] - report["tag_count_before"] == added
    assert json.loads((tmp_path / "gen" / "report.json").read_text())["per_tag"]


def test_outliers_are_the_far_points():
    rng = np.random.default_rng(0)
    points = np.concatenate([rng.normal(0, 0.05, (9, 4)), [[5.0, 5.0, 5.0, 5.0]]])
    assert outliers(points, 0.1, clusters=2).tolist() == [9]
    assert outliers(points, 0.0).size == 0


def test_clean_drops_outliers_and_unrecognised(setup, tmp_path):
    root, labels, ckpt = setup
    model = load_any(ckpt, labels_dir=labels)
    report = clean(model, [str(root / "s" / "train")], tmp_path / "clean", ColourDetector(), ModelCropEmbedder(model),
                   outlier_fraction=0.25, clusters=2, device="cpu")
    cats = report["categories"]
    assert set(cats) <= set(COLOURS) | {t for t in ALL_TAGS if t not in COLOURS}
    assert all(c["regions"] == 0 for t, c in cats.items() if t not in COLOURS)  # the detector finds colours only
    assert any(c["regions"] >= 4 and c["outliers"] >= 1 for c in cats.values())
    for c in cats.values():
        assert c["outliers"] == int(c["regions"] * 0.25)
    removed = 0
    for old, new in zip(_samples(root / "s" / "train"), _samples(tmp_path / "clean")):
        meta = json.loads(new["json"])
        gone = set(meta.get("removed_tags", []))
        assert gone <= set(COLOURS) and not gone & set(meta["tags"])
        assert set(meta["tags"]) | gone == set(json.loads(old["json"])["tags"])
        removed += len(gone)
    expected = sum(c["outliers"] + c["not_recognised"] for c in cats.values())
    assert removed == report["removed"] == expected > 0
    assert report["tag_count_before"] - report["tag_count_after"] == removed


def test_cli_generate_and_missing_detector(setup, tmp_path, capsys):
    from ramcli.cli.app import main

    root, labels, ckpt = setup
    out = tmp_path / "gen"
    with pytest.raises(SystemExit) as exc:
        main(["engine", "generate", "--weights", str(ckpt), "--labels", str(labels), "--data",
              str(root / "s" / "val"), "--out", str(out), "--device", "cpu"])
    assert exc.value.code == 0
    assert (out / "report.json").is_file() and list(out.glob("*.tar"))
    with pytest.raises(SystemExit) as exc:
        main(["engine", "clean", "--weights", str(ckpt), "--labels", str(labels), "--data", str(root / "s" / "val"),
              "--out", str(tmp_path / "c"), "--detector-model", str(tmp_path / "no-such-model"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert exc.value.code == 1 and "Grounding DINO" in err and "Traceback" not in err


def test_ray_usage_errors_come_before_the_model(tmp_path, capsys, monkeypatch):
    """`--ray` without Ray names the extra to install, and `generate --ray --captioner` is
    refused: one line each, exit 2, before the (here missing) weights are looked at."""
    from ramcli.cli.app import main

    missing = str(tmp_path / "missing.pth")
    args = ["--weights", missing, "--data", str(tmp_path), "--out", str(tmp_path / "out"), "--ray"]
    with pytest.raises(SystemExit) as exc:
        main(["engine", "generate", *args, "--captioner", missing])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --ray does not generate captions yet: run --captioner locally"]
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as if it were not installed
    for command in ("generate", "clean"):
        with pytest.raises(SystemExit) as exc:
            main(["engine", command, *args])
        assert exc.value.code == 2
        assert capsys.readouterr().err.strip().splitlines() == ["error: --ray needs Ray: pip install 'ramcli[ray]'"]


def test_generated_tags_are_the_tags_tag_emits(setup):
    """The engine decides with the tagger's policy: its active classes (deleted tags never) and
    thresholds (per class, or one for all), on the same scores, in label order."""
    import torch

    from ramcli.models.configs import get_arch
    from ramcli.models.ram import RecognitionModel
    from ramcli.tagging.decision import class_policy
    from ramcli.tagging.tagger import Tagger
    from ramcli_train.engine_generate import _decide

    arch = get_arch("ram_tiny")
    n = arch.num_classes
    names = tuple(f"t{i}" for i in range(n))
    thresholds = tuple(float(t) for t in np.linspace(0.2, 0.8, n))
    model = RecognitionModel(arch, LabelSet(names, names, thresholds, frozenset({1, 3})))
    scores = np.random.default_rng(0).random((8, n), dtype=np.float32)
    for threshold in (None, 0.5):
        tagger = Tagger(model, torch.device("cpu"), threshold=threshold)
        policy = class_policy(model.labels, threshold)
        for row in scores:
            tags = _decide(model, policy, row)
            emitted = tagger.decide(torch.from_numpy(row[tagger.active])[None])[0]
            assert set(tags) == {t.name for t in emitted} and tags == sorted(tags, key=names.index)
            assert "t1" not in tags and "t3" not in tags
