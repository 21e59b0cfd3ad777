"""`ramcli tag --ray` on a local Ray cluster: the records of a local run, a killed actor, a killed
driver resumed, object-storage addresses (through pyarrow's local file system: `file://`).

One Ray session serves the whole module (starting Ray takes seconds); each run gets its own
`$RAMCLI_HOME` and its own copy of the photos.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from ckpt_factory import make_labels_dir, make_official_checkpoint
from images import photo_like
from ramcli.tagging import on_ray as ray_tag
from ramcli.tagging import ray_cluster
from ramcli.cli.app import app
from ramcli.errors import UsageError
from ramcli.media.object_storage import list_objects
from ramcli.pathnames import from_text
from ramcli.tagging.options import TagOptions

N = 30
REPO = Path(__file__).resolve().parents[1]
#: Names that must survive every hop (Arrow columns, the object store, ExifTool on the driver).
NAMES = ["p00.jpg", "p01.jpg", "-leading dash.jpg", "new\nline.jpg", os.fsdecode(b"caf\xe9.jpg"),
         *(f"sub/p{i:02d}.jpg" for i in range(2, 12))]


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("model")
    return make_official_checkpoint(root / "ram_tiny.pth", "ram_tiny", num_classes=N), make_labels_dir(root, N)


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster of 2 CPUs for the module; yields its address."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("library") / "lib"
    for i, name in enumerate(NAMES):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        photo_like(160, 120, seed=i).save(path, quality=85)
    (root / "broken.jpg").write_text("not a photo")
    return root


@pytest.fixture(scope="module")
def local_run(model_files, library, tmp_path_factory):
    """The reference: a local `ramcli tag` (metadata written) of a copy of the library."""
    base = tmp_path_factory.mktemp("local")
    lib = _copy(library, base)
    res = _tag(model_files, base / "home", str(lib))
    assert res.exit_code == 1, res.output  # the broken photo
    return lib, base / "home", res


def _copy(library: Path, dest: Path) -> Path:
    return Path(shutil.copytree(library, dest / "lib"))


def _tag(model_files, home: Path, *args: str):
    weights, labels = model_files
    return CliRunner().invoke(app, ["tag", *args, "--weights", str(weights), "--labels", str(labels),
                                    "--precision", "fp32", "--batch-size", "2", "--workers", "0", "-f", "jsonl"],
                              env={"RAMCLI_HOME": str(home)}, catch_exceptions=False)


def _lines(output: str, root: str) -> list[dict]:
    """JSONL rows with paths relative to `root`."""
    rows = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    for r in rows:
        r["path"] = r["path"].removeprefix(root)
    return rows


def _close(a, b) -> bool:
    """Equal, floats to 1e-5: an actor sums in another order than a local run with more threads
    (its cores), which moves the last bits of a score."""
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= 1e-5
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    return a == b


def _index(home: Path, root: str, *, stat: bool = True) -> tuple[dict, dict]:
    """Photos (what a run records of each, `tagged_at` aside) and their tags, by relative path."""
    with sqlite3.connect(home / "index.db") as con:
        columns = "size, mtime_ns, " if stat else ""
        photos = {from_text(path).removeprefix(root): rest for path, *rest in con.execute(
            f"SELECT path, {columns}content_hash, width, height, taken_at, model_id, vocab_version, status, error,"
            " caption, link FROM photos")}
        tags: dict[str, list] = {}
        for path, name, score in con.execute(
                "SELECT p.path, t.name, pt.score FROM photo_tags pt JOIN photos p ON p.id = pt.photo_id"
                " JOIN tags t ON t.id = pt.tag_id ORDER BY p.path, t.name"):
            tags.setdefault(from_text(path).removeprefix(root), []).append((name, score))
        counts = dict(con.execute("SELECT name, photo_count FROM tags WHERE photo_count > 0"))
    return photos, tags | {"<counts>": counts}


@pytest.mark.slow
def test_a_ray_run_records_what_a_local_run_records(model_files, cluster, library, local_run, tmp_path):
    local_lib, local_home, local = local_run
    lib = _copy(library, tmp_path)
    res = _tag(model_files, tmp_path / "home", str(lib), "--ray")
    assert res.exit_code == 1, res.output
    assert _close(_lines(res.stdout, str(lib)), _lines(local.stdout, str(local_lib)))
    assert "failed: " in res.stderr and "broken.jpg: not an image (text)" in res.stderr
    assert "metadata written 15" in res.stderr and "metadata written 15" in local.stderr
    # the same rows; the files' mtimes are those of ramcli's own metadata writes, which differ
    assert _close(_index(tmp_path / "home", str(lib), stat=False), _index(local_home, str(local_lib), stat=False))
    # the same incremental rule: nothing is due again, the broken photo waits for its file to change
    again = _tag(model_files, tmp_path / "home", str(lib), "--ray")
    assert again.exit_code == 0 and _lines(again.stdout, str(lib)) == []
    assert "1 broken photo(s) skipped" in again.stderr


def _actor_pids() -> list[int]:
    """Model actors of this process's Ray cluster (children of its raylet, itself our child)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            parent = _ppid(int(entry))
        except OSError:
            continue
        if b"Scorer" in cmdline and parent and _ppid(parent) == os.getpid():
            pids.append(int(entry))
    return pids


