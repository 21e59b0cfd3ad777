"""`ramcli tag` end to end: the JSONL contract, decisions, incremental runs, resume, bad input."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ckpt_factory import make_labels_dir, make_official_checkpoint
from images import make_image, make_library, photo_like
from ramcli.cli.app import app
from ramcli.models import load_any
from ramcli.tagging.tagger import Tagger

N = 30


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("model")
    return (make_official_checkpoint(root / "ram_tiny.pth", "ram_tiny", num_classes=N),
            make_labels_dir(root, N))


def _photos(folder: Path, n: int, size=(160, 120)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        p = folder / f"p{i:03d}.jpg"
        photo_like(*size, seed=i).save(p, quality=85)
        out.append(p)
    return out


def _tag(model_files, *args: str, home: Path | None = None):
    weights, labels = model_files
    env = {"RAMCLI_HOME": str(home)} if home else {}
    return CliRunner().invoke(app, ["tag", *args, "--weights", str(weights), "--labels", str(labels),
                                    "--workers", "0", "-q"], env=env, catch_exceptions=False)


def _said(res) -> str:
    """stderr with rich's line wrapping undone."""
    return " ".join(res.stderr.split())


def _lines(output: str) -> list[dict]:
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


def test_jsonl_contract(model_files, tmp_path):
    photos = _photos(tmp_path / "lib", 3)
    res = _tag(model_files, str(tmp_path / "lib"), "--format", "jsonl", "--no-write", "--no-index")
    assert res.exit_code == 0, res.output
    rows = _lines(res.stdout)
    assert [r["path"] for r in rows] == [str(p) for p in photos]
    for r in rows:
        assert r["model"].startswith("ram_tiny@")
        scores = [t["score"] for t in r["tags"]]
        assert scores == sorted(scores, reverse=True) and all(isinstance(s, float) for s in scores)
        assert all(t["name"] and t["name_zh"] for t in r["tags"])
    assert any(r["tags"] for r in rows)


def test_decisions_are_strict_per_class_and_overridable(model_files):
    weights, labels = model_files
    model = load_any(weights, labels_dir=labels)
    th = torch.tensor(model.labels.thresholds)
    scores = torch.stack([th, th + 1e-4, th - 1e-4])  # equal, just above, just below
    tagger = Tagger(model, torch.device("cpu"))
    equal, above, below = tagger.decide(scores)
    assert equal == [] and below == [] and len(above) == N
    assert {t.name for t in above} == set(model.labels.names)
    override = Tagger(model, torch.device("cpu"), threshold=0.9).decide(torch.full((1, N), 0.85))
    assert override == [[]]
    top = Tagger(model, torch.device("cpu"), top_k=2).decide(scores[1:2])[0]
    assert len(top) == 2 and top[0].score >= top[1].score
    excluded = model.labels.names[0]
    t = Tagger(model, torch.device("cpu"), exclude=[excluded])
    active = [model.labels.names[i] for i in t.active]
    assert excluded not in active and len(active) == N - 1


def test_excluded_tags_are_not_emitted_and_chinese_names_work(model_files, tmp_path):
    _photos(tmp_path / "lib", 2)
    first = _lines(_tag(model_files, str(tmp_path / "lib"), "-f", "jsonl", "--no-write", "--no-index",
                        "--threshold", "0.0").stdout)
    top = first[0]["tags"][0]["name"]
    res = _tag(model_files, str(tmp_path / "lib"), "-f", "csv", "--no-write", "--no-index", "--threshold", "0.0",
               "--exclude-tags", top, "--lang", "zh")
    assert res.exit_code == 0
    assert top not in res.stdout
    assert first[0]["tags"][1]["name_zh"] in res.stdout  # Chinese names in the output


