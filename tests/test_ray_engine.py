"""`ramcli engine clean --ray` on a local Ray cluster: the shards and report of a local clean,
a killed actor, a detector that cannot load."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch

import test_engine
from ckpt_factory import make_official_checkpoint
from ramcli.models import load_any
from ramcli.models.labels import LabelSet
from ramcli_train import engine_clean, ray_engine
from ramcli_train.detector import ModelCropEmbedder
from ramcli_train.engine_shards import read_samples
from ramcli_train.label_system import write_label_files
from ramcli_train.synth import ALL_TAGS, write_shards

TESTS = Path(__file__).resolve().parent


class SlowColourDetector(test_engine.ColourDetector):
    """The engine tests' detector, slowed down so that an actor is killed while it works."""

    def __init__(self, device: str = "cpu"):
        self.device = device

    def detect(self, image, phrases):
        time.sleep(0.1)
        return super().detect(image, phrases)


@pytest.fixture(scope="module")
def cluster():
    import ray

    # the actors import the tests' detectors from the tests folder
    path = os.pathsep.join([str(TESTS), str(TESTS.parent), *filter(None, [os.environ.get("PYTHONPATH")])])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": path}})
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """4 shards, and the reference: a local clean (one thread, as each CPU actor computes)."""
    root = tmp_path_factory.mktemp("engine")
    write_shards(root / "s", 40, shards=4, seed=5, size=64)
    labels = root / "labels"
    write_label_files(labels, LabelSet(ALL_TAGS, ALL_TAGS, (0.65,) * len(ALL_TAGS)))
    weights = make_official_checkpoint(root / "ram.pth", "ram_tiny", num_classes=len(ALL_TAGS))
    model = load_any(weights, labels_dir=labels)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        report = engine_clean.clean(model, [str(root / "s" / "train")], root / "local", test_engine.ColourDetector(),
                              ModelCropEmbedder(model), **OPTIONS)
    finally:
        torch.set_num_threads(threads)
    assert report["removed"] > 0 and len(list((root / "local").glob("*.tar"))) == 4
    return root, weights, labels, report


OPTIONS = dict(outlier_fraction=0.25, clusters=2, device="cpu", batch_size=4)


def _same_shards(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.glob("*.tar"))
    assert names == sorted(p.name for p in b.glob("*.tar"))
    for name in names:
        assert list(read_samples(str(a / name))) == list(read_samples(str(b / name))), name


def _actor_pids(name: bytes) -> list[int]:
    """This process's Ray actors whose process title names `name`."""
    pids = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            if name in Path(f"/proc/{entry}/cmdline").read_bytes() and _descends(int(entry)):
                pids.append(int(entry))
        except OSError:
            continue
    return pids


def _descends(pid: int) -> bool:
    while pid > 1:
        pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        if pid == os.getpid():
            return True
    return False


@pytest.mark.slow
def test_clean_on_ray_writes_the_shards_and_report_of_a_local_clean(cluster, setup, tmp_path):
    root, weights, labels, local = setup
    remote = ray_engine.clean(load_any(weights, labels_dir=labels), [str(root / "s" / "train")], tmp_path / "ray",
                              lambda device: test_engine.ColourDetector(), **OPTIONS)
    assert remote == local
    _same_shards(root / "local", tmp_path / "ray")
    assert (tmp_path / "ray" / "report.json").read_text() == (root / "local" / "report.json").read_text()


@pytest.mark.slow
def test_a_killed_clean_actor_loses_and_doubles_nothing(cluster, setup, tmp_path):
    root, weights, labels, local = setup
    killed: list[int] = []

    def kill_the_actor_once(done: int, total: int) -> None:
        if not killed:
            for pid in _actor_pids(b"ShardCleaner"):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)

    remote = ray_engine.clean(load_any(weights, labels_dir=labels), [str(root / "s" / "train")], tmp_path / "ray",
                              SlowColourDetector, on_shard=kill_the_actor_once, **OPTIONS)
    assert killed, "no clean actor was running after the first shard"
    assert remote == local
    _same_shards(root / "local", tmp_path / "ray")


@pytest.mark.slow
def test_cli_clean_on_ray_with_a_missing_detector_is_one_line(cluster, setup, tmp_path, capsys):
    from ramcli.cli.app import main

    root, weights, labels, _ = setup
    with pytest.raises(SystemExit) as exc:
        main(["engine", "clean", "--weights", str(weights), "--labels", str(labels), "--data",
              str(root / "s" / "train"), "--out", str(tmp_path / "c"), "--detector-model",
              str(tmp_path / "no-such-model"), "--device", "cpu", "--ray"])
    err = capsys.readouterr().err
    assert exc.value.code == 1 and "Grounding DINO" in err and "Traceback" not in err
    assert not list((tmp_path / "c").glob("*.tar"))
