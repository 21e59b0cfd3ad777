"""RAM on any timm backbone, its pretrained-weight lookup, and `ramcli distill` end to end on
tiny models: teacher pass (stored, resumable, embedding cache reused), student training,
agreement, export, then `tag`, `vocab add`, `tag`."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from ckpt_factory import make_labels_dir, make_official_checkpoint
from clip_fixtures import TINY_CLIP, save_random_clip
from click.testing import Result
from images import photo_like
from typer.testing import CliRunner

from ramcli.cli.app import app
from ramcli.errors import CheckpointError, UsageError
from ramcli.tagging.embed_cache import EmbeddingCache
from ramcli.models import load_any, load_model
from ramcli.models.converted import save_converted
from ramcli.models.configs import ARCHS
from ramcli.models.ram import RecognitionModel, backbone_width
from ramcli_train import pretrained
from ramcli_train.distill_eval import agreement
from ramcli_train.distill_photos import key_photos, split
from ramcli_train.student import INHERITED_LR, LR, build_student, default_depths
from ramcli_train.teacher import TeacherStore, teacher_pass

BACKBONES = ["resnet18", "convnext_atto", "efficientnet_b0", "mobilenetv4_conv_small", "vit_tiny_patch16_224",
             "swin_tiny_patch4_window7_224"]


@pytest.mark.parametrize("name", BACKBONES)
def test_any_timm_backbone_tags_and_round_trips_through_the_tagger_file(name, tmp_path):
    base = ARCHS["ram_plus_tiny"]
    arch = replace(base, name=f"ram_plus_{name}_64", swin=None, backbone=name, num_classes=5)
    torch.manual_seed(0)
    from ramcli.models.labels import LabelSet

    labels = LabelSet(tuple("abcde"), tuple("abcde"), (0.5,) * 5)
    model = RecognitionModel(arch, labels).eval()
    assert model.image_proj.in_features == backbone_width(arch) == model.backbone.num_features
    assert model.arch.data_config["input_size"] == (3, 64, 64) and len(model.arch.data_config["mean"]) == 3
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = model(images)
    assert want.shape == (2, 5)
    path = save_converted(model, tmp_path / "m.safetensors")
    loaded = load_model(path)
    assert loaded.arch.backbone == name and loaded.arch.data_config == model.arch.data_config
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), want)


def test_unknown_backbone_is_a_one_line_error(tmp_path):
    from ramcli.cli.app import main

    with pytest.raises(SystemExit) as exc:
        main(["train", "--data", str(tmp_path), "--preset", "tiny", "--backbone", "no_such_net", "--dry-run"])
    assert exc.value.code != 0


def _fake_hub_cache(root: Path, repo: str, tensors: dict[str, torch.Tensor]) -> Path:
    """The huggingface_hub cache layout holding one model.safetensors of `repo`."""
    from safetensors.torch import save_file

    folder = root / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("abc123")
    snap = folder / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(snap / "model.safetensors"))
    return root


def test_pretrained_weights_come_from_the_hub_cache_or_fail_fast(tmp_path, monkeypatch):
    import time

    import timm

    arch = replace(ARCHS["ram_tiny"], swin=None, backbone="test_resnet", num_classes=3)
    source = timm.create_model("test_resnet", num_classes=0)
    torch.manual_seed(1)
    for p in source.parameters():
        torch.nn.init.normal_(p)
    cache = _fake_hub_cache(tmp_path / "hub", timm.models.get_pretrained_cfg("test_resnet").hf_hub_id,
                            source.state_dict())
    model = RecognitionModel(arch)
    loaded = pretrained.load_pretrained_backbone(model, cache_dir=cache)
    assert loaded.pretrained and "hub cache" in loaded.message
    torch.testing.assert_close(model.backbone.conv1[0].weight if hasattr(model.backbone.conv1, "__getitem__")
                               else model.backbone.conv1.weight,
                               source.conv1[0].weight if hasattr(source.conv1, "__getitem__") else source.conv1.weight)

    monkeypatch.setattr(pretrained, "hub_reachable", lambda timeout=3.0: False)
    start = time.perf_counter()
    missing = pretrained.load_pretrained_backbone(RecognitionModel(arch), cache_dir=tmp_path / "empty")
    assert not missing.pretrained and "random initialisation" in missing.message
    assert time.perf_counter() - start < 5  # no retries against an unreachable hub


def test_agreement_and_split():
    assert agreement([{"a", "b"}, set()], [{"a"}, set()]) == {"f1": pytest.approx(2 / 3), "same_set": 0.5, "photos": 2}
    assert agreement([set()], [set()])["f1"] == 1.0
    keys = [f"{i:064x}" for i in range(0, 2**20, 997)]
    train, held = split(keys, 0.25)
    assert set(train).isdisjoint(held) and set(train) | set(held) == set(keys) and held
    assert split(list(reversed(keys)), 0.25) == (train, held)  # by content, not by order


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    labels = make_labels_dir(root, 50)
    ckpt = make_official_checkpoint(root / "ram.pth", "ram_tiny", num_classes=50)
    teacher = save_converted(load_any(ckpt, labels_dir=labels), root / "teacher.safetensors")
    photos = root / "photos"
    photos.mkdir()
    for i in range(14):
        photo_like(96, 80, seed=i).save(photos / f"p{i:02d}.jpg", quality=90)
    whole = (photos / "p00.jpg").read_bytes()
    (photos / "broken.jpg").write_bytes(whole[: len(whole) // 2])  # a truncated JPEG
    return root, teacher, labels, photos


def _run(args: list[str], home: Path) -> Result:
    return CliRunner().invoke(app, args, env={"RAMCLI_HOME": str(home)}, catch_exceptions=False)


def test_distill_tag_vocab_add_tag(world, tmp_path):
    root, teacher, labels, photos = world
    home = tmp_path / "home"
    out = tmp_path / "student.safetensors"
    args = ["distill", "--teacher", str(teacher), "--data", str(photos), "--backbone", "test_resnet", "--out", str(out),
            "--batch-size", "4", "--max-steps", "4", "--val-fraction", "0.3", "--no-pretrained", "--device", "cpu",
            "--pooled-weight", "2", "--force", "--report", str(tmp_path / "report.json")]
    res = _run(args, home)
    assert res.exit_code == 1, res.output  # one photo could not be read: counted, the run completes
    assert "skipped 1 photo(s)" in res.stderr and "broken.jpg" in res.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["photos"] == 14 and report["train"] + report["held_out"] == 14 and report["steps"] == 4
    assert report["teacher_new"] == 14 and 0 <= report["agreement"]["f1"] <= 1
    assert {"teacher", "student", "speedup"} <= set(report["speed"])
    assert "held-out agreement" in res.stdout and "teacher" in res.stdout

    student = load_model(out)
    assert student.arch.backbone == "test_resnet" and student.arch.family == "ram"
    assert student.labels.names == load_model(teacher).labels.names
    metrics = [json.loads(line) for line in (tmp_path / "student.distill" / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "soft" in m]
    assert len(steps) == 4 and all("embed" in m and "pooled" in m for m in steps)
    assert steps[0]["lr"] == pytest.approx(LR / 50)

    # resume: the teacher's outputs are reused, training continues from the checkpoint
    resumed = _run([*args, "--max-steps", "6", "--resume"], home)
    report2 = json.loads((tmp_path / "report.json").read_text())
    assert resumed.exit_code == 1 and report2["teacher_new"] == 0 and report2["steps"] == 6

    tag = ["tag", str(photos), "--weights", str(out), "--format", "jsonl", "--no-write", "--no-index", "--workers", "0"]
    first = _run(tag, home)
    rows = [r for line in first.stdout.splitlines() if line.startswith("{") and (r := json.loads(line)).get("tags")]
    assert len(rows) == 14 and all(r["model"] == "student@step6" for r in rows)

    from ramcli.models import clip_text
    from ramcli.tagging.vocab import Vocabulary

    clip = save_random_clip(tmp_path / "clip.safetensors", TINY_CLIP)
    vocab = Vocabulary.open(home / "vocab", builtin=student.labels.names)
    vocab.add("tram", lambda: clip_text.load_text_encoder(clip, model_config=TINY_CLIP), threshold=0.0)
    vocab.save()
    again = _run(tag, home)
    rows = [r for line in again.stdout.splitlines() if line.startswith("{") and (r := json.loads(line)).get("tags")]
    assert len(rows) == 14 and all("tram" in {t["name"] for t in r["tags"]} for r in rows)


def test_teacher_pass_resumes_and_reuses_cached_embeddings(world, tmp_path):
    root, teacher_file, labels, photos = world
    teacher = load_model(teacher_file)
    files = sorted(photos.glob("p*.jpg"))
    store = TeacherStore(tmp_path / "teacher", teacher.model_id)
    seen = []
    encode = teacher.encode_image

    def counting(images):
        seen.append(images.shape[0])
        return encode(images)

    teacher.encode_image = counting
    keyed, failures = key_photos(files[:5])
    targets, failures = teacher_pass(teacher, keyed, store, torch.device("cpu"), 2, 0)
    assert len(keyed) == 5 and sum(seen) == 5 and not failures and set(targets.logits) == set(keyed)
    # a later (or restarted) pass only runs the teacher on what it has not seen
    seen.clear()
    cache = EmbeddingCache(teacher.model_id, tmp_path / "cache")
    from ramcli.media.decode import content_hash, load_for_model, normalize

    with torch.no_grad():
        for f in files[5:8]:
            cache.put([content_hash(f)], encode(normalize(load_for_model(f, 64).pixels[None])))
    keyed, _ = key_photos(files)
    targets, _ = teacher_pass(teacher, keyed, store, torch.device("cpu"), 4, 0, cache=cache)
    assert len(keyed) == 14 and sum(seen) == 14 - 5 - 3
    reloaded = store.load()
    assert set(reloaded.logits) == set(keyed) and reloaded.embeds[next(iter(keyed))].shape == (512,)
    with torch.no_grad():  # targets are the teacher's own outputs
        key = content_hash(files[0])
        x = normalize(load_for_model(files[0], 64).pixels[None])
        torch.testing.assert_close(reloaded.logits[key], teacher.decode(encode(x))[0], atol=1e-5, rtol=1e-4)


def test_student_copies_the_teacher_label_side_and_decoder(world):
    _, teacher_file, _, _ = world
    teacher = load_model(teacher_file)
    student, note = build_student(teacher, "test_resnet", 48, pretrained=False)
    assert "random" in note and student.arch.image_size == 48 and student.arch.swin is None
    t, s = teacher.state_dict(), student.state_dict()
    for k in ("label_embed", "wordvec_proj.weight", "fc.weight", "decoder.layers.0.ffn_in.weight"):
        torch.testing.assert_close(s[k], t[k])
    smaller, _ = build_student(teacher, "test_resnet", 48, hidden=32, pretrained=False)
    assert smaller.arch.hidden == 32 and torch.equal(smaller.label_embed, teacher.label_embed)


def test_a_shallower_student_starts_from_the_teacher_block_by_block():
    """`--backbone teacher --depths`: stage by stage, student block i is teacher block
    i * n_teacher // n_student (the first from the first), the rest of the encoder and its
    projection are the teacher's; the round trip through the tagger file keeps the depths."""
    from ramcli.models.labels import LabelSet

    labels = LabelSet(tuple("abcde"), tuple("abcde"), (0.5,) * 5)
    arch = replace(ARCHS["ram_tiny"], name="ram_test_convnext_64", swin=None, backbone="test_convnext", num_classes=5)
    torch.manual_seed(0)
    teacher = RecognitionModel(arch, labels).eval()
    assert [len(s.blocks) for s in teacher.backbone.stages] == [1, 2, 4, 2]
    student, note = build_student(teacher, "teacher", 64, depths=(1, 1, 2, 1))
    assert [len(s.blocks) for s in student.backbone.stages] == [1, 1, 2, 1] and student.arch.depths == (1, 1, 2, 1)
    mine, theirs = student.backbone.stages, teacher.backbone.stages
    for stage, blocks in ((1, {0: 0}), (2, {0: 0, 1: 2}), (3, {0: 0})):
        for i, j in blocks.items():
            for a, b in zip(mine[stage].blocks[i].parameters(), theirs[stage].blocks[j].parameters(), strict=True):
                assert torch.equal(a, b)
    assert not torch.equal(mine[2].blocks[1].conv_dw.weight, theirs[2].blocks[1].conv_dw.weight)
    for a, b in ((student.backbone.stem, teacher.backbone.stem), (student.image_proj, teacher.image_proj),
                 (mine[2].downsample, theirs[2].downsample)):
        assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    n = len(student.backbone.state_dict())
    assert f"{n} of {n} tensors from the teacher's test_convnext" in note and "test_convnext [1,1,2,1]" in note
    assert sum(p.numel() for p in student.parameters()) < sum(p.numel() for p in teacher.parameters())
    for name, depths in (("teacher", (1, 1)), ("resnet18", (1, 1, 1))):  # fewer stages than the encoder's: refused, not built wrong
        with pytest.raises(CheckpointError, match="cannot have"):
            build_student(teacher, name, 64, depths=depths, pretrained=False)


