"""`ramcli train clip-features` and `distill=precomputed`: CLIP distillation targets computed
once into copies of the shards, read back by the loader, used by the loop."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from clip_fixtures import TINY_CLIP, save_random_clip
from conftest import run_cli

from ramcli.errors import RamcliError, UsageError
from ramcli_train.clip_features import clip_view
from ramcli_train.config import resolve
from ramcli_train.data import ShardDataset
from ramcli_train.samples import TrainLoader, decode_clip_features, decode_image
from ramcli_train.loop import train
from ramcli_train.runtime import Runtime
from ramcli_train.sources import build_loader, resolve_training_labels
from ramcli_train.model import ClipTeacher
from ramcli_train.synth import write_shards


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("clipfeat")
    data = root / "data"
    write_shards(data, samples=24, shards=2, seed=3, val_samples=4, size=64)
    clip = save_random_clip(root / "clip.safetensors", TINY_CLIP)
    return root, data / "train", clip


def _members(shard: Path) -> dict[str, bytes]:
    with tarfile.open(shard) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar}


def _digest(folder: Path) -> str:
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(folder.glob("*.tar")))).hexdigest()


def test_cli_writes_each_samples_teacher_feature_and_resumes(world, tmp_path, capsys):
    root, data, clip = world
    before = _digest(data)
    out = tmp_path / "with_clip"
    args = ["train", "clip-features", "--data", str(data), "--out", str(out), "--clip-model", "tiny",
            "--clip-weights", str(clip), "--batch-size", "5", "--device", "cpu"]
    assert run_cli(args) == 0
    assert "12 of 12 samples with a feature" in capsys.readouterr().out
    assert _digest(data) == before  # the input shards are only read

    teacher = ClipTeacher.load(str(clip), "tiny", torch.device("cpu"))
    for shard in sorted(data.glob("*.tar")):
        src, dst = _members(shard), _members(out / shard.name)
        extra = {k for k in dst if k not in src}
        assert {k: v for k, v in dst.items() if k in src} == src  # every member copied unchanged
        keys = sorted({k.split(".", 1)[0] for k in src})
        assert extra == {f"{k}.clip.npy" for k in keys}
        views = torch.stack([clip_view(decode_image(src[f"{k}.jpg"]), teacher.image_size) for k in keys])
        want = teacher(torch.empty(0), views)
        got = torch.stack([decode_clip_features(dst[f"{k}.clip.npy"]) for k in keys])
        torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)  # stored as float16

    stamp = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    assert run_cli(args) == 0
    assert capsys.readouterr().out.count("already written") == 2
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == stamp


def test_no_clip_weights_is_an_error_not_random_targets(world, tmp_path, capsys):
    root, data, clip = world
    code = run_cli(["train", "clip-features", "--data", str(data), "--out", str(tmp_path / "o"), "--clip-model", "tiny",
                    "--clip-weights", str(tmp_path / "missing.safetensors")])
    err = capsys.readouterr().err
    assert code != 0 and "missing.safetensors" in err and "Traceback" not in err
    assert not list((tmp_path / "o").glob("*.tar"))


def test_output_folder_must_differ_from_the_input(world, capsys):
    root, data, clip = world
    code = run_cli(["train", "clip-features", "--data", str(data), "--out", str(data),
                    "--clip-model", "tiny", "--clip-weights", str(clip)])
    err = capsys.readouterr().err
    assert code == 2 and "another folder" in err and "Traceback" not in err


def test_precomputed_distillation_trains_on_the_stored_targets(world, tmp_path):
    root, data, clip = world
    out = tmp_path / "with_clip"
    assert run_cli(["train", "clip-features", "--data", str(data), "--out", str(out), "--clip-model", "tiny",
                    "--clip-weights", str(clip)]) == 0
    cfg = resolve("tiny", overrides=dict(data=[str(out)], out=str(tmp_path / "run"), batch_size=6, max_steps=2,
                                         progress=False, tokenizer_vocab=300, distill="precomputed",
                                         labels=str(data.parent / "tags.txt")))
    labels = resolve_training_labels(cfg)
    batch = next(iter(build_loader(cfg, [str(out)], labels, Runtime(), train=True)))
    stored = {}
    for shard in out.glob("*.tar"):
        stored.update({k.split(".", 1)[0]: decode_clip_features(v) for k, v in _members(shard).items()
                       if k.endswith(".clip.npy")})
    assert torch.equal(batch.clip_features, torch.stack([stored[k] for k in batch.keys]))
    summary = train(cfg)
    assert summary["step"] == 2 and summary["last"]["dis"] > 0  # the L1 distillation term is on


def test_shards_without_features_are_counted_then_refused(world, tmp_path):
    root, data, clip = world
    cfg = resolve("tiny", overrides=dict(data=[str(data)], out=str(tmp_path / "run"), batch_size=6, max_steps=2,
                                         progress=False, tokenizer_vocab=300, distill="precomputed"))
    with pytest.raises(RamcliError, match=r"no usable training sample: .*no_clip_features 24\)"):
        train(cfg)


def test_malformed_features_are_skipped_never_unpickled(tmp_path, parser):
    import webdataset as wds

    def npy(arr) -> bytes:
        buf = io.BytesIO()
        np.save(buf, arr, allow_pickle=True)
        return buf.getvalue()

    from PIL import Image

    img = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(img, format="JPEG")
    bad = {"wrong_shape": npy(np.zeros(7, np.float16)), "object": npy(np.array([{"a": 1}], dtype=object)),
           "not_npy": b"hello", "nan": npy(np.full(512, np.nan, np.float16)), "good": npy(np.ones(512, np.float16))}
    shard = tmp_path / "s.tar"
    with wds.TarWriter(str(shard)) as sink:
        for key, feat in bad.items():
            sink.write({"__key__": key, "jpg": img.getvalue(), "txt": b"a red dog", "clip.npy": feat})
    loader = TrainLoader(ShardDataset(str(shard), parser, clip_features=True, shuffle=False), batch_size=8)
    batches = list(loader)
    assert [k for b in batches for k in b.keys] == ["good"]
    assert loader.stats.no_clip_features == 4
    assert torch.equal(batches[0].clip_features, torch.ones(1, 512))


def test_official_json_with_precomputed_is_a_usage_error(world, tmp_path):
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps([{"image_path": "x.jpg", "caption": ["a dog"]}]))
    cfg = resolve("tiny", overrides=dict(data=[str(ann)], out=str(tmp_path / "run"), distill="precomputed",
                                         labels=str(world[1].parent / "tags.txt")))
    with pytest.raises(UsageError, match="official JSON"):
        build_loader(cfg, [str(ann)], resolve_training_labels(cfg), Runtime(), train=True)
