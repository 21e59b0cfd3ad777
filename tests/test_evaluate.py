"""Benchmark parsing of every official format, class selection, score cache, outputs, `ramcli eval`."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ramcli.eval import metrics
from ramcli.errors import RamcliError, UsageError
from ramcli.models.labels import read_label_dir
from ramcli.eval.benchmark import INDICES, NAMES, TAG_IDS, load_benchmark, resolve_image, select_classes
from ramcli.eval.results import benchmark_thresholds, evaluate_scores, write_outputs
from ramcli.eval.run import EvalRequest, run
from ramcli.eval.scores import ScoreCache


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- official formats
# Small files written in each layout the official benchmark lists use (generated here, so the
# tests need no data folder): OpenImages by tag name and by Tag2Text tag id, ImageNet-multi and
# HICO by class index on one space-separated field.


@pytest.fixture()
def openimages(tmp_path, labels_dir) -> dict[str, Path]:
    """Five images over four RAM tags, once by name and once by Tag2Text tag id (classes in another order)."""
    ram = read_label_dir(labels_dir, "ram")
    t2t = read_label_dir(labels_dir, "tag2text")
    names = [n for n in ram.names if n in t2t.names][3:43:10]  # four tags both vocabularies know
    ids = [t2t.names.index(n) for n in names]
    images = [("test/0000c64e1253d68f", [0]), ("test/0002ab0af02e4a77", [1, 2]), ("test/00229645efaf204f", []),
              ("test/00045d609ca3f4eb", [2, 3, 0]), ("test/0007ef7b46ad6bb8", [3])]
    by_id_order = [3, 1, 0, 2]  # the id list names the same classes in another order
    return {
        "names": _write(tmp_path / "oi_ram_annots.txt",
                        "".join(",".join([i, *(names[c] for c in cs)]) + "\n" for i, cs in images)),
        "taglist": _write(tmp_path / "oi_ram_taglist.txt", "".join(n + "\n" for n in names)),
        "ids": _write(tmp_path / "oi_t2t_idannots.txt",
                      "".join(",".join([i, *(str(ids[c]) for c in cs)]) + "\n" for i, cs in images)),
        "idlist": _write(tmp_path / "oi_t2t_tagidlist.txt", "".join(f"{ids[c]}\n" for c in by_id_order)),
    }


def test_openimages_both_variants(openimages):
    ram = load_benchmark(openimages["names"], openimages["taglist"])
    ids = load_benchmark(openimages["ids"], openimages["idlist"])
    assert ram.label_format == NAMES and ids.label_format == TAG_IDS
    assert ram.targets.shape == ids.targets.shape == (5, 4)
    assert ram.image_ids[0] == "test/0000c64e1253d68f" and ram.image_ids == ids.image_ids
    # Same labels, classes in another order: per-image label counts and class sizes agree.
    assert np.array_equal(ram.targets.sum(axis=1), ids.targets.sum(axis=1))
    assert sorted(ram.targets.sum(axis=0)) == sorted(ids.targets.sum(axis=0))
    assert (ram.targets.sum(axis=1) == 0).sum() == 1  # a line with an id only
    assert ram.targets[3].nonzero()[0].tolist() == [0, 2, 3]


def test_index_labels_and_duplicate_names(tmp_path):
    taglist = _write(tmp_path / "imagenet_taglist.txt", "tench\nmissile\ngoldfish\nmissile\nshark\n")
    annots = _write(tmp_path / "imagenet_annots.txt",
                    "ILSVRC2012_val_00000001.JPEG\nILSVRC2012_val_00000002.JPEG,4 1\nILSVRC2012_val_00000003.JPEG,3\n")
    b = load_benchmark(annots, taglist)
    assert b.label_format == INDICES
    assert b.targets.shape == (3, 5)
    assert b.image_ids[1] == "ILSVRC2012_val_00000002.JPEG"
    assert b.targets[1].nonzero()[0].tolist() == [1, 4]
    assert b.targets[2].nonzero()[0].tolist() == [3]  # by index: only that copy of "missile"
    assert (b.targets.sum(axis=1) == 0).sum() == 1
    assert b.taglist.count("missile") == 2  # kept as two classes, labelled by index


def test_hico_phrases_by_index_and_rare_names(tmp_path):
    hico = load_benchmark(
        _write(tmp_path / "hico_annots.txt", "HICO_test2015_00000001.jpg,2\nHICO_test2015_00000002.jpg,0 1 2\n"),
        _write(tmp_path / "hico_taglist.txt", "person board airplane\nperson direct airplane\nperson exit airplane\n"))
    assert hico.label_format == INDICES and hico.targets.shape == (2, 3)
    assert hico.targets[1].nonzero()[0].tolist() == [0, 1, 2]
    rare = load_benchmark(
        _write(tmp_path / "rare_annots.txt", "test/0000c64e1253d68f,Auto racing\ntest/0002cc8afaf1b611,Lawn game,Ale\n"),
        _write(tmp_path / "rare_taglist.txt", "Aerial photography\nAle\nAuto racing\nLawn game\n"))
    assert rare.label_format == NAMES and rare.targets.shape == (2, 4)
    assert rare.targets[0, rare.taglist.index("Auto racing")]
    assert rare.targets[1].nonzero()[0].tolist() == [1, 3]


def test_class_selection_against_the_official_vocabulary(openimages, tmp_path, labels_dir):
    ram_labels = read_label_dir(labels_dir, "ram")
    common = load_benchmark(openimages["names"], openimages["taglist"])
    selection = select_classes(common, ram_labels)
    assert len(selection.columns) == 4 and not selection.missing
    assert [ram_labels.names[i] for i in selection.model_indices] == list(common.taglist)

    partial_list = _write(tmp_path / "partial_taglist.txt", f"tench\n{ram_labels.names[7]}\nnot a ram tag\n")
    partial = select_classes(load_benchmark(_write(tmp_path / "partial.txt", "a.jpg,0 1\n"), partial_list), ram_labels)
    assert len(partial.columns) == 1 and partial.missing == ("tench", "not a ram tag")

    ids = load_benchmark(openimages["ids"], openimages["idlist"])
    t2t = select_classes(ids, read_label_dir(labels_dir, "tag2text"))
    assert t2t.model_indices[0] == int(ids.taglist[0]) and t2t.names[0].endswith(f"({ids.taglist[0]})")

    rare = load_benchmark(_write(tmp_path / "rare.txt", "x,Auto racing\n"),
                          _write(tmp_path / "rare_list.txt", "Auto racing\nLawn game\n"))
    with pytest.raises(RamcliError, match="open-set.*ramcli vocab add"):
        select_classes(rare, ram_labels)


# ----------------------------------------------------------------------------- small formats and errors


def test_duplicate_taglist_names_mark_every_copy(tmp_path):
    taglist = _write(tmp_path / "t.txt", "cat\ndog\ncat\n")
    b = load_benchmark(_write(tmp_path / "a.txt", "x,cat\ny,dog\nz\n"), taglist)
    assert b.targets.tolist() == [[True, False, True], [False, True, False], [False, False, False]]


def test_bad_benchmarks_are_clear_errors(tmp_path):
    taglist = _write(tmp_path / "t.txt", "cat\ndog\n")
    with pytest.raises(RamcliError, match="'bird', which is not in the taglist"):
        load_benchmark(_write(tmp_path / "a.txt", "x,cat\ny,bird\n"), taglist)
    with pytest.raises(RamcliError, match="class index 7"):
        load_benchmark(_write(tmp_path / "b.txt", "x,0 1\ny,7\n"), taglist)
    with pytest.raises(RamcliError, match="blank line at line 2"):
        load_benchmark(_write(tmp_path / "c.txt", "x,cat\n"), _write(tmp_path / "t2.txt", "cat\n\ndog\n"))
    with pytest.raises(RamcliError, match="not found"):
        load_benchmark(tmp_path / "nope.txt", taglist)


def test_resolve_image_adds_suffixes_and_refuses_escapes(tmp_path):
    (tmp_path / "test").mkdir()
    jpg = tmp_path / "test" / "abc.jpg"
    jpg.write_bytes(b"x")
    png = tmp_path / "b.png"
    png.write_bytes(b"x")
    assert resolve_image(tmp_path, "test/abc") == jpg
    assert resolve_image(tmp_path, "b.png") == png
    assert resolve_image(tmp_path, "missing") is None
    for bad in ("../etc/passwd", "/etc/passwd", "a/../../x"):
        with pytest.raises(RamcliError, match="outside"):
            resolve_image(tmp_path, bad)


# ----------------------------------------------------------------------------- cached scores -> metrics


def _synthetic_case(tmp_path: Path, n: int = 400, seed: int = 0):
    """A 4-class benchmark over a 6-class 'model' (classes 'e','f' unused; 'zz' unknown to it)."""
    rng = np.random.default_rng(seed)
    model_names = ["a", "b", "c", "d", "e", "f"]
    bench_classes = ["c", "a", "zz", "d"]
    targets = rng.random((n, 4)) < 0.3
    lines = [f"img{i}" + "".join(f",{bench_classes[k]}" for k in range(4) if targets[i, k]) for i in range(n)]
    annotations = _write(tmp_path / "annots.txt", "\n".join(lines) + "\n")
    taglist = _write(tmp_path / "taglist.txt", "\n".join(bench_classes) + "\n")
    benchmark = load_benchmark(annotations, taglist)
    selection = select_classes(benchmark, _labels(model_names))
    true_cut = np.array([0.3, 0.6, 0.8])  # per selected class: c, a, d
    kept = targets[:, selection.columns]
    scores = np.clip(np.where(kept, true_cut + 0.1, true_cut - 0.1) + rng.normal(0, 0.07, kept.shape), 0, 1)
    cache = ScoreCache(
        benchmark_key=benchmark.key(), model_fingerprint="none", model_id="synthetic",
        image_ids=np.array(benchmark.image_ids), paths=np.array([f"/x/{i}.jpg" for i in benchmark.image_ids]),
        scores=scores.astype(np.float32), columns=selection.columns, model_indices=selection.model_indices,
        class_names=np.array(selection.names), missing_classes=np.array(selection.missing),
        model_thresholds=np.full(6, 0.5),
    )
    return benchmark, cache, annotations, taglist


def _labels(names):
    from ramcli.models.labels import LabelSet

    return LabelSet(tuple(names), tuple(names), tuple([0.5] * len(names)))


def test_cache_round_trip_without_pickle(tmp_path):
    benchmark, cache, *_ = _synthetic_case(tmp_path)
    cache.save(tmp_path / "out" / "scores.npz")
    loaded = ScoreCache.load(tmp_path / "out" / "scores.npz")
    assert loaded.benchmark_key == benchmark.key() and loaded.model_id == "synthetic"
    assert np.array_equal(loaded.scores, cache.scores) and loaded.scores.dtype == np.float32
    assert loaded.class_names.tolist() == ["c", "a", "d"] and loaded.missing_classes.tolist() == ["zz"]
    assert loaded.model_indices.tolist() == [2, 0, 3]


def test_metrics_from_cache_and_threshold_files(tmp_path):
    benchmark, cache, *_ = _synthetic_case(tmp_path)
    result = evaluate_scores(benchmark, cache)
    expected_targets = benchmark.targets[:, [0, 1, 3]]
    assert np.array_equal(result.targets, expected_targets)
    assert result.mean_ap.mean == metrics.mean_average_precision(cache.scores, expected_targets).mean
    assert result.thresholds.tolist() == [0.5, 0.5, 0.5]

    model_order = _write(tmp_path / "model_thr.txt", "0.1\n0.2\n0.3\n0.4\n0.5\n0.6\n")
    assert benchmark_thresholds(model_order, 6, cache).tolist() == [0.3, 0.1, 0.4]
    bench_order = _write(tmp_path / "bench_thr.txt", "0.7\n0.8\n0.9\n0.95\n")
    assert benchmark_thresholds(bench_order, 6, cache).tolist() == [0.7, 0.8, 0.95]
    with pytest.raises(RamcliError, match="has 2 values"):
        benchmark_thresholds(_write(tmp_path / "bad.txt", "0.1\n0.2\n"), 6, cache)
    single = evaluate_scores(benchmark, cache, threshold=0.9)
    assert single.pr.cr < result.pr.cr  # a higher threshold recalls less
    with pytest.raises(UsageError):
        evaluate_scores(benchmark, cache, threshold=0.9, threshold_file=model_order)


def test_calibration_writes_a_full_threshold_file_and_improves_f1(tmp_path):
    benchmark, cache, *_ = _synthetic_case(tmp_path, n=2000)
    result = evaluate_scores(benchmark, cache, calibration_fraction=0.5)
    c = result.calibration
    assert c.calibration_images == 1000 and c.evaluation_images == 1000
    assert c.after.cf1 > c.before.cf1 + 0.05
    assert c.thresholds == pytest.approx([0.3, 0.6, 0.8], abs=0.05)
    written = write_outputs(result, benchmark, tmp_path / "out", plots=False)
    values = [float(x) for x in written["thresholds"].read_text().split()]
    assert len(values) == 6  # every model class, model label order
    assert values[4:] == [0.5, 0.5]  # classes not in the benchmark keep the default
    assert values[:4] == pytest.approx([c.thresholds[1], 0.5, c.thresholds[0], c.thresholds[2]], abs=1e-4)
    # the written file is accepted as --threshold-file and reproduces the calibrated thresholds
    assert benchmark_thresholds(written["thresholds"], 6, cache) == pytest.approx(c.thresholds, abs=1e-4)


def test_outputs_and_plots(tmp_path):
    benchmark, cache, *_ = _synthetic_case(tmp_path)
    result = evaluate_scores(benchmark, cache)
    written = write_outputs(result, benchmark, tmp_path / "out", plots=True)
    summary = json.loads(written["summary_json"].read_text())
    assert summary["mAP"] == result.mean_ap.mean and summary["classes"] == 3 and summary["missing_classes"] == 1
    assert "mAP:" in written["summary"].read_text()
    rows = list(csv.DictReader(written["per_class"].open()))
    assert [r["tag"] for r in rows] == ["c", "a", "d"]
    assert float(rows[0]["AP"]) == pytest.approx(result.mean_ap.per_class[0], abs=1e-6)
    pred_lines = written["predictions"].read_text().splitlines()
    assert len(pred_lines) == 400
    predicted = metrics.predict(cache.scores, 0.5)
    assert pred_lines[0].split(",")[1:] == [["c", "a", "d"][k] for k in np.nonzero(predicted[0])[0]]
    assert written["missing_classes"].read_text() == "zz\n"
    for png in ("pr_curves", "ap_per_class"):
        assert written[png].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_reuses_the_cache_without_a_model(tmp_path):
    benchmark, cache, annotations, taglist = _synthetic_case(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(UsageError, match="--weights is needed"):
        run(EvalRequest(annotations=annotations, taglist=taglist, out_dir=out))
    cache.save(out / "scores.npz")
    result, written, reused = run(EvalRequest(annotations=annotations, taglist=taglist, out_dir=out, threshold=0.7))
    assert reused and result.threshold_source.startswith("0.7")
    # another benchmark (different image list) must not reuse these scores
    other = _write(tmp_path / "other.txt", "img0,a\n")
    with pytest.raises(UsageError, match="another benchmark"):
        run(EvalRequest(annotations=other, taglist=taglist, out_dir=out))


def test_cli_sweep_from_cache_and_errors(tmp_path):
    benchmark, cache, annotations, taglist = _synthetic_case(tmp_path)
    out = tmp_path / "out"
    cache.save(out / "scores.npz")
    cmd = [sys.executable, "-m", "ramcli", "eval", "--annotations", str(annotations), "--taglist", str(taglist),
           "--out", str(out)]
    done = subprocess.run(cmd + ["--calibrate"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "mAP:" in done.stdout and "calibration:" in done.stdout and "1 benchmark classes" in done.stderr
    assert (out / "thresholds.txt").is_file()
    bad = subprocess.run(cmd + ["--threshold", "0.5", "--threshold-file", str(taglist)], capture_output=True, text=True)
    assert bad.returncode == 2 and "not both" in bad.stderr and "Traceback" not in bad.stderr


# ----------------------------------------------------------------------------- end to end with a tiny model


@pytest.mark.slow
def test_eval_end_to_end_with_a_tiny_model(tmp_path):
    from ckpt_factory import make_labels_dir, make_official_checkpoint
    from PIL import Image
    from typer.testing import CliRunner

    from ramcli.cli.app import app

    from ramcli.eval.scores import targets_for

    weights = make_official_checkpoint(tmp_path / "ram_tiny.pth", arch="ram_tiny", num_classes=40)
    labels = make_labels_dir(tmp_path, 40)
    names = read_label_dir(labels, "ram").names
    classes = [names[i] for i in (2, 5, 9, 17)]
    folder = tmp_path / "imgs" / "test"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(folder / f"im{i}.jpg")
        lines.append(f"test/im{i}," + ",".join(c for k, c in enumerate(classes) if (i >> k) & 1 or k == i % 4))
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    lines += [f"test/absent,{classes[0]}", f"test/broken,{classes[1]}"]
    annotations = _write(tmp_path / "annots.txt", "\n".join(lines) + "\n")
    taglist = _write(tmp_path / "taglist.txt", "\n".join(classes + ["not a ram tag"]) + "\n")
    out = tmp_path / "out"
    base = ["eval", "--annotations", str(annotations), "--taglist", str(taglist), "--out", str(out)]
    runner = CliRunner()  # in-process: one torch import instead of two subprocesses

    done = runner.invoke(app, base + ["--images", str(tmp_path / "imgs"), "--weights", str(weights), "--labels",
                                      str(labels), "--batch-size", "3", "--device", "cpu", "--calibrate", "--plots"])
    assert done.exit_code == 0, done.output
    summary = json.loads((out / "summary.json").read_text())
    cache = ScoreCache.load(out / "scores.npz")
    benchmark = load_benchmark(annotations, taglist)
    assert cache.scores.shape == (8, 4) and cache.model_indices.tolist() == [2, 5, 9, 17]
    assert summary["failed_images"] == 2 and summary["missing_classes"] == 1
    failures = dict(line.split("\t") for line in (out / "failures.txt").read_text().splitlines())
    assert failures["test/absent"] == "not found" and set(failures) == {"test/absent", "test/broken"}
    assert summary["mAP"] == metrics.mean_average_precision(cache.scores, targets_for(benchmark, cache)).mean
    assert len((out / "thresholds.txt").read_text().split()) == 40
    for name in ("per_class.csv", "pred.txt", "summary.txt", "pr_curves.png", "ap_per_class.png", "failures.txt"):
        assert (out / name).is_file(), name

    again = runner.invoke(app, base + ["--threshold", "0.3"])
    assert again.exit_code == 0, again.output
    assert "reused the cached scores" in again.output
    assert json.loads((out / "summary.json").read_text())["mAP"] == summary["mAP"]