def test_the_teachers_own_swin_shallower_tags_and_round_trips(world, tmp_path):
    """The official Swin as the student's encoder: `--depths` shortens its stages; without it the
    student is the teacher, tensor for tensor, so it scores as the teacher does."""
    _, teacher_file, _, _ = world
    teacher = load_model(teacher_file)
    same, _ = build_student(teacher, "teacher", 64)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(same.eval()(images), teacher(images))
    student, note = build_student(teacher, "teacher", 64, depths=(2, 2, 1, 2))
    assert student.arch.swin.depths == (2, 2, 1, 2) and student.arch.backbone == "" and "Swin 16 [2,2,1,2]" in note
    path = save_converted(student.eval(), tmp_path / "shallow.safetensors")
    loaded = load_model(path)
    assert loaded.arch == student.arch
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), student(images))
    with pytest.raises(UsageError, match="4 stages"):
        build_student(teacher, "teacher", 64, depths=(1, 1))


@pytest.mark.parametrize("depths", [[100000], [1] * 9, [1, "2"], "1,1", [0, 1], [1.5], [True]])
def test_a_tagger_file_cannot_ask_for_absurd_depths(tmp_path, depths):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from ramcli.models.labels import LabelSet

    labels = LabelSet(("a", "b"), ("a", "b"), (0.5, 0.5))
    arch = replace(ARCHS["ram_tiny"], name="r", swin=None, backbone="test_resnet", num_classes=2, depths=(1, 1, 1, 1))
    good = save_converted(RecognitionModel(arch, labels), tmp_path / "good.safetensors")
    assert load_model(good).arch.depths == (1, 1, 1, 1)
    with safe_open(str(good), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    header = json.loads(meta["arch"])
    header["depths"] = depths
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata={**meta, "arch": json.dumps(header)})
    with pytest.raises(CheckpointError, match="damaged ramcli header"):
        load_model(tmp_path / "bad.safetensors")


