"""One decision rule (score > threshold, float32) for `tag`, the engine, the metrics and calibration."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ramcli.eval import metrics
from ramcli.tagging.decision import emitted, format_thresholds, read_threshold_file, threshold_below, threshold_between
from ramcli.errors import UsageError


def test_the_rule_is_strict_and_float32_for_tensors_and_arrays():
    scores = np.array([[0.5, 0.65, 0.7]], dtype=np.float32)
    assert emitted(scores, 0.65).tolist() == [[False, False, True]]
    assert emitted(torch.from_numpy(scores), torch.tensor([0.4, 0.65, 0.7])).tolist() == [[True, False, False]]
    # 0.65 as float64 is above float32(0.65): compared in float32 the two are the same number
    assert not emitted(np.float32(0.65), 0.65)
    assert metrics.predict(scores, 0.65).tolist() == emitted(scores, 0.65).tolist()


def test_thresholds_between_adjacent_float32_scores_keep_both_sides():
    lo = np.float32(0.5)
    hi = np.nextafter(lo, np.float32(1))  # no float32 lies strictly between them
    t = threshold_between(lo, hi)
    assert emitted(hi, t) and not emitted(lo, t)
    assert emitted(np.float32(0.3), threshold_below(0.3))
    with pytest.raises(ValueError):
        threshold_between(0.6, 0.6)


def test_calibrated_thresholds_reproduce_in_tag_after_the_file_round_trip(tmp_path):
    """The thresholds `eval --calibrate` writes make `tag` take exactly the calibrated decisions,
    even where scores tie or differ in the last float32 bit."""
    rng = np.random.default_rng(3)
    n, c = 400, 6
    scores = rng.random((n, c)).astype(np.float32).round(2)  # many exact ties
    scores[:5, 0] = np.nextafter(np.float32(0.5), np.float32(1))
    scores[5:10, 0] = np.float32(0.5)
    targets = rng.random((n, c)) < scores
    fitted = metrics.calibrate_thresholds(scores, targets, np.full(c, 0.5))
    path = tmp_path / "thresholds.txt"
    path.write_text(format_thresholds(fitted), encoding="utf-8")
    read = read_threshold_file(path, c)
    calibrated = metrics.predict(scores, fitted)
    tagged = emitted(torch.from_numpy(scores), torch.tensor(read)).numpy()
    assert np.array_equal(calibrated, tagged)
    # and the calibrated decisions are F1-optimal for `score > t` on every class
    for k in range(c):
        f1 = metrics.precision_recall(calibrated[:, [k]], targets[:, [k]]).f1[0]
        best = max(metrics.precision_recall(emitted(scores[:, [k]], t), targets[:, [k]]).f1[0]
                   for t in [threshold_below(s) for s in np.unique(scores[:, k])])
        assert f1 == pytest.approx(best, abs=1e-12)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-0.1", "1.5"])
def test_threshold_file_rejects_what_threshold_rejects(tmp_path, value):
    path = tmp_path / "t.txt"
    path.write_text(f"0.5\n{value}\n0.7\n", encoding="utf-8")
    with pytest.raises(UsageError, match="line 2"):
        read_threshold_file(path, 3)
    path.write_text("0\n1\n0.25\n", encoding="utf-8")
    assert read_threshold_file(path, 3) == [0.0, 1.0, 0.25]


def test_threshold_file_values_round_trip_as_float32():
    values = [0.65, 1 / 3, 0.0, 1.0, float(np.nextafter(np.float32(0.5), np.float32(0)))]
    text = format_thresholds(values)
    assert text.splitlines()[0] == "0.65"
    back = [float(s) for s in text.split()]
    assert np.array_equal(np.float32(back), np.float32(values))
    assert all(math.isfinite(v) for v in back)


# ----------------------------------------------------------------------------- every source of thresholds


def _label_dir(tmp_path, thresholds: list[str], names: list[str] | None = None):
    names = names or [f"tag{i}" for i in range(len(thresholds))]
    (tmp_path / "ram_tag_list.txt").write_text("\n".join(names) + "\n", encoding="utf-8")
    (tmp_path / "ram_tag_list_chinese.txt").write_text("\n".join(names) + "\n", encoding="utf-8")
    (tmp_path / "ram_tag_list_threshold.txt").write_text("\n".join(thresholds) + "\n", encoding="utf-8")
    return tmp_path


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "1.5"])
def test_a_label_folder_gets_the_threshold_files_rule(tmp_path, value):
    """`--labels DIR`: the same rule as `--threshold-file`, one line naming the folder and the label."""
    from ramcli.models.labels import LabelError, read_label_dir

    folder = _label_dir(tmp_path, ["0.5", value, "0.7"])
    with pytest.raises(LabelError, match=r"label 1 \('tag1'\): threshold .* is not a number from 0 to 1") as exc:
        read_label_dir(folder, "ram")
    assert str(folder) in str(exc.value) and "\n" not in str(exc.value)


def test_a_label_folder_with_escape_sequences_in_names_is_refused(tmp_path, capsys):
    from conftest import run_cli
    from images import photo_like

    from ckpt_factory import make_official_checkpoint

    (tmp_path / "labels").mkdir()
    folder = _label_dir(tmp_path / "labels", ["0.5"] * 40, [f"t{i}" for i in range(39)] + ["\x1b]0;owned\x07red"])
    ckpt = make_official_checkpoint(tmp_path / "ram.pth", "ram_tiny", num_classes=40)
    photo_like(80, 60).save(tmp_path / "p.jpg")
    code = run_cli(["tag", str(tmp_path / "p.jpg"), "--weights", str(ckpt), "--labels", str(folder),
                    "--no-write", "--no-index"])
    captured = capsys.readouterr()
    assert code == 1 and "label 39: name" in captured.err and "control characters" in captured.err
    assert "\x1b" not in captured.err + captured.out and "\x07" not in captured.err


@pytest.mark.parametrize("value", ["0.5", True, None, [0.5], float("nan"), -0.0001, 1.0001, np.float32("nan")])
def test_only_real_numbers_from_0_to_1_are_thresholds(value):
    from ramcli.tagging.decision import check_threshold, is_threshold

    assert not is_threshold(value)
    with pytest.raises(UsageError, match="is not a threshold"):  # not a TypeError from math.isfinite
        check_threshold(value, "--threshold")


@given(st.lists(st.one_of(st.floats(), st.integers(), st.booleans(), st.text(max_size=4), st.none()),
                min_size=1, max_size=6))
def test_a_label_set_holds_thresholds_exactly_when_each_one_passes_the_rule(thresholds):
    """The label set, built by every source (label folders, model files, checkpoints, custom
    tags), keeps exactly the thresholds the command line would take, as floats, and refuses the rest."""
    from ramcli.tagging.decision import is_threshold
    from ramcli.models.labels import LabelError, LabelSet

    names = tuple(f"t{i}" for i in range(len(thresholds)))
    if all(is_threshold(t) for t in thresholds):
        labels = LabelSet(names, names, tuple(thresholds))
        assert labels.thresholds == tuple(float(t) for t in thresholds)
        assert all(type(t) is float for t in labels.thresholds)
    else:
        with pytest.raises(LabelError, match="threshold"):
            LabelSet(names, names, tuple(thresholds))
