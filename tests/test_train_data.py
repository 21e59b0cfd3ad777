"""Training data: shards from the synthetic generator and hand-made corrupt shards, brace
patterns, the official JSON annotation format, rank/worker splits, transforms and counted skips."""

from __future__ import annotations

import io
import json

import pytest
import torch
import webdataset as wds
from PIL import Image

from ramcli.errors import RamcliError
from ramcli_train import synth
from ramcli_train.annotations import AnnotationDataset
from ramcli_train.data import ShardDataset, resolve_shards
from ramcli_train.samples import DataStats, TrainLoader, TransformConfig

EVAL = TransformConfig(size=32, train=False)




@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    synth.write_shards(out, samples=24, shards=4, seed=2, size=40)
    return out


def _jpeg(colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), colour).save(buf, format="JPEG")
    return buf.getvalue()


def _write_tar(path, samples):
    with wds.TarWriter(str(path), mtime=0) as sink:
        for sample in samples:
            sink.write(sample)


def _samples(dataset):
    return [s for s in dataset if not isinstance(s, DataStats)]


def test_synth_shards_give_union_targets(synth_dir, parser, labels):
    loader = TrainLoader(ShardDataset(synth_dir / "train", parser, EVAL, shuffle=False), batch_size=8)
    batches = list(loader)
    assert sum(len(b) for b in batches) == 24
    assert loader.stats.used == 24 and loader.stats.skipped == 0
    batch = batches[0]
    assert batch.images.shape == (8, 3, 32, 32) and batch.tags.shape == (8, len(labels))
    assert batch.images_clip is None
    # tags = the true tags of the JSON; parsed tags of the caption are a subset of them
    assert torch.all(batch.parse_tags <= batch.tags)
    for key, tags in zip(batch.keys, batch.tags):
        index = int(key[len("train"):])
        scene, _ = synth.sample(2, "train", index, 40)
        assert {labels.names[i] for i in tags.nonzero().flatten().tolist()} == set(scene.tags)


def test_brace_pattern_list_and_single_file(synth_dir):
    pattern = str(synth_dir / "train" / "{00000..00003}.tar")
    assert resolve_shards(pattern) == resolve_shards(synth_dir / "train")
    listed = [synth_dir / "train" / "00000.tar", str(synth_dir / "val")]
    assert len(resolve_shards(listed)) == 2
    with pytest.raises(RamcliError, match=r"1 of 5 shards .* missing"):
        resolve_shards(str(synth_dir / "train" / "{00000..00004}.tar"))


@pytest.mark.parametrize("source", ["", [], "/nonexistent/shards"])
def test_missing_or_empty_source_is_one_line_error(source, parser):
    with pytest.raises(RamcliError) as exc:
        ShardDataset(source, parser, EVAL)
    assert "\n" not in str(exc.value)


def test_empty_folder_and_hint_for_split_folders(tmp_path, synth_dir, parser):
    with pytest.raises(RamcliError, match="no .tar shards"):
        ShardDataset(tmp_path, parser, EVAL)
    with pytest.raises(RamcliError, match="sub-folders with shards: train, val"):
        ShardDataset(synth_dir, parser, EVAL)


def test_two_ranks_cover_everything_once(synth_dir, parser):
    keys = []
    for rank in (0, 1):
        dataset = ShardDataset(synth_dir / "train", parser, EVAL, rank=rank, world_size=2, seed=9)
        dataset.set_epoch(3)
        keys.append({s.key for s in _samples(dataset)})
    assert not keys[0] & keys[1]
    assert len(keys[0] | keys[1]) == 24 and keys[0] and keys[1]


@pytest.mark.slow
def test_workers_split_shards_and_report_skips(tmp_path, synth_dir, parser):
    shards = sorted((synth_dir / "train").glob("*.tar"))
    bad = tmp_path / "bad.tar"
    _write_tar(bad, [{"__key__": f"b{i}", "jpg": b"not a jpeg", "txt": b"a dog"} for i in range(3)])
    dataset = ShardDataset([*shards, bad], parser, EVAL, shuffle=False)
    loader = TrainLoader(dataset, batch_size=5, num_workers=2)
    keys = [k for batch in loader for k in batch.keys]
    assert len(keys) == len(set(keys)) == 24
    assert loader.stats.undecodable_image == 3 and loader.stats.seen == 27