def test_distill_cli_takes_depths_and_refuses_bad_ones(world, tmp_path):
    root, teacher, labels, photos = world
    out = tmp_path / "shallow.safetensors"
    base = ["distill", "--teacher", str(teacher), "--data", str(photos), "--backbone", "teacher", "--out", str(out),
            "--batch-size", "4", "--max-steps", "2", "--val-fraction", "0.3", "--device", "cpu", "--force"]
    res = _run([*base, "--depths", "2,2,1,2"], tmp_path / "home")  # 0.93x the teacher's FLOPs: forced
    assert res.exit_code == 1, res.output  # the broken photo
    assert "backbone Swin 16 [2,2,1,2]: 106 of 106 tensors from the teacher's Swin 16 [2,2,2,2]" in res.stderr
    assert load_model(out).arch.swin.depths == (2, 2, 1, 2)
    metrics = [json.loads(line) for line in (tmp_path / "shallow.distill" / "metrics.jsonl").read_text().splitlines()]
    first = next(m for m in metrics if m.get("step") == 1)  # warm-up to the lower rate of an inherited encoder
    assert first["lr"] == pytest.approx(INHERITED_LR / 50) and INHERITED_LR < LR
    for bad in ("2,x", "0,1", "", "1,,1"):
        res = CliRunner().invoke(app, [*base, "--depths", bad])
        assert res.exit_code == 2 and "blocks per stage" in res.output and "Traceback" not in res.output