def _ppid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


@pytest.mark.slow
def test_a_killed_actor_loses_no_photo_and_doubles_none(model_files, cluster, library, local_run, tmp_path,
                                                       capsys):
    local_lib, local_home, _ = local_run
    lib = _copy(library, tmp_path)
    killed: list[int] = []

    def kill_an_actor_once() -> bool:  # asked after each recorded batch
        if not killed:
            for pid in _actor_pids():
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
        return False

    weights, labels = model_files
    os.environ["RAMCLI_HOME"] = str(tmp_path / "home")
    try:
        options = TagOptions(paths=[lib], weights=str(weights), labels=labels, precision="fp32", batch_size=2,
                             workers=0, fmt="jsonl", quiet=True)
        failed = ray_tag.execute(options, [str(lib)], stop=kill_an_actor_once)
    finally:
        del os.environ["RAMCLI_HOME"]
    assert killed, "no model actor was running after the first batch"
    assert failed == 1  # the broken photo, nothing else
    rows = [r for r in _lines(capsys.readouterr().out, str(lib)) if r.get("status") != "broken"]
    assert len(rows) == len(NAMES) and len({r["path"] for r in rows}) == len(rows)
    assert _close(_index(tmp_path / "home", str(lib), stat=False), _index(local_home, str(local_lib), stat=False))


