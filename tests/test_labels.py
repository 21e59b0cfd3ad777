"""The label system: the shipped official files, Tag2Text rules, resolution order."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from ramcli.models import labels as L
from ramcli.errors import RamcliError


def test_official_files_read_as_the_official_code_does(labels_dir):
    ram = L.read_label_dir(labels_dir, "ram")
    assert len(ram) == 4585 and len(set(ram.names)) == 4585
    assert ram.names[0] == "3D CG rendering" and ram.names_zh[0] == "三维CG渲染"
    assert all(z == z.strip() for z in ram.names_zh)  # trailing spaces of the Chinese file dropped
    counts = {t: ram.thresholds.count(t) for t in (0.65, 0.8, 0.9)}
    assert counts == {0.65: 3414, 0.8: 735, 0.9: 119}
    assert ram.thresholds[ram.names.index("stop")] == 1.0


def test_tag2text_thresholds_and_deleted_tags(labels_dir):
    t2t = L.read_label_dir(labels_dir, "tag2text")
    assert len(t2t) == 3429
    assert t2t.thresholds[2701] == t2t.thresholds[2828] == t2t.thresholds[1167] == 0.7
    assert t2t.thresholds[0] == 0.68
    assert sorted(t2t.deleted) == sorted(L.TAG2TEXT_DELETE_INDEX)
    assert t2t.names[127] == "quarter" and t2t.names[2701] == "person"


def test_metadata_roundtrip(labels_dir):
    ram = L.read_label_dir(labels_dir, "ram")
    assert L.LabelSet.from_metadata(ram.to_metadata()) == ram
    assert ram.extend(["tram"], ["有轨电车"], [0.5]).checksum() != ram.checksum()


def _partial_copy(src: Path, dst: Path, n: int) -> Path:
    dst.mkdir()
    for name in ("ram_tag_list.txt", "ram_tag_list_chinese.txt", "ram_tag_list_threshold.txt"):
        lines = (src / name).read_text(encoding="utf-8").splitlines()[:n]
        (dst / name).write_text("\n".join(lines), encoding="utf-8")
    return dst


def test_resolution_order(labels_dir, tmp_path, monkeypatch):
    """--labels, then the file's own labels, then RAMCLI_LABELS, then the shipped official files."""
    explicit = _partial_copy(labels_dir, tmp_path / "explicit", 3)
    from_env = _partial_copy(labels_dir, tmp_path / "env", 4)
    embedded = L.read_label_dir(_partial_copy(labels_dir, tmp_path / "emb", 5), "ram")
    monkeypatch.setenv("RAMCLI_LABELS", str(from_env))
    assert len(L.resolve_labels("ram", labels_dir=explicit, embedded=embedded)) == 3
    assert len(L.resolve_labels("ram", embedded=embedded)) == 5  # a file's own labels beat the variable
    assert len(L.resolve_labels("ram")) == 4
    monkeypatch.delenv("RAMCLI_LABELS")
    assert len(L.resolve_labels("ram", embedded=embedded)) == 5
    assert len(L.resolve_labels("ram")) == 4585
    assert len(L.resolve_labels("tag2text")) == 3429


def test_shipped_files_are_the_pinned_official_ones_with_licence():
    folder = L.official_dir()
    for name, digest in L.OFFICIAL_FILES.items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest, name
    assert "Apache License" in (folder / "LICENSE").read_text(encoding="utf-8")
    notice = (folder / "NOTICE").read_text(encoding="utf-8")
    assert L.OFFICIAL_COMMIT in notice and all(name in notice for name in L.OFFICIAL_FILES)


def test_packaged_labels_are_declared_package_data():
    """A wheel built from the repository carries the label files (not just a source checkout)."""
    import tomllib

    repo = Path(__file__).resolve().parents[1]
    data = tomllib.loads((repo / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = data["tool"]["setuptools"]["package-data"]["ramcli"]
    shipped = {p.name for pattern in patterns for p in (repo / "ramcli").glob(pattern)}
    assert {*L.OFFICIAL_FILES, "LICENSE", "NOTICE"} <= shipped


def test_labels_work_offline_in_a_fresh_process(tmp_path):
    """No network, no cache, no environment variable: the shipped files serve."""
    code = "from ramcli.models.labels import resolve_labels; print(len(resolve_labels('ram')), len(resolve_labels('tag2text')))"
    env = {"PATH": "/usr/bin:/bin", "RAMCLI_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["4585", "3429"]


def test_bad_label_files_are_clear_errors(labels_dir, tmp_path):
    bad = _partial_copy(labels_dir, tmp_path / "bad", 5)
    (bad / "ram_tag_list_threshold.txt").write_text("0.65\nzero\n0.65\n0.65\n0.65")
    with pytest.raises(RamcliError, match="non-number"):
        L.read_label_dir(bad, "ram")
    (bad / "ram_tag_list_threshold.txt").write_text("0.65\n0.65")
    with pytest.raises(RamcliError, match="label files disagree"):
        L.read_label_dir(bad, "ram")
