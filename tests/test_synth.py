"""Synthetic scenes: determinism, captions consistent with the true tags, real tag names,
shards in the img2dataset layout, and the `ramcli synth` command."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from conftest import run_cli
from ramcli.models.labels import read_label_dir
from ramcli_train import synth




def _members(path):
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_every_synthetic_tag_is_an_official_tag(labels_dir):
    names = set(read_label_dir(labels_dir, "ram").names)
    assert set(synth.ALL_TAGS) <= names


def test_captions_parse_to_a_subset_of_the_true_tags(parser):
    """The parser finds every shape, colour and texture named; negated extras never leak."""
    negations = 0
    for index in range(400):
        scene = synth.make_scene(np.random.default_rng([7, 0, index]))
        found = set(parser.parse(scene.caption).tag_names)
        assert found <= set(scene.tags), scene.caption
        for group in scene.groups:
            named = {group.shape, group.colour} | ({group.texture} if group.texture else set())
            assert named <= found, scene.caption
        negations += any(w in scene.caption.lower().split() for w in ("no", "not"))
    assert negations > 50  # the parser's negation handling is exercised


def test_sample_is_deterministic_and_depends_on_seed():
    a_scene, a_img = synth.sample(3, "train", 5, 64)
    b_scene, b_img = synth.sample(3, "train", 5, 64)
    assert a_scene == b_scene and a_img.tobytes() == b_img.tobytes()
    c_scene, c_img = synth.sample(4, "train", 5, 64)
    assert (c_scene, c_img.tobytes()) != (a_scene, a_img.tobytes())
    assert synth.sample(3, "val", 5, 64)[1].tobytes() != a_img.tobytes()


def test_tags_are_visible_colour_is_drawn():
    """A scene with one red shape has clearly red pixels; the same background alone has none."""
    for index in range(200):
        scene, image = synth.sample(11, "train", index, 96)
        if [g.colour for g in scene.groups] == ["red"] and scene.background in ("sky", "snow", "sea"):
            arr = np.asarray(image).astype(int)
            red = (arr[..., 0] > 150) & (arr[..., 1] < 90) & (arr[..., 2] < 90)
            assert red.sum() > 100
            break
    else:
        pytest.fail("no red single-colour scene found in 200 samples")


def test_write_shards_layout_and_determinism(tmp_path):
    m1 = synth.write_shards(tmp_path / "a", samples=12, shards=3, seed=5, size=48)
    m2 = synth.write_shards(tmp_path / "b", samples=12, shards=3, seed=5, size=48)
    assert m1 == m2
    assert m1["samples"] == {"train": 12, "val": 2}
    assert len(m1["shards"]["train"]) == 3
    for rel in m1["shards"]["train"] + m1["shards"]["val"]:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    files = _members(tmp_path / "a" / m1["shards"]["train"][0])
    keys = sorted({name.rsplit(".", 1)[0] for name in files})
    assert len(keys) == 4
    for key in keys:
        meta = json.loads(files[f"{key}.json"])
        assert meta["caption"] == files[f"{key}.txt"].decode()
        assert set(meta["tags"]) <= set(synth.ALL_TAGS)
        assert Image.open(io.BytesIO(files[f"{key}.jpg"])).size == (48, 48)
    assert (tmp_path / "a" / "tags.txt").read_text().split("\n")[:-1] == list(synth.ALL_TAGS)


def test_train_and_val_differ(tmp_path):
    synth.write_shards(tmp_path, samples=5, shards=1, seed=0, val_samples=5, size=40)
    train = _members(tmp_path / "train" / "00000.tar")
    val = _members(tmp_path / "val" / "00000.tar")
    assert not set(train.values()) & {v for k, v in val.items() if k.endswith(".jpg")}


def test_cli_synth_writes_shards(tmp_path, capsys):
    assert run_cli(["synth", str(tmp_path / "out"), "--samples", "6", "--shards", "2", "--seed", "1", "--size", "40"]) == 0
    assert sorted(p.name for p in (tmp_path / "out" / "train").iterdir()) == ["00000.tar", "00001.tar"]
    assert (tmp_path / "out" / "val" / "00000.tar").is_file()
    assert "wrote 6 training samples" in capsys.readouterr().out


@pytest.mark.parametrize("args", [["--samples", "0"], ["--samples", "3", "--shards", "5"], ["--size", "8"]])
def test_cli_synth_bad_arguments(tmp_path, capsys, args):
    assert run_cli(["synth", str(tmp_path / "o"), *args]) == 2
    assert "Traceback" not in capsys.readouterr().err