def test_corrupt_samples_are_skipped_and_counted(tmp_path, parser, labels):
    shard = tmp_path / "mixed.tar"
    good = {"__key__": "good", "jpg": _jpeg(), "txt": b"a red dog on the grass"}
    _write_tar(
        shard,
        [
            good,
            {"__key__": "badjpg", "jpg": _jpeg()[:50], "txt": b"a dog"},
            {"__key__": "nocap", "jpg": _jpeg()},
            {"__key__": "noimg", "txt": b"a dog"},
            {"__key__": "unknown", "png": _jpeg(), "txt": b"qwzx blorf"},
            {"__key__": "badids", "jpg": _jpeg(), "json": json.dumps({"caption": "a dog", "tag_ids": [99999]}).encode()},
            {"__key__": "badjson", "jpg": _jpeg(), "json": b"{not json"},
            {"__key__": "names", "webp": _webp(), "json": json.dumps({"caption": ["x"], "tags": ["cat", "flurb"]}).encode()},
            {"__key__": "ids", "jpg": _jpeg(), "json": json.dumps({"tag_ids": [5, 7]}).encode()},
        ],
    )
    loader = TrainLoader(ShardDataset(shard, parser, EVAL, shuffle=False), batch_size=4)
    batches = list(loader)
    keys = [k for b in batches for k in b.keys]
    assert keys == ["good", "names", "ids"]
    s = loader.stats
    assert (s.seen, s.used, s.undecodable_image, s.no_caption, s.no_image, s.no_tags, s.bad_tag_ids, s.bad_metadata) == (
        9, 3, 1, 1, 1, 1, 1, 1,
    )
    assert s.unknown_tag_names == 1
    assert "used 3 of 9 samples; skipped 6" in s.summary()
    by_key = {k: t for b in batches for k, t in zip(b.keys, b.tags)}
    assert by_key["names"].nonzero().flatten().tolist() == [labels.names.index("cat")]
    assert by_key["ids"].nonzero().flatten().tolist() == [5, 7]
    good_tags = {labels.names[i] for i in by_key["good"].nonzero().flatten().tolist()}
    assert good_tags == {"red", "dog", "grass"}
    assert batches[0].captions[0] == "a red dog on the grass"


def test_removed_tags_leave_the_union_and_the_parsed_tags(tmp_path, parser, labels):
    """`ramcli engine clean` writes KEY.json `removed_tags`; the caption still names them."""
    meta = {"caption": "a red dog on the grass with a cat", "tags": ["dog", "cat"], "removed_tags": ["cat", "red"]}
    _write_tar(
        tmp_path / "cleaned.tar",
        [
            {"__key__": "cleaned", "jpg": _jpeg(), "json": json.dumps(meta).encode()},
            {"__key__": "all_removed", "jpg": _jpeg(), "json": json.dumps({"caption": "a cat", "removed_tags": ["cat"]}).encode()},
            {"__key__": "bad_list", "jpg": _jpeg(), "json": json.dumps({"caption": "a cat", "removed_tags": "cat"}).encode()},
        ],
    )
    loader = TrainLoader(ShardDataset(tmp_path / "cleaned.tar", parser, EVAL, shuffle=False), batch_size=4)
    (batch,) = list(loader)
    assert batch.keys == ["cleaned"]
    names = lambda row: {labels.names[i] for i in row.nonzero().flatten().tolist()}  # noqa: E731
    assert names(batch.tags[0]) == {"dog", "grass"}
    assert names(batch.parse_tags[0]) == {"dog", "grass"}
    assert (loader.stats.no_tags, loader.stats.bad_metadata) == (1, 1)


def _webp() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), (0, 0, 200)).save(buf, format="WEBP")
    return buf.getvalue()


def test_unreadable_shard_is_counted_and_epoch_without_samples_errors(tmp_path, parser):
    broken = tmp_path / "broken.tar"
    broken.write_bytes(b"this is not a tar file" * 100)
    no_captions = tmp_path / "nocaptions.tar"
    _write_tar(no_captions, [{"__key__": "a", "jpg": _jpeg()}, {"__key__": "b", "jpg": _jpeg()}])
    loader = TrainLoader(ShardDataset([broken, no_captions], parser, EVAL, shuffle=False), batch_size=2)
    with pytest.raises(RamcliError, match=r"no usable training sample: used 0 of 2 samples; skipped 2 \(no_caption 2\); 1 unreadable shard"):
        list(loader)


def test_more_ranks_than_shards_is_an_error(synth_dir, parser):
    with pytest.raises(RamcliError, match="cannot be split across 8 ranks"):
        ShardDataset(synth_dir / "train", parser, EVAL, rank=0, world_size=8)


def _annotations(tmp_path, n=6):
    images = tmp_path / "images"
    images.mkdir()
    items = []
    for i in range(n):
        Image.new("RGB", (24, 24), (i * 40, 10, 10)).save(images / f"{i}.jpg")
        items.append(
            {"image_path": f"images/{i}.jpg", "caption": [f"caption {i} a dog", "a cat"], "parse_label_id": [[1], [2]], "union_label_id": [1, 2, 3]}
        )
    return items


