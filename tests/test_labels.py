"""The label system: official files, Tag2Text rules, resolution order, verified download."""

from __future__ import annotations

import functools
import http.server
import shutil
import threading
from pathlib import Path

import pytest

from ramcli import labels as L
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
    explicit = _partial_copy(labels_dir, tmp_path / "explicit", 3)
    from_env = _partial_copy(labels_dir, tmp_path / "env", 4)
    embedded = L.read_label_dir(_partial_copy(labels_dir, tmp_path / "emb", 5), "ram")
    monkeypatch.setenv("RAMCLI_LABELS", str(from_env))
    assert len(L.resolve_labels("ram", labels_dir=explicit, embedded=embedded)) == 3
    assert len(L.resolve_labels("ram", embedded=embedded)) == 4
    monkeypatch.delenv("RAMCLI_LABELS")
    assert len(L.resolve_labels("ram", embedded=embedded)) == 5


@pytest.fixture
def label_server(labels_dir, tmp_path):
    """The official files served on loopback, as the pinned download URL would serve them."""
    root = tmp_path / "served"
    root.mkdir()
    for name in L.OFFICIAL_FILES:
        shutil.copy(labels_dir / name, root / name)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


def test_download_is_verified_against_the_pinned_sha256(label_server, tmp_path, monkeypatch):
    root, url = label_server
    monkeypatch.setattr(L, "OFFICIAL_BASE_URL", url)
    got = L.resolve_labels("ram", cache_dir=tmp_path / "cache")
    assert len(got) == 4585
    # a tampered file on the server is refused
    tampered = root / "ram_tag_list_threshold.txt"
    tampered.write_text(tampered.read_text().replace("0.65", "0.05", 1))
    with pytest.raises(RamcliError, match="cannot download the label file ram_tag_list_threshold.txt"):
        L.resolve_labels("ram", cache_dir=tmp_path / "other-cache")


def test_offline_without_labels_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(L, "OFFICIAL_BASE_URL", "http://127.0.0.1:9/")  # nothing listens on port 9
    with pytest.raises(RamcliError, match="pass --labels DIR"):
        L.resolve_labels("ram", cache_dir=tmp_path)


def test_bad_label_files_are_clear_errors(labels_dir, tmp_path):
    bad = _partial_copy(labels_dir, tmp_path / "bad", 5)
    (bad / "ram_tag_list_threshold.txt").write_text("0.65\nzero\n0.65\n0.65\n0.65")
    with pytest.raises(RamcliError, match="non-number"):
        L.read_label_dir(bad, "ram")
    (bad / "ram_tag_list_threshold.txt").write_text("0.65\n0.65")
    with pytest.raises(RamcliError, match="label files disagree"):
        L.read_label_dir(bad, "ram")