def test_incremental_force_moved_and_vocab_change(model_files, tmp_path):
    home = tmp_path / "home"
    lib = tmp_path / "lib"
    photos = _photos(lib, 4)
    res = _tag(model_files, str(lib), "-f", "jsonl", "--no-write", home=home)
    assert res.exit_code == 0 and len(_lines(res.stdout)) == 4
    assert _lines(_tag(model_files, str(lib), "-f", "jsonl", "--no-write", home=home).stdout) == []
    # a changed photo is re-tagged, the others are not
    photo_like(160, 120, seed=99).save(photos[1], quality=85)
    os.utime(photos[1], ns=(time.time_ns(), time.time_ns() + 10**9))
    again = _lines(_tag(model_files, str(lib), "-f", "jsonl", "--no-write", home=home).stdout)
    assert [r["path"] for r in again] == [str(photos[1])]
    # a moved photo is recognised by its image data and not re-tagged
    moved = lib / "sub" / "renamed.jpg"
    moved.parent.mkdir()
    shutil.move(photos[2], moved)
    assert _lines(_tag(model_files, str(lib), "-f", "jsonl", "--no-write", home=home).stdout) == []
    con = sqlite3.connect(home / "index.db")
    paths = {row[0] for row in con.execute("select path from photos")}
    assert str(moved) in paths and str(photos[2]) not in paths
    # --force re-tags everything
    assert len(_lines(_tag(model_files, str(lib), "-f", "jsonl", "--no-write", "--force", home=home).stdout)) == 4
    # a vocabulary change makes every photo due again
    env = {"RAMCLI_HOME": str(home), "RAMCLI_LABELS": str(model_files[1])}
    name = load_any(model_files[0], labels_dir=model_files[1]).labels.names[3]
    vocab = CliRunner().invoke(app, ["vocab", "threshold", name, "0.42"], env=env)
    assert vocab.exit_code == 0, vocab.output
    assert len(_lines(_tag(model_files, str(lib), "-f", "jsonl", "--no-write", home=home).stdout)) == 4


def test_dry_run_lists_and_tags_nothing(model_files, tmp_path):
    home = tmp_path / "home"
    photos = _photos(tmp_path / "lib", 2)
    res = _tag(model_files, str(tmp_path / "lib"), "--dry-run", home=home)
    assert res.exit_code == 0
    assert [line for line in res.stdout.splitlines() if line.strip()] == [str(p) for p in photos]
    res = _tag(model_files, str(tmp_path / "lib"), "-f", "jsonl", "--no-write", home=home)
    assert len(_lines(res.stdout)) == 2


def _run_cli(args: list[str], env: dict, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ramcli", *args], env={**os.environ, **env},
                          capture_output=True, text=True, **kw)


@pytest.mark.slow
def test_bad_photos_are_reported_and_the_run_completes(model_files, tmp_path):
    weights, labels = model_files
    library = make_library(tmp_path / "lib")
    res = _run_cli(["tag", str(tmp_path / "lib"), "--weights", str(weights), "--labels", str(labels),
                    "-f", "jsonl", "--no-write", "--workers", "1"], {"RAMCLI_HOME": str(tmp_path / "home")},
                   timeout=600)
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout
    rows = {r["path"]: r for r in _lines(res.stdout)}
    decodable = [p for p, e in library.items() if e.decodes and e.kind in ("image", "raw")]
    failing = [p for p, e in library.items() if not e.decodes and e.kind in ("image", "raw")]
    assert decodable and all(str(p) in rows and "status" not in rows[str(p)] for p in decodable)
    for p in failing + [p for p, e in library.items() if e.kind == "error"]:
        assert rows[str(p)]["status"] == "broken" and rows[str(p)]["error"]
        assert f"failed: {p}" in res.stderr
    assert res.returncode == (1 if failing else 0)


@pytest.mark.slow
def test_usage_errors_exit_2_without_traceback(model_files, tmp_path):
    res = _run_cli(["tag", str(tmp_path / "missing"), "--no-write", "--no-index"], {"RAMCLI_HOME": str(tmp_path)})
    assert res.returncode == 2 and "no such file or folder" in res.stderr and "Traceback" not in res.stderr
    res = _run_cli(["tag", str(tmp_path), "--device", "tpu"], {"RAMCLI_HOME": str(tmp_path)})
    assert res.returncode == 2 and "unknown device" in res.stderr
    res = _run_cli(["tag", str(tmp_path), "--decode", "gpu"], {"RAMCLI_HOME": str(tmp_path)})
    assert res.returncode == 2 and "'gpu' is not one of 'auto', 'workers', 'draft', 'device'" in res.stderr