@pytest.mark.slow
def test_a_killed_ray_run_resumes_where_it_stopped(model_files, cluster, library, local_run, tmp_path):
    local_lib, local_home, _ = local_run
    lib = _copy(library, tmp_path)
    home = tmp_path / "home"
    weights, labels = model_files
    env = {**os.environ, "RAMCLI_HOME": str(home),
           "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    driver = subprocess.Popen(
        [sys.executable, "-m", "ramcli", "tag", str(lib), "--ray-address", cluster, "--weights", str(weights),
         "--labels", str(labels), "--precision", "fp32", "--batch-size", "1", "-f", "jsonl", "-q"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    db, recorded, deadline = home / "index.db", 0, time.time() + 300
    while time.time() < deadline and driver.poll() is None:
        try:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
                recorded = con.execute("SELECT count(*) FROM photos").fetchone()[0]
        except sqlite3.OperationalError:
            recorded = 0
        if recorded >= 2:
            break
        time.sleep(0.01)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    with sqlite3.connect(db) as con:
        done = {from_text(p) for (p,) in con.execute("SELECT path FROM photos")}
    assert 0 < len(done) < len(NAMES), "the driver was not killed mid-run"
    res = _tag(model_files, home, str(lib), "--ray-address", cluster)
    assert res.exit_code == 0, res.output  # the broken photo was recorded before the kill
    redone = {r["path"] for r in _lines(res.stdout, "")}
    assert redone and not redone & done  # only what was not recorded
    assert _close(_index(home, str(lib), stat=False), _index(local_home, str(local_lib), stat=False))


@pytest.mark.slow
def test_object_storage_addresses_are_listed_read_and_recorded_as_given(model_files, cluster, library, local_run,
                                                                       tmp_path):
    """`file://` goes through the same pyarrow file-system code as `s3://` and `gs://`."""
    local_lib, _, local = local_run
    lib = _copy(library, tmp_path)
    (lib / "notes.txt").write_text("skipped")
    (lib / ".hidden.jpg").write_bytes((lib / "p00.jpg").read_bytes())
    (lib / "p00.xmp").write_text("<x/>")
    uri = f"file://{lib}"
    with pytest.raises(UsageError, match="not UTF-8"):
        _tag(model_files, tmp_path / "home", uri, "--ray", "--no-write")
    (lib / NAMES[4]).unlink()  # object keys are UTF-8: the listing refuses a local name that is not
    with pytest.raises(UsageError, match="add --no-write"):
        _tag(model_files, tmp_path / "home", uri, "--ray")
    res = _tag(model_files, tmp_path / "home", uri, "--ray", "--no-write", "--exclude", "sub/p1*")
    assert res.exit_code == 1, res.output
    rows = {r["path"]: r for r in _lines(res.stdout, uri)}
    # listing reads no object, so the broken photo is found by its name and fails to decode
    assert rows.pop("/broken.jpg")["error"] == "not an image (text)"
    reference = {r["path"]: r for r in _lines(local.stdout, str(local_lib))
                 if not r["path"].startswith("/sub/p1") and r["path"] not in ("/caf\\xe9.jpg", "/broken.jpg")}
    assert rows.keys() == reference.keys()
    for path, row in rows.items():
        assert _close(row["tags"], reference[path]["tags"]), path
    photos, _ = _index(tmp_path / "home", "")
    assert all(p.startswith(uri + "/") for p in photos)
    assert photos[f"{uri}/p00.jpg"][0] == (lib / "p00.jpg").stat().st_size
    again = _tag(model_files, tmp_path / "home", uri, "--ray", "--no-write", "--exclude", "sub/p1*")
    assert [r["path"] for r in _lines(again.stdout, uri)] == ["/broken.jpg"]


@pytest.mark.slow
def test_actors_leave_a_cpu_for_decoding(cluster):
    import ray

    assert ray_cluster.plan(ray, "auto", None, None) == ray_cluster.Cluster(1, 1, 0, "cpu")  # 2 CPUs: 1 model, 1 decode
    with pytest.raises(UsageError, match="leave at least one for decoding"):
        ray_cluster.plan(ray, "cpu", 2, 1)
    with pytest.raises(UsageError, match="no node of the Ray cluster has that many CPUs"):
        ray_cluster.plan(ray, "cpu", 1, 4)
    with pytest.raises(UsageError, match="has no GPU"):
        ray_cluster.plan(ray, "cuda", None, None)


def test_list_objects_follows_the_walks_rules(tmp_path):
    for name in ("a.jpg", "b.JPEG", "c.cr2", "d.mp4", "e.txt", "a.xmp", ".hidden.jpg", "@eaDir/x.jpg",
                 "skip/f.jpg", "keep/g.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x" * 3)
    photos, counts = list_objects(f"file://{tmp_path}", exclude=["skip"])
    assert [p.path for p in photos] == [f"file://{tmp_path}/{n}" for n in ("a.jpg", "b.JPEG", "c.cr2", "keep/g.png")]
    assert [p.kind for p in photos] == ["image", "image", "raw", "image"] and photos[0].size == 3
    assert counts == {"image": 3, "raw": 1, "video": 1, "unsupported": 1}
    with pytest.raises(UsageError, match="no such object or folder"):
        list_objects(f"file://{tmp_path}/missing")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.binary(min_size=1, max_size=40).filter(lambda b: b"/" not in b and b"\x00" not in b
                                                      and b not in (b".", b"..")))
def test_decoded_rows_keep_any_file_name_through_arrow(tmp_path, name):
    """A decode task's rows cross Arrow (Ray's blocks): every name comes back byte for byte."""
    path = tmp_path / os.fsdecode(name)
    photo_like(48, 32, seed=1).save(path, format="JPEG")
    rows = ray_tag._decode({"path": [os.fsencode(path)]}, size=16, draft=False, interpolation="bilinear")
    table = pa.table({k: list(v) if k != "pixels" else [p.tobytes() for p in v] for k, v in rows.items()})
    assert [os.fsdecode(p) for p in table.column("path").to_pylist()] == [str(path)]
    assert table.column("ok").to_pylist() == [True] and rows["pixels"].shape == (1, 3, 16, 16)


def test_without_ray_the_flag_says_what_to_install(model_files, tmp_path, monkeypatch, capsys):
    from ramcli.cli.app import main

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as if it were not installed
    monkeypatch.setenv("RAMCLI_HOME", str(tmp_path / "home"))
    with pytest.raises(SystemExit) as exited:
        main(["tag", str(tmp_path), "--ray", "--weights", str(model_files[0]), "--labels", str(model_files[1])])
    assert exited.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == ["error: --ray needs Ray: pip install 'ramcli[ray]'"]


def test_an_address_that_does_not_answer_is_one_line_at_once():
    import socket

    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # bound, not listening: connections are refused
        with pytest.raises(UsageError, match=f"cannot reach the Ray cluster at 127.0.0.1:{port}: "):
            ray_cluster._reachable(f"127.0.0.1:{port}")
        with pytest.raises(UsageError, match="cannot reach"):
            ray_cluster._reachable(f"ray://127.0.0.1:{port}")
    ray_cluster._reachable("auto")  # found by Ray itself


def test_the_command_line_does_not_import_ray():
    code = "import sys; from ramcli.cli.app import app; print(sorted(m for m in sys.modules if m.split('.')[0] == 'ray'))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr


def test_the_index_keeps_object_addresses_as_given(tmp_path):
    from ramcli.library.index import Index
    from ramcli.tagging.records import PhotoResult, TagScore

    uri = "s3://bucket/a b/photo.jpg"
    with Index.open(tmp_path / "index.db") as index:
        index.record_batch([PhotoResult(uri, "tagged", 10, 20, "hash", model_id="m", vocab_version="v",
                                        tags=[TagScore("dog", "狗", 0.9)])])
        assert index.lookup(uri).path == uri and not index.needs_tagging(uri, 10, 20, "m", "v")
        assert index.find_moved("hash") is None  # not "gone": the local file system cannot tell
        assert index.prune() == [] and index.lookup(uri) is not None


@pytest.mark.slow
def test_engine_generate_on_ray_writes_the_shards_of_a_local_run(cluster, tmp_path):
    from ramcli.models.labels import LabelSet
    from ramcli.models import load_any
    from ramcli_train import engine_generate, ray_engine
    from ramcli_train.engine_shards import read_samples
    from ramcli_train.label_system import write_label_files
    from ramcli_train.synth import ALL_TAGS, write_shards

    write_shards(tmp_path / "s", 18, shards=3, seed=5, size=64)
    labels = tmp_path / "labels"
    write_label_files(labels, LabelSet(ALL_TAGS, ALL_TAGS, (0.65,) * len(ALL_TAGS)))
    weights = make_official_checkpoint(tmp_path / "ram.pth", "ram_tiny", num_classes=len(ALL_TAGS))
    data = [str(tmp_path / "s" / "train")]
    local = engine_generate.generate(load_any(weights, labels_dir=labels), data, tmp_path / "local", device="cpu")
    remote = ray_engine.generate(load_any(weights, labels_dir=labels), data, tmp_path / "ray", device="cpu")
    assert remote == local and local["generated"] > 0
    shards = sorted(p.name for p in (tmp_path / "local").glob("*.tar"))
    assert len(shards) == 3 and shards == sorted(p.name for p in (tmp_path / "ray").glob("*.tar"))
    for name in shards:
        assert list(read_samples(str(tmp_path / "ray" / name))) == list(read_samples(str(tmp_path / "local" / name)))


@pytest.mark.slow
def test_eval_on_ray_scores_what_a_local_eval_scores(model_files, cluster, tmp_path):
    import numpy as np

    from ramcli.eval.scores import ScoreCache
    from ramcli.models.labels import read_label_dir

    weights, labels = model_files
    names = read_label_dir(labels, "ram").names
    (tmp_path / "imgs").mkdir()
    lines = []
    for i in range(7):
        photo_like(64, 48, seed=i).save(tmp_path / "imgs" / f"im{i}.jpg")
        lines.append(f"im{i},{names[i % 5]},{names[7]}")
    (tmp_path / "imgs" / "broken.jpg").write_bytes(b"not a jpeg")
    lines += ["broken," + names[1], "absent," + names[2]]
    (tmp_path / "annotations.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "taglist.txt").write_text("\n".join(names[:8]) + "\n")

    def evaluate(out: str, *extra: str) -> ScoreCache:
        done = CliRunner().invoke(app, ["eval", "--annotations", str(tmp_path / "annotations.txt"), "--taglist",
                                        str(tmp_path / "taglist.txt"), "--images", str(tmp_path / "imgs"),
                                        "--weights", str(weights), "--labels", str(labels), "--batch-size", "3",
                                        "--device", "cpu", "--out", str(tmp_path / out), *extra],
                                  catch_exceptions=False)
        assert done.exit_code == 0, done.output
        return ScoreCache.load(tmp_path / out / "scores.npz")

    local, remote = evaluate("local"), evaluate("ray", "--ray")
    assert remote.image_ids.tolist() == local.image_ids.tolist() and len(local.image_ids) == 7
    assert np.allclose(remote.scores, local.scores, atol=1e-5)
    assert (tmp_path / "ray" / "failures.txt").read_text() == (tmp_path / "local" / "failures.txt").read_text()