def test_official_json_format(tmp_path):
    items = _annotations(tmp_path)
    items += [
        {"image_path": "images/missing.jpg", "caption": ["x"], "parse_label_id": [[1]], "union_label_id": [1]},
        {"image_path": "images/0.jpg", "caption": ["x"], "parse_label_id": [[1]], "union_label_id": [9999]},
        {"image_path": "../outside.jpg", "caption": ["x"], "parse_label_id": [[1]], "union_label_id": [1]},
        {"caption": ["no image path"]},
    ]
    ann = tmp_path / "coco_train.json"
    ann.write_text(json.dumps(items))
    dataset = AnnotationDataset(ann, num_classes=10, transform=TransformConfig(size=16, train=False, clip_view="same"), shuffle=False)
    loader = TrainLoader(dataset, batch_size=4)
    batches = list(loader)
    assert sum(len(b) for b in batches) == 6
    batch = batches[0]
    assert batch.images.shape == (4, 3, 16, 16) and batch.images_clip.shape == (4, 3, 224, 224)
    assert batch.tags[0].nonzero().flatten().tolist() == [1, 2, 3]
    for caption, parse in zip(batch.captions, batch.parse_tags):
        assert parse.nonzero().flatten().tolist() == ([2] if caption == "a cat" else [1])
    s = loader.stats
    assert (s.missing_image, s.bad_tag_ids, s.bad_metadata, s.used) == (1, 1, 2, 6)


def test_json_parses_captions_when_ids_are_missing(tmp_path, parser, labels):
    items = _annotations(tmp_path, n=1)
    del items[0]["parse_label_id"], items[0]["union_label_id"]
    ann = tmp_path / "a.json"
    ann.write_text(json.dumps(items))
    dataset = AnnotationDataset(ann, num_classes=len(labels), parser=parser, transform=EVAL, shuffle=False)
    (sample,) = _samples(dataset)
    assert {labels.names[i] for i in sample.tags.nonzero().flatten().tolist()} == {"dog", "cat"}


def test_json_rank_striding_is_disjoint_and_complete(tmp_path):
    ann = tmp_path / "a.json"
    ann.write_text(json.dumps(_annotations(tmp_path, n=7)))
    keys = []
    for rank in (0, 1):
        dataset = AnnotationDataset(ann, num_classes=10, transform=EVAL, rank=rank, world_size=2, seed=1)
        dataset.set_epoch(2)
        keys.append([s.key for s in _samples(dataset)])
    assert not set(keys[0]) & set(keys[1])
    assert sorted(keys[0] + keys[1]) == sorted(f"images/{i}.jpg" for i in range(7))


@pytest.mark.parametrize("content,match", [(None, "not found"), ("{", "not valid JSON"), ('{"a": 1}', "JSON list")])
def test_bad_annotation_file(tmp_path, content, match):
    ann = tmp_path / "a.json"
    if content is not None:
        ann.write_text(content)
    with pytest.raises(RamcliError, match=match):
        AnnotationDataset(ann, num_classes=10)


def test_train_transform_and_normalisation(tmp_path):
    from ramcli_train.samples import SampleTransform

    image = Image.new("RGB", (50, 40), (255, 255, 255))
    main, clip = SampleTransform(TransformConfig(size=32, train=True, clip_view="separate"))(image)
    assert main.shape == (3, 32, 32) and clip.shape == (3, 224, 224)
    white_imagenet = (1 - 0.485) / 0.229
    white_clip = (1 - 0.48145466) / 0.26862954
    plain, _ = SampleTransform(TransformConfig(size=8, train=False))(image)
    assert plain[0].mean().item() == pytest.approx(white_imagenet, abs=1e-4)
    clip_norm, _ = SampleTransform(TransformConfig(size=8, train=False, normalization="clip"))(image)
    assert clip_norm[0].mean().item() == pytest.approx(white_clip, abs=1e-4)
    with pytest.raises(RamcliError):
        TransformConfig(normalization="other")


def test_training_feeds_a_timm_backbone_its_own_data_config(synth_dir):
    """timm's test_resnet is published with mean/std 0.5 and bilinear resizing, resnet10t with
    ImageNet's and bicubic: the training batches and the exported architecture follow each."""
    from ramcli_train.config import resolve
    from ramcli_train.runtime import Runtime
    from ramcli_train.sources import build_loader, resolve_training_labels

    half = resolve("tiny", overrides=dict(data=[str(synth_dir)], backbone="test_resnet", image_size=64))
    arch = half.arch(5)
    assert (arch.mean, arch.std, arch.interpolation) == ((0.5,) * 3, (0.5,) * 3, "bilinear")
    assert resolve("cpu").arch(5).data_config["interpolation"] == "bicubic"
    assert resolve("cpu").arch(5).data_config["mean"] == pytest.approx((0.485, 0.456, 0.406))

    labels = resolve_training_labels(half)
    batch = next(iter(build_loader(half, [str(synth_dir / "val")], labels, Runtime(), train=False)))
    assert batch.images.min() >= -1.0 and batch.images.max() <= 1.0  # (x - 0.5) / 0.5
    imagenet = resolve("tiny", overrides=dict(data=[str(synth_dir)]))  # the tiny Swin: 64 px, ImageNet
    swin_batch = next(iter(build_loader(imagenet, [str(synth_dir / "val")], labels, Runtime(), train=False)))
    # the same pixels under the two normalisations
    assert torch.allclose(swin_batch.images[:, 0] * 0.229 + 0.485, batch.images[:, 0] * 0.5 + 0.5, atol=1e-5)
    assert not torch.allclose(swin_batch.images, batch.images, atol=1e-2)