@pytest.mark.slow
def test_kill_9_mid_run_resumes_with_nothing_lost_or_duplicated(model_files, tmp_path):
    weights, labels = model_files
    # enough work (one photo per batch, each its own transaction) that the kill lands mid-run
    photos = _photos(tmp_path / "lib", 150, size=(640, 480))
    home = tmp_path / "home"
    args = ["tag", str(tmp_path / "lib"), "--weights", str(weights), "--labels", str(labels), "-f", "jsonl",
            "--no-write", "--workers", "0", "--batch-size", "1", "-q"]
    env = {**os.environ, "RAMCLI_HOME": str(home)}
    proc = subprocess.Popen([sys.executable, "-m", "ramcli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    db = home / "index.db"
    deadline = time.time() + 300
    done = 0
    while time.time() < deadline and proc.poll() is None:
        if db.exists():
            try:
                with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
                    done = con.execute("select count(*) from photos where status='tagged'").fetchone()[0]
            except sqlite3.OperationalError:
                done = 0
            if done >= 4:
                break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 0 < done < len(photos), "the run was not caught in the middle"
    rest = subprocess.run([sys.executable, "-m", "ramcli", *args], env=env, capture_output=True, text=True,
                          timeout=600)
    assert rest.returncode == 0, rest.stderr
    with sqlite3.connect(db) as con:
        rows = con.execute("select path, count(*) from photos group by path").fetchall()
        tagged = con.execute("select count(*) from photos where status='tagged'").fetchone()[0]
    assert sorted(r[0] for r in rows) == sorted(str(p) for p in photos)
    assert all(count == 1 for _, count in rows) and tagged == len(photos)
    resumed = _lines(rest.stdout)
    assert len(resumed) <= len(photos) - 4  # the photos recorded before the kill were not redone


def test_cached_embeddings_rescore_new_tags_without_the_backbone(model_files, tmp_path, monkeypatch):
    from clip_fixtures import TINY_CLIP, save_random_clip
    from ramcli.models import clip_text
    from ramcli.tagging.vocab import Vocabulary

    home = tmp_path / "home"
    lib = tmp_path / "lib"
    _photos(lib, 3)
    first = _tag(model_files, str(lib), "-f", "jsonl", "--no-write", "--cache-embeddings", home=home)
    assert first.exit_code == 0 and len(_lines(first.stdout)) == 3
    clip = save_random_clip(tmp_path / "clip.safetensors", TINY_CLIP)
    builtin = load_any(model_files[0], labels_dir=model_files[1]).labels.names
    vocab = Vocabulary.open(home / "vocab", builtin=builtin)
    vocab.add("tram", lambda: clip_text.load_text_encoder(clip, model_config=TINY_CLIP), threshold=0.0,
              name_zh="电车")
    vocab.save()
    weights, labels = model_files
    runner = CliRunner()
    args = ["tag", str(lib), "--weights", str(weights), "--labels", str(labels), "--workers", "0",
            "-f", "jsonl", "--no-write", "--cache-embeddings"]
    cheap = runner.invoke(app, args, env={"RAMCLI_HOME": str(home)}, catch_exceptions=False)
    assert cheap.exit_code == 0
    assert "3 from cached embeddings" in cheap.stderr
    full = runner.invoke(app, [*args, "--force"], env={"RAMCLI_HOME": str(home)}, catch_exceptions=False)
    cheap_rows, full_rows = _lines(cheap.stdout), _lines(full.stdout)
    assert [r["path"] for r in cheap_rows] == [r["path"] for r in full_rows]
    for c, f in zip(cheap_rows, full_rows):
        assert {"name": "tram", "name_zh": "电车"} in [{k: t[k] for k in ("name", "name_zh")} for t in c["tags"]]
        fs = {t["name"]: t["score"] for t in f["tags"]}
        for t in c["tags"]:
            if t["name"] in fs:
                assert abs(t["score"] - fs[t["name"]]) < 5e-3  # fp16 cache
    with sqlite3.connect(home / "index.db") as con:  # the custom tag stays custom in the index
        assert con.execute("select name_zh, source from tags where name = 'tram'").fetchone() == ("电车", "custom")


def test_ranks_split_the_photos_and_share_one_index(model_files, tmp_path, monkeypatch):
    """Under torchrun every rank takes every WORLD_SIZE-th photo; all results land in one index."""
    home = tmp_path / "home"
    photos = _photos(tmp_path / "lib", 5)
    seen = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        res = _tag(model_files, str(tmp_path / "lib"), "-f", "jsonl", "--no-write", home=home)
        assert res.exit_code == 0
        seen.append({r["path"] for r in _lines(res.stdout)})
    assert not seen[0] & seen[1] and seen[0] | seen[1] == {str(p) for p in photos}
    with sqlite3.connect(home / "index.db") as con:
        assert con.execute("select count(*) from photos where status='tagged'").fetchone()[0] == 5


def test_captions_flow_from_tag2text_into_results_and_the_index(tmp_path):
    """`tag --caption`: Tag2Text's generator, guided by the emitted tags, on the pipeline's embeddings."""

    from ramcli.library.index import Index
    from ramcli.models.checkpoint import load_official
    from ramcli.models.labels import read_label_dir
    from ramcli.tagging.pipeline import tag_files
    from test_caption import _setup

    sd, cfg, tok, gen, _ = _setup()
    labels_dir = make_labels_dir(tmp_path, 20, "tag2text")
    path = tmp_path / "t2t.pth"
    torch.save({"model": sd}, path)
    model = load_official(path, labels=read_label_dir(labels_dir, "tag2text"))
    photos = _photos(tmp_path / "lib", 3)
    tagger = Tagger(model, torch.device("cpu"), threshold=0.0, captioner=gen)
    results = []
    tag_files(photos, tagger, [results.extend], batch_size=2, workers=0)
    captions = [r.caption for r in results]
    assert all(isinstance(c, str) for c in captions) and any(captions)  # random tiny weights: some may be empty
    # the same photo, tags and weights give the same caption; the tags guide the generation
    again = []
    tag_files(photos[:1], tagger, [again.extend], batch_size=1, workers=0)
    assert again[0].caption == captions[0]
    with Index.open(tmp_path / "index.db") as index:
        index.record_batch(results)
        assert [index.lookup(str(p)).caption for p in photos] == captions
        word = next(c for c in captions if c).split()[0]
        hits = index.db.execute("select rowid from photos_fts where photos_fts match ?", [word]).fetchall()
        assert hits  # captions are searchable through the index's full-text table



@pytest.mark.slow
def test_compiled_model_matches_eager_and_pads_the_last_batch(model_files, tmp_path):
    """Large jobs run torch.compile'd: same scores, one compilation even with a short last batch."""
    import torch._dynamo

    weights, labels = model_files
    model = load_any(weights, labels_dir=labels)
    photos = _photos(tmp_path / "lib", 7)
    eager, compiled = [], []
    tag_files_args = dict(batch_size=4, workers=0)
    from ramcli.tagging.pipeline import tag_files

    tag_files(photos, Tagger(model, torch.device("cpu")), [eager.extend], **tag_files_args)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # reset() keeps them: earlier tests' graphs (ONNX export) would count
    tagger = Tagger(model, torch.device("cpu"), compile=True)
    tag_files(photos, tagger, [compiled.extend], **tag_files_args)
    assert tagger.compile and tagger._compiled_batch == 4  # did not fall back to eager
    for e, c in zip(eager, compiled):
        assert [t.name for t in e.tags] == [t.name for t in c.tags]
        assert all(abs(a.score - b.score) < 1e-5 for a, b in zip(e.tags, c.tags))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_decode_on_the_device_tags_like_the_workers(model_files, tmp_path):
    """`--decode device` (nvJPEG on CUDA; torchvision's libjpeg here) gives the same photos, the
    same failures and scores within a few thousandths of the worker (Pillow) path."""
    lib = tmp_path / "lib"
    _photos(lib, 3)
    make_image(lib / "truncated.jpg", "truncated_jpeg")  # stays with Pillow, which names the problem
    make_image(lib / "pic.png", "png")
    runs = {}
    for decode in ("workers", "device"):
        res = _tag(model_files, str(lib), "-f", "jsonl", "--no-write", "--no-index", "--threshold", "0",
                   "--decode", decode)
        assert res.exit_code == 1, res.output  # truncated.jpg fails, the rest is tagged
        runs[decode] = {r["path"]: r for r in _lines(res.stdout)}
    assert runs["workers"].keys() == runs["device"].keys()
    assert sum("error" in r for r in runs["device"].values()) == 1
    for path, row in runs["workers"].items():
        other = runs["device"][path]
        assert row.get("error") == other.get("error")
        a, b = ({t["name"]: t["score"] for t in r["tags"]} for r in (row, other))
        assert a.keys() == b.keys() and ("error" in row or len(a) == N)  # threshold 0: every tag
        assert all(abs(a[k] - b[k]) < 0.02 for k in a)


@pytest.mark.slow
def test_two_runs_at_once_on_one_index_both_finish(model_files, tmp_path):
    weights, labels = model_files
    env = {**os.environ, "RAMCLI_HOME": str(tmp_path / "home")}
    libraries = {name: _photos(tmp_path / name, 25) for name in ("a", "b")}
    runs = [subprocess.Popen([sys.executable, "-m", "ramcli", "tag", str(tmp_path / name), "--weights", str(weights),
                              "--labels", str(labels), "-f", "jsonl", "--workers", "0", "--batch-size", "1",
                              "--threshold", "0", "--precision", "fp32", "-q"],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for name in libraries]
    for run in runs:
        out, err = run.communicate(timeout=600)
        assert run.returncode == 0 and "error" not in err, err
        assert len(_lines(out)) == 25
    with sqlite3.connect(tmp_path / "home" / "index.db") as con:
        tagged = {p for (p,) in con.execute("select path from photos where status = 'tagged'")}
        written = {p for (p,) in con.execute("select distinct path from metadata_ledger")}
    every = {str(p) for photos in libraries.values() for p in photos}
    assert tagged == every and written == every


@pytest.mark.parametrize("same_stat", [False, True], ids=["edited", "replaced-same-size-and-mtime"])
def test_a_photo_replaced_between_decode_and_write_is_neither_written_nor_recorded(model_files, tmp_path,
                                                                                    monkeypatch, same_stat):
    from ramcli.tagging import pipeline

    home, lib = tmp_path / "home", tmp_path / "lib"
    photos = _photos(lib, 3)
    victim = photos[1]
    before = victim.stat()
    replacement = tmp_path / "other.jpg"
    photo_like(160, 120, seed=77).save(replacement, quality=85)
    if same_stat:  # another picture with the old one's size and mtime: only its inode tells them apart
        data = replacement.read_bytes()
        assert len(data) <= before.st_size
        replacement.write_bytes(data + b"\0" * (before.st_size - len(data)))  # after EOI: ignored by decoders
        os.utime(replacement, ns=(before.st_atime_ns, before.st_mtime_ns))
    decoded = pipeline.results_of

    def replace_after_decoding(batch, *args, **kwargs):
        results = decoded(batch, *args, **kwargs)
        if any(item.path == victim for item in batch.items):
            os.replace(replacement, victim)  # the user saves another picture under the same name
        return results

    monkeypatch.setattr(pipeline, "results_of", replace_after_decoding)
    content = replacement.read_bytes()
    res = _tag(model_files, str(lib), "-f", "jsonl", "--threshold", "0", home=home)
    assert res.exit_code == 1
    rows = {r["path"]: r for r in _lines(res.stdout)}
    assert rows[str(victim)]["status"] == "failed" and "changed" in rows[str(victim)]["error"]
    assert rows[str(victim)]["tags"] == [] and rows[str(photos[0])]["tags"]
    assert victim.read_bytes() == content  # not written
    with sqlite3.connect(home / "index.db") as con:
        status = dict(con.execute("select path, status from photos"))
        ledger = {p for (p,) in con.execute("select distinct path from metadata_ledger")}
    assert status[str(victim)] != "tagged" and str(victim) not in ledger
    assert status[str(photos[0])] == "tagged" and str(photos[0]) in ledger
    monkeypatch.setattr(pipeline, "results_of", decoded)
    again = _tag(model_files, str(lib), "-f", "jsonl", "--threshold", "0", home=home)
    assert again.exit_code == 0
    assert [(r["path"], bool(r["tags"])) for r in _lines(again.stdout)] == [(str(victim), True)]


def _broken_library(lib: Path) -> dict[str, Path]:
    photos = _photos(lib, 2)
    broken = {kind: lib / name for kind, name in
              (("zero_byte", "empty.jpg"), ("text_as_jpg", "note.jpg"), ("truncated_jpeg", "truncated.jpg"))}
    for kind, path in broken.items():
        make_image(path, kind)
    return {"good": photos, **broken}


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_broken_photos_are_listed_recorded_and_skipped_until_they_change(model_files, tmp_path, fmt):
    home, lib = tmp_path / "home", tmp_path / "lib"
    files = _broken_library(lib)
    broken = [str(files[k]) for k in ("zero_byte", "text_as_jpg", "truncated_jpeg")]

    def rows(res) -> dict[str, dict]:
        if fmt == "jsonl":
            return {r["path"]: r for r in _lines(res.stdout)}
        return {r["path"]: r for r in csv.DictReader(io.StringIO(res.stdout))}

    first = _tag(model_files, str(lib), "-f", fmt, "--no-write", home=home)
    assert first.exit_code == 1  # new failures
    listed = rows(first)
    assert set(listed) == {*broken, *map(str, files["good"])}  # every photo has a line
    assert all(listed[p]["status"] == "broken" and listed[p]["error"] for p in broken)
    stats = CliRunner().invoke(app, ["stats", "-f", "json"], env={"RAMCLI_HOME": str(home)})
    assert json.loads(stats.stdout)["by_status"] == {"broken": 3, "tagged": 2}, stats.stdout
    assert {f["path"] for f in json.loads(stats.stdout)["failures"]} == set(broken)

    loud = CliRunner().invoke(app, ["tag", str(lib), "--weights", str(model_files[0]), "--labels",
                                    str(model_files[1]), "--workers", "0", "-f", fmt, "--no-write"],
                              env={"RAMCLI_HOME": str(home)})
    assert loud.exit_code == 0, loud.output  # nothing new failed
    assert rows(loud) == {} and "3 broken photo(s) skipped, unchanged since they failed" in _said(loud)

    retried = _tag(model_files, str(lib), "-f", fmt, "--no-write", "--retry-broken", home=home)
    assert retried.exit_code == 0 and set(rows(retried)) == set(broken)  # tried again, failed as before

    photo_like(160, 120, seed=5).save(files["text_as_jpg"], quality=85)  # the note became a photo
    fixed = _tag(model_files, str(lib), "-f", fmt, "--no-write", home=home)
    assert fixed.exit_code == 0 and rows(fixed)[str(files["text_as_jpg"])].get("status", "tagged") == "tagged"
    files["zero_byte"].write_bytes(b"still no photo")  # changed, still broken: a new failure
    assert _tag(model_files, str(lib), "-f", fmt, "--no-write", home=home).exit_code == 1


def test_a_photo_whose_write_failed_is_written_by_the_next_run_once_it_can_be(model_files, tmp_path):
    home, lib = tmp_path / "home", tmp_path / "lib"
    photos = _photos(lib, 2)
    locked = photos[0]
    locked.chmod(0o444)  # the user protects it
    weights, labels = model_files

    def tag():
        return CliRunner().invoke(app, ["tag", str(lib), "--weights", str(weights), "--labels", str(labels),
                                        "--workers", "0", "-f", "jsonl", "--threshold", "0"],
                                  env={"RAMCLI_HOME": str(home)})

    def ledger_paths() -> set[str]:
        with sqlite3.connect(home / "index.db") as con:
            return {p for (p,) in con.execute("select distinct path from metadata_ledger")}

    first = tag()
    assert first.exit_code == 1
    [line] = [r for r in _lines(first.stdout) if r["path"] == str(locked)]
    assert line["tags"] and line["error"].startswith("metadata not written") and "read-only" in line["error"]
    assert ledger_paths() == {str(photos[1])}
    again = tag()  # still read-only: listed again, but it is no new failure
    assert again.exit_code == 0, again.output
    assert "metadata still not written 1" in _said(again) and f"not written: {locked}" in again.stderr
    locked.chmod(0o644)  # as the message advises; the photo itself did not change
    fixed = tag()
    assert fixed.exit_code == 0, fixed.output
    assert "metadata written 1" in _said(fixed) and _lines(fixed.stdout) == []  # written from the index
    assert ledger_paths() == {str(photos[0]), str(photos[1])}
    keywords = subprocess.run(["exiftool", "-s3", "-XMP-dc:Subject", str(locked)], capture_output=True, text=True)
    assert line["tags"][0]["name"] in keywords.stdout
    last = _said(tag())
    assert "metadata written 0," in last and "not written" not in last  # nothing pending


def test_a_run_held_off_by_another_says_so_in_one_line(model_files, tmp_path):
    weights, labels = model_files
    home = tmp_path / "home"
    _photos(tmp_path / "lib", 2)
    assert _tag(model_files, str(tmp_path / "lib"), "--no-write", home=home).exit_code == 0  # the index exists
    _photos(tmp_path / "more", 1)
    holder = sqlite3.connect(home / "index.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another run, mid-batch
    try:
        res = _run_cli(["tag", str(tmp_path / "more"), "--weights", str(weights), "--labels", str(labels),
                        "--workers", "0", "-q"], {"RAMCLI_HOME": str(home), "RAMCLI_INDEX_TIMEOUT": "1"},
                       timeout=600)
    finally:
        holder.execute("ROLLBACK")
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "busy (another ramcli process is writing); waiting up to 1 s" in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("error: the index")
    assert "stayed locked by another process" in " ".join(res.stderr.split())