def test_student_loss_parts(world):
    """soft and embed always (RAM); pooled only when weighted: the teacher's probabilities read
    from the student's pooled embedding through the label embeddings, with a gradient that
    reaches the backbone directly."""
    import torch.nn.functional as F

    from ramcli_train.distill import student_loss

    _, teacher_file, _, _ = world
    teacher = load_model(teacher_file)
    torch.manual_seed(0)
    student, _ = build_student(teacher, "test_resnet", 64, pretrained=False)
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        t_embeds = teacher.encode_image(images)
        t_logits = teacher.decode(t_embeds)
    plain = student_loss(student.eval(), images, t_logits, t_embeds[:, 0], 1.0)
    assert set(plain) == {"soft", "embed"}
    parts = student_loss(student, images, t_logits, t_embeds[:, 0], 1.0, pooled_weight=2.0)
    assert set(parts) == {"soft", "embed", "pooled"}
    torch.testing.assert_close(parts["soft"], plain["soft"])
    pooled = student.encode_image(images)[:, 0]
    classes = student.label_embed.view(student.arch.num_classes, -1, 512).mean(1)
    want = 2.0 * F.binary_cross_entropy_with_logits(pooled @ classes.t(), torch.sigmoid(t_logits), reduction="sum") / 3
    torch.testing.assert_close(parts["pooled"], want)
    student.zero_grad()
    parts["pooled"].backward()
    assert all(p.grad is not None for p in student.backbone.parameters())
    assert all(p.grad is None for p in student.decoder.parameters())


# ----------------------------------------------------------------------------- the default student


def _tagger(backbone: str, classes: int = 50) -> RecognitionModel:
    from ramcli.models.labels import read_label_dir, official_dir

    full = read_label_dir(official_dir(), "ram")
    from ramcli.models.labels import LabelSet

    labels = LabelSet(full.names[:classes], full.names_zh[:classes], full.thresholds[:classes])
    arch = replace(ARCHS["ram_tiny"], name=f"ram_{backbone}_64", swin=None, backbone=backbone, num_classes=classes)
    torch.manual_seed(0)
    return RecognitionModel(arch, labels).eval()


def test_default_depths_halve_each_stage_of_the_teachers_encoder(world):
    _, teacher_file, _, _ = world
    assert default_depths(load_model(teacher_file)) == (1, 1, 1, 1)  # the tiny Swin's [2,2,2,2]
    assert default_depths(_tagger("test_convnext")) == (1, 1, 2, 1)  # [1,2,4,2], counted in timm's stages
    assert default_depths(_tagger("resnet10t")) == (1, 1, 1, 1)  # one block per stage already
    assert default_depths(_tagger("resnet18")) == (1, 1, 1, 1)
    with torch.device("meta"):  # RAM Swin-L, as a skeleton
        assert default_depths(RecognitionModel(ARCHS["ram_swin_large_384"])) == (1, 1, 9, 1)


def test_the_default_student_is_a_shallower_copy_of_the_teacher(world, tmp_path):
    root, teacher, labels, photos = world
    out = tmp_path / "student.safetensors"
    res = _run(["distill", "--teacher", str(teacher), "--data", str(photos), "--out", str(out), "--batch-size", "4",
                "--max-steps", "2", "--val-fraction", "0.3", "--device", "cpu"], tmp_path / "home")
    assert res.exit_code == 1, res.output  # the broken photo
    assert "backbone Swin 16 [1,1,1,1]: 67 of 67 tensors from the teacher's Swin 16 [2,2,2,2]" in res.stderr
    student, teacher_model = load_model(out), load_model(teacher)
    assert student.arch.swin.depths == (1, 1, 1, 1) and student.arch.swin.embed_dim == teacher_model.arch.swin.embed_dim
    assert sum(p.numel() for p in student.parameters()) < sum(p.numel() for p in teacher_model.parameters())


@pytest.mark.parametrize("backbone", [None, "resnet50"])
def test_a_student_that_would_not_be_faster_is_refused_unless_forced(world, tmp_path, capsys, backbone):
    """A teacher of one block per stage (`train --preset cpu`'s resnet10t) cannot be halved, and a
    resnet50 needs more FLOPs than it: refused in one line before the teacher scores a photo."""
    _, _, _, photos = world
    teacher = save_converted(_tagger("resnet10t"), tmp_path / "cpu.safetensors")
    out = tmp_path / "student.safetensors"
    args = ["distill", "--teacher", str(teacher), "--data", str(photos), "--out", str(out), "--batch-size", "4",
            "--max-steps", "1", "--val-fraction", "0.3", "--device", "cpu", "--no-pretrained",
            *(["--backbone", backbone] if backbone else [])]
    from conftest import run_cli

    code, err = run_cli(args), capsys.readouterr().err
    assert code == 2 and "would not be faster" in err and "--force" in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists() and not list((tmp_path / "student.distill").glob("teacher/*"))
    forced = _run([*args, "--force"], tmp_path / "home")
    assert forced.exit_code == 1 and out.is_file(), forced.output  # trained (the broken photo: exit 1)


def test_the_teacher_scores_only_the_photos_the_run_uses(world, tmp_path):
    _, teacher, _, photos = world
    report = tmp_path / "report.json"
    res = _run(["distill", "--teacher", str(teacher), "--data", str(photos), "--out", str(tmp_path / "s.safetensors"),
                "--batch-size", "2", "--max-steps", "1", "--val-fraction", "0.3", "--device", "cpu",
                "--report", str(report)], tmp_path / "home")
    assert res.exit_code == 1, res.output
    r = json.loads(report.read_text())
    assert r["steps"] == 1 and r["train"] == 2 and r["held_out"] >= 1
    assert r["teacher_new"] == r["train"] + r["held_out"] < 14
    # a longer run later scores the photos it adds, and only those
    res = _run(["distill", "--teacher", str(teacher), "--data", str(photos), "--out", str(tmp_path / "s.safetensors"),
                "--batch-size", "2", "--max-steps", "2", "--val-fraction", "0.3", "--device", "cpu",
                "--report", str(report)], tmp_path / "home")
    again = json.loads(report.read_text())
    assert again["train"] == 4 and again["teacher_new"] == 2


def test_progress_lines_reach_a_piped_log(world, tmp_path):
    """stderr captured (not a terminal, so no bar is drawn): the run still says how it advances."""
    _, teacher, _, photos = world
    res = _run(["distill", "--teacher", str(teacher), "--data", str(photos), "--out", str(tmp_path / "s.safetensors"),
                "--batch-size", "2", "--max-steps", "5", "--val-fraction", "0.3", "--device", "cpu",
                "--log-every", "2"], tmp_path / "home")
    assert res.exit_code == 1, res.output
    steps = [line for line in res.stderr.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in steps] == ["1/5", "2/5", "4/5", "5/5"]
    assert all(" loss " in line and "soft" in line and "embed" in line and " lr " in line and line.endswith(" img/s")
               for line in steps)
    assert any(line.startswith("teacher ") and line.endswith(" photos") for line in res.stderr.splitlines())
